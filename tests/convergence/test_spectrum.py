"""Hutchinson, Lanczos, extreme eigenvalues and SLQ against exact oracles (theory notes §4.2-4.4, §4.7; P22)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from convergence.hessian import GGNOperator, HessianOperator
from convergence.spectrum import extreme_eigenvalues, hutchinson_trace, lanczos, lanczos_extremes, slq_density

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def prescribed(eigenvalues, device, seed: int = 0) -> torch.Tensor:
    """Q = U diag(lambda) U^T with U Haar-orthogonal (QR of a Gaussian), float64."""
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    n = lam.numel()
    u, r = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=F64))
    u = u * torch.sign(torch.diagonal(r))
    return ((u * lam) @ u.T).to(device)


def mv(a: torch.Tensor):
    return lambda v: a @ v


def half_mse(out, y):
    return 0.5 * ((out - y) ** 2).sum() / out.shape[0]


def lsq_problem(device, n_samples: int = 20, dim: int = 6):
    model = nn.Linear(dim, 1, bias=False).to(device=device, dtype=F64)
    x = torch.randn(n_samples, dim, generator=_gen(1), dtype=F64).to(device)
    y = torch.randn(n_samples, 1, generator=_gen(2), dtype=F64).to(device)
    return model, half_mse, x, y


class Saddle(nn.Module):
    """f(a, b) = ½(ab - 1)^2 at (0, 0): Hessian [[0, -1], [-1, 0]], eigenvalues ±1."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.a * self.b * x


def saddle_loss(out, y):
    return 0.5 * ((out - y) ** 2).sum()


# ======================================================================= Hutchinson (P22)
def test_hutchinson_diagonal_is_exact(device):
    """Rademacher probes: v^T D v = tr D for every sample (the variance 2(||D||_F^2 - sum D_ii^2) is 0)."""
    diag = torch.linspace(-3.0, 5.0, 17, dtype=F64, device=device)
    est = hutchinson_trace(lambda v: diag * v, 17, 10, seed=3, device=device)
    np.testing.assert_allclose(est.samples, float(diag.sum()), rtol=0, atol=1e-13)
    assert est.std_error == 0.0 and est.ci_low == pytest.approx(est.ci_high)


def test_hutchinson_ci_z_test_and_variance(device):
    n, m = 30, 400
    lam = torch.linspace(-1.0, 4.0, n, dtype=F64)
    a = prescribed(lam, device, seed=1) + 3.0 * torch.eye(n, dtype=F64, device=device)
    trace = float(torch.trace(a))
    est = hutchinson_trace(mv(a), n, m, seed=123, device=device, dtype=F64)
    assert est.num_samples == m and est.samples.shape == (m,) and est.confidence == 0.99
    assert est.contains(trace)
    # the interval is the Student-t one built from the samples
    s = est.samples
    assert est.mean == pytest.approx(s.mean(), rel=1e-14)
    assert est.std_error == pytest.approx(s.std(ddof=1) / math.sqrt(m), rel=1e-12)
    half = stats.t.ppf(0.995, m - 1) * s.std(ddof=1) / math.sqrt(m)
    assert est.ci_high - est.ci_low == pytest.approx(2 * half, rel=1e-12)
    # z-test with the exact Rademacher variance 2(||A||_F^2 - sum A_ii^2), 6 sigma
    var = 2.0 * (float((a**2).sum()) - float((torch.diagonal(a) ** 2).sum()))
    assert abs(est.mean - trace) <= 6.0 * math.sqrt(var / m)
    # the sample variance matches the Rademacher formula, not the Gaussian 2||A||_F^2 (much larger here)
    assert 0.6 * var <= s.var(ddof=1) <= 1.5 * var
    assert s.var(ddof=1) < 0.5 * 2.0 * float((a**2).sum())
    # reproducible with the same seed / generator
    again = hutchinson_trace(mv(a), n, m, generator=_gen(123), device=device)
    np.testing.assert_array_equal(again.samples, est.samples)


