"""Truncated CG and the Krylov |H|^-1 against dense float64 oracles."""

from __future__ import annotations

import math

import pytest
import torch

from curvature.krylov import backtracking_schedule, saddle_free_operator, truncated_cg
from tests.curvature.oracles import seeded_vector as _vec, spectrum_matrix as _spectrum_matrix

F64 = torch.float64


def test_cg_solves_spd_system_and_a_norm_error_is_monotone(device):
    eigs = [10.0 ** (3 * i / 11 - 1) for i in range(12)]
    a = _spectrum_matrix(eigs, 0, device)
    b = _vec(12, 1, device)
    x_star = torch.linalg.solve(a, b)
    errors = []
    res = truncated_cg(lambda v: a @ v, b, max_iters=200, tol=1e-13, progress_eps=None,
                       callback=lambda i, x, r: errors.append(float(torch.sqrt((x - x_star) @ a @ (x - x_star)))))
    assert res.stop_reason == "tolerance" and res.products == res.iterations
    torch.testing.assert_close(res.x, x_star, rtol=1e-10, atol=1e-12)
    assert len(errors) == res.iterations + 1
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:]))
    # phi(x_i) = 1/2 x^T A x - b^T x is recorded without products and decreases as well
    for (i, xi) in res.saved:
        expected = float(0.5 * xi @ a @ xi - b @ xi)
        assert math.isclose(res.phi[i], expected, rel_tol=1e-9, abs_tol=1e-12)
    assert all(p1 <= p0 + 1e-13 * abs(p0) for p0, p1 in zip(res.phi, res.phi[1:]))


def test_cg_warm_start_and_tolerance(device):
    a = _spectrum_matrix([1.0, 2.0, 3.0, 5.0, 8.0, 13.0], 2, device)
    b = _vec(6, 3, device)
    x_star = torch.linalg.solve(a, b)
    done = truncated_cg(lambda v: a @ v, b, x0=x_star, tol=1e-8)
    assert done.iterations == 0 and done.stop_reason == "tolerance" and done.products == 1
    big = _spectrum_matrix([10.0 ** (2 * i / 29) for i in range(30)], 17, device)
    b = _vec(30, 18, device)
    x_star = torch.linalg.solve(big, b)
    cold = truncated_cg(lambda v: big @ v, b, tol=1e-6, progress_eps=None)
    warm = truncated_cg(lambda v: big @ v, b, x0=x_star + 1e-5 * _vec(30, 4, device), tol=1e-6, progress_eps=None)
    assert warm.stop_reason == cold.stop_reason == "tolerance"
    assert warm.iterations < cold.iterations
    torch.testing.assert_close(warm.x, x_star, rtol=1e-5, atol=1e-6)


def test_cg_relative_progress_rule(device):
    """On a badly conditioned system CG stops by Martens's rule, and the rule holds where it stopped."""
    n = 80
    eigs = [10.0 ** (6 * i / (n - 1) - 3) for i in range(n)]
    a = _spectrum_matrix(eigs, 5, device)
    b = _vec(n, 6, device)
    res = truncated_cg(lambda v: a @ v, b, max_iters=500, progress_eps=5e-4)
    assert res.stop_reason == "progress"
    i = res.iterations
    k = max(10, math.ceil(0.1 * i))
    assert i > k and res.phi[i] < 0 and (res.phi[i] - res.phi[i - k]) / res.phi[i] < k * 5e-4
    j = i - 1  # it did not hold one iteration earlier
    kj = max(10, math.ceil(0.1 * j))
    assert not (j > kj and (res.phi[j] - res.phi[j - kj]) / res.phi[j] < kj * 5e-4)


def test_backtracking_schedule_and_saved_iterates(device):
    assert backtracking_schedule(14) == [1, 2, 3, 4, 5, 7, 9, 11, 14]
    a = _spectrum_matrix([1.0 + i for i in range(20)], 7, device)
    b = _vec(20, 8, device)
    seen = {}
    res = truncated_cg(lambda v: a @ v, b, max_iters=15, progress_eps=None,
                       callback=lambda i, x, r: seen.__setitem__(i, x.clone()))
    assert [i for i, _ in res.saved] == [1, 2, 3, 4, 5, 7, 9, 11, 14, 15]
    for i, x in res.saved:
        assert torch.equal(x, seen[i])
    with pytest.raises(ValueError):
        backtracking_schedule(10, gamma=1.0)


