"""curvature.krylov piece by piece against dense float64 oracles and hand computation (settings, messages,
every field of the results, the documented stopping rules)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from curvature.krylov import backtracking_schedule, lanczos, saddle_free_operator, truncated_cg
from curvature.products import MatvecOperator
from tests.curvature.oracles import seeded_vector as _vec, spectrum_matrix as _spd

F64 = torch.float64


def _raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


# ============================================================================ truncated CG
def test_cg_validation_messages(device):
    a = torch.eye(3, dtype=F64, device=device)
    b = torch.ones(3, dtype=F64, device=device)

    def mv(v):
        return a @ v

    with _raises("b must be a 1-D tensor"):
        truncated_cg(mv, b[:, None])
    for bad in (True, 2.0, 0):
        with _raises(f"max_iters must be an integer >= 1, got {bad!r}"):
            truncated_cg(mv, b, max_iters=bad)
    for bad in (-1.0, float("inf"), float("nan")):
        with _raises(f"tol must be a finite number >= 0, got {bad!r}"):
            truncated_cg(mv, b, tol=bad)
    for bad in (0.0, -1.0, float("inf")):
        with _raises(f"progress_eps must be > 0 or None, got {bad!r}"):
            truncated_cg(mv, b, progress_eps=bad)
    with _raises("b is not finite"):
        truncated_cg(mv, torch.tensor([1.0, float("inf"), 0.0], dtype=F64, device=device))
    for x0 in (torch.ones(4, dtype=F64, device=device), torch.tensor([0.0, float("nan"), 0.0], dtype=F64, device=device)):
        with _raises("x0 must be a finite tensor shaped like b"):
            truncated_cg(mv, b, x0=x0)


def test_cg_accepts_a_curvature_operator(device):
    a = _spd([1.0, 2.0, 4.0], 1, device)
    b = _vec(3, 2, device)
    res = truncated_cg(MatvecOperator(lambda v: a @ v, 3, device=device), b, tol=1e-12)
    torch.testing.assert_close(res.x, torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)


def test_cg_records_phi_residuals_and_callbacks_from_a_warm_start(device):
    """phi[i] = ½xᵢᵀAxᵢ − bᵀxᵢ and residual_norms[i] = ‖b − Axᵢ‖ for i = 0.. (x₀ = the warm start), and the
    callback sees (i, xᵢ, b − Axᵢ) for i = 0..iterations; products = 1 (for Ax₀) + iterations."""
    a = _spd([0.5, 1.0, 2.0, 3.0, 5.0, 8.0], 3, device)
    b = _vec(6, 4, device)
    x0 = _vec(6, 5, device)
    seen = []
    res = truncated_cg(lambda v: a @ v, b, x0=x0, max_iters=4, progress_eps=None,
                       callback=lambda i, x, r: seen.append((i, x.clone(), r.clone())))
    assert res.stop_reason == "max_iters" and res.iterations == 4 and res.products == 5
    assert [i for i, _, _ in seen] == [0, 1, 2, 3, 4]
    torch.testing.assert_close(seen[0][1], x0)
    for i, x, r in seen:
        torch.testing.assert_close(r, b - a @ x, rtol=1e-10, atol=1e-12)
        assert math.isclose(res.phi[i], float(0.5 * x @ a @ x - b @ x), rel_tol=1e-10, abs_tol=1e-12)
        assert math.isclose(res.residual_norms[i], float(torch.linalg.vector_norm(b - a @ x)), rel_tol=1e-10)
    assert len(res.phi) == len(res.residual_norms) == 5
    torch.testing.assert_close(res.x, seen[-1][1])


def test_cg_with_b_zero(device):
    """b = 0 from a zero start: nothing to do (x = 0, no product); from a nonzero start CG drives x to 0."""
    a = _spd([1.0, 2.0, 3.0, 4.0], 6, device)
    zero = torch.zeros(4, dtype=F64, device=device)
    res = truncated_cg(lambda v: a @ v, zero)
    assert torch.equal(res.x, zero) and res.iterations == 0 and res.products == 0
    assert res.stop_reason == "tolerance" and res.phi == [0.0] and res.residual_norms == [0.0]
    assert len(res.saved) == 1 and res.saved[0][0] == 0 and torch.equal(res.saved[0][1], zero)
    x0 = _vec(4, 7, device)
    warm = truncated_cg(lambda v: a @ v, zero, x0=x0, max_iters=10, progress_eps=None)
    assert warm.iterations >= 4
    assert float(torch.linalg.vector_norm(warm.x)) < 1e-8 * float(torch.linalg.vector_norm(x0))


def test_cg_with_a_unit_norm_right_hand_side_solves_it(device):
    a = _spd([1.0, 3.0, 9.0], 8, device)
    b = torch.tensor([1.0, 0.0, 0.0], dtype=F64, device=device)
    res = truncated_cg(lambda v: a @ v, b, tol=1e-12)
    assert res.iterations >= 1
    torch.testing.assert_close(res.x, torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)


def test_cg_tolerance_is_relative_to_the_norm_of_b(device):
    """The run stops at the first i with ‖rᵢ‖ ≤ tol·‖b‖ (‖b‖ = 100 here), and an exact zero residual meets tol = 0."""
    a = _spd([10.0 ** (2 * i / 19) for i in range(20)], 9, device)
    b = _vec(20, 10, device)
    b = 100.0 * b / torch.linalg.vector_norm(b)
    res = truncated_cg(lambda v: a @ v, b, tol=1e-6, progress_eps=None, max_iters=100)
    assert res.stop_reason == "tolerance"
    bound = 1e-6 * 100.0
    assert res.residual_norms[-1] <= bound * (1 + 1e-12) and all(r > bound for r in res.residual_norms[:-1])
    eye = truncated_cg(lambda v: v, b, tol=0.0, progress_eps=None)
    assert eye.stop_reason == "tolerance" and eye.iterations == 1 and torch.equal(eye.x, b)


def test_cg_stops_on_a_non_finite_curvature_product(device):
    """pᵀAp = 1e300·3e8 overflows (A = 1e300·I, p = b = 1e4·1) while Ap = 1e304·1 is finite: stop at once, x = 0."""
    b = torch.full((3,), 1e4, dtype=F64, device=device)
    assert bool(torch.isfinite(1e300 * b).all()) and not math.isfinite(float(b @ (1e300 * b)))
    res = truncated_cg(lambda v: 1e300 * v, b)
    assert res.stop_reason == "non_finite" and res.iterations == 0 and res.products == 1
    assert torch.equal(res.x, torch.zeros(3, dtype=F64, device=device))


def test_cg_default_iteration_cap_is_250(device):
    d = torch.logspace(0, 8, 400, dtype=F64, device=device)
    b = torch.ones(400, dtype=F64, device=device)
    res = truncated_cg(lambda v: d * v, b, progress_eps=None)
    assert res.stop_reason == "max_iters" and res.iterations == 250 and res.products == 250


def _first_progress_stop(phi, eps, window=10, fraction=0.1):
    """Martens's rule on a list of φ values: the first i > k with φᵢ < 0 and (φᵢ − φ_{i−k})/φᵢ < kε."""
    for i in range(1, len(phi)):
        k = max(window, math.ceil(fraction * i))
        if i > k and phi[i] < 0 and (phi[i] - phi[i - k]) / phi[i] < k * eps:
            return i
    return None