def test_hutchinson_interval_coverage():
    """Over 60 seeds the 99% t-interval should miss the true trace rarely (binomial: P(>=5 misses) < 3e-3)."""
    n = 12
    a = prescribed(torch.linspace(0.5, 3.0, n), "cpu", seed=4)
    trace = float(torch.trace(a))
    misses = sum(not hutchinson_trace(mv(a), n, 30, seed=s).contains(trace) for s in range(60))
    assert misses <= 4


def test_hutchinson_on_least_squares_hessian(device):
    model, loss_fn, x, y = lsq_problem(device)
    op = HessianOperator(model, loss_fn, x, y)
    est = hutchinson_trace(op, op.n, 200, seed=0, confidence=1 - 1e-6)
    assert est.contains(float((x**2).sum()) / x.shape[0])
    with pytest.raises(ValueError):
        hutchinson_trace(op, op.n + 1, 5)


# ================================================================================ Lanczos
def test_lanczos_relation_and_orthogonality(device):
    """Outliers converge early, which destroys the orthogonality of plain Lanczos; full reorthogonalization keeps it."""
    n, m = 100, 60
    lam = torch.cat([torch.tensor([10.0, 8.0, -6.0], dtype=F64), torch.linspace(-1.0, 1.0, n - 3, dtype=F64)])
    a = prescribed(lam, device, seed=2)
    res = lanczos(mv(a), n, m, seed=5, device=device)
    q, t = res.basis, res.tridiagonal()
    assert res.num_steps == m and res.alphas.shape == (m,) and res.betas.shape == (m - 1,) and not res.breakdown
    eye = torch.eye(m, dtype=F64, device=device)
    assert float((q.T @ q - eye).abs().max()) <= 1e-13
    assert float((q.T @ a @ q - t).abs().max()) <= 1e-12 * 10.0
    # A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T: the residual lives in the last column only
    resid = a @ q - q @ t
    assert float(resid[:, :-1].abs().max()) <= 1e-12 * 10.0
    assert float(resid[:, -1].norm()) == pytest.approx(res.residual_norm, rel=1e-8)
    # no spurious copies ("ghosts") of the converged outliers among the Ritz values
    ritz, _ = res.ritz()
    assert int((ritz > 5.0).sum()) == 2 and int((ritz < -5.0).sum()) == 1
    torch.testing.assert_close(ritz[-2:].cpu(), torch.tensor([8.0, 10.0], dtype=F64), rtol=0, atol=1e-10)


