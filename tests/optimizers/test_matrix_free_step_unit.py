"""``MatrixFreeOptimizer.step``'s entry checks and counters, with the minimal GD subclass of
test_matrix_free_base.py: each misuse's full message, skips and rejections counted one by one, a
closure that returns None skipped as a non-finite loss, and a parameter without a gradient stepping as
if its gradient were zero."""

from __future__ import annotations

import copy


import pytest
import torch
from torch import nn

from optimizers.matrix_free import BatchClosure
from tests.optimizers.closures import loss_closure
from tests.optimizers.test_matrix_free_base import GD, X, Y, _model, _mse
from tests.optimizers.messages import exact as _exact

F64 = torch.float64



def test_misuse_messages_in_full():
    model = _model()
    opt = GD(model)
    with pytest.raises(RuntimeError, match=_exact(
            "GD needs step(closure): the closure must zero the gradients, run forward and backward on the batch "
            "and return loss_fn(model(inputs), targets)")):
        opt.step()
    with pytest.raises(RuntimeError, match=_exact(
            "GD needs the batch targets for its curvature products: call opt.step(closure, targets=y) (or pass a "
            "closure with a `targets` attribute, e.g. optimizers.matrix_free.BatchClosure), or build it with "
            "targets_are_inputs=True for an autoencoder")):
        opt.step(loss_closure(opt, model, _mse, X, Y))

    def no_model_call():
        opt.zero_grad()
        return torch.tensor(1.0, dtype=F64)

    with pytest.raises(RuntimeError, match=_exact(
            "the closure did not call the model with gradients enabled; no batch was recorded")):
        opt.step(no_model_call, targets=Y)


def test_skips_and_rejections_are_counted_one_by_one():
    model = _model()
    opt = GD(model)
    nan_loss = BatchClosure(loss_closure(opt, model, lambda out, y: _mse(out, y) * float("nan"), X, Y), Y)
    for _ in range(2):
        opt.step(nan_loss)
    assert opt.counters["skipped_steps"] == 2
    assert opt.counters["skip_reasons"] == {"non-finite loss": 2}
    rejecting = GD(_model(), reject=True)
    for _ in range(2):
        rejecting.step(BatchClosure(loss_closure(rejecting, rejecting.model, _mse, X, Y), Y))
    assert rejecting.counters["rejected_steps"] == 2


def test_a_closure_returning_none_is_skipped_as_a_non_finite_loss():
    model = _model()
    opt = GD(model)

    def closure():
        opt.zero_grad()
        _mse(model(X), Y).backward()
        return None

    assert opt.step(closure, targets=Y) is None
    assert opt.counters["skip_reasons"] == {"non-finite loss": 1}


def test_a_parameter_without_a_gradient_steps_as_with_a_zero_gradient():
    """y = w·x + b with the bias detached in the loss: its grad stays None and the GD step leaves it."""
    model = _model()
    opt = GD(model)

    def closure():
        opt.zero_grad()
        model(X)  # the recorded batch
        loss = _mse(nn.functional.linear(X, model.weight) + model.bias.detach(), Y)
        loss.backward()
        return loss

    b0 = model.bias.detach().clone()
    opt.step(closure, targets=Y)
    assert model.bias.grad is None and torch.equal(model.bias.detach(), b0)
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[1.0 - 0.5 * 6.0, -1.0 - 0.5 * 3.0]], dtype=F64))


class _TwoInputs(nn.Module):
    """model(x, z, *, shift) = W₂ tanh(W₁ x + V z) + shift: two positional inputs and a keyword one."""

    def __init__(self):
        super().__init__()
        self.first, self.side, self.out = nn.Linear(2, 3), nn.Linear(2, 3, bias=False), nn.Linear(3, 1)

    def forward(self, x, z, *, shift=0.0):
        return self.out(torch.tanh(self.first(x) + self.side(z))) + shift


class _Packed(nn.Module):
    """The same model called with one tensor [x | z] (shift fixed): the single-input reference."""

    def __init__(self, inner, shift):
        super().__init__()
        self.inner, self.shift = inner, shift

    def forward(self, xz):
        return self.inner(xz[:, :2], xz[:, 2:], shift=self.shift)


