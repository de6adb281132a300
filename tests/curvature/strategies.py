"""Shared hypothesis strategies, float64 oracles and tolerance helpers for ``tests/curvature``.

Import as ``from tests.curvature.strategies import ...`` (works under ``--import-mode=importlib``:
pytest puts the rootdir on ``sys.path``).

Conventions (spec/theory.md §5):

* ``CURVATURE_TESTS_FLOAT32=1`` makes the CPU run use float32 too (see :data:`FORCE_FLOAT32`).
* Everything a strategy returns is a float64 CPU tensor. A test moves it to the device under test
  with :func:`to_work` (float64 on the CPU, float32 on CUDA) and builds its oracle from
  :func:`f64` of *that* tensor, so the oracle sees exactly the (possibly rounded) input of the code.
* SPD matrices are ``Q diag(10^u) Qᵀ`` with ``Q`` from the QR of a Gaussian and ``u ∈ [-3, 3]``
  (float64) or ``[-1.5, 1.5]`` (float32): :func:`spread_for` gives the half-range per device.
* Vectors have log-uniform norms ``10^{±4}``; :func:`pairs` adds the adversarial cases
  ``y = -t s``, ``y ⟂ s``, ``y = 0``, ``s = 0``, ``s`` tiny, near-parallel.
* Tolerances have the form ``|lhs - rhs| <= tau * scale`` with ``scale`` the magnitude of the terms
  summed and ``tau = k * n * eps`` of the dtype the code under test runs in.
"""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

F64 = torch.float64
EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps

#: Health checks to suppress: the profile's own, plus function-scoped fixtures (``device``).
SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def hyp(**kwargs) -> settings:
    """Hypothesis settings on top of the loaded profile (tests/conftest.py), fixture-friendly."""
    return settings(suppress_health_check=SUPPRESS, deadline=None, **kwargs)


# ------------------------------------------------------------------------------------- devices
#: ``CURVATURE_TESTS_FLOAT32=1`` runs the code under test in float32 on the CPU as well, with the
#: float32 strategies and tolerances: a way to exercise the CUDA (float32) path without a GPU.
FORCE_FLOAT32 = os.environ.get("CURVATURE_TESTS_FLOAT32", "") == "1"


def work_dtype(device) -> torch.dtype:
    """The dtype the code under test runs in: float64 on the CPU, float32 on CUDA."""
    if FORCE_FLOAT32:
        return torch.float32
    return F64 if torch.device(device).type == "cpu" else torch.float32


def eps_for(device) -> float:
    return torch.finfo(work_dtype(device)).eps


def spread_for(device) -> float:
    """Half-range of log10 of SPD spectra: 3 (κ ≤ 1e6) in float64, 1.5 (κ ≤ 1e3) in float32."""
    return 3.0 if work_dtype(device) == F64 else 1.5


def to_work(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device=device, dtype=work_dtype(device))


def f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=F64)