def test_lanczos_breakdown_gives_exact_eigenvalues(device):
    n = 30
    lam = torch.tensor([-1.5] * 10 + [0.5] * 12 + [4.0] * 8, dtype=F64)
    a = prescribed(lam, device, seed=6)
    res = lanczos(mv(a), n, 20, seed=1, device=device)
    assert res.breakdown and res.num_steps == 3
    ritz, _ = res.ritz()
    torch.testing.assert_close(ritz.cpu(), torch.tensor([-1.5, 0.5, 4.0], dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("check_every", [1, 3, 7, None])
def test_lanczos_reads_the_device_rarely_with_the_same_result(device, check_every):
    """Reading the breakdown test every k steps (or only at the end) gives the result of reading it after every
    step: the same tridiagonal, basis and residual; steps run past a breakdown are discarded."""
    n = 30
    for lam, steps in ((torch.tensor([-1.5] * 10 + [0.5] * 12 + [4.0] * 8, dtype=F64), 20),  # breakdown at 3
                       (torch.linspace(-2.0, 3.0, n, dtype=F64), 12)):  # no breakdown
        a = prescribed(lam, device, seed=6)
        calls = []

        def counted(v):
            calls.append(1)
            return a @ v

        ref = lanczos(mv(a), n, steps, seed=1, device=device, check_every=1)
        res = lanczos(counted, n, steps, seed=1, device=device, check_every=check_every)
        assert res.num_steps == ref.num_steps and res.breakdown == ref.breakdown
        torch.testing.assert_close(res.alphas, ref.alphas, rtol=0, atol=0)
        torch.testing.assert_close(res.betas, ref.betas, rtol=0, atol=0)
        torch.testing.assert_close(res.basis, ref.basis, rtol=0, atol=0)
        assert res.residual_norm == ref.residual_norm
        assert torch.isfinite(res.basis).all()
        k = steps if check_every is None else check_every
        assert ref.num_steps <= len(calls) <= max(ref.num_steps, min(steps, -(-ref.num_steps // k) * k))
    with pytest.raises(ValueError, match="check_every"):
        lanczos(mv(a), n, 5, check_every=0)


def test_lanczos_zero_operator_breaks_down_without_nan(device):
    """A w = 0 at the first step (A = 0): q_2 = w / max(beta, tiny) = 0, never NaN, and the step is discarded."""
    n = 6
    res = lanczos(lambda v: torch.zeros_like(v), n, 5, seed=0, device=device, check_every=None)
    assert res.breakdown and res.num_steps == 1 and float(res.alphas[0]) == 0.0 and res.residual_norm == 0.0


@pytest.mark.parametrize("which", ["both", "largest", "magnitude"])
def test_lanczos_extremes_against_arpack_and_dense(device, which):
    """The device Lanczos against two independent oracles: ARPACK (scipy eigsh, CPU) and eigvalsh of the matrix."""
    from scipy.sparse.linalg import eigsh

    n = 300
    lam = torch.cat([torch.tensor([-7.0, 9.0, 8.5], dtype=F64), torch.linspace(-1.0, 1.0, n - 3, dtype=F64)])
    a = prescribed(lam, device, seed=3)
    res = lanczos_extremes(mv(a), n, which=which, tol=1e-8, seed=0)
    dense = torch.linalg.eigvalsh(a.cpu())
    a_np = a.cpu().numpy()
    v0 = np.random.default_rng(0).standard_normal(n)
    arpack = {w: float(eigsh(a_np, k=1, which=w, v0=v0, tol=1e-12, return_eigenvectors=False)[0])
              for w in ("LA", "SA", "LM")}
    assert res.converged and res.steps < n  # stopped by the residual bound, long before n
    if which in ("both", "largest"):
        assert res.lambda_max == pytest.approx(float(dense[-1]), rel=1e-10)
        assert res.lambda_max == pytest.approx(arpack["LA"], rel=1e-10)
        assert res.residual_max <= 1e-8 * abs(res.lambda_max)
    if which == "both":
        assert res.lambda_min == pytest.approx(float(dense[0]), rel=1e-10)
        assert res.lambda_min == pytest.approx(arpack["SA"], rel=1e-10)
    if which == "magnitude":
        assert res.norm == pytest.approx(float(dense.abs().max()), rel=1e-10)
        assert res.norm == pytest.approx(abs(arpack["LM"]), rel=1e-10)
    # Ritz values are inner bounds even before convergence
    early = lanczos_extremes(mv(a), n, which=which, tol=0.0, max_steps=4, seed=0)
    assert not early.converged and early.steps == 4
    assert float(dense[0]) - 1e-12 <= early.lambda_min <= early.lambda_max <= float(dense[-1]) + 1e-12
    with pytest.raises(ValueError, match="which"):
        lanczos_extremes(mv(a), n, which="LA")


def test_lanczos_extremes_syncs_do_not_grow_with_the_steps(device):
    """No host round trip per product: on CUDA the number of synchronizations (sync debug mode) is the same for
    30 and 120 steps when the device is read only at the end (check_every >= steps)."""
    if device.type != "cuda":
        pytest.skip("synchronizations are only observable on CUDA")
    import warnings

    n = 400
    a = prescribed(torch.linspace(-1.0, 2.0, n, dtype=F64), device, seed=4)
    counts = []
    for steps in (30, 120):
        lanczos_extremes(mv(a), n, tol=0.0, max_steps=steps, check_every=steps, seed=0)  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                lanczos_extremes(mv(a), n, tol=0.0, max_steps=steps, check_every=steps, seed=0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1] and counts[0] <= 8, counts


def test_saddle_negative_curvature_found(device):
    """theory notes §4.7: f(a,b) = ½(ab-1)^2 at (0,0) has eigenvalues ±1; both must be found."""
    model = Saddle().to(device=device, dtype=F64)
    x = torch.ones(1, dtype=F64, device=device)
    op = HessianOperator(model, saddle_loss, x, x)
    torch.testing.assert_close(op.to_dense().cpu(), torch.tensor([[0.0, -1.0], [-1.0, 0.0]], dtype=F64))
    ritz, _ = lanczos(op, 2, 2, seed=0).ritz()
    torch.testing.assert_close(ritz.cpu(), torch.tensor([-1.0, 1.0], dtype=F64), rtol=0, atol=1e-14)
    ext = extreme_eigenvalues(op, 2, k=1)
    assert ext.lambda_max == pytest.approx(1.0, abs=1e-12)
    assert ext.lambda_min == pytest.approx(-1.0, abs=1e-12)


def test_extreme_eigenvalues_both_ends(device):
    """Largest/smallest *algebraic*: -5 dominates in magnitude but is not the largest eigenvalue."""
    n, k = 50, 3
    lam = torch.cat([torch.tensor([-5.0, -4.5]), torch.linspace(-1.0, 2.0, n - 2)])
    a = prescribed(lam, device, seed=7)
    ext = extreme_eigenvalues(mv(a), n, k=k, device=device, return_eigenvectors=True)
    lam_sorted = np.sort(lam.numpy())
    np.testing.assert_allclose(ext.largest, lam_sorted[::-1][:k], rtol=0, atol=1e-10)
    np.testing.assert_allclose(ext.smallest, lam_sorted[:k], rtol=0, atol=1e-10)
    a_np = a.cpu().numpy()
    for vals, vecs in ((ext.largest, ext.largest_vectors), (ext.smallest, ext.smallest_vectors)):
        np.testing.assert_allclose(a_np @ vecs, vecs * vals, atol=1e-9)
    # dense fallback (k >= n and tiny n) agrees with ARPACK
    dense = extreme_eigenvalues(mv(a), n, k=k, device=device, dense_threshold=n)
    np.testing.assert_allclose(dense.largest, ext.largest, atol=1e-10)
    np.testing.assert_allclose(dense.smallest, ext.smallest, atol=1e-10)


def test_extreme_eigenvalues_least_squares_and_softmax_null_space(device):
    model, loss_fn, x, y = lsq_problem(device)
    ext = extreme_eigenvalues(HessianOperator(model, loss_fn, x, y), 6, k=1)
    sigma_max = float(torch.linalg.svdvals(x)[0])
    assert ext.lambda_max == pytest.approx(sigma_max**2 / x.shape[0], rel=1e-10)
    # softmax regression: PSD with a `dim`-dimensional null space x ⊗ 1 (exact zero eigenvalues)
    dim, classes = 5, 4
    model = nn.Linear(dim, classes, bias=False).to(device=device, dtype=F64)
    xs = torch.randn(30, dim, generator=_gen(3), dtype=F64).to(device)
    ys = torch.randint(0, classes, (30,), generator=_gen(4)).to(device)
    op = GGNOperator(model, nn.functional.cross_entropy, xs, ys)
    ext = extreme_eigenvalues(op, op.n, k=dim + 1)
    dense = np.linalg.eigvalsh(op.to_dense().cpu().numpy())
    assert ext.lambda_max == pytest.approx(dense[-1], rel=1e-10)
    np.testing.assert_allclose(ext.smallest[:dim], 0.0, atol=1e-10 * dense[-1])
    assert ext.smallest[dim] == pytest.approx(dense[dim], rel=1e-8)
    assert ext.smallest[dim] > 1e-3 * dense[-1]


# ==================================================================================== SLQ
def test_slq_moments_exact_to_degree_2m_minus_1(device):
    n, m = 40, 6
    lam = torch.linspace(-3.0, 3.0, n) + 0.05 * torch.randn(n, generator=_gen(9), dtype=F64)
    a = prescribed(lam, device, seed=8)
    norm_a = float(lam.abs().max())
    res = slq_density(mv(a), n, m, 3, seed=11, device=device)
    assert res.num_probes == 3 and res.probes.shape == (3, n)
    for p in range(res.num_probes):
        v = res.probes[p]
        assert float(v.norm()) == pytest.approx(1.0, rel=1e-14)
        assert torch.all(v.abs() == v.abs()[0])  # a normalized Rademacher vector
        assert res.nodes[p].shape == (m,) and float(res.weights[p].sum()) == pytest.approx(1.0, rel=1e-13)
        w = v.clone()
        exact = []
        for k in range(2 * m + 1):
            exact.append(float(torch.dot(v, w)))
            w = a @ w
        quad = [float(res.probe_moments(k)[p]) for k in range(2 * m + 1)]
        for k in range(2 * m):
            assert abs(quad[k] - exact[k]) <= 1e-10 * norm_a**k, (k, quad[k], exact[k])
        # one degree higher the m-point Gauss rule is visibly off (and underestimates: error > 0)
        assert exact[2 * m] - quad[2 * m] > 1e-6 * norm_a ** (2 * m)
    assert res.moment(0) == pytest.approx(1.0, rel=1e-13)


def test_slq_first_moment_matches_hutchinson_probes(device):
    """Same seed => same Rademacher probes: n · sum_j w_j theta_j = r^T A r (Hutchinson samples)."""
    n = 25
    a = prescribed(torch.linspace(0.0, 2.0, n), device, seed=12)
    res = slq_density(mv(a), n, 5, 8, seed=42, device=device)
    hutch = hutchinson_trace(mv(a), n, 8, seed=42, device=device)
    np.testing.assert_allclose(n * res.probe_moments(1), hutch.samples, rtol=1e-12, atol=1e-12)
    assert res.trace_estimate() == pytest.approx(hutch.mean, rel=1e-12)


def test_slq_density_clustered_spectrum(device):
    n = 40
    lam = torch.tensor([-1.0] * 10 + [2.0] * 30, dtype=F64)
    a = prescribed(lam, device, seed=13)
    num_probes = 20
    res = slq_density(mv(a), n, 10, num_probes, seed=0, device=device)
    for theta, w in zip(res.nodes, res.weights):
        assert theta.numel() == 2  # breakdown after two steps: the Krylov space is invariant
        torch.testing.assert_close(theta.cpu(), torch.tensor([-1.0, 2.0], dtype=F64), rtol=0, atol=1e-12)
    # weight of the cluster at 2 = ||P_2 v||^2 for the unit probe v: mean 30/40, variance about 2 p (1-p) / n
    mass_2 = float(np.mean([float(w[1]) for w in res.weights]))
    assert abs(mass_2 - 0.75) <= 6.0 * math.sqrt(2 * 0.75 * 0.25 / n / num_probes) + 1e-12
    grid = np.linspace(-3.0, 4.0, 20001)
    dens = res.density(grid)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-6)
    near_2 = np.abs(grid - 2.0) < 0.5
    assert np.trapezoid(dens[near_2], grid[near_2]) == pytest.approx(mass_2, abs=1e-6)
    g = res.grid(num_points=1000)
    assert g[0] == pytest.approx(-1.01) and g[-1] == pytest.approx(2.01) and g.shape == (1000,)
    assert res.default_sigma2() == pytest.approx(3e-5)
    with pytest.raises(ValueError):
        res.density(grid, sigma2=0.0)


def test_slq_on_mlp_hessian_runs_on_device(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(device=device, dtype=F64)
    x = torch.randn(8, 3, generator=_gen(5), dtype=F64).to(device)
    y = torch.randint(0, 2, (8,), generator=_gen(6)).to(device)
    op = HessianOperator(model, nn.functional.cross_entropy, x, y)
    dense = op.to_dense()
    eig = torch.linalg.eigvalsh(dense)
    res = slq_density(op, op.n, op.n, 2, seed=1)
    # m = n steps: every probe's quadrature is exact, nodes inside the spectrum
    for theta in res.nodes:
        assert float(theta.min()) >= float(eig[0]) - 1e-10 and float(theta.max()) <= float(eig[-1]) + 1e-10
    v = res.probes[0]
    assert float(res.probe_moments(3)[0]) == pytest.approx(float(v @ dense @ dense @ dense @ v), rel=1e-9, abs=1e-14)
