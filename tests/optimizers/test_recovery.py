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
    with pytest.raises(ValueError, match=r"^Recovery\.max_loss_rise \(or None\) must be a finite number in \(1\.0, inf\)"):
        Recovery(max_loss_rise=bad)


# ------------------------------------------------------------------ the policy object and its helpers (unit)
from types import SimpleNamespace  # noqa: E402

from curvature.factors import BFGSFactor  # noqa: E402
from optimizers.recovery import inputs_finite, make_recovery, reset_secant_memory  # noqa: E402


@pytest.mark.parametrize("field, value", [
    ("max_loss_rise", 1.5), ("max_loss_rise", 1.0 + 1e-9),
    ("step_shrink", 1.0), ("step_shrink", 1e-300), ("min_step_scale", 1.0), ("min_step_scale", 0.5),
    ("relax", 1.0), ("relax", 1.5),
])
def test_recovery_accepts_the_ends_of_the_documented_ranges(field, value):
    """max_loss_rise > 1; step_shrink, min_step_scale in (0, 1]; relax >= 1 (docstring of Recovery)."""
    assert getattr(Recovery(**{field: value}), field) == value


@pytest.mark.parametrize("field, value", [
    ("step_shrink", 0.0), ("step_shrink", 1.5), ("step_shrink", float("inf")), ("step_shrink", True),
    ("step_shrink", "0.5"), ("min_step_scale", 0.0), ("min_step_scale", 1.5), ("min_step_scale", -0.1),
    ("relax", 0.5), ("relax", float("inf")), ("relax", float("nan")), ("relax", True), ("relax", "2"),
])
def test_recovery_rejects_values_outside_the_documented_ranges(field, value):
    with pytest.raises(ValueError, match=f"Recovery.{field} must be a"):
        Recovery(**{field: value})


def test_step_multiplier_shrinks_floors_and_relaxes_as_documented():
    """step_scale ← max(min_step_scale, step_shrink·step_scale) per fault, ← min(1, relax·step_scale) per
    accepted step; disabled: no change. Values by hand: 1 → 0.25 → 0.0625 → 0.05 (floor) → 0.15 → 0.45 → 1."""
    r = Recovery(step_shrink=0.25, min_step_scale=0.05, relax=3.0)
    seen = []
    for event in ("fault", "fault", "fault", "ok", "ok", "ok", "ok"):
        r.after_fault() if event == "fault" else r.after_accepted_step()
        seen.append(r.step_scale)
    assert seen == pytest.approx([0.25, 0.0625, 0.05, 0.15, 0.45, 1.0, 1.0], rel=1e-15)
    off = Recovery(enabled=False)
    off.after_fault()
    assert off.step_scale == 1.0


def test_recovery_state_round_trips_through_the_optimizer_state_dict(device):
    """The shrunk multiplier is saved and restored: a resumed run continues with the same step scale."""
    model, x, y = _problem(device)
    opt = KBFGS(model, lr=0.2, damping=0.3, recovery=Recovery(step_shrink=0.3, relax=1.0))
    closure = _shifted_second_call(opt, model, x, y, shift_at=1, shift=1e3)
    for _ in range(2):
        opt.step(closure)
    assert opt.recovery.step_scale == 0.3  # one fault, never relaxed (relax = 1)
    saved = opt.recovery.state_dict()
    assert saved == {"enabled": True, "reset_secant": True, "step_shrink": 0.3, "relax": 1.0, "min_step_scale": 1e-4,
                     "rollback": True, "max_loss_rise": 10.0, "step_scale": 0.3}
    fresh = KBFGS(model, lr=0.2, damping=0.3, recovery=Recovery(step_shrink=0.3, relax=1.0))
    fresh.load_state_dict(opt.state_dict())
    assert fresh.recovery.step_scale == 0.3 and isinstance(fresh.recovery.step_scale, float)
    plain = Recovery()
    plain.load_state_dict({"step_scale": 0.125})
    assert plain.step_scale == 0.125


def test_make_recovery_false_switches_every_part_off(device):
    """recovery=False: no policy, no rollback copy kept, no blow-up rule (the old behaviour)."""
    off = make_recovery(False)
    assert off.enabled is False and off.rollback is False and off.max_loss_rise is None
    assert off.loss_rise_factor is None
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.3, damping=1.0, recovery=False)
    opt.step(_closure(opt, model, x, y))
    assert opt._rollback_point is None  # the copy that rollback would cost is not made
    on = make_recovery(True)
    assert on.enabled is True and on.rollback is True and on.max_loss_rise == 10.0
    given = Recovery(step_shrink=0.5)
    assert make_recovery(given) is given and make_recovery(None) == Recovery()
    with pytest.raises(TypeError, match="recovery must be a Recovery, True or False, got str"):
        make_recovery("yes")


def test_inputs_finite_walks_nested_containers(device):
    bad = torch.tensor([1.0, float("nan")], device=device)
    good = torch.ones(2, device=device)
    assert inputs_finite((good, [good, {"a": good}])) is True
    assert inputs_finite({"a": good, "b": bad}) is False
    assert inputs_finite([good, (good, {"k": [bad]})]) is False
    assert inputs_finite({"ids": torch.tensor([1, 2], device=device)}) is True  # integer tensors are not checked


def _moved_bfgs(device):
    f = BFGSFactor(3, None, pair_decay=0.5, init_scale=2.0, dtype=D, device=device)
    f.H = torch.full((3, 3), 7.0, dtype=D, device=device)
    f.s_avg.fill_(1.0)
    f.y_avg.fill_(1.0)
    return f


def test_reset_secant_memory_resets_every_secant_factor_and_counts_them(device):
    """Every secant factor, on either side and inside a chunked block's parts, goes back to init_scale·I
    with zero pair EMA; non-secant factors and blocks without factors are left alone; the count is exact."""
    chunk1 = SimpleNamespace(a_factor=None, g_factor=_moved_bfgs(device))
    chunk2 = SimpleNamespace(a_factor=_moved_bfgs(device), g_factor=_moved_bfgs(device))
    chunked = SimpleNamespace(parts={"q": (slice(0, 1), chunk1), "kv": (slice(1, 3), chunk2)})
    plain = SimpleNamespace(a_factor=_moved_bfgs(device), g_factor=_moved_bfgs(device))
    only_g = SimpleNamespace(g_factor=_moved_bfgs(device))  # no a_factor attribute at all
    other = SimpleNamespace(a_factor="not a secant factor", g_factor=None)
    n = reset_secant_memory([plain, chunked, only_g, other])
    assert n == 2 + 3 + 1
    factors = [plain.a_factor, plain.g_factor, chunk1.g_factor, chunk2.a_factor, chunk2.g_factor, only_g.g_factor]
    for f in factors:
        torch.testing.assert_close(f.H, 2.0 * torch.eye(3, dtype=D, device=device), rtol=0, atol=0)
        assert not bool(f.s_avg.any()) and not bool(f.y_avg.any())
    assert reset_secant_memory([chunked]) == 3 and reset_secant_memory([]) == 0


@pytest.mark.parametrize("bad", [5.0, 0.0, -0.5, float("nan"), True])
def test_a_hand_built_step_scale_outside_0_1_is_rejected(bad):
    """step_scale is the policy's state (1 after construction, shrunk after faults, relaxed back to at most 1):
    a hand-built Recovery(step_scale=5) would multiply every step by 5."""
    with pytest.raises(ValueError, match="step_scale"):
        Recovery(step_scale=bad)
    assert Recovery(step_scale=0.25).step_scale == 0.25
