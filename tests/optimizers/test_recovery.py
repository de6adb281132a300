"""Recovery instead of stalls: planted faults during training (issue 11).

A factor that cannot be inverted even in float64 keeps its previous inverse (or is retried with
more damping), and training continues; ``strict`` optimizers raise instead.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optimizers import KBFGS, KFAC

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
