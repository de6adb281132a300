"""``MatrixFreeOptimizer.step``'s entry checks and counters, with the minimal GD subclass of
test_matrix_free_base.py: each misuse's full message, skips and rejections counted one by one, a
closure that returns None skipped as a non-finite loss, and a parameter without a gradient stepping as
if its gradient were zero."""

from __future__ import annotations


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
