"""E1: empirical Lipschitz constants and mean-value consistency.

Oracles: least squares has the constant Hessian X̄ᵀX̄/N, so L = λmax exactly, every difference
quotient is <= L and L_H = L.  Smooth problems (logistic regression, tanh MLP) must be consistent.
Planted violation: a loss whose autograd gradient is doubled by a custom autograd.Function (its
values are right): the Taylor form of the check catches it with the HVPs of the same loss, and the
gradient form catches it against a trusted reference loss.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convergence import problems
from convergence.checks.smoothness import (
    SmoothnessConfig,
    check_smoothness,
    hessian_norm,
    hessian_norm_lower_bound,
)
from convergence.checks.variance import flat_parameters
from convergence.results import Verdict




class DoubledGradient(torch.autograd.Function):
    """Identity in the forward pass; the backward pass (and hence every HVP) is scaled by 2."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return 2.0 * grad

    @staticmethod
    def jvp(ctx, tangent):
        return tangent


def _gd_iterates(prob, steps: int, lr: float) -> list[torch.Tensor]:
    x, y = prob.full_batch
    its = []
    for _ in range(steps):
        its.append(flat_parameters(prob.model))
        g = prob.gradient()
        prob.set_parameters_flat(prob.parameters_flat() - lr * g)
    its.append(flat_parameters(prob.model))
    return its


def test_least_squares_is_consistent_and_matches_the_analytic_L(device):
    prob = problems.least_squares(n=128, d=4, outputs=2, seed=0, device=device)
    L = prob.lipschitz
    its = _gd_iterates(prob, 4, 0.5 / L)
    x, y = prob.full_batch
    res = check_smoothness(prob.model, prob.loss_fn, x, y, its, steps=list(range(5)))
    assert res.verdict is Verdict.PASS
    assert res.evidence["num_violations"] == 0
    assert res.evidence["L_H"] == pytest.approx(L, rel=1e-8)
    assert res.statistic <= L * (1 + 1e-9)  # difference quotients are Rayleigh-type: <= lambda_max
    assert res.statistic >= 0.3 * L
    assert res.evidence["L_up"] == pytest.approx(2 * L, rel=1e-8)
    centers = res.evidence["per_center"]
    assert [c["step"] for c in centers] == [0, 2, 4]
    assert all(c["x_norm"] > 0 and c["hessian_norm"] == pytest.approx(L, rel=1e-8) for c in centers)
    # parameters restored
    torch.testing.assert_close(flat_parameters(prob.model), its[-1], rtol=0, atol=0)


def test_hessian_norm_lanczos_matches_dense_oracle(device):
    prob = problems.softmax_regression(n=64, d=30, classes=3, seed=1, device=device)  # n = 93 > dense threshold
    x, y = prob.full_batch
    exact = float(torch.linalg.eigvalsh(prob.hessian()).abs().max())
    assert hessian_norm(prob.model, prob.loss_fn, x, y, tol=1e-10) == pytest.approx(exact, rel=1e-7)
    # ARPACK (scipy, CPU), the previous implementation, as a second oracle of the device Lanczos
    from scipy.sparse.linalg import eigsh

    from convergence.hessian import HessianOperator

    lin = HessianOperator(prob.model, prob.loss_fn, x, y).to_scipy()
    arpack = float(np.abs(eigsh(lin, k=1, which="LM", tol=1e-10, v0=np.ones(lin.shape[0]),
                                return_eigenvectors=False)).max())
    assert hessian_norm(prob.model, prob.loss_fn, x, y) == pytest.approx(arpack, rel=1e-6)
    with pytest.raises(RuntimeError, match="did not converge"):
        hessian_norm(prob.model, prob.loss_fn, x, y, tol=0.0, max_steps=3)
    lower = hessian_norm_lower_bound(prob.model, prob.loss_fn, x, y, num_steps=8)
    assert lower <= exact * (1 + 1e-10)
    assert lower >= 0.5 * exact


