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
    opt.step(_closure(opt, model))
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


# ------------------------------------------------------------------ mutation audit of optimizers/saddle_free.py
def _closure(opt, model):
    x = torch.zeros(1, dtype=F64, device=model.theta.device)

    def closure():
        opt.zero_grad()
        loss = model(x)
        loss.backward()
        return loss

    return closure


def test_saddle_free_defaults_and_keywords():
    model = Landscape(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    opt = SaddleFreeNewton(model, _identity_loss)
    assert (opt.k, opt.eigenvalue_floor, opt.damping_grid, opt.min_damping, opt.max_damping) == (
        20, 1e-3, (0.1, 1.0, 10.0), 1e-8, 1e8)
    assert type(opt.damping) is Tikhonov and opt.damping.damping == 1e-2
    assert (opt.param_groups[0]["lr"], opt.weight_decay, opt.targets_are_inputs) == (1.0, 0.0, False)
    assert opt.loss_fn is _identity_loss and opt.model is model
    policy = Tikhonov(0.3)
    opt = SaddleFreeNewton(model, _identity_loss, 0.5, policy, k=3, eigenvalue_floor=0.2, damping_grid=[2.0],
                           min_damping=0.01, max_damping=7.0, weight_decay=0.1, targets_are_inputs=True)
    assert (opt.k, opt.eigenvalue_floor, opt.damping_grid, opt.min_damping, opt.max_damping) == (3, 0.2, (2.0,), 0.01, 7.0)
    assert opt.damping is policy and (opt.param_groups[0]["lr"], opt.weight_decay, opt.targets_are_inputs) == (0.5, 0.1, True)
    assert SaddleFreeNewton(model, _identity_loss, eigenvalue_floor=1.0, damping=4.0).damping.damping == 4.0
    assert SaddleFreeNewton(model, _identity_loss, eigenvalue_floor=0.0, k=1).k == 1
    assert SaddleFreeNewton(model, _identity_loss, min_damping=2.0, max_damping=2.0 + 1e-12).max_damping == 2.0 + 1e-12


@pytest.mark.parametrize("kw, message", [
    ({"k": 0}, "k must be an integer >= 1, got 0"),
    ({"eigenvalue_floor": 1.5}, "eigenvalue_floor must be a finite number in [0.0, 1.0], got 1.5"),
    ({"eigenvalue_floor": -0.1}, "eigenvalue_floor must be a finite number in [0.0, 1.0], got -0.1"),
    ({"damping_grid": ()}, "damping_grid must hold at least one multiplier"),
    ({"damping_grid": (1.0, 0.0)}, "damping_grid entries must be a finite number in (0.0, inf), got 0.0"),
    ({"min_damping": 0.0}, "min_damping must be a finite number in (0.0, inf), got 0.0"),
    ({"min_damping": 2.0, "max_damping": 2.0}, "max_damping must be a finite number in (2.0, inf), got 2.0"),
    ({"damping": 0.0}, "damping must be a finite number in (0.0, inf), got 0.0"),
])
def test_saddle_free_validation_messages(kw, message):
    model = Landscape(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError) as err:
        SaddleFreeNewton(model, _identity_loss, **kw)
    assert str(err.value) == message


def test_saddle_free_step_floor_clamps_and_loss_choice_against_a_dense_oracle():
    """Full Krylov space (k = n): the candidates −α V diag(1/(max(|θ_i|, μ) + λ_c)) Vᵀ g with μ = floor·max|θ|,
    λ_c = clamp(λ·m) for m in the grid; the lowest loss wins; ρ = (F(new) − F) / (gᵀs + ½ sᵀ|H|_λ s)."""
    eigs = torch.tensor([-4.0, 0.002, 1.0, 3.0], dtype=F64)
    q = _orthogonal(4, 5)
    h = q @ torch.diag(eigs) @ q.T
    s = torch.zeros(4, dtype=F64)
    theta0 = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=F64)
    model = Landscape(h, s, theta0)
    lr, lam, floor = 0.7, 0.5, 0.01
    opt = SaddleFreeNewton(model, _identity_loss, lr, lam, k=4, eigenvalue_floor=floor, damping_grid=(0.1, 1.0, 10.0),
                           min_damping=0.1, max_damping=2.0, targets_are_inputs=True)
    g = h @ theta0
    mu = floor * 4.0
    f = lambda t: float(0.5 * t @ h @ t)  # noqa: E731
    cands = []
    for lam_c in (0.1, 0.5, 2.0):  # 0.05 raised to min_damping, 5 lowered to max_damping
        absh = q @ torch.diag(eigs.abs().clamp(min=mu) + lam_c) @ q.T
        step = -lr * torch.linalg.solve(absh, g)
        cands.append((f(theta0 + step), lam_c, step, absh))
    best = min(cands, key=lambda c: c[0])
    assert best[1] == 0.1 and sorted(c[0] for c in cands)[1] > best[0] + 1e-3  # a clear winner
    opt.step(_closure(opt, model))
    info = opt.last_step
    assert info.accepted and info.details["chosen_damping"] == 0.1 and opt.damping.damping == 0.1
    torch.testing.assert_close(model.theta.detach(), theta0 + best[2], rtol=1e-9, atol=1e-11)
    assert info.details["lanczos_steps"] == 4 and info.products == 4 and info.loss_evals == 3
    assert info.details["floor"] == pytest.approx(mu, rel=1e-9)
    assert info.details["ritz_min"] == pytest.approx(-4.0, rel=1e-9)
    assert info.details["ritz_max"] == pytest.approx(3.0, rel=1e-9)
    step, absh = best[2], best[3]
    model_change = float(g @ step + 0.5 * step @ absh @ step)
    assert info.reduction_ratio == pytest.approx((best[0] - f(theta0)) / model_change, rel=1e-8)
    assert info.loss_after == pytest.approx(best[0], rel=1e-12) and info.step_scale == lr


