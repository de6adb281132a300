"""Sharpness, preconditioned sharpness and the GD stability threshold on quadratics (theory notes §4.6; P25)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from convergence.hessian import HessianOperator
from convergence.sharpness import (
    edge_of_stability_ratio,
    gd_is_stable,
    preconditioned_lanczos,
    preconditioned_sharpness,
    sharpness,
    stability_threshold,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def prescribed(eigenvalues, seed: int) -> torch.Tensor:
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    u, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=_gen(seed), dtype=F64))
    return (u * lam) @ u.T


def spd(n: int, log10_cond: float, seed: int) -> torch.Tensor:
    return prescribed(10.0 ** torch.linspace(-log10_cond / 2, log10_cond / 2, n, dtype=F64), seed)


class Quadratic(nn.Module):
    """Parameter x; the loss ½ x^T A x is applied to the output (= x) by `quad_loss`."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x0.clone())

    def forward(self, _inputs):
        return self.x


def quad_loss_for(a: torch.Tensor):
    return lambda out, _t: 0.5 * out @ (a @ out)


def run_gd(a, x0, lr, steps, precond=None, momentum=0.0):
    """x+ = x - lr P A x (+ heavy ball); returns ||x_T|| / ||x_0||."""
    x, prev = x0.clone(), x0.clone()
    for _ in range(steps):
        g = a @ x
        step = precond @ g if precond is not None else g
        x, prev = x - lr * step + momentum * (x - prev), x
    return float(x.norm() / x0.norm())


def test_sharpness_is_largest_algebraic(device):
    lam = torch.cat([torch.tensor([-9.0]), torch.linspace(-1.0, 3.0, 29)])
    a = prescribed(lam, seed=1).to(device)
    assert sharpness(lambda v: a @ v, 30, device=device) == pytest.approx(3.0, abs=1e-10)


def test_sharpness_of_least_squares_hessian(device):
    x = torch.randn(25, 7, generator=_gen(2), dtype=F64).to(device)
    y = torch.randn(25, 1, generator=_gen(3), dtype=F64).to(device)
    model = nn.Linear(7, 1, bias=False).to(device=device, dtype=F64)
    op = HessianOperator(model, lambda o, t: 0.5 * ((o - t) ** 2).sum() / o.shape[0], x, y)
    assert sharpness(op, op.n) == pytest.approx(float(torch.linalg.svdvals(x)[0]) ** 2 / 25, rel=1e-10)


@pytest.mark.parametrize("factor,stable", [(0.9, True), (1.1, False)])
def test_p25_gd_threshold_on_quadratic_module(device, factor, stable):
    """GD on ½x^T A x (via the module's Hessian operator and torch.optim.SGD) is stable iff lr·λmax < 2."""
    n = 20
    a = spd(n, 2.0, seed=4).to(device)  # spectrum in [0.1, 10]
    x0 = torch.randn(n, generator=_gen(5), dtype=F64).to(device)
    model = Quadratic(x0).to(device)
    loss_fn = quad_loss_for(a)
    lam_max = sharpness(HessianOperator(model, loss_fn, None, None), n)
    assert lam_max == pytest.approx(float(torch.linalg.eigvalsh(a)[-1]), rel=1e-10)
    lr = factor * 2.0 / lam_max
    assert edge_of_stability_ratio(lr, lam_max) == pytest.approx(factor)
    assert gd_is_stable(lr, lam_max) is stable
    assert stability_threshold(lr) == pytest.approx(lam_max / factor)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(300):
        opt.zero_grad()
        loss_fn(model(None), None).backward()
        opt.step()
    ratio = float(model.x.detach().norm() / x0.norm())
    assert (ratio < 1e-2) if stable else (ratio > 1e6)


@pytest.mark.parametrize("factor,stable", [(0.9, True), (1.1, False)])
def test_p25_heavy_ball_threshold(factor, stable):
    a = spd(15, 2.0, seed=6)
    lam_max = sharpness(lambda v: a @ v, 15)
    beta = 0.5
    lr = factor * stability_threshold(1.0, beta) / lam_max  # lr·λmax = factor · 2(1+β)
    assert gd_is_stable(lr, lam_max, momentum=beta) is stable
    ratio = run_gd(a, torch.randn(15, generator=_gen(7), dtype=F64), lr, 300, momentum=beta)
    assert (ratio < 1e-2) if stable else (ratio > 1e6)


def oracle_precond_sharpness(h: torch.Tensor, p: torch.Tensor) -> float:
    """λmax(PH) from the generalized problem H v = λ P^{-1} v (scipy, float64)."""
    h_np, p_np = h.cpu().numpy(), p.cpu().numpy()
    return float(scipy.linalg.eigh(h_np, np.linalg.inv(p_np), eigvals_only=True)[-1])


@pytest.mark.parametrize("indefinite", [False, True])
def test_preconditioned_sharpness_against_dense_oracle(device, indefinite):
    n = 16
    lam = torch.linspace(-4.0, 2.0, n) if indefinite else torch.logspace(-2, 1, n)
    h = prescribed(lam, seed=8).to(device)
    p = spd(n, 3.0, seed=9).to(device)
    oracle = oracle_precond_sharpness(h, p)
    # the similarity λ(PH) = λ(P^{1/2} H P^{1/2}) also from the non-symmetric eigenvalues
    assert oracle == pytest.approx(float(np.max(np.linalg.eigvals((p @ h).cpu().numpy()).real)), rel=1e-8)
    h_mv, p_mv = (lambda v: h @ v), (lambda v: p @ v)
    scale = float(torch.linalg.matrix_norm(p @ h, 2))
    got = preconditioned_sharpness(h_mv, p_mv, n, device=device)
    assert abs(got - oracle) <= 1e-10 * scale
    dense = preconditioned_sharpness(h_mv, p_mv, n, method="dense", device=device)
    assert abs(dense - oracle) <= 1e-10 * scale
    w, q = torch.linalg.eigh(p)
    p_sqrt = (q * w.sqrt()) @ q.T
    for method in ("lanczos", "dense"):
        via_sqrt = preconditioned_sharpness(h_mv, lambda v: p_sqrt @ v, n, precond_is_sqrt=True, method=method,
                                            device=device)
        assert abs(via_sqrt - oracle) <= 1e-9 * scale
    # the unpreconditioned sharpness differs: the test sees the preconditioner
    assert abs(sharpness(h_mv, n, device=device) - oracle) > 1e-2 * scale


