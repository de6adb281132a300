"""Saddle-free Newton: -|H|^-1 g on prescribed indefinite quadratics; escape from strict saddles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from curvature.damping import Tikhonov
from optimizers.saddle_free import SaddleFreeNewton

F64 = torch.float64


class Landscape(nn.Module):
    r"""f(theta) = 1/2 (theta - s)^T H (theta - s) + c |theta - s|^4 (the input is ignored): a strict saddle at s."""

    def __init__(self, h: torch.Tensor, s: torch.Tensor, theta0: torch.Tensor, quartic: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("h", h)
        self.register_buffer("s", s)
        self.quartic = quartic
        self.theta = nn.Parameter(theta0.clone())

    def forward(self, x):
        d = self.theta - self.s
        return 0.5 * d @ self.h @ d + self.quartic * (d @ d) ** 2 + 0.0 * x.sum()


def _identity_loss(out, target):
    return out


def _step(model, **kw):
    opt = SaddleFreeNewton(model, _identity_loss, damping=Tikhonov(1e-14), damping_grid=(1.0,), eigenvalue_floor=0.0,
                           k=model.theta.numel(), targets_are_inputs=True, min_damping=1e-15, **kw)
    x = torch.zeros(1, dtype=F64, device=model.theta.device)

    def closure():
        opt.zero_grad()
        loss = model(x)
        loss.backward()
        return loss

    opt.step(closure)
    return opt


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


def test_step_equals_minus_abs_inverse_gradient_on_indefinite_quadratic(device):
    eigs = torch.tensor([-4.0, -1.0, 0.5, 2.0, 3.0, 8.0], dtype=F64)
    q = _orthogonal(6, 0)
    h = (q @ torch.diag(eigs) @ q.T).to(device)
    s = torch.zeros(6, dtype=F64, device=device)
    theta0 = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=F64).to(device)
    model = Landscape(h, s, theta0).to(device)
    g = h @ theta0
    abs_inv = (q @ torch.diag(1.0 / eigs.abs()) @ q.T).to(device)
    opt = _step(model)
    assert opt.last_step.accepted
    torch.testing.assert_close(model.theta.detach() - theta0, -abs_inv @ g, rtol=1e-9, atol=1e-11)
    assert opt.last_step.products == 6
    assert opt.last_step.details["ritz_min"] == pytest.approx(-4.0, rel=1e-9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), n_neg=st.integers(1, 3), n=st.integers(4, 6),
       scale=st.floats(1e-3, 1e-2))
def test_moves_away_from_a_strict_saddle_where_newton_moves_in(device, seed, n_neg, n, scale):
    gen = torch.Generator().manual_seed(seed)
    magnitudes = 0.5 + 2.5 * torch.rand(n, generator=gen, dtype=F64)
    signs = torch.ones(n, dtype=F64)
    signs[:n_neg] = -1.0
    q = _orthogonal(n, seed % 100000)
    h = q @ torch.diag(signs * magnitudes) @ q.T
    s = torch.randn(n, generator=gen, dtype=F64)
    offset = torch.randn(n, generator=gen, dtype=F64)
    neg = q[:, :n_neg]
    assume(float((neg.T @ offset).norm()) >= 0.2 * float(offset.norm()))
    offset = scale * offset / offset.norm()
    theta0 = s + offset
    h, s, theta0 = h.to(device), s.to(device), theta0.to(device)
    model = Landscape(h, s, theta0, quartic=1.0).to(device)
    # Newton's step from the dense Hessian of the landscape (torch.func oracle)
    f = lambda t: 0.5 * (t - s) @ h @ (t - s) + ((t - s) @ (t - s)) ** 2  # noqa: E731
    newton = theta0 - torch.linalg.solve(torch.func.hessian(f)(theta0), torch.func.grad(f)(theta0))
    assert float((newton - s).norm()) < 0.1 * float((theta0 - s).norm())  # Newton jumps into the saddle
    opt = _step(model)
    moved = model.theta.detach()
    neg = neg.to(device)
    assert opt.last_step.accepted
    assert float((neg.T @ (moved - s)).norm()) > 1.5 * float((neg.T @ (theta0 - s)).norm())
    assert float(f(moved)) < float(f(theta0))


def test_damping_is_chosen_by_the_loss_and_raised_on_rejection(device):
    eigs = torch.tensor([-1.0, 2.0, 3.0], dtype=F64)
    q = _orthogonal(3, 3)
    h = (q @ torch.diag(eigs) @ q.T).to(device)
    s = torch.zeros(3, dtype=F64, device=device)
    theta0 = torch.tensor([0.3, -0.2, 0.5], dtype=F64, device=device)
    model = Landscape(h, s, theta0, quartic=1.0).to(device)
    opt = SaddleFreeNewton(model, _identity_loss, damping=1.0, targets_are_inputs=True)
    x = torch.zeros(1, dtype=F64, device=device)

    def closure():
        opt.zero_grad()
        loss = model(x)
        loss.backward()
        return loss

    opt.step(closure)
    info = opt.last_step
    assert info.accepted and info.details["chosen_damping"] in (0.1, 1.0, 10.0)
    assert opt.damping.damping == info.details["chosen_damping"]
    assert info.loss_evals == 3 and info.loss_after < info.loss