def test_saddle_free_rejects_when_no_candidate_decreases_and_raises_the_damping():
    """lr 10 on a convex quadratic overshoots for every candidate: the step is rejected, θ stays, and
    λ ← clamp(λ·max(grid))."""
    q = _orthogonal(3, 7)
    h = q @ torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64)) @ q.T
    theta0 = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
    for max_damping, expected in ((1e8, 0.02), (0.015, 0.015)):
        model = Landscape(h, torch.zeros(3, dtype=F64), theta0)
        opt = SaddleFreeNewton(model, _identity_loss, 10.0, 0.01, k=3, damping_grid=(0.1, 2.0),
                               min_damping=1e-4, max_damping=max_damping, targets_are_inputs=True)
        opt.step(_closure(opt, model))
        info = opt.last_step
        assert not info.accepted and info.details["reason"] == "no damping candidate decreased the objective"
        assert opt.damping.damping == expected and torch.equal(model.theta.detach(), theta0)
        assert opt.counters["rejected_steps"] == 1 and info.loss_evals == 2 and "chosen_damping" not in info.details
        assert info.reduction_ratio is None


def test_saddle_free_rejection_raises_the_damping_from_below_min():
    """λ·max(grid) below min_damping is raised to it."""
    q = _orthogonal(3, 7)
    h = q @ torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64)) @ q.T
    model = Landscape(h, torch.zeros(3, dtype=F64), torch.tensor([0.3, -0.2, 0.5], dtype=F64))
    opt = SaddleFreeNewton(model, _identity_loss, 10.0, 0.01, k=3, damping_grid=(0.1, 0.5),
                           min_damping=0.008, targets_are_inputs=True)
    opt.step(_closure(opt, model))
    assert not opt.last_step.accepted and opt.damping.damping == 0.008


def test_saddle_free_zero_gradient_is_rejected_without_products():
    model = Landscape(torch.eye(3, dtype=F64), torch.ones(3, dtype=F64), torch.ones(3, dtype=F64))
    opt = SaddleFreeNewton(model, _identity_loss, targets_are_inputs=True)
    opt.step(_closure(opt, model))
    info = opt.last_step
    assert not info.accepted and info.details == {"reason": "zero gradient"}
    assert info.products == 0 and info.loss_evals == 0 and opt.damping.damping == 1e-2


def test_saddle_free_k_above_the_dimension_uses_the_dimension():
    eigs = torch.tensor([-1.0, 2.0, 3.0], dtype=F64)
    q = _orthogonal(3, 3)
    h = q @ torch.diag(eigs) @ q.T
    theta0 = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
    model = Landscape(h, torch.zeros(3, dtype=F64), theta0)
    opt = SaddleFreeNewton(model, _identity_loss, 0.5, 1e-12, k=50, eigenvalue_floor=0.0, damping_grid=(1.0,),
                           min_damping=1e-13, targets_are_inputs=True)
    opt.step(_closure(opt, model))
    assert opt.last_step.accepted and opt.last_step.details["lanczos_steps"] == 3 and opt.last_step.products == 3
    torch.testing.assert_close(model.theta.detach(), theta0 - 0.5 * (q @ torch.diag(1 / eigs.abs()) @ q.T) @ (h @ theta0),
                               rtol=1e-9, atol=1e-11)


