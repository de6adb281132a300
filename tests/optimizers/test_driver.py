"""The generic driver: configuration errors, assignment and fallback, skip-on-non-finite, schedules,
frequencies, orientation of the applied step, and bit-identical checkpoint/resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from curvature.adapters import UnsupportedLayerError
from curvature.blocks import vec_c
from curvature.damping import AdaptiveLM, FactoredPi
from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer, diagonal_block, kbfgsl_block, kfac_block

D = torch.float64


def make_problem(device, dtype=D, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype).to(device)
    y = torch.sin(x @ torch.randn(6, 3, generator=g, dtype=dtype).to(device))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype).to(device)
    return model, x, y


def closure_for(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1e-3}, "weight_decay"),
        ({"inverse_update_freq": 0}, "inverse_update_freq"),
        ({"curvature_update_freq": 1.5}, "curvature_update_freq"),
        ({"fallback": "rmsprop"}, "fallback"),
        ({"loss_reduction": "avg"}, "loss_reduction"),
        ({"fisher": "mc"}, "likelihood"),
        ({"kl_clip": 0.0}, "kl_clip"),
        ({"damping": -1.0}, "damping"),
        ({"inverse_method": "qr"}, "inverse_method"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_parameter(kwargs, name):
    model, _, _ = make_problem("cpu")
    base = {"lr": 0.1}
    base.update(kwargs)
    with pytest.raises(ValueError, match=name):
        KFAC(model, **base)


def test_kbfgs_bad_config_values():
    model, _, _ = make_problem("cpu")
    with pytest.raises(ValueError, match="memory"):
        KBFGSL(model, memory=0)
    with pytest.raises(ValueError, match="damping"):
        KBFGS(model, damping=0.0)
    with pytest.raises(ValueError, match="mu1"):
        KBFGS(model, mu1=1.5)


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.norm = nn.PReLU(4)  # a layer type without an adapter
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.body(x))))


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_unsupported_layers_fall_back_and_are_reported(device, rule):
    torch.manual_seed(0)
    model = WithNorm().to(D).to(device)
    opt = KFAC(model, lr=0.05, damping=0.1, fallback=rule)
    table = opt.describe()
    assert "norm" in table and f"fallback ({rule}, lr=" in table and "kfac" in table
    x = torch.randn(16, 5, dtype=D, device=device)
    before = model.norm.weight.detach().clone()
    opt.step(lambda: (opt.zero_grad(), model(x).pow(2).sum(1).mean().backward())[-1] or torch.tensor(0.0))
    assert not torch.equal(model.norm.weight, before), "the fallback rule must update the PReLU parameters"
    state = opt.state[model.norm.weight]
    assert ("momentum" in state) if rule == "sgd" else ("exp_avg_sq" in state)


def test_fallback_error_option_raises():
    with pytest.raises(UnsupportedLayerError, match="norm"):
        KFAC(WithNorm(), lr=0.1, fallback="error")


def test_mixed_composition_by_type_and_name(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 8), nn.Tanh(),
                          nn.Linear(8, 3)).to(D).to(device)
    opt = CurvatureOptimizer(model, lr=0.05, damping=0.3,
                             blocks={nn.Linear: kbfgsl_block(memory=5), nn.Conv2d: kfac_block(), "5": diagonal_block()})
    kinds = {name: b.kind for name, b in opt.blocks.items()}
    assert kinds == {"0": "kfac", "3": "kbfgsl", "5": "diagonal"}
    assert opt.require_closure
    x = torch.randn(12, 1, 6, 6, dtype=D, device=device)
    y = torch.randn(12, 3, dtype=D, device=device)
    losses = []
    for _ in range(15):
        losses.append(float(opt.step(closure_for(opt, model, x, y)).detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="does not have"):
        CurvatureOptimizer(model, lr=0.1, blocks={"nope": kfac_block()})


def test_shared_parameters_fall_back_once_and_error_mode_raises():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh())
    model.add_module("again", nn.Linear(3, 3))
    model.again.weight = lin.weight
    opt = KFAC(model, lr=0.1)
    assert set(opt.fallback_modules) == {"0", "again"} and not opt.slots
    table = opt.describe()
    assert table.count("partial tie between ['0', 'again']") == 2  # weight shared, biases separate
    counted = sum(int(line.split()[-1]) for line in table.splitlines()[1:])
    assert counted == 9 + 3 + 3, "the tied weight must be counted once"
    with pytest.raises(UnsupportedLayerError, match="tied"):
        KFAC(model, lr=0.1, fallback="error")


def _state_snapshot(opt, model):
    return copy.deepcopy({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                          "opt": opt.state_dict()})


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("make", [lambda m: KFAC(m, lr=0.1, damping=0.3), lambda m: KBFGS(m, lr=0.1, damping=0.3),
                                  lambda m: KBFGSL(m, lr=0.1, damping=0.3)], ids=["kfac", "kbfgs", "kbfgsl"])
@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_non_finite_step_is_skipped_and_nothing_changes(device, make, poison):
    model, x, y = make_problem(device)
    opt = make(model)
    for _ in range(3):
        opt.step(closure_for(opt, model, x, y))
    before = _state_snapshot(opt, model)

    def bad_closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        if poison == "loss":
            loss = loss * float("nan")
        loss.backward()
        if poison == "grad":
            model[0].weight.grad[0, 0] = float("inf")
        return loss

    opt.step(bad_closure)
    after = _state_snapshot(opt, model)
    assert opt.skipped_steps == 1
    reason = "non-finite loss" if poison == "loss" else "non-finite gradient"
    assert opt.counters["skip_reasons"] == {reason: 1}
    before["opt"]["secondorder"]["counters"] = after["opt"]["secondorder"]["counters"]
    _assert_same(before, after)
    opt.step(closure_for(opt, model, x, y))  # training continues normally
    assert opt.steps == 4


def test_kbfgs_without_closure_is_a_clear_error():
    model, x, y = make_problem("cpu")
    opt = KBFGS(model)
    (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_step_without_forward_backward_is_a_clear_error():
    model, _, _ = make_problem("cpu")
    opt = KFAC(model, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="no statistics were captured"):
        opt.step()


def test_kfac_without_closure_uses_the_callers_pass(device):
    model, x, y = make_problem(device)
    twin = copy.deepcopy(model)
    opt_a = KFAC(model, lr=0.1, damping=0.3)
    opt_b = KFAC(twin, lr=0.1, damping=0.3)
    for _ in range(4):
        opt_a.step(closure_for(opt_a, model, x, y))
        opt_b.zero_grad()
        (0.5 * ((twin(x) - y) ** 2).sum(1).mean()).backward()
        opt_b.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_changes_the_step(device):
    model, x, y = make_problem(device)
    opt = KFAC(model, lr=0.2, damping=0.3, momentum=0.0, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    deltas = []
    for _ in range(3):
        before = model[2].weight.detach().clone()
        opt.step(closure_for(opt, model, x, y))
        deltas.append((model[2].weight - before).norm().item())
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.125)
    assert deltas[1] < deltas[0] and deltas[2] < deltas[1]


def test_applied_step_is_minus_lr_hg_m_ha_from_the_kronecker_operator(device):
    """P3 on a real step: Δvec_c(W) = −α (H_a ⊗ H_g) vec_c(M), operator built with torch.kron."""
    model, x, y = make_problem(device)
    opt = KBFGS(model, lr=0.3, damping=0.3, momentum=0.0, weight_decay=0.0)
    for _ in range(3):
        opt.step(closure_for(opt, model, x, y))
    ops = {n: torch.kron(b.a_factor.to_dense(), b.g_factor.to_dense()).clone() for n, b in opt.blocks.items()}
    olds = {n: s.adapter.weight_matrix().clone() for n, s in opt.slots.items()}
    captured = {}
    opt.register_step_hook(lambda info: captured.update(info.grads))
    opt.step(closure_for(opt, model, x, y))
    for name, slot in opt.slots.items():
        delta = slot.adapter.weight_matrix() - olds[name]
        torch.testing.assert_close(vec_c(delta), -0.3 * ops[name] @ vec_c(captured[name]))


def test_update_frequencies(device):
    model, x, y = make_problem(device)
    opt = KFAC(model, lr=0.05, damping=0.3, curvature_update_freq=3, inverse_update_freq=4, inverse_warmup_steps=0)
    block = opt.blocks["0"]
    inverses = []
    for k in range(9):
        opt.step(closure_for(opt, model, x + 0.1 * k, y))  # a new batch each step
        inverses.append(block.a_factor.inverse.clone())
    assert block.a_factor.updates == 3  # steps 0, 3, 6
    changed = [k for k in range(1, 9) if not torch.equal(inverses[k], inverses[k - 1])]
    assert changed == [4, 8]


def test_warm_start_sets_full_pass_averages(device):
    model, x, y = make_problem(device)
    opt = KBFGS(model, lr=0.1, damping=0.3)
    batches = [x[:16], x[16:]]
    assert opt.warm_start(batches) == 2
    slot = opt.slots["0"]
    ones = torch.ones(32, 1, dtype=D, device=device)
    abar = torch.cat([x, ones], 1)
    torch.testing.assert_close(slot.block.a_factor.statistic, abar.T @ abar / 32)
    params_before = [p.clone() for p in model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(params_before, model.parameters()))


def _train_steps(opt, model, batches):
    losses = []
    for xb, yb in batches:
        losses.append(opt.step(closure_for(opt, model, xb, yb)).item())
    return losses


@pytest.mark.parametrize(
    "make",
    [
        lambda m: KFAC(m, lr=0.1, damping=0.3, fisher="mc", likelihood="gaussian", inverse_update_freq=2),
        lambda m: KFAC(m, lr=0.1, damping=AdaptiveLM(0.3), kl_clip=1e-2),
        lambda m: KBFGS(m, lr=0.1, damping=0.3),
        lambda m: KBFGSL(m, lr=0.1, damping=0.3, memory=3),
        lambda m: CurvatureOptimizer(m, 0.1, {nn.Linear: diagonal_block()}, damping=FactoredPi(0.1)),
    ],
    ids=["kfac-mc", "kfac-adaptive", "kbfgs", "kbfgsl", "diagonal"],
)
def test_checkpoint_resume_is_bit_identical(device, make, tmp_path):
    model, x, y = make_problem(device)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)] * 3
    opt = make(model)
    _train_steps(opt, model, batches[:6])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    reference = _train_steps(opt, model, batches[6:11])
    ref_params = [p.detach().clone() for p in model.parameters()]

    fresh, _, _ = make_problem(device, seed=123)  # different init: everything must come from the checkpoint
    ckpt = torch.load(path, weights_only=False)
    fresh.load_state_dict(ckpt["model"])
    opt2 = make(fresh)
    opt2.load_state_dict(ckpt["opt"])
    resumed = _train_steps(opt2, fresh, batches[6:11])
    assert resumed == reference
    for p, q in zip(ref_params, fresh.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_foreign_state():
    model, _, _ = make_problem("cpu")
    opt = KFAC(model, lr=0.1)
    with pytest.raises(ValueError, match="secondorder"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_adaptive_lm_moves_damping_with_the_reduction_ratio(device):
    model, x, y = make_problem(device)
    policy = AdaptiveLM(1.0, min_damping=1e-6)
    opt = KFAC(model, lr=0.05, damping=policy, inverse_update_freq=1)
    seen = []
    opt.register_step_hook(lambda info: seen.append(info.reduction_ratio))
    for _ in range(10):
        opt.step(closure_for(opt, model, x, y))
    assert len(policy.history) == 10 and all(r is not None for r in seen)
    for (rho, lam), prev in zip(policy.history, [1.0] + [h[1] for h in policy.history[:-1]]):
        expected = prev * policy.omega if rho > 0.75 else (prev / policy.omega if rho < 0.25 else prev)
        assert lam == pytest.approx(min(max(expected, 1e-6), 1e8))
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="quadratic model"):
        KBFGS(model).__class__.__bases__[0](model, 0.1, {nn.Linear: kbfgsl_block()}, damping=AdaptiveLM(1.0))


def test_kl_clip_scales_the_step(device):
    model, x, y = make_problem(device)
    opt = KFAC(model, lr=1.0, damping=0.3, kl_clip=1e-6)
    scales = []
    opt.register_step_hook(lambda info: scales.append(info.step_scale))
    opt.step(closure_for(opt, model, x, y))
    assert 0 < scales[0] < 1


def test_statistics_use_the_current_batch_or_lag_it(device):
    """lag_factors=False folds batch k into A before the step; lag_factors=True only after it."""
    model, x, y = make_problem(device)
    lagged = KFAC(copy.deepcopy(model), lr=0.1, damping=0.3, lag_factors=True)
    current = KFAC(model, lr=0.1, damping=0.3)
    for opt in (lagged, current):
        opt.step(closure_for(opt, opt.model, x, y))
    ones = torch.ones(32, 1, dtype=D, device=device)
    expected_a = torch.cat([x, ones], 1).T @ torch.cat([x, ones], 1) / 32
    torch.testing.assert_close(current.blocks["0"].a_factor.statistic, expected_a)
    torch.testing.assert_close(lagged.blocks["0"].a_factor.statistic, expected_a)  # folded in after the step
    # ... but the lagged inverse was computed before: from the zero statistic, i.e. I / sqrt(λ)
    torch.testing.assert_close(lagged.blocks["0"].a_factor.inverse,
                               torch.eye(7, dtype=D, device=device) / math.sqrt(0.3))
