"""Inverse/direct BFGS updates (curvature.bfgs): properties P5–P8 and the skip rules (kbfgs.md §8)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvature.bfgs import (
    DEFAULT_CURVATURE_THRESHOLD,
    bfgs_direct_update,
    bfgs_inverse_update,
    check_pair,
    guarded_bfgs_inverse_update,
    symmetric_rank2_update,
)
from tests.curvature.strategies import (
    F64,
    bfgs_direct_oracle,
    bfgs_inverse_oracle,
    cos_pairs,
    eig_bounds,
    eps_for,
    f64,
    hyp,
    rel_err,
    spd,
    spread_for,
    to_work,
)


def _setup(device, data, cos_range=(0.05, 1.0)):
    n = data.draw(st.integers(1, 8))
    H64 = data.draw(spd(n, spread_for(device)))
    s64, y64 = data.draw(cos_pairs(n, cos_range))
    H, s, y = to_work(H64, device), to_work(s64, device), to_work(y64, device)
    return n, H, s, y, f64(H), f64(s), f64(y)


def _update_scale(H, s, y) -> float:
    """Magnitude of the terms of H⁺ = H - ρ(s uᵀ + u sᵀ) + (ρ² yᵀHy + ρ) s sᵀ (float64 inputs), with the
    relative rounding of ρ = 1/sᵀy (factor ‖s‖‖y‖/|sᵀy|) and of yᵀu (‖y‖‖u‖ instead of yᵀHy) folded in."""
    sy = abs(float(s @ y))
    rho = 1.0 / sy
    u = H @ y
    ns, ny, nu = float(s.norm()), float(y.norm()), float(u.norm())
    c = ns * ny / sy
    return float(torch.linalg.matrix_norm(H, 2)) + c * (2 * rho * ns * nu + (rho * rho * ny * nu + rho) * ns * ns)


def _sym_inv(H: torch.Tensor) -> torch.Tensor:
    """An exactly symmetric float64 inverse (torch.linalg.inv of an ill-conditioned SPD matrix is not)."""
    B = torch.linalg.inv(H)
    return 0.5 * (B + B.T)


def _direct_scale(B, s, y) -> float:
    """Magnitude of the terms of B⁺ = B - Bs sᵀB/(sᵀBs) + y yᵀ/(sᵀy), with the cancellation in sᵀBs and sᵀy."""
    Bs = B @ s
    sBs, sy = abs(float(s @ Bs)), abs(float(s @ y))
    ns, ny, nb = float(s.norm()), float(y.norm()), float(Bs.norm())
    return float(torch.linalg.matrix_norm(B, 2)) + (ns * nb / sBs) * nb * nb / sBs + (ns * ny / sy) * ny * ny / sy


# ------------------------------------------------------------------------------ formula, symmetry
@given(data=st.data())
@hyp()
def test_inverse_update_matches_product_form_and_is_symmetric(device, data):
    n, H, s, y, H64, s64, y64 = _setup(device, data, (-1.0, 1.0))
    if abs(float(s64 @ y64)) < 0.05 * float(s64.norm() * y64.norm()):
        return  # ρ ill-defined near sᵀy = 0; covered elsewhere
    Hp = bfgs_inverse_update(H, s, y)
    assert Hp.shape == (n, n) and Hp.dtype == H.dtype
    assert torch.equal(Hp, Hp.T)
    expected = bfgs_inverse_oracle(H64, s64, y64)
    err = float((f64(Hp) - expected).norm())
    assert err <= 100 * n * eps_for(device) * _update_scale(H64, s64, y64) * n**0.5


@given(data=st.data())
@hyp()
def test_direct_update_matches_formula_and_is_symmetric(device, data):
    n, H, s, y, H64, s64, y64 = _setup(device, data)
    B = H  # any SPD matrix serves as B
    Bp = bfgs_direct_update(B, s, y)
    assert torch.equal(Bp, Bp.T)
    expected = bfgs_direct_oracle(H64, s64, y64)
    assert float((f64(Bp) - expected).norm()) <= 100 * n * eps_for(device) * _direct_scale(H64, s64, y64) * n**0.5


# Every size 1-70 (each remainder of the vector widths, 2-16 elements per register for float32/float64 on
# CPU vector units) and sizes around powers of two and the benchmark nets' widths.
RANK2_SIZES = list(range(1, 71)) + [127, 128, 129, 255, 256, 257, 400, 401, 511, 512, 513, 784, 785]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_rank2_update_is_bit_symmetric_and_accurate_at_every_size(device, dtype):
    """H + ppᵀ − qqᵀ against the float64 sum, elementwise within two roundings of its terms' magnitudes, and
    exactly symmetric for an exactly symmetric H (H = (L + Lᵀ) built symmetric, so no BLAS product's rounding)."""
    generator = torch.Generator().manual_seed(7)
    eps = torch.finfo(dtype).eps
    for n in RANK2_SIZES:
        lower = torch.randn(n, n, dtype=torch.float64, generator=generator).tril()
        H64 = lower + lower.T  # exactly symmetric, indefinite: the update needs no definiteness
        p64, q64 = torch.randn(n, dtype=torch.float64, generator=generator), torch.randn(n, dtype=torch.float64, generator=generator)
        H, p, q = (t.to(device=device, dtype=dtype) for t in (H64, p64, q64))
        out = symmetric_rank2_update(H, p, q)
        assert out.dtype == dtype and out.shape == (n, n)
        assert torch.equal(out, out.T), f"not bit-symmetric at n = {n}"
        H64, p64, q64 = (t.double().cpu() for t in (H, p, q))  # the inputs as rounded to dtype
        exact = H64 + torch.outer(p64, p64) - torch.outer(q64, q64)
        scale = H64.abs() + torch.outer(p64, p64).abs() + torch.outer(q64, q64).abs()
        assert bool(((out.double().cpu() - exact).abs() <= 2 * eps * scale).all()), f"inaccurate at n = {n}"
        assert torch.equal(H.double().cpu(), H64)  # H untouched


def test_symmetric_rank2_update_leaves_its_inputs_alone(device):
    """The result is a new tensor (the revert snapshot references H, see test_revert_snapshot.py)."""
    H = torch.eye(3, device=device)
    p, q = torch.tensor([1.0, 2.0, 3.0], device=device), torch.tensor([0.5, 0.0, -1.0], device=device)
    before = H.clone(), p.clone(), q.clone()
    out = symmetric_rank2_update(H, p, q)
    assert out.data_ptr() != H.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip((H, p, q), before))
    expected = torch.tensor([[1.75, 2.0, 3.5], [2.0, 5.0, 6.0], [3.5, 6.0, 9.0]], device=device)  # by hand
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------ P5 secant
@given(data=st.data())
@hyp()
def test_p5_secant_equations(device, data):
    """H⁺y = s (inverse form) and B⁺s = y (direct form, B = H^{-1})."""
    n, H, s, y, H64, s64, y64 = _setup(device, data)
    Hp = f64(bfgs_inverse_update(H, s, y))
    tau = 100 * n * eps_for(device)
    scale_h = _update_scale(H64, s64, y64) * float(y64.norm())
    assert float((Hp @ y64 - s64).norm()) <= tau * scale_h
    B = to_work(_sym_inv(H64), device)
    B64 = f64(B)
    Bp = f64(bfgs_direct_update(B, s, y))
    scale_b = _direct_scale(B64, s64, y64) * float(s64.norm())
    assert float((Bp @ s64 - y64).norm()) <= tau * scale_b


