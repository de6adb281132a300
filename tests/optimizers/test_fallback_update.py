"""The first-order fallback rules of :mod:`optimizers.fallback`, step by step against independent oracles:
``torch.optim.Adam`` for ``"adam"`` (same L2 weight decay, bias correction and ε placement) and the EMA
momentum m ← βm + (1 − β)(g + τθ), θ ← θ − lr·m computed by hand for ``"sgd"``."""

from __future__ import annotations

import pytest
import torch

from optimizers.fallback import FALLBACK_RULES, fallback_update

D = torch.float64


def _grads(device, n, shape=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=D).to(device) for _ in range(n)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("betas, eps, defaults", [((0.8, 0.99), 1e-6, False), ((0.0, 0.95), 1e-3, False),
                                                  ((0.9, 0.999), 1e-8, True)])
def test_adam_rule_matches_torch_adam_over_several_steps(device, weight_decay, betas, eps, defaults):
    """Four steps with changing gradients: the bias corrections 1 − β^t (t counted in the state) and the
    weight decay g + τθ as torch.optim.Adam's. ``defaults``: β2 and ε not passed (documented 0.999, 1e-8)."""
    theta0 = torch.linspace(-1.0, 1.5, 6, dtype=D, device=device).reshape(3, 2)
    ours, ref = theta0.clone(), theta0.clone().requires_grad_(True)
    oracle = torch.optim.Adam([ref], lr=0.05, betas=betas, eps=eps, weight_decay=weight_decay)
    state: dict = {}
    extra = {} if defaults else {"betas2": betas[1], "eps": eps}
    for g in _grads(device, 4):
        fallback_update(ours, g, state, rule="adam", lr=0.05, momentum=betas[0], weight_decay=weight_decay, **extra)
        ref.grad = g.clone()
        oracle.step()
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-14)
    assert state["adam_step"] == 4


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 0.2)])
def test_sgd_rule_is_the_ema_momentum_by_hand(device, momentum, weight_decay):
    theta = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=D, device=device)
    expected, m = theta.clone(), torch.zeros_like(theta)
    state: dict = {}
    for g in _grads(device, 3, shape=(2, 2), seed=1):
        d = g + weight_decay * expected
        m = momentum * m + (1.0 - momentum) * d
        expected = expected - 0.1 * m
        fallback_update(theta, g, state, rule="sgd", lr=0.1, momentum=momentum, weight_decay=weight_decay)
        torch.testing.assert_close(theta, expected, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(state["momentum"], m, rtol=1e-14, atol=1e-15)


def test_sgd_first_step_by_hand(device):
    """θ = 2, g = 1, β = 0.75, τ = 0.5, lr = 0.1: m = 0.25·(1 + 1) = 0.5, θ = 2 − 0.05 = 1.95 (exact in binary)."""
    theta = torch.tensor([2.0], dtype=D, device=device)
    state: dict = {}
    fallback_update(theta, torch.tensor([1.0], dtype=D, device=device), state, rule="sgd", lr=0.1, momentum=0.75,
                    weight_decay=0.5)
    assert state["momentum"].item() == 0.5 and theta.item() == pytest.approx(1.95, rel=1e-15)


def test_unknown_rule_is_rejected_with_the_choices(device):
    theta = torch.zeros(2, dtype=D, device=device)
    with pytest.raises(ValueError, match=r"unknown fallback rule 'rmsprop'; choose one of \('sgd', 'adam', 'error'\)"):
        fallback_update(theta, torch.ones_like(theta), {}, rule="rmsprop", lr=0.1, momentum=0.0, weight_decay=0.0)
    assert FALLBACK_RULES == ("sgd", "adam", "error") and not theta.any()
