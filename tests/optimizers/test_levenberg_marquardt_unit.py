"""One Levenberg–Marquardt step at a time against dense float64 oracles (torch.func Jacobians, linalg.solve).

A linear model under the half squared error has F(θ + δ) − F(θ) = gᵀδ + ½δᵀJᵀJδ exactly, so the LM
direction, the reduction ratio (ρ = 1), the momentum combination and the accepted point can all be
written down from the dense Jacobian J.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvature.damping import DelayedGratification, Tikhonov
from optimizers.levenberg_marquardt import LevenbergMarquardt, uphill_accepts
from tests.optimizers.closures import loss_closure

F64 = torch.float64


def half_sse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum()


def _mse_mean(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian of the flattened outputs (N*O x n), float64."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def out(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,)).reshape(-1)

    jac = torch.func.jacrev(out, argnums=tuple(range(len(params))))(*params)
    return torch.cat([t.reshape(t.shape[0], -1) for t in jac], dim=1)


def _linear_problem(device, seed: int = 0, n_in: int = 3, n_out: int = 2, batch: int = 6):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(n_in, n_out).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randn(batch, n_in, generator=gen, dtype=F64)
    y = torch.randn(batch, n_out, generator=gen, dtype=F64)
    return model.to(device), x.to(device), y.to(device)


def _closure(opt, model, x, y, loss_fn=half_sse):
    return loss_closure(opt, model, loss_fn, x, y)


def _oracle(model, x, y):
    """(J, r, g = Jᵀr, F) of the half squared error summed, from the dense Jacobian."""
    j = _jacobian(model, x)
    r = (model(x) - y).detach().reshape(-1)
    return j, r, j.T @ r, 0.5 * float(r @ r)


# ------------------------------------------------------------------ uphill rule
def test_uphill_rule_uses_the_cosine_of_vectors_of_any_length(device):
    """cos β = sᵀp / (|s| |p|) for a step of length 3 and a previous step of length 2 (cos β = 0.9):
    (1 − 0.9)² F' ≤ F admits F' up to 100 F."""
    prev = torch.tensor([2.0, 0.0], dtype=F64, device=device)
    step = 3.0 * torch.tensor([0.9, math.sqrt(1 - 0.81)], dtype=F64, device=device)
    assert uphill_accepts(99.0, 1.0, step, prev, 2.0)
    assert not uphill_accepts(101.0, 1.0, step, prev, 2.0)
    # the same vectors the other way round: the cosine is symmetric
    assert uphill_accepts(99.0, 1.0, prev, step, 2.0) and not uphill_accepts(101.0, 1.0, prev, step, 2.0)
    # power b = 1: (0.1) F' <= F admits F' up to 10 F
    assert uphill_accepts(9.9, 1.0, step, prev, 1.0) and not uphill_accepts(10.1, 1.0, step, prev, 1.0)


# ------------------------------------------------------------------ identity damping
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_identity_damping_step_is_the_dense_lm_solve(device, weight_decay):
    """p = −(JᵀJ + τI + λI)⁻¹(g + τθ); on a linear model ρ = 1 and λ goes down by 3."""
    model, x, y = _linear_problem(device)
    lam = 0.7
    theta = _flat(model)
    j, _, g, f = _oracle(model, x, y)
    n = theta.numel()
    eye = torch.eye(n, dtype=F64, device=device)
    grad = g + weight_decay * theta
    expected = -torch.linalg.solve(j.T @ j + (weight_decay + lam) * eye, grad)
    opt = LevenbergMarquardt(model, half_sse, damping=lam, weight_decay=weight_decay, max_line_search=0,
                             cg_tol=1e-14)
    seen = []
    opt.register_step_hook(lambda info: seen.append((info.operator_shift.clone(), info.operator(eye[:, 0]).clone())))
    opt.step(_closure(opt, model, x, y), targets=y)
    info = opt.last_step
    assert info.accepted and info.step_scale == 1.0
    torch.testing.assert_close(_flat(model) - theta, expected, rtol=1e-9, atol=1e-12)
    # the published system: shift τ + λ on every coordinate, operator JᵀJ (uncounted, no τ)
    shift, col = seen[0]
    torch.testing.assert_close(shift, torch.full((n,), weight_decay + lam, dtype=F64, device=device))
    torch.testing.assert_close(col, (j.T @ j)[:, 0], rtol=1e-10, atol=1e-12)
    # a quadratic objective: the model predicts the change exactly
    assert math.isclose(info.reduction_ratio, 1.0, rel_tol=1e-8)
    assert math.isclose(opt.damping.damping, lam / 3, rel_tol=1e-12)
    f_new = 0.5 * float(((model(x).detach() - y) ** 2).sum()) + 0.5 * weight_decay * float(_flat(model) @ _flat(model))
    assert math.isclose(info.loss_after, f_new, rel_tol=1e-12)
    assert math.isclose(info.loss, f + 0.5 * weight_decay * float(theta @ theta), rel_tol=1e-12)
    assert info.details["line_search_tries"] == 0 and info.details["cg_stop"] == "tolerance"
    assert 1 <= info.details["cg_iterations"] <= n
    # cost: one product per CG iteration plus one for the model change; one forward (the trial at lr = 1)
    assert info.products == info.details["cg_iterations"] + 1 and info.loss_evals == 1


# ------------------------------------------------------------------ maximum-diagonal damping, Monte Carlo
def test_monte_carlo_diagonal_is_one_rademacher_draw_per_example(device):
    """diagonal_samples=1 with two outputs: example i contributes (J_i,1 ± J_i,2)², one sign per example.
    The stored D is one of the 2^N sign patterns from the dense Jacobian (and not the exact diagonal);
    the step records min and max of D."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).to(device=device, dtype=F64)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, generator=gen, dtype=F64).to(device)
    y = torch.randn(3, 2, generator=gen, dtype=F64).to(device)
    j = _jacobian(model, x).reshape(3, 2, -1)  # (example, output, parameter)
    plus, minus = (j[:, 0] + j[:, 1]) ** 2, (j[:, 0] - j[:, 1]) ** 2
    candidates = [sum(plus[i] if s else minus[i] for i, s in enumerate(signs)) / 3
                  for signs in itertools.product([True, False], repeat=3)]
    exact = (j ** 2).sum(dim=(0, 1)) / 3
    opt = LevenbergMarquardt(model, _mse_mean, damping=0.5, damping_matrix="max_diagonal", diagonal_samples=1)
    opt.step(_closure(opt, model, x, y, _mse_mean), targets=y)
    stored = opt._get_vector("max_diagonal")
    matches = [c for c in candidates if torch.allclose(stored, c, rtol=1e-12, atol=1e-15)]
    assert len(matches) == 1
    assert not torch.allclose(stored, exact, rtol=1e-3)
    details = opt.last_step.details
    assert math.isclose(details["max_diagonal_min"], float(matches[0].min()), rel_tol=1e-12)
    assert math.isclose(details["max_diagonal_max"], float(matches[0].max()), rel_tol=1e-12)