# ------------------------------------------------------------------------------ P6 curvature / PD
@given(data=st.data())
@hyp()
def test_p6_curvature_and_positive_definiteness(device, data):
    n, H, s, y, H64, s64, y64 = _setup(device, data, (-1.0, 1.0))
    sy = float(s64 @ y64)
    if abs(sy) < 0.05 * float(s64.norm() * y64.norm()):
        return  # sign tests need sᵀy bounded away from 0
    Hp = f64(bfgs_inverse_update(H, s, y))
    tau = 100 * n * eps_for(device)
    # yᵀH⁺y = sᵀy (holds for either sign of sᵀy)
    yHpy = float(y64 @ Hp @ y64)
    assert abs(yHpy - sy) <= tau * _update_scale(H64, s64, y64) * float(y64 @ y64)
    lo, hi = eig_bounds(Hp)
    if sy > 0:
        # λmax(B⁺) ≤ λmax(B) + ‖y‖²/sᵀy  ⇒  λmin(H⁺) ≥ 1/(1/λmin(H) + ‖y‖²/sᵀy) > 0
        bound = 1.0 / (1.0 / eig_bounds(H64)[0] + float(y64 @ y64) / sy)
        assert lo >= bound - tau * max(hi, _update_scale(H64, s64, y64))
        assert lo > 0
    else:
        assert yHpy < 0  # a direction of negative curvature: H⁺ is not PD
        assert lo < 0


