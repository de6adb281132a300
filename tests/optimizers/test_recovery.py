"""Recovery instead of stalls: planted faults during training (issue 11).

A factor that cannot be inverted even in float64 keeps its previous inverse (or is retried with
more damping), and training continues; ``strict`` optimizers raise instead.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optimizers import KBFGS, KBFGSL, KFAC

D = torch.float64


def _problem(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g, dtype=D)
    y = torch.tanh(x @ torch.randn(6, 3, generator=g, dtype=D))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(D).to(device)
    return model, x.to(device), y.to(device)


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    return closure


def test_kfac_singular_factor_mid_training_keeps_training(device):
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.3, damping=0.3, inverse_update_freq=1)
    losses = [float(opt.step(_closure(opt, model, x, y)).detach()) for _ in range(5)]
    factor = opt.blocks["0"].a_factor
    kept = factor.inverse.clone()
    # plant: A + λ_A I indefinite in any precision for the next few refreshes
    factor.F.copy_(-10.0 * torch.eye(factor.dim, dtype=D, device=device))
    losses.append(float(opt.step(_closure(opt, model, x, y)).detach()))
    assert factor.inversion_failures == 1 and torch.equal(factor.inverse, kept)
    assert factor.damping_boost > 1.0
    for _ in range(40):
        losses.append(float(opt.step(_closure(opt, model, x, y)).detach()))
    assert all(math.isfinite(v) for v in losses)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert opt.inversion_stats.recovered == factor.inversion_failures >= 1
    assert factor.refreshes > 6, "refreshes must succeed again once the factor is PD with the raised damping"
    assert losses[-1] < losses[5]


def test_kbfgs_singular_initial_activation_factor_keeps_training(device):
    model, x, y = _problem(device, seed=1)
    opt = KBFGS(model, lr=0.2, damping=0.3)
    factor = opt.blocks["0"].a_factor
    opt.warm_start([x])
    factor.set_statistic(-2.0 * torch.eye(factor.dim, dtype=D, device=device))  # A + √λ I indefinite
    losses = [float(opt.step(_closure(opt, model, x, y)).detach()) for _ in range(30)]
    assert factor.inversion_failures == 1
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


MAKERS = {
    "kfac": lambda m: KFAC(m, lr=0.3, damping=1.0),
    "kbfgs": lambda m: KBFGS(m, lr=0.2, damping=0.3),
    "kbfgsl": lambda m: KBFGSL(m, lr=0.2, damping=0.3, memory=5),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_one_step_lr_spike_returns_to_the_pre_spike_loss(device, name):
    """A scheduler multiplies the lr by 1e200 for one step: the loss becomes non-finite; within a bounded
    number of steps the run is back at (or below) its pre-spike loss and keeps training."""
    model, x, y = _problem(device, seed=2)
    opt = MAKERS[name](model)
    spike_at = 15
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1e200 if k == spike_at else 1.0)
    losses = []
    for _ in range(spike_at):
        losses.append(float(opt.step(_closure(opt, model, x, y)).detach()))
        sched.step()
    with torch.no_grad():
        pre = float(0.5 * ((model(x) - y) ** 2).sum(1).mean())
    after = []
    for _ in range(12):
        after.append(float(opt.step(_closure(opt, model, x, y)).detach()))
        sched.step()
    c = opt.counters
    assert c["reverted_steps"] + c["rollbacks"] == 1, c  # the spike is seen once
    assert c["recoveries"] == 1 and c["step_scale"] == 1.0, c  # shrunk, then relaxed back
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    back = [i for i, v in enumerate(after) if math.isfinite(v) and v <= pre]
    assert back and back[0] <= 4, (pre, after)
    assert after[-1] < pre


def test_kbfgs_blowing_up_every_step_recovers_instead_of_stalling(device):
    """A planted H_g of 1e200·I makes every step leave the finite region. Without recovery each step is
    reverted and nothing changes (a stall); with it the secant memory is reset and the step shrunk."""
    results = {}
    for recovery in (False, True):
        model, x, y = _problem(device, seed=3)
        opt = KBFGS(model, lr=0.2, damping=0.3, recovery=recovery)
        for _ in range(3):
            opt.step(_closure(opt, model, x, y))
        for block in opt.blocks.values():
            block.g_factor.H = 1e200 * torch.eye(block.g_factor.dim, dtype=D, device=device)
        losses = [float(opt.step(_closure(opt, model, x, y)).detach()) for _ in range(20)]
        results[recovery] = (opt.counters["reverted_steps"], losses)
    stalled, recovered = results[False], results[True]
    assert stalled[0] == 20  # every step reverted
    assert recovered[0] == 1 and recovered[1][-1] < recovered[1][0]


def test_a_nan_input_batch_is_skipped_without_rollback(device):
    model, x, y = _problem(device, seed=4)
    opt = KFAC(model, lr=0.3, damping=1.0)
    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
    bad = x.clone()
    bad[0, 0] = float("nan")
    for _ in range(2):  # twice in a row: still a data fault, not a bad point
        opt.step(_closure(opt, model, bad, y))
    c = opt.counters
    assert c["skip_reasons"] == {"non-finite input batch": 2} and c["rollbacks"] == 0, c


def test_recovery_disabled_and_strict(device):
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.3, damping=0.3, inverse_update_freq=1, strict=True)
    opt.step(_closure(opt, model, x, y))
    factor = opt.blocks["0"].a_factor
    factor.F.copy_(-10.0 * torch.eye(factor.dim, dtype=D, device=device))
    from curvature.linalg import InversionError

    with pytest.raises(InversionError):
        opt.step(_closure(opt, model, x, y))


# ------------------------------------------------------------------ finite blow-ups (max_loss_rise)
from optimizers.driver import _LOSS_ROSE, loss_rose  # noqa: E402
from optimizers.recovery import Recovery  # noqa: E402


@pytest.mark.parametrize("before, after, factor, expected", [
    (2.0, 20.0, 10.0, False),  # exactly 10x: f+ - f = 18 = 9|f|, not more
    (2.0, 20.5, 10.0, True),
    (-2.0, 15.0, 10.0, False),  # a negative loss: the rise is measured against |f| (17 <= 18)
    (-2.0, 16.5, 10.0, True),
    (0.0, 1e-12, 10.0, True),  # any rise from 0
    (5.0, 4.0, 1.5, False),  # a fall never counts
])
def test_loss_rose_is_the_documented_inequality(device, before, after, factor, expected):
    assert loss_rose(before, after, factor) is expected or loss_rose(before, after, factor) == expected
    on_device = loss_rose(torch.tensor(before, dtype=D, device=device), torch.tensor(after, dtype=D, device=device), factor)
    assert isinstance(on_device, torch.Tensor) and bool(on_device) is expected


def _shifted_second_call(opt, model, x, y, shift_at, shift):
    """A closure whose second call (the new point) returns the loss plus ``shift`` on step ``shift_at``:
    a finite blow-up planted in the value only (the gradients, hence the pairs, are untouched)."""
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        if opt.steps == shift_at and calls["n"] % 2 == 0:
            return loss + shift
        return loss

    return closure


@pytest.mark.parametrize("name", ["kbfgs", "kbfgsl"])
def test_a_finite_blow_up_at_the_new_point_is_reverted_and_recovered(device, name):
    model, x, y = _problem(device)
    opt = MAKERS[name](model)
    closure = _shifted_second_call(opt, model, x, y, shift_at=3, shift=1e3)
    for _ in range(3):
        opt.step(closure)
    params = [p.detach().clone() for p in model.parameters()]
    blocks = {n: s.block.state_dict() for n, s in opt.slots.items()}
    state = {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()}
    opt.step(closure)  # the planted rise: loss + 1000 at the new point (> 10x the loss of ~0.3)
    assert opt.counters["reverted_steps"] == 1 and opt.counters["skip_reasons"] == {_LOSS_ROSE: 1}
    assert opt.counters["recoveries"] == 1 and opt.counters["step_scale"] == pytest.approx(0.1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(v, opt.state[p][k]) for p in opt.state for k, v in state[id(p)].items())
    restored = {n: s.block.state_dict() for n, s in opt.slots.items()}
    for n in blocks:  # H_a kept; H_g reset by the recovery policy (secant memory not trusted)
        assert torch.equal(restored[n]["a"]["H"], blocks[n]["a"]["H"])
    assert opt.counters["secant_resets"] == len(opt.slots)


@pytest.mark.parametrize("recovery", [Recovery(max_loss_rise=None), Recovery(max_loss_rise=1e4), False])
def test_the_blow_up_rule_off_or_above_the_rise_accepts_the_step(device, recovery):
    model, x, y = _problem(device)
    opt = KBFGS(model, lr=0.2, damping=0.3, recovery=recovery)
    closure = _shifted_second_call(opt, model, x, y, shift_at=3, shift=1e3)
    for _ in range(5):
        opt.step(closure)
    assert opt.counters["reverted_steps"] == 0 and opt.counters["skipped_steps"] == 0


def test_kfac_has_no_new_point_loss_and_is_not_judged_by_it(device):
    """Not applicable without a second pass: KFAC never evaluates the new point's loss."""
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.3, damping=1.0)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        return _closure(opt, model, x, y)()

    for _ in range(4):
        opt.step(closure)
    assert calls["n"] == 4 and opt.counters["reverted_steps"] == 0


@pytest.mark.parametrize("bad", [1.0, 0.5, float("inf"), float("nan"), True, "10"])
def test_max_loss_rise_is_validated(bad):
    with pytest.raises(ValueError, match="max_loss_rise"):
        Recovery(max_loss_rise=bad)