# ------------------------------------------------------------------------------------- builders
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-ish orthogonal matrix from the QR of a Gaussian."""
    z = torch.randn(n, n, generator=generator(seed), dtype=F64)
    q, r = torch.linalg.qr(z)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def spd_from(evals: torch.Tensor, seed: int) -> torch.Tensor:
    q = orthogonal(evals.numel(), seed)
    m = (q * evals) @ q.T
    return 0.5 * (m + m.T)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@st.composite
def spd(draw, n: int, spread: float = 3.0, scale_exp: tuple[float, float] = (0.0, 0.0)):
    """SPD ``n × n`` matrix with spectrum ``10^(c + spread·u)``, ``u ∈ [-1, 1]``, ``c ∈ scale_exp``."""
    seed = draw(seeds)
    u = draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n))
    c = draw(st.floats(*scale_exp)) if scale_exp[0] < scale_exp[1] else scale_exp[0]
    evals = 10.0 ** (c + spread * torch.tensor(u, dtype=F64))
    return spd_from(evals, seed)


@st.composite
def psd(draw, n: int, scale_exp: tuple[float, float] = (-2.0, 2.0)):
    """Symmetric PSD ``n × n`` matrix ``X Xᵀ/r`` of rank ``r ∈ [0, n]`` (often singular)."""
    seed = draw(seeds)
    rank = draw(st.integers(0, n))
    c = draw(st.floats(*scale_exp))
    x = torch.randn(n, max(rank, 1), generator=generator(seed), dtype=F64)
    if rank == 0:
        x = torch.zeros(n, 1, dtype=F64)
    m = (10.0**c) * (x @ x.T) / max(rank, 1)
    return 0.5 * (m + m.T)


@st.composite
def vectors(draw, n: int, norm_exp: float = 4.0):
    seed = draw(seeds)
    e = draw(st.floats(-norm_exp, norm_exp))
    return unit(torch.randn(n, generator=generator(seed), dtype=F64)) * 10.0**e


@st.composite
def matrices(draw, rows: int, cols: int):
    seed = draw(seeds)
    return torch.randn(rows, cols, generator=generator(seed), dtype=F64)


PAIR_KINDS = ("random", "neg_parallel", "pos_parallel", "orth", "y_zero", "s_zero", "s_tiny", "near_parallel")


@st.composite
def pairs(draw, n: int, kinds: tuple[str, ...] = PAIR_KINDS, norm_exp: float = 4.0):
    """A pair ``(s, y, kind)`` (float64, not both zero) with adversarial geometry.

    Kinds: independent random; ``y = -t s``; ``y = t s``; ``y ⟂ s`` (``y = 0`` when ``n = 1``);
    ``y = 0``; ``s = 0``; ``‖s‖ = 10^{-12..-6}‖y‖``; near-parallel (either sign).
    """
    kind = draw(st.sampled_from(kinds))
    seed = draw(seeds)
    es = draw(st.floats(-norm_exp, norm_exp))
    ey = draw(st.floats(-norm_exp, norm_exp))
    g = generator(seed)
    s_dir = unit(torch.randn(n, generator=g, dtype=F64))
    w = torch.randn(n, generator=g, dtype=F64)
    w = w - (w @ s_dir) * s_dir
    w_ok = n > 1 and float(w.norm()) > 1e-8
    w_dir = unit(w) if w_ok else torch.zeros(n, dtype=F64)
    ns, ny = 10.0**es, 10.0**ey
    s = ns * s_dir
    if kind == "random":
        y = ny * unit(torch.randn(n, generator=g, dtype=F64))
    elif kind == "neg_parallel":
        y = -ny * s_dir
    elif kind == "pos_parallel":
        y = ny * s_dir
    elif kind == "orth":
        y = ny * w_dir
    elif kind == "y_zero":
        y = torch.zeros(n, dtype=F64)
    elif kind == "s_zero":
        s = torch.zeros(n, dtype=F64)
        y = ny * unit(torch.randn(n, generator=g, dtype=F64))
    elif kind == "s_tiny":
        y = ny * unit(torch.randn(n, generator=g, dtype=F64))
        s = ny * 10.0 ** draw(st.floats(-12.0, -6.0)) * s_dir
    elif kind == "near_parallel":
        delta = 10.0 ** draw(st.floats(-8.0, -2.0))
        sign = draw(st.sampled_from([1.0, -1.0]))
        y = sign * ny * unit(s_dir + delta * w_dir)
    else:  # pragma: no cover
        raise ValueError(kind)
    return s, y, kind


@st.composite
def cos_pairs(draw, n: int, cos_range: tuple[float, float] = (0.05, 1.0), norm_exp: float = 3.0):
    """``(s, y)`` with prescribed cosine ``sᵀy/(‖s‖‖y‖) ∈ cos_range`` (exactly ±1 when ``n = 1``)."""
    seed = draw(seeds)
    c = draw(st.floats(*cos_range))
    es = draw(st.floats(-norm_exp, norm_exp))
    ey = draw(st.floats(-norm_exp, norm_exp))
    g = generator(seed)
    s_dir = unit(torch.randn(n, generator=g, dtype=F64))
    w = torch.randn(n, generator=g, dtype=F64)
    w = w - (w @ s_dir) * s_dir
    if n == 1 or float(w.norm()) < 1e-8:
        c = math.copysign(1.0, c)
        w_dir = torch.zeros(n, dtype=F64)
    else:
        w_dir = unit(w)
    y_dir = c * s_dir + math.sqrt(max(0.0, 1.0 - c * c)) * w_dir
    return 10.0**es * s_dir, 10.0**ey * y_dir


# ------------------------------------------------------------------------------------- oracles
def bfgs_inverse_oracle(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(I - ρ s yᵀ) H (I - ρ y sᵀ) + ρ s sᵀ`` written as the product (float64)."""
    rho = 1.0 / (s @ y)
    V = torch.eye(s.numel(), dtype=F64) - rho * torch.outer(y, s)
    return V.T @ H @ V + rho * torch.outer(s, s)


