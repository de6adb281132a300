"""Diagonal: the constructor's defaults and keywords, and the step against a per-sample-gradient oracle
(mutation audit of optimizers/diagonal.py)."""

from __future__ import annotations

import torch
from torch import nn

from curvature.blocks import DiagonalBlock
from optimizers import Diagonal
from optimizers.recovery import Recovery

D = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 2)).to(D)


def _settings(opt):
    g = opt.param_groups[0]
    blocks = {name: s.block for name, s in opt.slots.items()}
    block = blocks["0"]
    assert all(isinstance(b, DiagonalBlock) for b in blocks.values())
    assert all((b.decay, b.power, b.source) == (block.decay, block.power, block.source) for b in blocks.values())
    return {
        "lr": g["lr"], "damping": g["damping"], "momentum": g["momentum"], "weight_decay": g["weight_decay"],
        "decay": block.decay, "power": block.power, "source": block.source, "fallback": opt.fallback,
        "loss_reduction": opt.loss_reduction, "lag_factors": opt.lag_factors,
        "seed": opt._generator.initial_seed(), "strict": opt.strict, "blocks": sorted(blocks),
        "recovery": opt.recovery,
    }


def test_diagonal_defaults_are_the_documented_ones():
    """The module docstring's defaults: power 1, λ 0.1, lr 0.1, EMA 0.9 of the empirical-Fisher diagonal,
    momentum 0.9, τ 1e-5; Linear and Conv2d layers only (the Conv1d goes to the fallback)."""
    opt = Diagonal(_model())
    assert _settings(opt) == {
        "lr": 0.1, "damping": 0.1, "momentum": 0.9, "weight_decay": 1e-5, "decay": 0.9, "power": 1.0,
        "source": "empirical_fisher", "fallback": "sgd", "loss_reduction": "mean", "lag_factors": False,
        "seed": 0, "strict": False, "blocks": ["0", "4"], "recovery": Recovery(),
    }
    assert "2" in opt.fallback_modules
    conv2d = Diagonal(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 1)))
    assert sorted(conv2d.slots) == ["0", "2"]


def test_every_diagonal_keyword_reaches_the_optimizer():
    recovery = Recovery(step_shrink=0.5)
    opt = Diagonal(_model(), lr=0.7, damping=0.4, power=0.5, decay=0.8, source="gradient", momentum=0.3,
                   weight_decay=0.02, fallback="adam", loss_reduction="sum", lag_factors=True,
                   layer_types=(nn.Linear, nn.Conv1d), seed=7, recovery=recovery, strict=True)
    got = _settings(opt)
    assert got == {
        "lr": 0.7, "damping": 0.4, "momentum": 0.3, "weight_decay": 0.02, "decay": 0.8, "power": 0.5,
        "source": "gradient", "fallback": "adam", "loss_reduction": "sum", "lag_factors": True,
        "seed": 7, "strict": True, "blocks": ["0", "2", "4"], "recovery": recovery,
    }
    assert got["recovery"] is recovery


def test_diagonal_steps_equal_the_per_sample_fisher_formula():
    """Two steps on one Linear layer against the formula of the module docstring, with the per-sample
    gradients from one backward per sample: v₁ = F₁, v₂ = β v₁ + (1 − β) F₂ (F = mean of squared
    per-sample gradients of [W|b]), M = μ M + (1 − μ)(∇ + τθ) ... ΔW = −α M ⊘ (v + λ)^p."""
    torch.manual_seed(1)
    lin = nn.Linear(3, 2).to(D)
    lr, lam, p, beta, tau = 0.3, 0.05, 0.75, 0.6, 0.01
    opt = Diagonal(lin, lr=lr, damping=lam, power=p, decay=beta, momentum=0.0, weight_decay=tau)
    v = None
    for step in range(2):
        x, y = torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)
        theta = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).clone()
        per_sample = []
        for i in range(6):
            w = theta[:, :3].clone().requires_grad_(True)
            b = theta[:, 3].clone().requires_grad_(True)
            (0.5 * ((x[i] @ w.T + b - y[i]) ** 2).sum()).backward()
            per_sample.append(torch.cat([w.grad, b.grad[:, None]], 1))
        per_sample = torch.stack(per_sample)
        fisher = (per_sample**2).mean(0)
        grad = per_sample.mean(0)
        v = fisher if v is None else beta * v + (1 - beta) * fisher
        expected = theta - lr * (grad + tau * theta) / (v + lam) ** p
        opt.zero_grad()
        (0.5 * ((lin(x) - y) ** 2).sum(1).mean()).backward()
        opt.step()
        got = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