@given(data=st.data())
@hyp(max_examples=50)
def test_p6_pd_preserved_over_many_updates(device, data):
    n = data.draw(st.integers(1, 6))
    H = to_work(data.draw(spd(n, spread_for(device) / 3)), device)
    for _ in range(data.draw(st.integers(1, 10))):
        s, y = (to_work(v, device) for v in data.draw(cos_pairs(n, (0.3, 1.0), norm_exp=1.0)))
        H = bfgs_inverse_update(H, s, y)
        assert torch.equal(H, H.T)
        assert torch.linalg.cholesky_ex(f64(H))[1] == 0


# ------------------------------------------------------------------------------ P7 inverse pair
@given(data=st.data())
@hyp()
def test_p7_inverse_and_direct_updates_are_inverses(device, data):
    n, H, s, y, H64, s64, y64 = _setup(device, data, (0.2, 1.0))
    B = to_work(_sym_inv(H64), device)
    B64 = f64(B)
    Hp, Bp = f64(bfgs_inverse_update(H, s, y)), f64(bfgs_direct_update(B, s, y))
    # ‖H⁺B⁺ - I‖ ≤ ‖ΔH⁺‖‖B⁺‖ + ‖H⁺‖‖ΔB⁺‖ (+ the inexact B = H^{-1}: κ(H)·eps·‖H⁺‖‖B⁺‖-ish)
    norm_h, norm_b = float(torch.linalg.matrix_norm(Hp, 2)), float(torch.linalg.matrix_norm(Bp, 2))
    lo_h, hi_h = eig_bounds(H64)
    bound = (_update_scale(H64, s64, y64) * norm_b + norm_h * _direct_scale(B64, s64, y64)
             + (hi_h / lo_h) * norm_h * norm_b)
    err = float((Hp @ Bp - torch.eye(n, dtype=F64)).norm())
    assert err <= 100 * n * eps_for(device) * bound


# ------------------------------------------------------------------------------ P8 determinants
@given(data=st.data())
@hyp()
def test_p8_log_determinant_identities(device, data):
    """det B⁺ = det B · sᵀy/(sᵀBs); det H⁺ = det H · sᵀBs/(sᵀy)."""
    n, H, s, y, H64, s64, y64 = _setup(device, data, (0.2, 1.0))
    B = to_work(_sym_inv(H64), device)
    B64 = f64(B)
    Hp, Bp = f64(bfgs_inverse_update(H, s, y)), f64(bfgs_direct_update(B, s, y))
    sy, sBs = float(s64 @ y64), float(s64 @ B64 @ s64)
    # Δlogdet(X) ≈ tr(X^{-1}ΔX) ≤ n‖ΔX‖/λmin(X), with λmin from the float64 oracle; plus the oracle's own κ·eps
    lo0, hi0 = eig_bounds(H64)
    tau = 100 * n * eps_for(device)
    base = n * (hi0 / lo0) * tau + tau * float(s64.norm() * (B64 @ s64).norm()) / sBs
    tol_h = n * tau * _update_scale(H64, s64, y64) / eig_bounds(bfgs_inverse_oracle(H64, s64, y64))[0] + base
    tol_b = n * tau * _direct_scale(B64, s64, y64) / eig_bounds(bfgs_direct_oracle(B64, s64, y64))[0] + base
    if max(tol_h, tol_b) > 0.1:
        return  # H⁺ or B⁺ too ill-conditioned for the work precision (float32): determinant not resolvable
    sign_h, logdet_hp = torch.linalg.slogdet(Hp)
    sign_b, logdet_bp = torch.linalg.slogdet(Bp)
    assert float(sign_h) == 1.0 and float(sign_b) == 1.0
    ld_h = float(torch.linalg.slogdet(H64)[1])
    ld_b = float(torch.linalg.slogdet(B64)[1])
    assert abs(float(logdet_hp) - (ld_h + math.log(sBs) - math.log(sy))) <= tol_h
    assert abs(float(logdet_bp) - (ld_b + math.log(sy) - math.log(sBs))) <= tol_b