@pytest.mark.parametrize("name", ["logistic", "mlp"])
def test_smooth_problems_are_consistent(device, name):
    if name == "logistic":
        prob = problems.logistic_regression(n=96, d=4, seed=3, device=device)
    else:
        prob = problems.tanh_mlp(n=96, seed=3, device=device)
    its = _gd_iterates(prob, 3, 0.5)
    x, y = prob.full_batch
    res = check_smoothness(prob.model, prob.loss_fn, x, y, its, seed=1)
    assert res.verdict is Verdict.PASS, res.notes
    if prob.lipschitz is not None:
        assert res.evidence["L_H"] <= prob.lipschitz * (1 + 1e-9)
        assert res.statistic <= prob.lipschitz * (1 + 1e-9)


def test_doubled_gradient_fails_the_taylor_form(device):
    prob = problems.least_squares(n=128, d=4, seed=0, device=device)
    its = _gd_iterates(prob, 2, 0.1)
    x, y = prob.full_batch

    def bad_loss(out, target):
        return DoubledGradient.apply(prob.loss_fn(out, target))

    res = check_smoothness(prob.model, bad_loss, x, y, its, radii=(1e-3, 1e-1))
    assert res.verdict is Verdict.FAIL
    assert res.evidence["deterministic_fail"] is True
    rows = res.evidence["pairs"]
    assert any(r["taylor_violated"] for r in rows)
    # the HVPs differentiate the doubled gradient, so the gradient form alone stays consistent
    assert not any(r["gradient_violated"] for r in rows)
    assert res.evidence["L_H"] == pytest.approx(2 * prob.lipschitz, rel=1e-8)


def test_doubled_gradient_fails_the_gradient_form_against_a_reference(device):
    prob = problems.least_squares(n=128, d=4, seed=0, device=device)
    its = _gd_iterates(prob, 2, 0.1)
    x, y = prob.full_batch

    def bad_loss(out, target):
        return DoubledGradient.apply(prob.loss_fn(out, target))

    res = check_smoothness(prob.model, bad_loss, x, y, its, hessian_loss_fn=prob.loss_fn, radii=(1e-3, 1e-1))
    assert res.verdict is Verdict.FAIL
    assert any(r["gradient_violated"] for r in res.evidence["pairs"])
    assert res.evidence["L_H"] == pytest.approx(prob.lipschitz, rel=1e-8)
    assert res.statistic > 1.5 * prob.lipschitz  # L_hat of the doubled gradient


def test_minimum_separation_makes_it_not_applicable(device):
    prob = problems.least_squares(n=32, d=3, seed=0, device=device)
    x, y = prob.full_batch
    theta = flat_parameters(prob.model)
    res = check_smoothness(prob.model, prob.loss_fn, x, y, [theta, theta.clone()], radii=(1e-9,), centers=[0],
                           filter_normalized=True)
    assert res.verdict is Verdict.NOT_APPLICABLE and "rounding dominates" in res.reason
    assert res.evidence["num_pairs"] == 0
    assert res.evidence["num_skipped"] == 3  # the iterate pair, one random and one filter-normalized pair
    assert math.isnan(res.statistic)


def test_user_oracles_and_iterate_pairs():
    """A hand-made gradient field with a known norm oracle: g(x) = 3x, |H| = 3 is consistent; |H| = 1 is not."""
    model = torch.nn.Linear(2, 1, bias=False).double()
    pts = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)]

    def loss(out, y):
        return 1.5 * (model.weight ** 2).sum() + 0.0 * out.sum()

    x = torch.zeros(1, 2, dtype=torch.float64)
    ok = check_smoothness(model, loss, x, None, pts, iterate_pairs=[(0, 1)], hessian_norm_fn=lambda t: 3.0,
                          radii=(0.5,), num_random=1, filter_normalized=False)
    assert ok.verdict is Verdict.PASS and ok.statistic == pytest.approx(3.0)
    bad = check_smoothness(model, loss, x, None, pts, iterate_pairs=[(0, 1)], hessian_norm_fn=lambda t: 1.0,
                           radii=(0.5,), num_random=1, filter_normalized=False)
    assert bad.verdict is Verdict.FAIL
    assert all(r["grid_points"] == 17 for r in bad.evidence["pairs"])  # refined twice before failing


def test_config_validation():
    with pytest.raises(ValueError, match="radii"):
        SmoothnessConfig(radii=(0.0,))
    with pytest.raises(ValueError, match="tolerance"):
        SmoothnessConfig(tolerance=0.9)
    with pytest.raises(ValueError, match="t_points"):
        SmoothnessConfig(t_points=1)