@pytest.mark.parametrize("eps", [None, 0.2])
def test_cg_progress_rule_matches_the_dense_phi_oracle(device, eps):
    """The default rule is ε = 5e-4 with k = max(10, ⌈0.1 i⌉): run without it, compute φ(xᵢ) densely, and the
    run with the rule stops at the first iterate that meets it (ε = 0.2 stops at the first allowed i = 11)."""
    n = 60
    a = _spd([10.0 ** (6 * i / (n - 1) - 3) for i in range(n)], 11, device)
    b = _vec(n, 12, device)
    xs = []
    truncated_cg(lambda v: a @ v, b, max_iters=300, progress_eps=None, callback=lambda i, x, r: xs.append(x.clone()))
    phi = [float(0.5 * x @ a @ x - b @ x) for x in xs]
    expected = _first_progress_stop(phi, 5e-4 if eps is None else eps)
    assert expected is not None and expected < len(xs) - 1
    res = truncated_cg(lambda v: a @ v, b, max_iters=300) if eps is None else \
        truncated_cg(lambda v: a @ v, b, max_iters=300, progress_eps=eps)
    assert res.stop_reason == "progress" and res.iterations == expected
    if eps == 0.2:
        assert expected == 11


def test_cg_progress_rule_needs_a_negative_phi(device):
    """b = 0 from a warm start: φ(x) = ½xᵀAx > 0 all along, so the progress rule never fires."""
    n = 40
    d = torch.logspace(-3, 3, n, dtype=F64, device=device)
    x0 = 1e-2 * _vec(n, 13, device)
    res = truncated_cg(lambda v: d * v, torch.zeros(n, dtype=F64, device=device), x0=x0, max_iters=20)
    assert all(p > 0 for p in res.phi) and res.phi[0] < 1
    assert res.stop_reason == "max_iters" and res.iterations == 20