# ------------------------------------------------------------------------------ skip rules
def test_check_pair_reasons(device):
    s = to_work(torch.tensor([1.0, 0.0]), device)
    assert check_pair(s, s).ok and check_pair(s, s).sy == pytest.approx(1.0)
    assert check_pair(s, -s).reason == "s^T y <= 0"
    assert check_pair(s, to_work(torch.tensor([0.0, 1.0]), device)).reason == "s^T y <= 0"  # sᵀy = 0
    nan = to_work(torch.tensor([float("nan"), 0.0]), device)
    inf = to_work(torch.tensor([float("inf"), 0.0]), device)
    assert check_pair(nan, s).reason == "non-finite pair"
    assert check_pair(s, inf).reason == "non-finite pair"
    assert DEFAULT_CURVATURE_THRESHOLD == 1e-4


def test_check_pair_reports_sy_and_skips_at_the_threshold(device):
    """Every verdict carries sᵀy (NaN only for a non-finite pair), and the relative rule skips
    *at* equality: sᵀy ≤ threshold·‖s‖²·‖g_ref‖ (values exact in binary floating point)."""
    s = to_work(torch.tensor([1.0, 0.0]), device)
    y = to_work(torch.tensor([0.5, 3.0]), device)                  # sᵀy = 0.5, ‖s‖² = 1
    assert check_pair(s, -y).sy == pytest.approx(-0.5)
    assert math.isnan(check_pair(to_work(torch.tensor([float("nan"), 0.0]), device), y).sy)
    at = check_pair(s, y, reference_norm=1.0, threshold=0.5)      # 0.5 <= 0.5 · 1 · 1
    assert at.reason == "s^T y below the relative curvature threshold" and at.sy == pytest.approx(0.5)
    above = check_pair(s, y, reference_norm=1.0, threshold=0.25)  # 0.5 > 0.25
    assert above.ok and above.sy == pytest.approx(0.5)


def test_a_device_tensor_reference_norm_acts_like_the_float(device):
    """The blocks pass ‖g_ref‖ as a 0-dim device tensor (no host read of its own): check_pair and the
    guarded update apply the same relative rule with it as with the Python float, on both sides of
    the threshold; a non-finite pair reports sᵀy as NaN even when sᵀy itself is +inf."""
    s = to_work(torch.tensor([1.0, 0.0]), device)
    y = to_work(torch.tensor([0.5, 3.0]), device)                  # sᵀy = 0.5, ‖s‖² = 1
    H = to_work(torch.eye(2), device)
    for ref, skipped in ((1.0, True), (0.25, False)):             # 0.5 <= 0.5·1·1 ; 0.5 > 0.5·1·0.25
        tensor_ref = to_work(torch.tensor(ref), device)
        want = "s^T y below the relative curvature threshold" if skipped else None
        assert check_pair(s, y, reference_norm=tensor_ref, threshold=0.5).reason == want
        assert check_pair(s, y, reference_norm=ref, threshold=0.5).reason == want
        out, reason = guarded_bfgs_inverse_update(H, s, y, reference_norm=tensor_ref, threshold=0.5)
        assert reason == want and (out is H) == skipped
        if not skipped:
            torch.testing.assert_close(out, bfgs_inverse_update(H, s, y), rtol=0, atol=0)
    inf_pair = check_pair(s, to_work(torch.tensor([float("inf"), 0.0]), device))  # sᵀy = +inf
    assert inf_pair.reason == "non-finite pair" and math.isnan(inf_pair.sy)


