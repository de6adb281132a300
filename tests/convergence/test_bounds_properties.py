"""The bound formulas of ``convergence.bounds`` as hypothesis properties, on every device and dtype.

Random SPD ``H`` (spectrum 10^u, u in [-2, 2]) and adversarial pairs -- sᵀy <= 0, y = 0, s ⟂ y, y = -t s, huge
and tiny scales -- go through the library's own double damping (``DoubleDamping``) and inverse BFGS update
(``bfgs_inverse_update``) on the device, in the device's dtype; the spectrum of H⁺ (float64 ``eigvalsh`` of the
symmetric part, the oracle) must lie in the interval the harness uses for E4:

* one DD update (§2.5): ``dd_update_interval(λmin(H), λmax(H), μ1, μ2)``;
* one BFGS update with the damped pair's measured C_s, C_y: ``bfgs_update_interval``;
* the damped-inverse interval ``[1/(λmax(F)+λ), 1/λ]`` of ``(F + λI)⁻¹`` (tolerance 10·n·eps·κ·(1/λ),
  κ = (λmax(F)+λ)/λ the condition number of the inversion, in the device's dtype).

Tolerances (absolute, times λmax(H⁺)): float64 on CPU ``spectral_tolerance(n, eps64, ·)`` = 10·n·eps;
float32 on CUDA ``1e-3`` relative to the interval's scale, because the float32 update itself rounds at
~n·eps32·κ(H) ≈ 1e-4 for κ ≤ 1e4 (stated, not fitted: the largest residual seen is reported by the assertion).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convergence.bounds import bfgs_update_interval, damped_inverse_interval, dd_update_interval, spectral_tolerance
from curvature.bfgs import bfgs_inverse_update
from curvature.pair_damping import DoubleDamping

F64 = torch.float64
CASES = ("random", "negative_curvature", "y_zero", "orthogonal", "anti_parallel")


def _dtype(device: torch.device) -> torch.dtype:
    return F64 if device.type == "cpu" else torch.float32


def _tolerance(device: torch.device, n: int, scale: float) -> float:
    if device.type == "cpu":
        return spectral_tolerance(n, float(torch.finfo(F64).eps), scale)
    return 1e-3 * abs(scale)


def _spd(n: int, seed: int, spread: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    u = (torch.rand(n, generator=gen, dtype=F64) * 2 - 1) * spread
    return (q * 10.0 ** u) @ q.T


def _pair(n: int, seed: int, case: str, log_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 7)
    s = torch.randn(n, generator=gen, dtype=F64)
    y = torch.randn(n, generator=gen, dtype=F64)
    if case == "negative_curvature" and float(s @ y) > 0:
        y = -y
    elif case == "y_zero":
        y = torch.zeros(n, dtype=F64)
    elif case == "orthogonal":
        y = y - (y @ s) / (s @ s) * s
    elif case == "anti_parallel":
        y = -2.0 * s
    scale = 10.0 ** log_scale
    return s * scale, y * scale


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 7), seed=st.integers(0, 10_000), mu1=st.floats(0.05, 0.9), mu2=st.floats(0.05, 0.9),
       log_scale=st.floats(-4, 4))
def test_one_double_damped_update_stays_in_the_dd_interval(device, case, n, seed, mu1, mu2, log_scale):
    dtype = _dtype(device)
    spread = 2.0 if dtype == F64 else 1.0
    H = _spd(n, seed, spread).to(device=device, dtype=dtype)
    s, y = (v.to(device=device, dtype=dtype) for v in _pair(n, seed, case, log_scale))
    dd = DoubleDamping(mu1=mu1, mu2=mu2)
    pair = dd(s, y, lambda v: H @ v)
    if pair.skipped:  # only the (numerically) zero pair may be skipped
        assert pair.skip_reason in ("zero pair", "damped s is (numerically) zero")
        return
    assert float(pair.s @ pair.y) > 0  # DD lemma (iii): the update keeps H positive definite
    H_plus = bfgs_inverse_update(H, pair.s, pair.y).to(F64)
    eig = torch.linalg.eigvalsh(0.5 * (H_plus + H_plus.T))
    H64 = H.to(F64)
    h_eig = torch.linalg.eigvalsh(0.5 * (H64 + H64.T))
    lo, hi = dd_update_interval(float(h_eig[0]), float(h_eig[-1]), mu1, mu2)
    tol = _tolerance(device, n, max(hi, float(eig[-1])))
    assert float(eig[0]) >= lo - tol, (float(eig[0]), lo, tol)
    assert float(eig[-1]) <= hi + tol, (float(eig[-1]), hi, tol)
    # the general one-update interval with the damped pair's own constants holds too
    s64, y64 = pair.s.to(F64), pair.y.to(F64)
    sy = float(s64 @ y64)
    lo2, hi2 = bfgs_update_interval(float(h_eig[0]), float(h_eig[-1]), float(s64 @ s64) / sy, float(y64 @ y64) / sy)
    tol2 = _tolerance(device, n, max(hi2, float(eig[-1])))
    assert lo2 - tol2 <= float(eig[0]) and float(eig[-1]) <= hi2 + tol2


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 7), seed=st.integers(0, 10_000), log_damping=st.floats(-4, 2), rank=st.integers(0, 7))
def test_damped_inverse_interval(device, n, seed, log_damping, rank):
    """spec((F + λI)⁻¹) ⊂ [1/(λmax(F)+λ), 1/λ] for PSD F, including singular F (rank < n)."""
    dtype = _dtype(device)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, min(rank, n), generator=gen, dtype=F64)
    F = (X @ X.T).to(device=device, dtype=dtype)
    lam = 10.0 ** log_damping
    inv = torch.linalg.inv(F + lam * torch.eye(n, device=device, dtype=dtype)).to(F64)
    eig = torch.linalg.eigvalsh(0.5 * (inv + inv.T))
    f_max = float(torch.linalg.eigvalsh(F.to(F64))[-1])
    lo, hi = damped_inverse_interval(f_max, lam)
    # inversion rounds at ~n eps kappa relative, kappa = (lambda_max(F) + lambda)/lambda
    tol = spectral_tolerance(n, float(torch.finfo(dtype).eps), hi, condition=(f_max + lam) / lam)
    assert float(eig[0]) >= lo - tol and float(eig[-1]) <= hi + tol


def test_the_interval_is_tight_for_an_active_step_one():
    """With step 2 inactive and step 1 active, ỹᵀHỹ = s̃ᵀỹ/μ1 (P11 tightness): the bound is not vacuous."""
    H = torch.eye(3, dtype=F64)
    s = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    y = torch.tensor([0.05, 1.0, 0.0], dtype=F64)
    pair = DoubleDamping(mu1=0.2, mu2=0.01)(s, y, lambda v: H @ v)
    assert pair.step1_active and not pair.step2_active
    assert float(pair.y @ H @ pair.y) == pytest.approx(float(pair.s @ pair.y) / 0.2, rel=1e-12)
    assert math.isfinite(dd_update_interval(1.0, 1.0, 0.2, 0.01)[1])