def test_cg_saves_iterates_on_the_given_schedule(device):
    a = _spd([1.0 + i for i in range(12)], 14, device)
    b = _vec(12, 15, device)
    res = truncated_cg(lambda v: a @ v, b, max_iters=10, progress_eps=None, save_gamma=2.0)
    assert [i for i, _ in res.saved] == [1, 2, 4, 8, 10]


def test_backtracking_schedule_by_hand():
    assert backtracking_schedule(10, gamma=2.0) == [1, 2, 4, 8]
    assert backtracking_schedule(1) == [1]
    with _raises("gamma must be > 1, got 1.0"):
        backtracking_schedule(10, gamma=1.0)


# ============================================================================ Lanczos
def test_lanczos_validation_messages(device):
    a = torch.eye(4, dtype=F64, device=device)

    def mv(v):
        return a @ v

    with _raises("num_steps must be >= 1, got 0"):
        lanczos(mv, 4, 0, device=device)
    for bad in (True, 1.5, 0):
        with _raises(f"check_every must be an integer >= 1 or None, got {bad!r}"):
            lanczos(mv, 4, 2, check_every=bad, device=device)
    with _raises("v0 has shape (3,), expected a 1-D vector of length n=4"):
        lanczos(mv, 4, 2, v0=torch.ones(3, dtype=F64, device=device), device=device)
    with _raises("v0 has shape (4, 1), expected a 1-D vector of length n=4"):
        lanczos(mv, 4, 2, v0=torch.ones(4, 1, dtype=F64, device=device), device=device)
    with _raises("the start vector is zero"):
        lanczos(mv, 4, 2, v0=torch.zeros(4, dtype=F64, device=device), device=device)


def test_lanczos_seed_and_generator_pick_the_start_vector(device):
    a = _spd([1.0, 2.0, 3.0, 4.0, 5.0], 16, device)

    def mv(v):
        return a @ v

    by_seed = lanczos(mv, 5, 3, seed=7, device=device)
    by_gen = lanczos(mv, 5, 3, generator=torch.Generator().manual_seed(7), device=device)
    other = lanczos(mv, 5, 3, seed=8, device=device)
    torch.testing.assert_close(by_seed.basis, by_gen.basis, rtol=0, atol=0)
    assert not torch.allclose(by_seed.basis[:, 0], other.basis[:, 0])
    assert not torch.allclose(by_gen.basis[:, 0], lanczos(mv, 5, 3, device=device).basis[:, 0])


def test_lanczos_float32_operator_and_float64_start(device):
    """dtype=float32: the basis and coefficients are float32 (a float64 v0 is cast) and match float64."""
    a = _spd([1.0, 2.0, 4.0, 8.0], 17, device)
    v0 = _vec(4, 18, device)
    ref = lanczos(lambda v: a @ v, 4, 3, v0=v0, device=device)
    a32 = a.float()
    got = lanczos(lambda v: a32 @ v, 4, 3, v0=v0, dtype=torch.float32, device=device)
    assert got.basis.dtype == got.alphas.dtype == got.betas.dtype == torch.float32
    torch.testing.assert_close(got.alphas.double(), ref.alphas, rtol=1e-4, atol=1e-5)


def test_lanczos_one_step_has_an_empty_float64_off_diagonal(device):
    a = _spd([1.0, 2.0, 3.0], 19, device)
    res = lanczos(lambda v: a @ v, 3, 1, v0=_vec(3, 20, device), device=device)
    assert res.num_steps == 1 and res.betas.shape == (0,) and res.betas.dtype == F64