def _set(model: nn.Module, **values) -> nn.Module:
    with torch.no_grad():
        for name, value in values.items():
            getattr(model, name).copy_(torch.as_tensor(value, dtype=F64))
    return model


def test_non_finite_gauss_newton_diagonal_rejects_the_step_and_raises_damping(device):
    """ŷ = w·x with w = 1e-200, x = 1e200: loss ½(1 − 0.5)² and gradient x·0.5 = 5e199 are finite, but
    diag(JᵀJ) = x² overflows to inf: no step, λ doubles, the reason is recorded, nothing is evaluated."""
    model = _set(nn.Linear(1, 1, bias=False).to(F64), weight=[[1e-200]]).to(device)
    x = torch.tensor([[1e200]], dtype=F64, device=device)
    y = torch.tensor([[0.5]], dtype=F64, device=device)
    opt = LevenbergMarquardt(model, _mse_mean, damping=0.25, damping_matrix="max_diagonal")
    opt.step(_closure(opt, model, x, y, _mse_mean), targets=y)
    info = opt.last_step
    assert not info.skipped and not info.accepted and opt.counters["rejected_steps"] == 1
    assert info.details["reason"] == "non-finite Gauss-Newton diagonal"
    assert opt.damping.damping == 0.5 and opt.damping.history == [(float("-inf"), 0.5)]
    assert info.products == 0 and info.loss_evals == 0
    assert float(model.weight.detach()) == 1e-200 and opt._get_vector("max_diagonal") is None