def _two_input_batch():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64),
            torch.randn(5, 1, generator=g, dtype=F64))


def test_a_model_with_several_and_keyword_inputs_is_replayed_with_all_of_them():
    """The recorded call is model(x, z, shift=…): the functional loss at θ is the closure's loss, and a
    Hessian-free step equals the step on the same network called with one packed tensor."""
    from optimizers.hessian_free import HessianFree

    x, z, y = _two_input_batch()
    torch.manual_seed(0)
    model = _TwoInputs().to(F64)
    reference = _Packed(copy.deepcopy(model), 0.25)
    probing = GD(copy.deepcopy(model), probe=True)

    def probe_closure():
        probing.zero_grad()
        loss = _mse(probing.model(x, z, shift=0.25), y)
        loss.backward()
        return loss

    loss = probing.step(probe_closure, targets=y)
    assert float(probing.probes[0][0]) == float(loss.detach())

    two, packed = HessianFree(model, _mse, lr=1.0), HessianFree(reference, _mse, lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]

    def two_closure():
        two.zero_grad()
        out = _mse(model(x, z, shift=0.25), y)
        out.backward()
        return out

    two.step(two_closure, targets=y)
    packed.step(loss_closure(packed, reference, _mse, torch.cat([x, z], dim=1), y), targets=y)
    assert two.last_step.accepted and packed.last_step.accepted
    for (name, p), (_, q) in zip(model.named_parameters(), reference.inner.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14, msg=name)
    assert all(not torch.equal(p.detach(), p0) for p, p0 in zip(model.parameters(), before))


def test_two_positional_inputs_without_keywords_are_both_replayed():
    x, z, y = _two_input_batch()
    torch.manual_seed(0)
    opt = GD(_TwoInputs().to(F64), probe=True)

    def closure():
        opt.zero_grad()
        loss = _mse(opt.model(x, z), y)
        loss.backward()
        return loss

    loss = opt.step(closure, targets=y)
    assert float(opt.probes[0][0]) == float(loss.detach())


def test_a_single_tensor_input_stays_a_tensor_for_the_per_example_preconditioner():
    """Martens' preconditioner needs per-example gradients, which take a single tensor batch: a model called
    as model(X) must reach it as X itself (and a step with it equals the identity-preconditioned one's
    bookkeeping: per_example_gradients is the batch size)."""
    from optimizers.hessian_free import HessianFree

    x, _, y = _two_input_batch()
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)
    opt = HessianFree(model, _mse, preconditioner="martens")
    seen = []
    opt.register_step_hook(lambda info: seen.append(info.details["per_example_gradients"]))
    opt.step(loss_closure(opt, model, _mse, x, y), targets=y)
    assert seen == [5]


def test_a_closure_that_calls_the_model_twice_is_rejected_before_anything_changes():
    model = _model()
    opt = GD(model)
    w0 = model.weight.detach().clone()

    def twice():
        opt.zero_grad()
        loss = _mse(model(X), Y) + _mse(model(2 * X), Y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=_exact(
            "the closure called the model 2 times with gradients enabled; GD measures curvature on one batch, so "
            "the closure must call it exactly once (concatenate the batches, or run the extra calls under "
            "torch.no_grad())")):
        opt.step(twice, targets=Y)
    assert torch.equal(model.weight.detach(), w0) and opt.steps == 0

    def with_a_monitor_call():
        with torch.no_grad():
            model(2 * X)  # not recorded
        return loss_closure(opt, model, _mse, X, Y)()

    opt.step(with_a_monitor_call, targets=Y)
    assert opt.steps == 1


def test_targets_are_inputs_needs_a_positional_input():
    class KeywordOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2).to(F64)

        def forward(self, *, x):
            return self.lin(x)

    model = KeywordOnly()
    opt = GD(model, targets_are_inputs=True)

    def closure():
        opt.zero_grad()
        loss = _mse(model(x=X), X)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=_exact(
            "targets_are_inputs=True needs the model's first positional input, but the model was called with "
            "keyword arguments only")):
        opt.step(closure)
