"""The shared driver MatrixFreeOptimizer / StepContext / BatchClosure of optimizers.matrix_free, exercised
through a minimal subclass (a plain gradient step) whose every number is worked out by hand below."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from curvature.damping import Tikhonov
from optimizers.matrix_free import BatchClosure, MatrixFreeOptimizer
from tests.optimizers.closures import loss_closure

F64 = torch.float64


def _mse(out, y):
    return ((out - y) ** 2).sum()


class GD(MatrixFreeOptimizer):
    """θ ← θ − lr·g; records the StepContext; optionally calls objective/counted/expose or rejects."""

    def __init__(self, model, loss_fn=_mse, *, lr=0.5, reject=False, probe=False, **kw):
        super().__init__(model, loss_fn, lr=lr, damping=Tikhonov(0.25), **kw)
        self.reject, self.probe, self.loaded_extra = reject, probe, None
        self.probes: list = []

    def _propose(self, ctx):
        if self.probe:
            product = ctx.counted(lambda v: 2.0 * v)
            v = torch.tensor([1.0, 2.0, 4.0], dtype=ctx.theta.dtype)
            self.probes.append((ctx.objective(ctx.theta), product(v).clone(), product(v).clone()))
            ctx.expose(lambda v: 2.0 * v, 0.25)
        if self.reject:
            return None
        return ctx.theta - ctx.lr * ctx.grad

    def _extra_state(self):
        return {"marker": [7, 8]}

    def _load_extra_state(self, state):
        self.loaded_extra = state


def _model(bias=True):
    # y_hat = w·x + b with w = (1, -1), b = 0.5
    m = nn.Linear(2, 1, bias=bias).to(F64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, -1.0]], dtype=F64))
        if bias:
            m.bias.fill_(0.5)
    return m


X = torch.tensor([[2.0, 1.0]], dtype=F64)  # y_hat = 2 - 1 + 0.5 = 1.5
Y = torch.tensor([[0.0]], dtype=F64)       # f = 1.5² = 2.25, ∇_w f = 2·1.5·x = (6, 3), ∇_b f = 3


def _closure(opt, model, x=X, y=Y):
    return loss_closure(opt, model, _mse, x, y)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_construction_messages_and_defaults():
    with pytest.raises(TypeError, match="^" + re.escape("model must be an nn.Module, got str") + "$"):
        GD("model")
    with pytest.raises(TypeError, match="^" + re.escape("loss_fn must be callable as loss_fn(output, targets)") + "$"):
        GD(_model(), "mse")
    with pytest.raises(TypeError, match="^" + re.escape("damping must be a DampingPolicy, got float") + "$"):
        MatrixFreeOptimizer(_model(), _mse, lr=1.0, damping=0.1)
    with pytest.raises(ValueError, match=r"^lr must be a finite number in \(0.0, inf\), got 0.0$"):
        GD(_model(), lr=0.0)
    with pytest.raises(ValueError, match=r"^weight_decay must be a finite number in \[0.0, inf\), got -1.0$"):
        GD(_model(), weight_decay=-1.0)
    frozen = _model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="^the model has no trainable parameters$"):
        GD(frozen)
    mixed = nn.Sequential(nn.Linear(2, 2).to(F64), nn.Linear(2, 1))  # float64 and float32 on one device
    with pytest.raises(ValueError, match="^all trainable parameters must share one dtype and one device$"):
        GD(mixed)
    opt = GD(_model())
    assert opt.weight_decay == 0.0 and opt.targets_are_inputs is False
    assert opt.counters == {"steps": 0, "skipped_steps": 0, "reverted_steps": 0, "rejected_steps": 0,
                            "products": 0, "loss_evals": 0, "skip_reasons": {}}
    assert opt.last_step is None and opt.skipped_steps == 0
    assert opt.describe() == "GD: whole model (3 parameters) preconditioned matrix-free"
    with pytest.raises(RuntimeError, match="needs the batch targets"):  # targets_are_inputs defaults to False
        opt.step(_closure(opt, opt.model))


def test_one_step_by_hand_with_weight_decay_objective_and_counted_products():
    model = _model()
    opt = GD(model, probe=True, weight_decay=0.1)
    seen = []
    opt.register_step_hook(lambda info: seen.append((info.operator, info.operator_shift.clone())))
    loss = opt.step(_closure(opt, model), targets=Y)
    assert float(loss.detach()) == 2.25  # the closure's loss, without the L2 term
    # θ = (1, -1, 0.5), |θ|² = 2.25: F = 2.25 + 0.05·2.25 = 2.3625, ∇F = (6, 3, 3) + 0.1·θ = (6.1, 2.9, 3.05)
    info = opt.last_step
    assert info.loss == pytest.approx(2.3625, abs=1e-12) and info.lr == 0.5 and info.damping == 0.25
    assert torch.allclose(info.grad, torch.tensor([6.1, 2.9, 3.05], dtype=F64), atol=1e-12)
    expected = torch.tensor([1 - 3.05, -1 - 1.45, 0.5 - 1.525], dtype=F64)
    assert torch.allclose(_flat(model), expected, atol=1e-12)
    assert torch.allclose(info.update, expected - torch.tensor([1.0, -1.0, 0.5], dtype=F64), atol=1e-12)
    assert info.accepted and not info.skipped and info.step == 0
    # ctx.objective(θ) = F(θ) on the recorded batch; counted(v ↦ 2v)(v) = (2 + τ)v = 2.1·(1, 2, 4)
    objective, p1, p2 = opt.probes[0]
    assert objective == pytest.approx(2.3625, abs=1e-12)
    assert torch.allclose(p1, torch.tensor([2.1, 4.2, 8.4], dtype=F64), atol=1e-12) and torch.equal(p1, p2)
    assert info.products == 2 and info.loss_evals == 1
    # the exposed system: shift = λ + τ = 0.35 everywhere; the operator reaches the hooks, then is dropped
    operator, shift = seen[0]
    assert operator is not None and torch.allclose(shift, torch.full((3,), 0.35, dtype=F64), atol=1e-12)
    assert info.operator is None
    # a second step: the counters accumulate over the steps (2 products, 1 loss evaluation each)
    opt.step(_closure(opt, model), targets=Y)
    assert opt.counters["products"] == 4 and opt.counters["loss_evals"] == 2 and opt.counters["steps"] == 2
    assert opt.last_step.step == 1


def test_counted_without_weight_decay_and_objective_is_the_batch_loss():
    model = _model()
    opt = GD(model, probe=True)
    opt.step(_closure(opt, model), targets=Y)
    objective, p1, _ = opt.probes[0]
    assert objective == 2.25 and torch.equal(p1, torch.tensor([2.0, 4.0, 8.0], dtype=F64))
    assert torch.equal(opt.last_step.grad, torch.tensor([6.0, 3.0, 3.0], dtype=F64))


def test_rejected_step_keeps_parameters_and_counts():
    model = _model()
    opt = GD(model, reject=True)
    opt.step(_closure(opt, model), targets=Y)
    assert torch.equal(_flat(model), torch.tensor([1.0, -1.0, 0.5], dtype=F64))
    info = opt.last_step
    assert not info.accepted and info.step_scale == 0.0 and info.loss_after == 2.25 and info.update is None
    assert opt.counters["rejected_steps"] == 1 and opt.counters["steps"] == 1


def test_batch_closure_and_targets_are_inputs():
    with pytest.raises(TypeError, match="^closure must be callable$"):
        BatchClosure(None, Y)
    model = _model()
    opt = GD(model)
    inner = _closure(opt, model)
    bc = BatchClosure(inner, Y)
    assert bc.closure is inner and bc.targets is Y
    assert float(opt.step(bc).detach()) == 2.25
    assert torch.allclose(_flat(model), torch.tensor([1 - 3.0, -1 - 1.5, 0.5 - 1.5], dtype=F64), atol=1e-12)
    # autoencoder: the targets are the first input; a 1-in/1-out linear map w·x, w = 2, x = 3: f = (6-3)² = 9,
    # ∇f = 2·3·3 = 18, w ← 2 − 0.5·18 = −7; the objective is evaluated with the same targets: F(w=2) = 9
    ae = nn.Linear(1, 1, bias=False).to(F64)
    with torch.no_grad():
        ae.weight.fill_(2.0)
    opt = GD(ae, targets_are_inputs=True, probe=True)
    x = torch.tensor([[3.0]], dtype=F64)
    opt.step(_closure(opt, ae, x, x))
    assert opt.probes[0][0] == 9.0 and float(ae.weight.detach()) == -7.0


def test_only_grad_enabled_forwards_inside_the_closure_are_recorded():
    model = _model()
    opt = GD(model, probe=True)
    other = torch.tensor([[10.0, 10.0]], dtype=F64)

    def closure():
        opt.zero_grad()
        loss = _mse(model(X), Y)
        loss.backward()
        with torch.no_grad():
            model(other)  # e.g. logging: must not become the step's batch
        return loss

    opt.step(closure, targets=Y)
    assert opt.probes[0][0] == 2.25  # F on X, not on `other` (which gives (10 - 10 + 0.5)² = 0.25)


def test_state_dict_format_extra_state_and_messages():
    model = _model()
    opt = GD(model, weight_decay=0.1)
    opt.step(_closure(opt, model), targets=Y)
    opt._set_vector("v", torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    sd = opt.state_dict()
    assert sd["matrix_free"]["version"] == 1 and sd["matrix_free"]["method"] == "GD"
    assert sd["matrix_free"]["extra"] == {"marker": [7, 8]}
    opt2 = GD(_model(), weight_decay=0.1)
    opt2.load_state_dict(sd)
    assert opt2.loaded_extra == {"marker": [7, 8]} and opt2.steps == 1
    assert torch.equal(opt2._get_vector("v"), torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    # never alias the caller's checkpoint: changing the loaded state in place leaves `sd` as it was
    for p in opt2.param_groups[0]["params"]:
        opt2.state[p]["v"].add_(100.0)
    p0 = sd["param_groups"][0]["params"][0]
    assert torch.equal(sd["state"][p0]["v"], torch.tensor([[1.0, 2.0]], dtype=F64))
    with pytest.raises(ValueError, match="^" + re.escape(
            "not a matrix-free optimizer state_dict (missing the 'matrix_free' entry)") + "$"):
        opt2.load_state_dict({"state": {}, "param_groups": sd["param_groups"]})

    class Other(GD):
        pass

    with pytest.raises(ValueError, match="^state_dict is from GD, not Other$"):
        Other(_model()).load_state_dict(sd)