def test_lanczos_explicit_breakdown_tolerance(device):
    """A = diag(1, 2, 3, 4), v0 = e₁: w = Ae₁ − e₁ = 0 exactly, so β₁ = 0 ≤ 0 = breakdown_tol: one step."""
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64, device=device))
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64, device=device)
    res = lanczos(lambda v: a @ v, 4, 4, v0=e1, breakdown_tol=0.0, device=device)
    assert res.num_steps == 1 and res.breakdown and res.residual_norm == 0.0
    # a large tolerance stops at the first step whose beta is below it
    v0 = torch.ones(4, dtype=F64, device=device)
    full = lanczos(lambda v: a @ v, 4, 4, v0=v0, device=device)
    cut = 0.5 * (float(full.betas[0]) + float(full.betas[1]))  # between beta_1 and beta_2 (beta_1 > beta_2 here)
    assert float(full.betas[0]) > cut > float(full.betas[1])
    res = lanczos(lambda v: a @ v, 4, 4, v0=v0, breakdown_tol=cut, device=device)
    assert res.num_steps == 2 and res.breakdown


@pytest.mark.parametrize("size", [1e3, 1e-3])
@pytest.mark.parametrize("factor, steps", [(99.5, 1), (100.5, 2)])
def test_lanczos_default_breakdown_tolerance_by_hand(device, size, factor, steps):
    """A = size·diag(1, 0, 0), q₁ = (c, s, 0): α₁ = size·c², β₁ = size·|cs|. The default tolerance is
    100·√n·ε·max(|α|, β): with β₁ = 99.5 of those units the run breaks down after step 1, with 100.5 it goes on
    (and breaks down after step 2, where Aq₂ ≈ 0)."""
    eps = torch.finfo(F64).eps
    s = factor * math.sqrt(3) * eps  # β₁/α₁ ≈ s (c ≈ 1)
    v0 = torch.tensor([1.0, s, 0.0], dtype=F64, device=device)
    a = size * torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=F64, device=device))
    res = lanczos(lambda v: a @ v, 3, 3, v0=v0, device=device)
    q = v0 / torch.linalg.vector_norm(v0)
    alpha = float(q @ a @ q)
    beta = float(torch.linalg.vector_norm(a @ q - alpha * q))
    tol = 100 * math.sqrt(3) * eps * max(abs(alpha), beta)
    assert (beta <= tol) == (steps == 1)
    assert res.num_steps == steps and res.breakdown


def test_lanczos_full_run_is_not_a_breakdown_and_checks_every_step_by_default(device):
    """k = n steps: the last beta is ~0 but the space is the whole space (breakdown False). An invariant
    subspace of dimension 3 (three distinct eigenvalues) stops after 3 products with the default check_every."""
    a = _spd([1.0, 2.0, 3.0, 5.0], 21, device)
    res = lanczos(lambda v: a @ v, 4, 4, v0=_vec(4, 22, device), device=device)
    assert res.num_steps == 4 and not res.breakdown
    d = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], dtype=F64, device=device))
    count = [0]

    def counted(v):
        count[0] += 1
        return d @ v

    res = lanczos(counted, 6, 6, v0=torch.ones(6, dtype=F64, device=device), device=device)
    assert res.num_steps == 3 and res.breakdown and count[0] == 3