@given(data=st.data())
@hyp(max_examples=100)
def test_guarded_update_relative_threshold(device, data):
    """Skip iff sᵀy ≤ 1e-4·‖s‖²·‖g_ref‖; the skipped call returns the SAME H object and the reason."""
    n, H, s, y, H64, s64, y64 = _setup(device, data)
    sy, ss = float(s64 @ y64), float(s64 @ s64)
    ratio = 10.0 ** data.draw(st.floats(-2.0, 2.0))  # threshold·ss·ref = sy/ratio
    ref = sy / (DEFAULT_CURVATURE_THRESHOLD * ss) * ratio
    out, reason = guarded_bfgs_inverse_update(H, s, y, reference_norm=ref)
    if ratio > 1.0 + 1e-6:
        assert reason == "s^T y below the relative curvature threshold"
        assert out is H
    elif ratio < 1.0 - 1e-6:
        assert reason is None
        assert out is not H
        torch.testing.assert_close(out, bfgs_inverse_update(H, s, y), rtol=0, atol=0)
    # a custom threshold is honoured: 10x the default with the same reference
    out2, reason2 = guarded_bfgs_inverse_update(H, s, y, reference_norm=sy / (1e-3 * ss) * 2.0, threshold=1e-3)
    assert reason2 is not None and out2 is H
    # no reference: the relative rule is off
    out3, reason3 = guarded_bfgs_inverse_update(H, s, y)
    assert reason3 is None


def test_guarded_update_skips_nonpositive_and_nonfinite(device):
    H = to_work(torch.eye(3, dtype=F64) * 2.0, device)
    s = to_work(torch.tensor([1.0, 2.0, 0.0], dtype=F64), device)
    for y, why in [(-s, "s^T y <= 0"), (torch.zeros_like(s), "s^T y <= 0"),
                   (to_work(torch.tensor([2.0, -1.0, 5.0], dtype=F64), device), "s^T y <= 0")]:
        out, reason = guarded_bfgs_inverse_update(H, s, y)
        assert out is H and reason == why
    bad = s.clone()
    bad[1] = float("nan")
    out, reason = guarded_bfgs_inverse_update(H, bad, s)
    assert out is H and reason == "non-finite pair"
    out, reason = guarded_bfgs_inverse_update(H, s, bad)
    assert out is H and reason == "non-finite pair"


def test_guarded_update_skips_overflowing_update(device):
    """A finite pair whose update overflows (ρ²·yᵀHy = inf) is skipped: 'non-finite update', H unchanged."""
    big = torch.finfo(to_work(torch.zeros(1), device).dtype).max / 10
    H = to_work(torch.eye(2, dtype=F64), device) * big
    s = to_work(torch.tensor([1e-3, 0.0], dtype=F64), device)
    out, reason = guarded_bfgs_inverse_update(H, s, s.clone())
    assert torch.isfinite(H).all()
    assert reason == "non-finite update" and out is H
    assert not torch.isfinite(bfgs_inverse_update(H, s, s.clone())).all()


def test_guarded_update_applies_good_pair(device):
    H = to_work(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64)), device)
    s = to_work(torch.tensor([1.0, 0.5, -0.2], dtype=F64), device)
    y = to_work(torch.tensor([2.0, 1.0, 0.1], dtype=F64), device)
    out, reason = guarded_bfgs_inverse_update(H, s, y, reference_norm=1.0)
    assert reason is None
    assert rel_err(out, bfgs_inverse_oracle(f64(H), f64(s), f64(y))) <= 100 * eps_for(device)
    # the input is not modified in place
    assert torch.equal(f64(H), torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64)))


