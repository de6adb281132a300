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