def _diag_landscape(eigs, theta0):
    h = torch.diag(torch.tensor(eigs, dtype=F64))
    t0 = torch.tensor(theta0, dtype=F64)
    return Landscape(h, torch.zeros(len(eigs), dtype=F64), t0), h, t0


def test_ratio_is_minus_inf_when_the_model_predicts_no_decrease():
    """1-D, h = −1, θ₀ = −1 (g = 1), λ = 0.5·2 = 1: |h| + λ = 2 and lr 2 give s = −1 and the model change
    g s + ½ s (|h| + λ) s = −1 + 1 = 0 exactly: ρ = −inf; the step is still taken (F: −0.5 → −2)."""
    model, h, t0 = _diag_landscape([-1.0], [-1.0])
    opt = SaddleFreeNewton(model, _identity_loss, 2.0, 0.5, k=1, eigenvalue_floor=0.0, damping_grid=(2.0,),
                           targets_are_inputs=True)
    opt.step(_closure(opt, model))
    info = opt.last_step
    assert info.accepted and info.details["chosen_damping"] == 1.0 and opt.damping.damping == 1.0
    assert model.theta.detach().tolist() == [-2.0]
    assert info.reduction_ratio == float("-inf") and info.loss_after == -2.0


def test_a_candidate_with_a_non_finite_direction_is_skipped_for_the_next():
    """H = diag(−1, 1), θ₀ = (1, 1): g = (−1, 1) and the one Ritz value gᵀHg/gᵀg is exactly 0. With the
    subnormal λ_c = 1e-309 the direction overflows to inf and is skipped; λ_c = 1e-309·1e308 (≈ 0.1) gives the
    step −g/λ_c, F = −2t with t = lr/λ_c (by hand: θ = (1 + t, 1 − t))."""
    model, h, t0 = _diag_landscape([-1.0, 1.0], [1.0, 1.0])
    lam = 1e-309
    opt = SaddleFreeNewton(model, _identity_loss, 1.0, lam, k=1, eigenvalue_floor=0.0, damping_grid=(1.0, 1e308),
                           min_damping=1e-310, targets_are_inputs=True)
    opt.step(_closure(opt, model))
    info = opt.last_step
    lam_c = lam * 1e308
    t = 1.0 / lam_c
    assert info.accepted and info.details["chosen_damping"] == lam_c and info.details["ritz_max"] == 0.0
    torch.testing.assert_close(model.theta.detach(), torch.tensor([1 + t, 1 - t], dtype=F64), rtol=1e-12, atol=0)
    assert info.loss_evals == 1 and info.loss_after == pytest.approx(-2 * t, rel=1e-12)


def test_equal_losses_keep_the_first_candidate_and_a_tie_with_the_current_loss_is_rejected():
    """The loss clamped from below: two candidates that both land under the clamp tie, and the first
    (grid order) is kept; clamped at the current loss itself, no candidate decreases it: rejected."""
    model, h, t0 = _diag_landscape([-1.0, 2.0], [0.5, 0.3])
    f0 = float(0.5 * t0 @ h @ t0)  # −0.035
    clamp_low = lambda out, target: out.clamp(min=-0.5)  # noqa: E731
    opt = SaddleFreeNewton(model, clamp_low, 2.0, 0.01, k=2, eigenvalue_floor=0.0, damping_grid=(0.1, 1.0),
                           targets_are_inputs=True)
    opt.step(_closure(opt, model))
    info = opt.last_step
    assert info.accepted and info.loss_after == -0.5 and info.details["chosen_damping"] == 0.01 * 0.1
    model, h, t0 = _diag_landscape([-1.0, 2.0], [0.5, 0.3])
    clamp_here = lambda out, target: out.clamp(min=f0)  # noqa: E731
    opt = SaddleFreeNewton(model, clamp_here, 2.0, 0.01, k=2, eigenvalue_floor=0.0, damping_grid=(0.1, 1.0),
                           targets_are_inputs=True)
    opt.step(_closure(opt, model))
    info = opt.last_step
    assert info.loss == f0 and not info.accepted
    assert info.details["reason"] == "no damping candidate decreased the objective"
    assert torch.equal(model.theta.detach(), t0) and opt.damping.damping == 0.01