def test_zero_gauss_newton_diagonal_is_damped_with_the_identity(device):
    """ŷ = w₂·relu(w₁x) with w₁x < 0 on the whole batch: J = 0, so D = 0 (max 0) and the damping term
    published to the hooks is λ·1, not λ·0; g = 0, so CG returns δ = 0 and the step is rejected."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.ReLU(), nn.Linear(1, 1, bias=False)).to(F64)
    _set(model[0], weight=[[-1.0]])
    _set(model[2], weight=[[2.0]])
    model.to(device)
    x = torch.tensor([[1.0], [2.0]], dtype=F64, device=device)
    y = torch.tensor([[0.3], [-0.4]], dtype=F64, device=device)
    opt = LevenbergMarquardt(model, _mse_mean, damping=0.25, damping_matrix="max_diagonal")
    shifts = []
    opt.register_step_hook(lambda info: shifts.append(info.operator_shift.clone()))
    opt.step(_closure(opt, model, x, y, _mse_mean), targets=y)
    torch.testing.assert_close(opt._get_vector("max_diagonal"), torch.zeros(2, dtype=F64, device=device))
    torch.testing.assert_close(shifts[0], torch.full((2,), 0.25, dtype=F64, device=device))
    assert not opt.last_step.accepted and opt.last_step.details["reason"] == "no acceptable step scale"
    # F(θ + αδ) = F(θ) is no decrease: all five halvings are tried (1 + 5 forwards at lr = 1)
    assert opt.last_step.details["line_search_tries"] == 5 and opt.last_step.loss_evals == 6


def test_max_diagonal_floor_is_relative_to_the_largest_entry(device):
    """D_k ≥ floor·max_j D_k,j: with one input scaled by 1e-3 its weights' diagonal entries lie far below the
    floor 0.1·max D, are raised to exactly that, and the step solves (JᵀJ/N + λ·clamp(D, 0.1·max D)) p = −g.
    The stored running maximum is not floored."""
    model, x, y = _linear_problem(device, seed=4, n_in=3, n_out=2, batch=8)
    x = x * torch.tensor([1e-3, 2.0, 3.0], dtype=F64, device=device)
    lam, floor = 0.6, 0.1
    theta = _flat(model)
    j = _jacobian(model, x)
    n_batch = x.shape[0]
    ggn = j.T @ j / n_batch
    d = torch.diagonal(ggn)
    top = float(d.max())
    assert top > 2.0 and int((d < floor / top).sum()) == 2  # the two weights of input 0
    floored = torch.clamp(d, min=floor * top)
    r = (model(x).detach() - y).reshape(-1)
    g = j.T @ r / n_batch
    expected = -torch.linalg.solve(ggn + lam * torch.diag(floored), g)
    opt = LevenbergMarquardt(model, _mse_mean, damping=DelayedGratification(lam), damping_matrix="max_diagonal",
                             diagonal_floor=floor, max_line_search=0, cg_tol=1e-14)
    shifts = []
    opt.register_step_hook(lambda info: shifts.append(info.operator_shift.clone()))
    opt.step(_closure(opt, model, x, y, _mse_mean), targets=y)
    torch.testing.assert_close(shifts[0], lam * floored, rtol=1e-12, atol=0)
    assert opt.last_step.accepted
    torch.testing.assert_close(_flat(model) - theta, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(opt._get_vector("max_diagonal"), d, rtol=1e-12, atol=1e-15)
    assert math.isclose(opt.last_step.details["max_diagonal_min"], float(d.min()), rel_tol=1e-12)
    assert math.isclose(opt.last_step.details["max_diagonal_max"], top, rel_tol=1e-12)


def test_cg_is_capped_at_max_cg_iters(device):
    """max_cg_iters=1: one CG iteration from 0 is the exact line search along −g on the damped system,
    p = −(gᵀg / gᵀAg) g with A = JᵀJ + λI."""
    model, x, y = _linear_problem(device, seed=2)
    lam = 0.2
    theta = _flat(model)
    j, _, g, _ = _oracle(model, x, y)
    a = j.T @ j + lam * torch.eye(theta.numel(), dtype=F64, device=device)
    expected = -(g @ g) / (g @ a @ g) * g
    opt = LevenbergMarquardt(model, half_sse, damping=lam, max_cg_iters=1, max_line_search=0)
    opt.step(_closure(opt, model, x, y), targets=y)
    info = opt.last_step
    assert info.details["cg_iterations"] == 1 and info.details["cg_stop"] == "max_iters"
    assert info.accepted and info.products == 2
    torch.testing.assert_close(_flat(model) - theta, expected, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ step scale and ρ
def test_rho_is_measured_at_the_full_step_when_lr_is_not_one(device):
    """lr = 0.5: the parameters move by p/2, but ρ compares F(θ + p) with the model at p (= 1 on a quadratic),
    at the cost of a second forward; the half-step ratio would be (½gᵀp + ⅛pᵀGp)/(gᵀp + ½pᵀGp) ≠ 1."""
    model, x, y = _linear_problem(device, seed=5)
    lam = 0.4
    theta = _flat(model)
    j, _, g, f = _oracle(model, x, y)
    a = j.T @ j
    p = -torch.linalg.solve(a + lam * torch.eye(theta.numel(), dtype=F64, device=device), g)
    half_ratio = float(0.5 * g @ p + 0.125 * p @ a @ p) / float(g @ p + 0.5 * p @ a @ p)
    assert abs(half_ratio - 1.0) > 0.1
    opt = LevenbergMarquardt(model, half_sse, lr=0.5, damping=lam, max_line_search=0, cg_tol=1e-14)
    opt.step(_closure(opt, model, x, y), targets=y)
    info = opt.last_step
    assert info.accepted and info.step_scale == 0.5 and info.loss_evals == 2
    torch.testing.assert_close(_flat(model) - theta, 0.5 * p, rtol=1e-9, atol=1e-12)
    assert math.isclose(info.reduction_ratio, 1.0, rel_tol=1e-8)
    r_half = (model(x).detach() - y).reshape(-1)
    assert math.isclose(info.loss_after, 0.5 * float(r_half @ r_half), rel_tol=1e-12)


# ------------------------------------------------------------------ adaptive momentum
def test_momentum_minimizes_the_damped_model_over_the_direction_and_the_previous_step(device):
    """With one CG iteration p is the Cauchy step, so the best combination a·p + b·δ₁ on the damped model
    (the 2×2 system of the module docstring, from dense JᵀJ + λI) genuinely uses the previous step."""
    model, x, y = _linear_problem(device, seed=6, n_in=4, n_out=2, batch=10)
    lam0 = 0.3
    opt = LevenbergMarquardt(model, half_sse, damping=lam0, momentum=True, max_cg_iters=1, max_line_search=0)
    eye = torch.eye(_flat(model).numel(), dtype=F64, device=device)
    # step 1: no previous step, the plain Cauchy step; ρ = 1 on a quadratic, so λ goes down by 3
    theta0 = _flat(model)
    j, _, g0, _ = _oracle(model, x, y)
    a0 = j.T @ j + lam0 * eye
    d0 = -(g0 @ g0) / (g0 @ a0 @ g0) * g0
    opt.step(_closure(opt, model, x, y), targets=y)
    assert opt.last_step.accepted and "momentum" not in opt.last_step.details
    torch.testing.assert_close(_flat(model) - theta0, d0, rtol=1e-10, atol=1e-13)
    assert math.isclose(opt.damping.damping, lam0 / 3, rel_tol=1e-12)
    # step 2
    theta1 = _flat(model)
    _, _, g1, _ = _oracle(model, x, y)
    a1 = j.T @ j + lam0 / 3 * eye
    p1 = -(g1 @ g1) / (g1 @ a1 @ g1) * g1
    basis = torch.stack([p1, d0], dim=1)
    coeff = torch.linalg.solve(basis.T @ a1 @ basis, -(basis.T @ g1))
    assert abs(float(coeff[1])) > 1e-2 and abs(float(coeff[0]) - 1.0) > 1e-2
    opt.step(_closure(opt, model, x, y), targets=y)
    info = opt.last_step
    assert info.accepted
    torch.testing.assert_close(_flat(model) - theta1, basis @ coeff, rtol=1e-9, atol=1e-12)
    assert math.isclose(info.details["momentum"], float(coeff[1]), rel_tol=1e-9)
    assert info.products == 1 + 2 + 1  # CG, the two momentum products, the model change


def test_momentum_with_a_parallel_previous_step_keeps_the_lm_direction(device):
    """One parameter: δ and δ₁ are parallel, the 2×2 system is exactly singular, and the step stays the LM
    direction. ŷ = w·1, y = 1, w₀ = 0, fixed λ = 1 (A = 2): δ₁ = 0.5, then δ = 0.25 (w = 0.75)."""
    model = _set(nn.Linear(1, 1, bias=False).to(F64), weight=[[0.0]]).to(device)
    x = torch.tensor([[1.0]], dtype=F64, device=device)
    y = torch.tensor([[1.0]], dtype=F64, device=device)
    opt = LevenbergMarquardt(model, half_sse, damping=Tikhonov(1.0), momentum=True)
    opt.step(_closure(opt, model, x, y), targets=y)
    assert float(model.weight.detach()) == 0.5
    opt.step(_closure(opt, model, x, y), targets=y)
    assert float(model.weight.detach()) == 0.75
    assert opt.last_step.accepted and "momentum" not in opt.last_step.details


# ------------------------------------------------------------------ non-finite direction
def test_non_finite_lm_direction_is_rejected_and_raises_damping(device):
    """A loss linear in the output has a zero GGN, so p = −g/λ; with g = 1e10 and λ = 1e-300 it overflows:
    no step, the reason is recorded, λ doubles (then clipped to DelayedGratification's floor 1e-12)."""
    model = _set(nn.Linear(1, 1, bias=False).to(F64), weight=[[1.0]]).to(device)
    x = torch.tensor([[1e10]], dtype=F64, device=device)
    y = torch.tensor([[1.0]], dtype=F64, device=device)

    def linear_loss(out, target):
        return (out * target).sum()

    opt = LevenbergMarquardt(model, linear_loss, damping=1e-300)
    opt.step(_closure(opt, model, x, y, linear_loss), targets=y)
    info = opt.last_step
    assert not info.accepted and info.details["reason"] == "non-finite LM direction"
    assert opt.damping.history == [(float("-inf"), 1e-12)]
    assert info.loss_evals == 0 and float(model.weight.detach()) == 1.0


# ------------------------------------------------------------------ uphill acceptance
class _Exp(nn.Module):
    def forward(self, z):
        return torch.exp(z)


def _exp_problem(device):
    """ŷ = exp(w), y = e², w₀ = 0: one parameter, J = exp(w), G = exp(2w)."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), _Exp()).to(F64)
    _set(model[0], weight=[[0.0]])
    return model.to(device), torch.ones(1, 1, dtype=F64, device=device), torch.full((1, 1), math.exp(2.0), dtype=F64,
                                                                                 device=device)


def _exp_oracle(w: float, lam: float) -> tuple[float, float]:
    """(F(w), LM step at w) for ŷ = exp(w), y = e²."""
    r, jac = math.exp(w) - math.exp(2.0), math.exp(w)
    return 0.5 * r * r, -jac * r / (jac * jac + lam)


@pytest.mark.parametrize("uphill", [False, True])
def test_uphill_acceptance_takes_an_increase_along_the_previous_step(device, uphill):
    """lr = 2 on ŷ = exp(w). Step 1 (no previous step) overshoots and halves three times (α = 0.25). Step 2 moves the
    same way (cos β = 1): its trial F(w₁ + 2δ₂) > F(w₁) is taken by the uphill rule when it is on (α = 2,
    recorded); without it the line search halves once (α = 1, downhill)."""
    model, x, y = _exp_problem(device)
    opt = LevenbergMarquardt(model, half_sse, lr=2.0, damping=1e-3, uphill=uphill)
    f0, d1 = _exp_oracle(0.0, 1e-3)
    assert [_exp_oracle(alpha * d1, 0.0)[0] < f0 for alpha in (2.0, 1.0, 0.5, 0.25)] == [False, False, False, True]
    opt.step(_closure(opt, model, x, y), targets=y)
    info = opt.last_step
    assert info.accepted and info.step_scale == 0.25 and info.details["line_search_tries"] == 3
    assert "uphill" not in info.details
    w1 = 0.25 * d1
    assert math.isclose(float(model[0].weight.detach()), w1, rel_tol=1e-12)
    assert opt.damping.damping == 2e-3  # ρ < 0: F(w₀ + δ₁) > F(w₀)
    f1, d2 = _exp_oracle(w1, 2e-3)
    f_up = 0.5 * (math.exp(w1 + 2 * d2) - math.exp(2.0)) ** 2
    assert d2 > 0 and f_up > f1
    opt.step(_closure(opt, model, x, y), targets=y)
    info = opt.last_step
    assert info.accepted
    if uphill:
        assert info.details["uphill"] is True and info.step_scale == 2.0 and info.details["line_search_tries"] == 0
        assert math.isclose(float(model[0].weight.detach()), w1 + 2 * d2, rel_tol=1e-12)
        assert math.isclose(info.loss_after, f_up, rel_tol=1e-10)
    else:
        assert "uphill" not in info.details and info.step_scale == 1.0 and info.details["line_search_tries"] == 1
        assert math.isclose(float(model[0].weight.detach()), w1 + d2, rel_tol=1e-12)
        assert info.loss_after < f1


def test_uphill_rule_is_not_consulted_without_a_previous_step(device):
    """Step 1 with uphill on and a failing trial: there is no previous step, so the line search decides."""
    model, x, y = _exp_problem(device)
    opt = LevenbergMarquardt(model, half_sse, lr=2.0, damping=1e-3, uphill=True, max_line_search=0)
    opt.step(_closure(opt, model, x, y), targets=y)
    assert not opt.last_step.accepted and opt.last_step.details["reason"] == "no acceptable step scale"
    assert float(model[0].weight.detach()) == 0.0
    # max_line_search=0: no halving; the forwards are the trial at α = 2 and F(θ + δ) for ρ
    assert opt.last_step.details["line_search_tries"] == 0 and opt.last_step.loss_evals == 2


# ------------------------------------------------------------------ CG settings
def test_lm_cg_runs_to_its_tolerance_without_the_progress_stop(device):
    """An ill-conditioned 25-parameter least-squares problem that needs many CG iterations: the LM system is
    solved to cg_tol (Martens's relative-progress stop is off), matching the dense solve."""
    gen = torch.Generator().manual_seed(9)
    model = nn.Linear(24, 1).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randn(60, 24, generator=gen, dtype=F64) * torch.logspace(-2, 1, 24, dtype=F64)
    y = torch.randn(60, 1, generator=gen, dtype=F64)
    model, x, y = model.to(device), x.to(device), y.to(device)
    lam = 1e-4
    theta = _flat(model)
    j, _, g, _ = _oracle(model, x, y)
    expected = -torch.linalg.solve(j.T @ j + lam * torch.eye(25, dtype=F64, device=device), g)
    opt = LevenbergMarquardt(model, half_sse, damping=lam, max_line_search=0, cg_tol=1e-12)
    opt.step(_closure(opt, model, x, y), targets=y)
    info = opt.last_step
    assert info.details["cg_stop"] == "tolerance" and info.details["cg_iterations"] > 11
    torch.testing.assert_close(_flat(model) - theta, expected, rtol=1e-8, atol=1e-10)