# ------------------------------------------------------------------------------ one host read per decision
def test_a_finite_pair_is_decided_with_one_host_read(device):
    """check_pair and the guarded update read their scalars once (the GPU-ready contract); the exact
    elementwise finiteness test runs only to confirm a False fused flag (a non-finite pair), never
    for a finite pair or a finite update."""
    from benchmarks.syncs import SyncCounter

    H = torch.eye(2, dtype=F64, device=device)
    s = torch.tensor([1.0, 0.5], dtype=F64, device=device)
    y = torch.tensor([2.0, 1.0], dtype=F64, device=device)
    with SyncCounter() as counter:
        assert check_pair(s, y, reference_norm=1.0).ok
    assert counter.count == 1, dict(counter.sites)
    with SyncCounter() as counter:
        out, reason = guarded_bfgs_inverse_update(H, s, y, reference_norm=1.0)
    assert reason is None and out is not H
    assert counter.count == 1, dict(counter.sites)
    bad = torch.tensor([float("nan"), 0.5], dtype=F64, device=device)
    with SyncCounter() as counter:  # the flag reads False: the exact test confirms it (more reads)
        assert check_pair(bad, y).reason == "non-finite pair"
    assert counter.count > 1


# ------------------------------------------------------------------------------ extreme exponents
def test_update_is_accurate_when_the_norm_of_s_overflows(device):
    """H = 2⁻¹⁸⁰·I, s = (2⁵¹³, 0), y = (2⁴⁸⁶, 0): the pair lives in span(e₁), so the secant equation
    alone fixes H⁺ = diag(s₁/y₁, H₂₂) = diag(2²⁷, 2⁻¹⁸⁰) (exact). ‖s‖₂ overflows (s₁² = 2¹⁰²⁶) while
    w = (2⁻⁴⁸⁷, 0) is small: a balancing factor from 2-norms would be 0 (then clamped, inaccurate);
    from the largest entries it is α = √(2⁻⁴⁸⁷)/√(2⁵¹³) = 2⁻⁵⁰⁰, and ŝ = ŵ = 2¹³·e₁/√2."""
    H = torch.eye(2, dtype=F64, device=device) * 2.0**-180
    s = torch.tensor([2.0**513, 0.0], dtype=F64, device=device)
    y = torch.tensor([2.0**486, 0.0], dtype=F64, device=device)
    assert math.isinf(float(torch.linalg.vector_norm(s)))
    out = bfgs_inverse_update(H, s, y)
    assert abs(float(out[0, 0]) / 2.0**27 - 1.0) <= 1e-9
    assert float(out[1, 1]) == 2.0**-180 and float(out[0, 1]) == 0.0 == float(out[1, 0])


def test_update_is_accurate_when_the_norms_of_s_and_w_overflow(device):
    """n = 512, H = I, s = σ·1 (σ = 1.5·2⁵¹¹), y = η·1 (η = 2⁻⁵¹⁸): every entry and the exact
    H⁺ = I - ρ(s uᵀ + u sᵀ) + (ρ² yᵀHy + ρ) s sᵀ are finite (ρ = 1/(nση) = 1/6, so
    H⁺ = I - (1/6)·2·ση·11ᵀ + (1/6 + n η²/36)·σ²·11ᵀ, i.e. σ²/6 = 1.5·2¹⁰²⁰ in every entry to
    float64 precision), but ‖s‖₂ and ‖w‖₂ (w = σ/12·1) overflow to inf, so 2-norms would give α = NaN;
    the largest entries give α = √(1/12) and keep p, q = (ŝ ± ŵ)/√2 in range."""
    n, sigma, eta = 512, 1.5 * 2.0**511, 2.0**-518
    H = torch.eye(n, dtype=F64, device=device)
    s = torch.full((n,), sigma, dtype=F64, device=device)
    y = torch.full((n,), eta, dtype=F64, device=device)
    assert math.isinf(float(torch.linalg.vector_norm(s)))
    out = bfgs_inverse_update(H, s, y)
    expected = sigma * sigma / 6.0  # 1.5·2¹⁰²⁰; the I and ση terms are below its rounding
    assert bool(torch.isfinite(out).all())
    assert float((out / expected - 1.0).abs().max()) <= 1e-12