def test_preconditioned_lanczos_ritz_values(device):
    n = 30
    h = prescribed(torch.linspace(0.1, 5.0, n), seed=10).to(device)
    p = spd(n, 2.0, seed=11).to(device)
    true = np.sort(np.linalg.eigvals((p @ h).cpu().numpy()).real)
    full = preconditioned_lanczos(lambda v: h @ v, lambda v: p @ v, n, n, device=device)
    np.testing.assert_allclose(full.cpu().numpy(), true, rtol=0, atol=1e-9 * true[-1])
    # partial runs: Ritz values are interior (Cauchy interlacing), the top one increases with m
    tops = []
    for m in (3, 6, 12):
        ritz = preconditioned_lanczos(lambda v: h @ v, lambda v: p @ v, n, m, device=device)
        assert ritz.shape == (m,)
        assert float(ritz[-1]) <= true[-1] * (1 + 1e-12) and float(ritz[0]) >= true[0] * (1 - 1e-12)
        tops.append(float(ritz[-1]))
    assert tops == sorted(tops)
    with pytest.raises(ValueError):
        preconditioned_lanczos(lambda v: h @ v, lambda v: -(p @ v), n, 5, device=device)


@pytest.mark.parametrize("factor,stable", [(0.9, True), (1.1, False)])
def test_p25_preconditioned_gd_threshold(device, factor, stable):
    """x+ = x - lr P A x is stable iff lr·λmax(PA) < 2 -- with λmax(A) alone the prediction would be wrong."""
    n = 20
    a = spd(n, 1.0, seed=12).to(device)  # κ(A), κ(P) = 10, so κ(PA) <= 100 and 400 steps suffice
    p = spd(n, 1.0, seed=13).to(device)
    lam_pa = preconditioned_sharpness(lambda v: a @ v, lambda v: p @ v, n, device=device)
    lr = factor * 2.0 / lam_pa
    assert gd_is_stable(lr, lam_pa) is stable
    assert edge_of_stability_ratio(lr, lam_pa) == pytest.approx(factor)
    x0 = torch.randn(n, generator=_gen(14), dtype=F64).to(device)
    ratio = run_gd(a, x0, lr, 400, precond=p)
    assert (ratio < 1e-2) if stable else (ratio > 1e6)
    # λmax(A)·λmax(P) or λmax(A) alone would misplace the threshold for this P
    assert abs(sharpness(lambda v: a @ v, n, device=device) - lam_pa) > 0.1 * lam_pa


def test_preconditioned_lanczos_reads_the_device_rarely_with_the_same_ritz_values(device):
    """check_every only changes how often the device is read: the same Ritz values, also across a breakdown
    (H with 3 distinct eigenvalues and P = 2I: the P-Krylov space is invariant after 3 steps)."""
    n = 24
    h = prescribed(torch.linspace(0.1, 5.0, n), seed=10).to(device)
    p = spd(n, 2.0, seed=11).to(device)
    ref = preconditioned_lanczos(lambda v: h @ v, lambda v: p @ v, n, 15, device=device, check_every=1)
    for k in (4, 15):
        got = preconditioned_lanczos(lambda v: h @ v, lambda v: p @ v, n, 15, device=device, check_every=k)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    h3 = prescribed(torch.tensor([1.0] * 8 + [2.0] * 8 + [3.0] * 8), seed=12).to(device)
    two = lambda v: 2.0 * v  # noqa: E731
    for k in (1, 10):
        ritz = preconditioned_lanczos(lambda v: h3 @ v, two, n, 12, device=device, check_every=k)
        assert ritz.shape == (3,), k
        torch.testing.assert_close(ritz.cpu(), torch.tensor([2.0, 4.0, 6.0], dtype=ritz.dtype), rtol=0, atol=1e-10)


def test_sharpness_against_arpack(device):
    """The device Lanczos of sharpness against ARPACK (scipy eigsh 'LA' on the CPU), the previous implementation."""
    from scipy.sparse.linalg import eigsh

    n = 200
    h = prescribed(torch.cat([torch.tensor([4.0, 3.9]), torch.linspace(-3.0, 1.0, n - 2)]), seed=13).to(device)
    oracle = float(eigsh(h.cpu().numpy(), k=1, which="LA", tol=1e-12, return_eigenvectors=False)[0])
    assert sharpness(lambda v: h @ v, n, seed=0, device=device) == pytest.approx(oracle, rel=1e-9)


def test_stability_helpers_validate():
    assert edge_of_stability_ratio(0.1, 20.0) == pytest.approx(1.0)
    assert not gd_is_stable(0.1, 20.0)  # equality is not stable (|1 - lr λ| = 1)
    assert gd_is_stable(0.1, 19.999)
    assert stability_threshold(0.01, momentum=0.9) == pytest.approx(380.0)
    with pytest.raises(ValueError):
        stability_threshold(0.0)