def test_lanczos_stop_when_sees_the_tridiagonal_so_far(device):
    a = _spd([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 23, device)
    v0 = _vec(6, 24, device)
    calls = []

    def stop_when(alphas, betas, residual):
        calls.append((alphas.clone(), betas.clone(), float(residual)))
        return torch.tensor(len(calls) == 3, device=device)

    res = lanczos(lambda v: a @ v, 6, 6, v0=v0, stop_when=stop_when, device=device)
    ref = lanczos(lambda v: a @ v, 6, 3, v0=v0, device=device)
    assert [(c[0].shape[0], c[1].shape[0]) for c in calls] == [(1, 0), (2, 1), (3, 2)]
    assert res.num_steps == 3 and not res.breakdown
    torch.testing.assert_close(res.alphas, ref.alphas, rtol=0, atol=0)
    torch.testing.assert_close(calls[2][1], ref.betas, rtol=0, atol=0)
    assert calls[2][2] == ref.residual_norm


# ============================================================================ saddle-free
def test_saddle_free_validation_messages(device):
    h = torch.eye(3, dtype=F64, device=device)
    g = torch.ones(3, dtype=F64, device=device)

    def mv(v):
        return h @ v

    for bad in (True, 2.5, 0):
        with _raises(f"k must be an integer >= 1, got {bad!r}"):
            saddle_free_operator(mv, g, bad)
    with _raises("floor must be a finite number >= 0, got -1.0"):
        saddle_free_operator(mv, g, 2, floor=-1.0)
    with _raises("damping must be a finite number >= 0, got inf"):
        saddle_free_operator(mv, g, 2, damping=float("inf"))
    zero = torch.zeros(3, 3, dtype=F64, device=device)
    with _raises("a Ritz value is zero and floor + damping = 0: |H|^-1 does not exist; set floor or damping > 0"):
        saddle_free_operator(lambda v: zero @ v, g, 2)


def test_saddle_free_operator_on_a_partial_krylov_space(device):
    """k < n: the dense |H|_k⁻¹ = V diag(1/curv) Vᵀ + (I − QQᵀ)/c and |H|_k = V diag(curv) Vᵀ + c (I − QQᵀ),
    from the dense projection QᵀHQ."""
    h = _spd([-3.0, -1.0, 0.5, 2.0, 4.0, 6.0], 25, device)
    start = _vec(6, 26, device)
    sfo, lan = saddle_free_operator(lambda v: h @ v, start, 3, floor=0.2, damping=0.1)
    q = lan.basis
    theta, s = torch.linalg.eigh(q.T @ h @ q)
    v = q @ s
    curv = theta.abs().clamp_min(0.2) + 0.1
    c = float(curv.max())
    rest = torch.eye(6, dtype=F64, device=device) - q @ q.T
    inv = v @ torch.diag(1 / curv) @ v.T + rest / c
    fwd = v @ torch.diag(curv) @ v.T + rest * c
    dense = sfo.to_dense()
    assert dense.shape == (6, 6)
    torch.testing.assert_close(dense, inv, rtol=1e-9, atol=1e-11)
    x = _vec(6, 27, device)
    torch.testing.assert_close(sfo.matvec(x), fwd @ x, rtol=1e-9, atol=1e-11)


def test_saddle_free_float32_start_and_breakdown_tol(device):
    h = _spd([-2.0, 1.0, 3.0, 5.0], 28, device)
    start = _vec(4, 29, device)
    sfo, lan = saddle_free_operator(lambda v: h.float() @ v, start.float(), 4)
    assert lan.basis.dtype == sfo.ritz_values.dtype == torch.float32
    full = lanczos(lambda v: h @ v, 4, 4, v0=start, device=device)
    cut = float(full.betas.max()) * 2  # above every beta: one step only
    _, lan = saddle_free_operator(lambda v: h @ v, start, 4, breakdown_tol=cut)
    assert lan.num_steps == 1


def test_lanczos_breakdown_tolerance_is_compared_in_the_operator_dtype(device):
    """A = b·(e₁e₂ᵀ + e₂e₁ᵀ) with b = 1 + 2⁻³⁰ (a float64 number that float32 rounds to 1), v₀ = e₁: β₁ = b
    exactly, so breakdown_tol = b stops after one step (β₁ ≤ b); in float32 the tolerance would be 1 < β₁."""
    b = 1.0 + 2.0 ** -30
    a = torch.zeros(3, 3, dtype=F64, device=device)
    a[0, 1] = a[1, 0] = b
    e1 = torch.tensor([1.0, 0.0, 0.0], dtype=F64, device=device)
    res = lanczos(lambda v: a @ v, 3, 3, v0=e1, breakdown_tol=b, device=device)
    assert res.residual_norm == b and res.num_steps == 1 and res.breakdown


def test_lanczos_refuses_a_generator_that_is_not_on_the_cpu(device):
    """Only the generator's ``device`` is read before the refusal, so a stand-in with a CUDA device shows the
    message without a GPU."""
    fake = type("FakeGenerator", (), {"device": torch.device("cuda")})()
    with _raises("pass a CPU torch.Generator; probes are drawn on the CPU and moved to the device"):
        lanczos(lambda v: v, 3, 2, generator=fake, device=device)