def bfgs_direct_oracle(B: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    Bs = B @ s
    return B - torch.outer(Bs, Bs) / (s @ Bs) + torch.outer(y, y) / (s @ y)


def dd_oracle(s, y, H, mu1: float, mu2: float, variant: str = "interpolate") -> dict:
    """Double damping written from the spec (kbfgs.md §4), float64, no guards."""
    Hy = H @ y
    yHy, sy = float(y @ Hy), float(s @ y)
    if sy < mu1 * yHy:
        theta1 = (1 - mu1) * yHy / (yHy - sy)
        s1, active1 = theta1 * s + (1 - theta1) * Hy, True
    else:
        theta1, s1, active1 = 1.0, s, False
    ss, s1y = float(s1 @ s1), float(s1 @ y)
    theta2 = 1.0
    if variant == "lm":
        y2, active2 = y + mu2 * s1, True
    elif s1y < mu2 * ss:
        theta2 = (1 - mu2) * ss / (ss - s1y)
        y2, active2 = theta2 * y + (1 - theta2) * s1, True
    else:
        y2, active2 = y, False
    return {"s": s1, "y": y2, "theta1": theta1, "theta2": theta2, "active1": active1, "active2": active2,
            "margin1": sy - mu1 * yHy, "scale1": abs(sy) + mu1 * abs(yHy),
            "margin2": s1y - mu2 * ss, "scale2": float(s1.norm() * y.norm()) + mu2 * ss}


def two_loop(pair_list, gamma: float, v: torch.Tensor) -> torch.Tensor:
    """Nocedal's two-loop recursion for ``H v`` with ``H0 = γ I`` and pairs oldest first (float64)."""
    q = v.clone()
    alphas = []
    for s, y in reversed(pair_list):
        a = (s @ q) / (s @ y)
        q = q - a * y
        alphas.append(a)
    r = gamma * q
    for (s, y), a in zip(pair_list, reversed(alphas)):
        b = (y @ r) / (s @ y)
        r = r + (a - b) * s
    return r


def sqrtm_spd(M: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(M)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def eig_bounds(M: torch.Tensor) -> tuple[float, float]:
    e = torch.linalg.eigvalsh(0.5 * (M + M.T))
    return float(e[0]), float(e[-1])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in the Frobenius norm (``inf`` when the actual value is not finite)."""
    actual, expected = f64(actual), f64(expected)
    if not torch.isfinite(actual).all():
        return math.inf
    den = float(expected.norm())
    num = float((actual - expected).norm())
    return num / den if den > 0 else num


def assert_close_work(actual: torch.Tensor, expected: torch.Tensor, device, k: float = 100.0) -> None:
    """``actual ≈ expected`` to ``k·eps`` of the work dtype, relative to the largest entry of ``expected``."""
    expected = f64(expected)
    tol = k * eps_for(device)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(f64(actual), expected, rtol=tol, atol=tol * max(scale, 1e-300))