def test_cg_stops_on_negative_curvature(device):
    a = _spectrum_matrix([-1.0, 2.0, 3.0], 9, device)
    b = _vec(3, 10, device)
    res = truncated_cg(lambda v: a @ v, b, max_iters=10, progress_eps=None)
    assert res.stop_reason == "negative_curvature"
    assert bool(torch.isfinite(res.x).all())


def test_preconditioned_cg(device):
    d = torch.tensor([1e-2, 1.0, 1e2, 1e4], dtype=F64, device=device)
    a = torch.diag(d) + 1e-3 * torch.ones(4, 4, dtype=F64, device=device)
    b = _vec(4, 11, device)
    res = truncated_cg(lambda v: a @ v, b, max_iters=4, progress_eps=None, preconditioner=lambda r: r / d)
    torch.testing.assert_close(res.x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)


def test_cg_rejects_bad_input(device):
    a = torch.eye(3, dtype=F64, device=device)
    with pytest.raises(ValueError):
        truncated_cg(lambda v: a @ v, torch.tensor([1.0, float("nan"), 0.0], dtype=F64, device=device))
    with pytest.raises(ValueError):
        truncated_cg(lambda v: a @ v, torch.ones(3, 1, dtype=F64, device=device))
    with pytest.raises(ValueError):
        truncated_cg(lambda v: a @ v, torch.ones(3, dtype=F64, device=device), max_iters=0)


def test_saddle_free_full_krylov_equals_abs_inverse(device):
    eigs = [-3.0, -0.5, 0.25, 1.0, 4.0, -7.0]
    h = _spectrum_matrix(eigs, 12, device)
    g = _vec(6, 13, device)
    sfo, lan = saddle_free_operator(lambda v: h @ v, g, 6)
    evals, evecs = torch.linalg.eigh(h)
    abs_inv = evecs @ torch.diag(1.0 / evals.abs()) @ evecs.T
    torch.testing.assert_close(sfo.solve(g), abs_inv @ g, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(sfo.to_dense(), abs_inv, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(sfo.matvec(sfo.solve(g)), g, rtol=1e-10, atol=1e-12)
    # floor mu and damping lambda: 1/(max(|l|, mu) + lambda) on every eigen-direction
    sfo2, _ = saddle_free_operator(lambda v: h @ v, g, 6, floor=1.0, damping=0.1)
    expected = evecs @ torch.diag(1.0 / (evals.abs().clamp_min(1.0) + 0.1)) @ evecs.T
    torch.testing.assert_close(sfo2.to_dense(), expected, rtol=1e-9, atol=1e-11)


def test_saddle_free_complement_gets_damped_gradient_step(device):
    h = _spectrum_matrix([-2.0, 1.0, 3.0, 5.0, 0.5, 9.0, -4.0, 2.0], 14, device)
    start = _vec(8, 15, device)
    sfo, lan = saddle_free_operator(lambda v: h @ v, start, 3, floor=0.1, damping=0.2)
    q = lan.basis
    assert q.shape == (8, 3)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=F64, device=device), rtol=0, atol=1e-12)
    outside = _vec(8, 16, device)
    outside = outside - q @ (q.T @ outside)
    c = sfo.complement_curvature
    t = q.T @ h @ q  # Ritz values from the dense projection: c = max(max(|theta|, mu)) + lambda
    assert math.isclose(c, float(torch.linalg.eigvalsh(t).abs().clamp_min(0.1).max()) + 0.2, rel_tol=1e-10)
    torch.testing.assert_close(sfo.solve(outside), outside / c, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        saddle_free_operator(lambda v: h @ v, start, 0)
    with pytest.raises(ValueError):
        saddle_free_operator(lambda v: h @ v, start, 2, floor=-1.0)
