"""Powell damping (P9, P10), double damping (P11) and the one-update eigenvalue bounds after DD (P12).

spec/theory.md §2.3–2.5 and §5; kbfgs.md §4. Oracles are float64 formulas written in the tests
(tests/curvature/strategies.py: dd_oracle, bfgs_inverse_oracle).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvature.bfgs import bfgs_direct_update, bfgs_inverse_update
from curvature.pair_damping import DampedPair, DampingCounters, DoubleDamping, powell_b_damping, powell_h_damping
from tests.curvature.strategies import (
    F64,
    PAIR_KINDS,
    assert_close_work,
    dd_oracle,
    eig_bounds,
    eps_for,
    f64,
    hyp,
    pairs,
    spd,
    spread_for,
    to_work,
    work_dtype,
)

VARIANTS = ["interpolate", "lm"]
mus = st.floats(0.01, 0.99)


def _rtol(device) -> float:
    """spec §5 P11: rel 1e-10 (float64) / 1e-4 (float32), relative to the magnitude of the summed terms."""
    return 1e-10 if work_dtype(device) == F64 else 1e-4


def _draw_problem(device, data, kinds=PAIR_KINDS):
    n = data.draw(st.integers(1, 8))
    H64 = data.draw(spd(n, spread_for(device)))
    s64, y64, kind = data.draw(pairs(n, kinds))
    H, s, y = to_work(H64, device), to_work(s64, device), to_work(y64, device)
    return n, H, s, y, f64(H), f64(s), f64(y), kind


# ================================================================================ P9 Powell B-form
@given(data=st.data(), mu=mus)
@hyp()
def test_p9_powell_b_form(device, data, mu):
    """ANY y, s ≠ 0: θ ∈ (0, 1]; sᵀr ≥ μ sᵀBs with equality iff active; B⁺ = BFGS(B, s, r) ≻ 0."""
    n, B, s, y, B64, s64, y64, kind = _draw_problem(device, data, kinds=tuple(k for k in PAIR_KINDS if k != "s_zero"))
    Bs = B @ s
    r, theta, active = powell_b_damping(s, y, Bs, mu)
    r64, Bs64 = f64(r), B64 @ s64
    sBs, sy = float(s64 @ Bs64), float(s64 @ y64)
    rtol = _rtol(device)
    assert 0.0 < theta <= 1.0
    margin_scale = abs(sy) + mu * sBs
    if abs(sy - mu * sBs) > rtol * margin_scale:  # away from the switching boundary
        assert active == (sy < mu * sBs)
    sr = float(s64 @ r64)
    term_scale = float(s64.abs() @ r64.abs()) + mu * sBs
    if active:
        assert abs(sr - mu * sBs) <= rtol * (term_scale + theta * float(s64.abs() @ y64.abs()))
        th_exp = (1 - mu) * sBs / (sBs - sy)
        # θ inherits the rounding of sᵀy and sᵀBs (k·eps·|s|ᵀ|y|, k·eps·|s|ᵀ|Bs|) through 1/(sᵀBs − sᵀy)
        rounding = 100 * n * eps_for(device) * (float(s64.abs() @ y64.abs()) + float(s64.abs() @ Bs64.abs()))
        assert abs(theta - th_exp) <= th_exp * (rtol + rounding / abs(sBs - sy))
        r_exp = theta * y64 + (1 - theta) * Bs64
        assert float((r64 - r_exp).norm()) <= rtol * float((theta * y64.abs() + (1 - theta) * Bs64.abs()).norm())
    else:
        assert theta == 1.0 and r is y
        assert sr >= mu * sBs * (1 - rtol)
    assert sr > 0
    # B⁺ ≻ 0: λmin(B⁺) ≥ 1/λmax(H⁺) with the one-update bound λmax(H⁺) ≤ (1+√(C_s C_y))² λmax(H) + C_s
    Bp = f64(bfgs_direct_update(B, s, r))
    lo, hi = eig_bounds(Bp)
    c_s, c_y = float(s64 @ s64) / sr, float(r64 @ r64) / sr
    h_max = 1.0 / eig_bounds(B64)[0]
    lower = 1.0 / ((1 + math.sqrt(c_s * c_y)) ** 2 * h_max + c_s)
    tau = 1000 * n * eps_for(device) * (sBs / sr) * max(abs(hi), 1.0)
    assert lo >= lower - tau * max(hi, eig_bounds(B64)[1])
    if lower > 2 * tau * max(hi, eig_bounds(B64)[1]):
        assert lo > 0


def test_p9_powell_b_form_negative_curvature_example(device):
    B = to_work(torch.eye(2, dtype=F64), device)
    s = to_work(torch.tensor([1.0, 0.0], dtype=F64), device)
    y = to_work(torch.tensor([-3.0, 1.0], dtype=F64), device)  # sᵀy = -3, sᵀBs = 1
    r, theta, active = powell_b_damping(s, y, B @ s)  # default μ = 0.2 (N&W Procedure 18.2)
    assert active and theta == pytest.approx(0.8 / 4.0)
    assert_close_work(r, 0.2 * torch.tensor([-3.0, 1.0], dtype=F64) + 0.8 * torch.tensor([1.0, 0.0], dtype=F64), device)
    assert float(f64(s) @ f64(r)) == pytest.approx(0.2)


# ================================================================================ P10 Powell H-form
@given(data=st.data(), mu1=mus)
@hyp()
def test_p10_powell_h_form(device, data, mu1):
    """ANY s, y ≠ 0: s̃ᵀy ≥ μ1 yᵀHy, equality iff active; formula θ1 = (1-μ1)yᵀHy/(yᵀHy - sᵀy)."""
    n, H, s, y, H64, s64, y64, kind = _draw_problem(device, data, kinds=tuple(k for k in PAIR_KINDS if k != "y_zero"))
    Hy = H @ y
    s1, theta, active = powell_h_damping(s, y, Hy, mu1)
    s164, Hy64 = f64(s1), H64 @ y64
    yHy, sy = float(y64 @ Hy64), float(s64 @ y64)
    rtol = _rtol(device)
    assert 0.0 < theta <= 1.0
    if abs(sy - mu1 * yHy) > rtol * (abs(sy) + mu1 * yHy):
        assert active == (sy < mu1 * yHy)
    s1y = float(s164 @ y64)
    scale = float(s164.abs() @ y64.abs()) + mu1 * yHy + theta * float(s64.abs() @ y64.abs())
    if active:
        assert abs(s1y - mu1 * yHy) <= rtol * scale
        s_exp = theta * s64 + (1 - theta) * Hy64
        assert float((s164 - s_exp).norm()) <= rtol * float((theta * s64.abs() + (1 - theta) * Hy64.abs()).norm())
    else:
        assert theta == 1.0 and s1 is s
    assert s1y >= mu1 * yHy - rtol * scale


@given(data=st.data(), mu1=mus)
@hyp(max_examples=100)
def test_p10_negative_control_asdl_sign_bug(device, data, mu1):
    """sign=-1 (θs − (1−θ)Hy, the asdl bug): with sᵀy = 0 the guarantee fails, s̃ᵀy = −μ1 yᵀHy < μ1 yᵀHy."""
    n = data.draw(st.integers(2, 8))
    H = to_work(data.draw(spd(n, spread_for(device))), device)
    s64, y64, _ = data.draw(pairs(n, kinds=("orth",), norm_exp=1.0))
    s, y = to_work(s64, device), to_work(y64, device)
    Hy = H @ y
    yHy = float(f64(y) @ f64(H) @ f64(y))
    sy = float(f64(s) @ f64(y))  # 0 up to the rounding of s, y to the work dtype
    s_bad, theta, active = powell_h_damping(s, y, Hy, mu1, sign=-1)
    assert active
    s_bad_y = float(f64(s_bad) @ f64(y))
    assert s_bad_y < mu1 * yHy  # the P10 inequality is violated ...
    assert s_bad_y < 0  # ... badly: negative curvature, −μ1 yᵀHy up to the rounding of sᵀy = 0
    assert abs(s_bad_y + mu1 * yHy) <= 1e-3 * mu1 * yHy + 2 * abs(sy)
    s_ok, _, _ = powell_h_damping(s, y, Hy, mu1, sign=1)
    assert float(f64(s_ok) @ f64(y)) >= mu1 * yHy * (1 - 1e-3)


def test_p10_negative_control_exact_example(device):
    H = to_work(torch.eye(2, dtype=F64), device)
    s = to_work(torch.tensor([1.0, 0.0], dtype=F64), device)
    y = to_work(torch.tensor([0.0, 1.0], dtype=F64), device)  # sᵀy = 0, yᵀHy = 1
    s_bad, _, _ = powell_h_damping(s, y, H @ y, 0.2, sign=-1)
    assert float(f64(s_bad) @ f64(y)) == pytest.approx(-0.2)
    s_ok, theta, _ = powell_h_damping(s, y, H @ y)  # default μ1 = 0.2, sign = +1
    assert theta == pytest.approx(0.8) and float(f64(s_ok) @ f64(y)) == pytest.approx(0.2)
    # the policy with the bug breaks the step-1 invariant on the same pair
    pair = DoubleDamping(mu1=0.2, mu2=0.5, powell_sign=-1)(s, y, lambda v: H @ v)
    assert float(f64(pair.s) @ f64(y)) < 0.2 * 1.0


# ================================================================================ P11 double damping
def _check_dd(device, H64, s64, y64, pair: DampedPair, mu1, mu2, variant):
    n = s64.numel()
    rtol = _rtol(device)
    st64, yt64 = f64(pair.s), f64(pair.y)
    lam_max = eig_bounds(H64)[1]
    c = 1.0 / mu1 + mu2 * lam_max
    sty = float(st64 @ yt64)
    ss = float(st64 @ st64)
    ns, ny = float(st64.norm()), float(yt64.norm())
    # (i) s̃ᵀỹ ≥ μ2‖s̃‖²
    assert sty >= mu2 * ss - rtol * (ns * ny + mu2 * ss), "(i)"
    # (iii) s̃ᵀỹ > 0
    assert sty > 0, "(iii)"
    # (ii) ỹᵀHỹ ≤ (1/μ1 + μ2 λmax(H)) s̃ᵀỹ
    yHy = float(yt64 @ H64 @ yt64)
    assert yHy <= c * sty + rtol * (lam_max * ny * ny + c * ns * ny), "(ii)"
    # against the independent oracle (away from the switching boundaries)
    o = dd_oracle(s64, y64, H64, mu1, mu2, variant)
    near1 = abs(o["margin1"]) <= 1e-8 * o["scale1"]
    near2 = abs(o["margin2"]) <= 1e-8 * o["scale2"]
    if not near1:
        assert pair.step1_active == o["active1"]
    if not (near1 or near2):
        assert pair.step2_active == o["active2"]
        so, yo = o["s"], o["y"]
        assert float((st64 - so).norm()) <= 1e3 * rtol * (float(so.norm()) + float((H64 @ y64).norm()) + float(s64.norm()))
        assert float((yt64 - yo).norm()) <= 1e3 * rtol * (float(yo.norm()) + float(y64.norm()) + float(so.norm()))
        if variant == "interpolate" and o["active2"]:
            assert abs(sty - mu2 * ss) <= rtol * (ns * ny + mu2 * ss)  # equality when step 2 is active
    # θ's are in (0, 1] for μ's in (0, 1)
    assert 0.0 < pair.theta1 <= 1.0 and 0.0 < pair.theta2 <= 1.0
    # tightness: step 2 inactive, step 1 active ⇒ ỹᵀHỹ = s̃ᵀỹ/μ1
    if variant == "interpolate" and pair.step1_active and not pair.step2_active:
        assert abs(yHy - sty / mu1) <= rtol * (lam_max * ny * ny + ns * ny / mu1)
    return sty


@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data(), mu1=mus, mu2=mus)
@hyp()
def test_p11_double_damping_lemma(device, variant, data, mu1, mu2):
    n, H, s, y, H64, s64, y64, kind = _draw_problem(device, data)
    dd = DoubleDamping(mu1=mu1, mu2=mu2, variant=variant)
    counters = DampingCounters()
    pair = dd(s, y, lambda v: H @ v, counters)
    assert not pair.skipped, (kind, pair.skip_reason)
    assert counters.pairs == 1 and counters.skipped == 0
    assert counters.step1 == int(pair.step1_active) and counters.step2 == int(pair.step2_active)
    if variant == "lm":
        assert pair.step2_active
    _check_dd(device, H64, s64, y64, pair, mu1, mu2, variant)


@given(data=st.data(), mu1=mus)
@hyp(max_examples=100)
def test_p11_tightness_is_attained(device, data, mu1):
    """Step 1 active, step 2 inactive ⇒ ỹᵀHỹ = s̃ᵀỹ/μ1 (bound (ii) attained up to the μ2λmax term).
    Constructed: H = h I with small μ2, sᵀy = 0 so step 1 fires; s̃ᵀy = μ1 h‖y‖² ≥ μ2‖s̃‖² for μ2 small."""
    n = data.draw(st.integers(2, 8))
    s64, y64, _ = data.draw(pairs(n, kinds=("orth",), norm_exp=1.0))
    H64 = data.draw(spd(n, 0.5))
    H, s, y = to_work(H64, device), to_work(s64, device), to_work(y64, device)
    H64 = f64(H)
    mu2 = 1e-9
    pair = DoubleDamping(mu1=mu1, mu2=mu2)(s, y, lambda v: H @ v)
    assert pair.step1_active and not pair.step2_active
    yt, stt = f64(pair.y), f64(pair.s)
    yHy, sty = float(yt @ H64 @ yt), float(stt @ yt)
    assert abs(yHy - sty / mu1) <= _rtol(device) * 10 * (yHy + sty / mu1)


def test_p11_degenerate_cases(device):
    H = to_work(torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=F64)), device)
    apply_H = lambda v: H @ v  # noqa: E731
    mu1, mu2 = 0.3, 0.4
    z = to_work(torch.zeros(3, dtype=F64), device)
    v = to_work(torch.tensor([1.0, -2.0, 0.5], dtype=F64), device)
    for variant in VARIANTS:
        dd = DoubleDamping(mu1=mu1, mu2=mu2, variant=variant)
        counters = DampingCounters()
        # s = y = 0: skipped and counted
        pair = dd(z, z, apply_H, counters)
        assert pair.skipped and pair.skip_reason == "zero pair"
        assert counters.skipped == 1 and counters.skip_reasons == {"zero pair": 1} and counters.pairs == 1
        # s = 0, y ≠ 0: s̃ = μ1 H y
        pair = dd(z, v, apply_H, counters)
        assert not pair.skipped and pair.step1_active
        torch.testing.assert_close(f64(pair.s), mu1 * f64(H) @ f64(v), rtol=_rtol(device), atol=0)
        assert pair.theta1 == pytest.approx(1 - mu1)
        # y = 0, s ≠ 0: s̃ = s and ỹ = μ2 s̃
        pair = dd(v, z, apply_H, counters)
        assert not pair.skipped and not pair.step1_active and pair.step2_active
        assert torch.equal(pair.s, v)
        torch.testing.assert_close(f64(pair.y), mu2 * f64(v), rtol=_rtol(device), atol=0)
        assert counters.pairs == 3 and counters.skipped == 1
        # step 2 fires for y = 0 (both variants) and, in the LM variant, always; for s = 0 it does not
        # interpolate here: s̃ᵀy = μ1 vᵀHv = 3 ≥ μ2‖μ1 Hv‖² = 0.756
        assert counters.step1 == 1 and counters.step2 == (2 if variant == "lm" else 1) and counters.step2_guard == 0


@pytest.mark.parametrize("mu2", [1.0, 2.0, 7.5])
def test_p11_mu2_at_least_one_vanishing_denominator_takes_guard(device, mu2):
    """μ2 ≥ 1 with s̃ᵀy = ‖s̃‖² (so ‖s̃‖² − s̃ᵀy = 0): the guard shifts ỹ along s̃; s̃ᵀỹ = μ2‖s̃‖² holds."""
    H = to_work(torch.eye(3, dtype=F64) * 0.5, device)  # μ1·sᵀHs < sᵀs: step 1 inactive for y = s
    s = to_work(torch.tensor([1.0, 2.0, -1.0], dtype=F64), device)
    counters = DampingCounters()
    pair = DoubleDamping(mu1=0.2, mu2=mu2)(s, s.clone(), lambda v: H @ v, counters)
    assert not pair.skipped and not pair.step1_active
    ss = float(f64(s) @ f64(s))
    sty = float(f64(pair.s) @ f64(pair.y))
    if mu2 > 1.0:
        assert pair.step2_active and counters.step2_guard == 1
        assert torch.isfinite(pair.y).all()
        assert sty == pytest.approx(mu2 * ss, rel=_rtol(device))
        torch.testing.assert_close(f64(pair.y), mu2 * f64(s), rtol=_rtol(device), atol=0)
    else:  # μ2 = 1: s̃ᵀy = μ2‖s̃‖², not below the threshold: inactive, no division
        assert not pair.step2_active and counters.step2_guard == 0
        assert sty == pytest.approx(ss)


@given(data=st.data(), mu1=mus, mu2=st.floats(1.0, 4.0))
@hyp(max_examples=100)
def test_p11_invariant_i_for_mu2_above_one(device, data, mu1, mu2):
    """μ2 ≥ 1 (λ > 1 in the reference code): θ2 may leave [0, 1] but s̃ᵀỹ ≥ μ2‖s̃‖² still holds."""
    n, H, s, y, H64, s64, y64, kind = _draw_problem(device, data)
    pair = DoubleDamping(mu1=mu1, mu2=mu2)(s, y, lambda v: H @ v)
    assert not pair.skipped
    st64, yt64 = f64(pair.s), f64(pair.y)
    ss, sty = float(st64 @ st64), float(st64 @ yt64)
    assert math.isfinite(sty)
    assert sty >= mu2 * ss - _rtol(device) * 10 * (float(st64.norm() * yt64.norm()) + mu2 * ss)
    assert sty > 0


def test_dd_skip_rules_and_counters(device):
    H = to_work(torch.eye(2, dtype=F64), device)
    apply_H = lambda v: H @ v  # noqa: E731
    counters = DampingCounters()
    dd = DoubleDamping(mu1=0.05, mu2=0.5, min_norm=1e-3)
    nan = to_work(torch.tensor([float("nan"), 1.0], dtype=F64), device)
    one = to_work(torch.tensor([1.0, 0.0], dtype=F64), device)
    assert dd(nan, one, apply_H, counters).skip_reason == "non-finite pair"
    assert dd(one, nan * float("inf"), apply_H, counters).skip_reason == "non-finite pair"
    tiny = to_work(torch.tensor([1e-4, 0.0], dtype=F64), device)
    assert dd(tiny, tiny, apply_H, counters).skip_reason == "zero pair"
    # s = 0, ‖y‖ = 1e-2 > min_norm, but s̃ = μ1 H y has norm 5e-4 < min_norm
    y = to_work(torch.tensor([0.0, 1e-2], dtype=F64), device)
    pair = dd(0 * y, y, apply_H, counters)
    assert pair.skip_reason == "damped s is (numerically) zero" and pair.skipped
    good = dd(one, to_work(torch.tensor([-1.0, 0.5], dtype=F64), device), apply_H, counters)
    assert not good.skipped and good.skip_reason is None
    assert counters.pairs == 5 and counters.skipped == 4
    assert counters.skip_reasons == {"non-finite pair": 2, "zero pair": 1, "damped s is (numerically) zero": 1}
    # the good pair: step 1 fires (sᵀy = -1 < μ1 yᵀHy); s̃ᵀy = μ1 yᵀHy = 0.0625 ≥ μ2‖s̃‖² ≈ 0.029: step 2 does not
    assert good.step1_active and not good.step2_active
    assert counters.step1 == 1 and counters.step2 == 0
    d = counters.as_dict()
    assert d == {"pairs": 5, "step1": 1, "step2": 0, "step2_guard": 0, "skipped": 4, "skip_reasons": counters.skip_reasons}
    d["skip_reasons"]["x"] = 1
    assert "x" not in counters.skip_reasons  # as_dict copies
    # skipped pairs are returned unchanged
    assert dd(nan, one, apply_H).s is nan


@pytest.mark.parametrize(
    "kwargs, name",
    [({"mu1": 0.0}, "mu1"), ({"mu1": 1.0}, "mu1"), ({"mu1": -0.5}, "mu1"), ({"mu1": 1.5}, "mu1"),
     ({"mu2": 0.0}, "mu2"), ({"mu2": -1.0}, "mu2"), ({"variant": "powell"}, "variant"),
     ({"powell_sign": 0}, "powell_sign"), ({"powell_sign": 2}, "powell_sign")],
)
def test_double_damping_config_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DoubleDamping(**kwargs)


def test_double_damping_defaults():
    dd = DoubleDamping()
    assert dd.mu1 == 0.2 and dd.variant == "interpolate" and dd.powell_sign == 1
    DoubleDamping(mu2=3.0)  # μ2 > 1 is allowed (reference code: μ2 = sqrt(λ))


# ================================================================================ P12 eigenvalue bounds
@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data(), mu1=mus, mu2=mus)
@hyp()
def test_p12_eigenvalue_bounds_after_dd_and_bfgs(device, variant, data, mu1, mu2):
    """λmin(H⁺) ≥ λmin(H)/(1+c), λmax(H⁺) ≤ (√λmax(H) + √(c/μ2))² + 1/μ2, c = 1/μ1 + μ2 λmax(H)."""
    n, H, s, y, H64, s64, y64, kind = _draw_problem(device, data)
    pair = DoubleDamping(mu1=mu1, mu2=mu2, variant=variant)(s, y, lambda v: H @ v)
    assert not pair.skipped
    Hp = f64(bfgs_inverse_update(H, pair.s, pair.y))
    lo0, hi0 = eig_bounds(H64)
    lo, hi = eig_bounds(Hp)
    c = 1.0 / mu1 + mu2 * hi0
    upper = (math.sqrt(hi0) + math.sqrt(c / mu2)) ** 2 + 1.0 / mu2
    lower = lo0 / (1.0 + c)
    tau = 100 * n * eps_for(device) * (1.0 if work_dtype(device) == F64 else 10.0)
    scale = max(hi, hi0)
    assert hi <= upper + tau * scale
    assert lo >= lower - tau * scale


def test_dd_boundaries_overflow_and_counters_exact(device):
    """Exact edges of the skip rules (kills mutants that survived the suite): the zero-pair and the
    damped-s rules skip *at* equality with ``min_norm``; a damped pair that overflows is skipped with
    its reason and returned unchanged; the guard counter accumulates; ``powell_sign`` reaches step 1."""
    H = to_work(torch.eye(2, dtype=F64), device)
    apply_H = lambda v: H @ v  # noqa: E731
    half = to_work(torch.tensor([0.5, 0.0], dtype=F64), device)
    one = to_work(torch.tensor([1.0, 0.0], dtype=F64), device)
    dd = DoubleDamping(mu1=0.2, mu2=0.5, min_norm=0.5)
    assert dd(half, half, apply_H).skip_reason == "zero pair"                      # ‖s‖ = ‖y‖ = min_norm
    assert dd(half, one, apply_H).skip_reason == "damped s is (numerically) zero"  # ‖s̃‖ = ‖s‖ = min_norm
    # finite s and y, ỹ = y + μ2 s̃ overflows (LM variant): skipped, counted, the input pair returned
    counters = DampingCounters()
    big = to_work(torch.tensor([1e200, 0.0], dtype=F64), device)
    pair = DoubleDamping(mu1=0.2, mu2=1e109, variant="lm")(big, one, apply_H, counters)
    assert pair.skip_reason == "non-finite damped pair" and pair.s is big and pair.y is one
    assert counters.skip_reasons == {"non-finite damped pair": 1} and counters.step2 == 0
    # the step-2 guard (μ2 > 1, s̃ᵀy = ‖s̃‖²) counted once per pair
    s = to_work(torch.tensor([1.0, 2.0], dtype=F64), device)
    counters = DampingCounters()
    for _ in range(2):
        DoubleDamping(mu1=0.2, mu2=2.0)(s, s.clone(), lambda v: 0.5 * v, counters)
    assert counters.step2_guard == 2
    # powell_sign is passed to step 1 (a step-1-active pair: sᵀy < μ1 yᵀHy)
    y = to_work(torch.tensor([-1.0, 0.5], dtype=F64), device)
    for sign in (1, -1):
        got = DoubleDamping(mu1=0.2, mu2=0.5, powell_sign=sign)(one, y, apply_H).s
        torch.testing.assert_close(got, powell_h_damping(one, y, H @ y, 0.2, sign)[0], rtol=0, atol=0)


def test_powell_b_form_is_inactive_at_equality(device):
    """sᵀy = μ sᵀBs exactly: no damping (θ = 1 and ``active`` is False)."""
    s = to_work(torch.tensor([1.0, 0.0], dtype=F64), device)
    y = to_work(torch.tensor([0.5, 7.0], dtype=F64), device)       # sᵀy = 0.5 = μ · sᵀBs with B = I, μ = 0.5
    r, theta, active = powell_b_damping(s, y, s.clone(), mu=0.5)
    assert not active and theta == 1.0 and r is y


def test_dd_reports_theta2_and_keeps_the_pair_dtype(device):
    """H = I, s = (1, 0), y = (1/4, 1), μ1 = 0.2, μ2 = 1/2: step 1 is off (sᵀy = 1/4 ≥ μ1‖y‖² = 0.2125),
    step 2 interpolates: θ2 = (1 − μ2)‖s̃‖²/(‖s̃‖² − s̃ᵀy) = (1/2)/(3/4) = 2/3 and
    ỹ = θ2 y + (1 − θ2) s̃ = (1/2, 2/3), so s̃ᵀỹ = μ2‖s̃‖². In float32 the damped pair stays float32."""
    for dtype, rtol in ((F64, 1e-15), (torch.float32, 1e-6)):
        s = torch.tensor([1.0, 0.0], dtype=dtype, device=device)
        y = torch.tensor([0.25, 1.0], dtype=dtype, device=device)
        counters = DampingCounters()
        pair = DoubleDamping(mu1=0.2, mu2=0.5)(s, y, lambda v: v, counters)
        assert not pair.skipped and not pair.step1_active and pair.step2_active
        assert pair.theta1 == 1.0 and pair.theta2 == pytest.approx(2.0 / 3.0, rel=rtol)
        assert counters.step2 == 1 and counters.step2_guard == 0
        assert pair.y.dtype == dtype and pair.s.dtype == dtype
        torch.testing.assert_close(pair.y.double().cpu(), torch.tensor([0.5, 2.0 / 3.0], dtype=F64), rtol=rtol, atol=0)


def test_dd_step2_guard_threshold_is_relative_and_strict(device):
    """Step 2 interpolates only when ‖s̃‖² − s̃ᵀy > 1e-12·‖s̃‖² (relative: the decision does not change
    when the pair is scaled); at or below it, the guard ỹ = y + ((μ2‖s̃‖² − s̃ᵀy)/‖s̃‖²)·s̃ is used.
    μ2 = 1, H = I, and step 1 is off in every case (s̃ = s)."""
    dd = DoubleDamping(mu1=0.2, mu2=1.0)
    # exactly at the threshold (float64 values chosen so that every operation is exact): s = (1, b),
    # ‖s‖² = 1 + b² = σ and σ − sᵀy = d = fl(1e-12·σ): not above it, so the guard fires
    b, sigma, d = 0.009428710534373807, 1.000088900582341, 1.000088900582341e-12
    assert 1.0 + b * b == sigma and 1e-12 * sigma == d and sigma - (sigma - d) == d
    s = torch.tensor([1.0, b], dtype=F64, device=device)
    y = torch.tensor([sigma - d, 0.0], dtype=F64, device=device)
    counters = DampingCounters()
    pair = dd(s, y, lambda v: v, counters)
    assert pair.step2_active and counters.step2_guard == 1 and pair.theta2 == 1.0
    want = torch.tensor([sigma - d + d / sigma, d / sigma * b], dtype=F64)  # y + (d/σ)·s
    torch.testing.assert_close(pair.y.cpu(), want, rtol=1e-12, atol=0)
    # relative: s = c·e₁, y = c·((1 − r)e₁ + t e₂), so ‖s̃‖² − s̃ᵀy = r·c²; r = 1e-14 takes the guard
    # (ỹ = y + r·s = c·(1, t)), r = 1e-10 interpolates (θ2 = 0 for μ2 = 1: ỹ = s̃ = c·e₁), at every scale c
    t = 0.5
    for c in (2.0**-20, 1.0, 2.0**20):
        for r, guarded in ((1e-14, True), (1e-10, False)):
            s = torch.tensor([c, 0.0], dtype=F64, device=device)
            y = torch.tensor([c * (1.0 - r), c * t], dtype=F64, device=device)
            counters = DampingCounters()
            pair = dd(s, y, lambda v: v, counters)
            assert pair.step2_active and counters.step2_guard == int(guarded), (c, r)
            want = torch.tensor([c, c * t] if guarded else [c, 0.0], dtype=F64)
            torch.testing.assert_close(pair.y.cpu(), want, rtol=1e-9, atol=0)


def test_dd_skips_a_damped_s_that_overflows_while_y_stays_finite(device):
    """A non-finite s̃ is never returned, also when ỹ is finite. Step 1 overflows with an indefinite H
    (H = −I; the optimizers' H is SPD, but the damping takes any action): y = e₁, s = (−1 + 2⁻⁴⁰, 10³⁰⁰)
    gives sᵀy = −1 + 2⁻⁴⁰ < μ1 yᵀHy = −0.2, θ1 = (1 − μ1)yᵀHy/(yᵀHy − sᵀy) = 0.8·2⁴⁰, so
    s̃₂ = θ1·10³⁰⁰ = inf; s̃ᵀy is NaN (inf·0), step 2 is off and ỹ = y is finite."""
    s = torch.tensor([-1.0 + 2.0**-40, 1e300], dtype=F64, device=device)
    y = torch.tensor([1.0, 0.0], dtype=F64, device=device)
    counters = DampingCounters()
    pair = DoubleDamping(mu1=0.2, mu2=0.5)(s, y, lambda v: -v, counters)
    assert pair.skip_reason == "non-finite damped pair" and pair.s is s and pair.y is y
    assert counters.skip_reasons == {"non-finite damped pair": 1}


def test_dd_decides_a_finite_pair_with_one_host_read(device):
    """The GPU-ready contract: one read of the draft's scalars per pair (both variants); the exact
    elementwise finiteness tests run only to confirm a False fused flag."""
    from benchmarks.syncs import SyncCounter

    s = torch.tensor([1.0, 0.0], dtype=F64, device=device)
    y = torch.tensor([0.25, 1.0], dtype=F64, device=device)
    for variant in ("interpolate", "lm"):
        with SyncCounter() as counter:
            pair = DoubleDamping(mu1=0.2, mu2=0.5, variant=variant)(s, y, lambda v: v)
        assert not pair.skipped and counter.count == 1, (variant, dict(counter.sites))