def test_update_is_accurate_when_only_the_norm_of_w_overflows(device):
    """H = I, s = (2⁵⁰⁰, 0), y = (2⁻⁵¹³, 0): H⁺ = diag(s₁/y₁, 1) = diag(2¹⁰¹³, 1) (exact, the pair lives
    in span(e₁)). Here w = (2⁵¹², 0) (ρ = 2¹³, a = 2¹³ + 2⁻¹⁰⁰⁰), so ‖w‖₂ overflows (w₁² = 2¹⁰²⁴) while
    ‖s‖₂ is finite (2-norms would give α = +inf); the largest entries give α = 2⁶ and
    ŝ = ŵ = 2⁵⁰⁶·e₁/√2, so p₁² = 2¹⁰¹³ is in range."""
    H = torch.eye(2, dtype=F64, device=device)
    s = torch.tensor([2.0**500, 0.0], dtype=F64, device=device)
    y = torch.tensor([2.0**-513, 0.0], dtype=F64, device=device)
    out = bfgs_inverse_update(H, s, y)
    assert abs(float(out[0, 0]) / 2.0**1013 - 1.0) <= 1e-12
    assert float(out[1, 1]) == 1.0 and float(out[0, 1]) == 0.0 == float(out[1, 0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_update_with_w_zero_returns_H_exactly(device, dtype):
    """H = I, y = s: u = s, ρ = 1/sᵀs, a = 2ρ, so w = (a/2)s − ρu = 0 and H⁺ = H + swᵀ + wsᵀ = I exactly
    (the secant equation H⁺y = s already holds for H). The balancing factor √‖w‖∞/√‖s‖∞ is 0 there: the
    division w/α must use a positive stand-in (0 would give ŵ = 0/0 = NaN), and ŝ = αs must stay 0 (with a
    stand-in α = 1, H + ppᵀ rounds before − qqᵀ takes it back: off-diagonal entries of ~1e-16)."""
    H = torch.eye(3, dtype=dtype, device=device)
    s = torch.tensor([1.0, 2.0, 4.0], dtype=dtype, device=device)
    assert torch.equal(bfgs_inverse_update(H, s, s.clone()), H)


@pytest.mark.parametrize("dtype, e_h, e_y", [(torch.float64, -999, 1000), (torch.float32, -74, 75)])
def test_inverse_update_is_exact_where_rho_squared_underflows(device, dtype, e_h, e_y):
    """H = 2^e_h·I₂, s = e₁, y = 2^e_y·e₁: ρ = 2^-e_y, so ρ² underflows to 0 in the dtype, while the exact
    update H⁺ = (I − ρsyᵀ)H(I − ρysᵀ) + ρssᵀ = diag(2^-e_y, 2^e_h) is representable (by hand: ρsᵀy = 1
    removes H's first diagonal entry). (ρ·ρ)·yᵀHy gave −2^-e_y there: a finite, indefinite H⁺.
    The float32 case also needs the balancing factor from largest entries: w = −2^-76·e₁, whose 2-norm
    squares below float32's range (the balancing factor was then clamped and H⁺₁₁ came out wrong)."""
    H = 2.0 ** e_h * torch.eye(2, dtype=dtype, device=device)
    s = torch.tensor([1.0, 0.0], dtype=dtype, device=device)
    y = torch.tensor([2.0 ** e_y, 0.0], dtype=dtype, device=device)
    out = bfgs_inverse_update(H, s, y)
    expected = torch.diag(torch.tensor([2.0 ** -e_y, 2.0 ** e_h], dtype=dtype, device=device))
    torch.testing.assert_close(out, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
