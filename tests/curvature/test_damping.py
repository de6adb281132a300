"""Damping policies (curvature.damping): Tikhonov split, Martens & Grosse's π split, adaptive LM, make_damping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvature.damping import AdaptiveLM, DampingPolicy, FactoredPi, Tikhonov, make_damping, pi_split
from tests.curvature.strategies import F64, f64, hyp, psd, to_work

lams = st.floats(1e-8, 1e4)


# ------------------------------------------------------------------------------ Tikhonov / π split
@given(lam=lams)
@hyp(max_examples=50)
def test_tikhonov_splits_sqrt_lambda(lam):
    pol = Tikhonov(lam)
    A = torch.diag(torch.tensor([100.0, 1.0], dtype=F64))
    for a, g in ((A, torch.eye(3, dtype=F64)), (None, None)):
        lam_a, lam_g = pol.factor_damping(a, g)
        assert lam_a == lam_g == pytest.approx(math.sqrt(lam), rel=1e-15)
    assert not pol.needs_reduction_ratio
    pol.observe_reduction_ratio(0.0)  # fixed policies ignore ρ
    assert pol.damping == lam


@given(data=st.data(), lam=lams)
@hyp()
def test_pi_split_formula_against_explicit_traces(device, data, lam):
    """π = sqrt((tr A/d_A)/(tr G/d_G)), λ_A = π√λ, λ_G = √λ/π (so λ_A λ_G = λ)."""
    da, dg = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    A = to_work(data.draw(psd(da)), device)
    G = to_work(data.draw(psd(dg)), device)
    A64, G64 = f64(A), f64(G)
    ta = sum(float(A64[i, i]) for i in range(da)) / da
    tg = sum(float(G64[i, i]) for i in range(dg)) / dg
    lam_a, lam_g = pi_split(lam, A, G)
    if ta > 1e-12 and tg > 1e-12:
        pi = math.sqrt(ta / tg)
        rtol = 1e-12 if A.dtype == F64 else 1e-5
        assert lam_a == pytest.approx(pi * math.sqrt(lam), rel=rtol)
        assert lam_g == pytest.approx(math.sqrt(lam) / pi, rel=rtol)
    else:  # a (numerically) zero factor: fall back to √λ each
        assert lam_a == lam_g == pytest.approx(math.sqrt(lam))
    assert lam_a * lam_g == pytest.approx(lam, rel=1e-12)
    # FactoredPi uses the same split; AdaptiveLM too (use_pi=True), or √λ each (use_pi=False)
    assert FactoredPi(lam).factor_damping(A, G) == (lam_a, lam_g)
    assert AdaptiveLM(lam).factor_damping(A, G) == (lam_a, lam_g)
    root = math.sqrt(lam)
    assert AdaptiveLM(lam, use_pi=False).factor_damping(A, G) == pytest.approx((root, root))


def test_pi_split_examples_and_degenerate_factors():
    A = torch.diag(torch.tensor([4.0, 8.0], dtype=F64))  # tr/d = 6
    G = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=F64))  # tr/d = 1.5
    lam_a, lam_g = pi_split(0.01, A, G)
    assert lam_a == pytest.approx(2.0 * 0.1) and lam_g == pytest.approx(0.1 / 2.0)
    for a, g in ((torch.zeros(2, 2), G), (A, torch.zeros(4, 4)), (A, torch.full((4, 4), float("nan"))),
                 (torch.full((2, 2), float("inf")), G)):
        assert pi_split(0.25, a, g) == (0.5, 0.5)
    assert FactoredPi(0.25).factor_damping(None, G) == (0.5, 0.5)
    assert FactoredPi(0.25).factor_damping(A, None) == (0.5, 0.5)


# ------------------------------------------------------------------------------ adaptive LM
@given(rho=st.floats(-10.0, 10.0), lam=st.floats(1e-3, 1e3), interval=st.integers(1, 5))
@hyp()
def test_adaptive_lm_rule(rho, lam, interval):
    """ρ > 3/4: λ·ω; ρ < 1/4: λ/ω; otherwise unchanged; ω = (19/20)^T; one adjustment per T observations."""
    pol = AdaptiveLM(lam, interval=interval)
    assert pol.omega == pytest.approx(0.95**interval, rel=1e-15)
    for k in range(interval - 1):
        pol.observe_reduction_ratio(rho)
        assert pol.damping == lam and pol.history == []
    pol.observe_reduction_ratio(rho)
    if rho > 0.75:
        expected = lam * 0.95**interval
    elif rho < 0.25:
        expected = lam / 0.95**interval
    else:
        expected = lam
    assert pol.damping == pytest.approx(expected, rel=1e-12)
    assert len(pol.history) == 1
    assert pol.history[0][0] == pytest.approx(rho, rel=1e-12, abs=1e-12)
    assert pol.history[0][1] == pol.damping


def test_adaptive_lm_thresholds_are_strict():
    for rho in (0.25, 0.75, 0.5):
        pol = AdaptiveLM(1.0)
        pol.observe_reduction_ratio(rho)
        assert pol.damping == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_adaptive_lm_non_finite_ratio_increases_damping(bad):
    pol = AdaptiveLM(1.0)
    pol.observe_reduction_ratio(bad)
    assert pol.damping == pytest.approx(1 / 0.95)
    # inside an averaging interval a single non-finite ρ also makes the adjustment an increase
    pol = AdaptiveLM(1.0, interval=3)
    for rho in (0.9, bad, 0.9):
        pol.observe_reduction_ratio(rho)
    assert pol.damping == pytest.approx(1 / 0.95**3)


def test_adaptive_lm_interval_averages_ratios():
    pol = AdaptiveLM(2.0, interval=3)
    for rho in (0.9, 0.9, 0.0):  # mean 0.6: unchanged
        pol.observe_reduction_ratio(rho)
    assert pol.damping == 2.0 and pol.history == [(pytest.approx(0.6), 2.0)]
    for rho in (0.9, 0.9, 0.6):  # mean 0.8 > 3/4: decrease
        pol.observe_reduction_ratio(rho)
    assert pol.damping == pytest.approx(2.0 * 0.95**3)
    for rho in (0.0, 0.3, 0.3):  # mean 0.2 < 1/4: increase
        pol.observe_reduction_ratio(rho)
    assert pol.damping == pytest.approx(2.0)
    assert len(pol.history) == 3
    # a partial interval is pending and survives a state round trip
    pol.observe_reduction_ratio(1.0)
    pol.observe_reduction_ratio(1.0)
    state = pol.state_dict()
    other = AdaptiveLM(5.0, interval=3)
    other.load_state_dict(state)
    assert other.damping == pol.damping and other.history == pol.history
    other.observe_reduction_ratio(1.0)
    pol.observe_reduction_ratio(1.0)
    assert other.damping == pol.damping == pytest.approx(2.0 * 0.95**3)


def test_adaptive_lm_clipping():
    pol = AdaptiveLM(1e-3, min_damping=5e-4, max_damping=2e-3)
    for _ in range(50):
        pol.observe_reduction_ratio(1.0)
        assert 5e-4 <= pol.damping <= 2e-3
    assert pol.damping == 5e-4
    for _ in range(50):
        pol.observe_reduction_ratio(-1.0)
    assert pol.damping == 2e-3
    assert pol.needs_reduction_ratio


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"damping": 0.0}, "damping"), ({"damping": -1.0}, "damping"), ({"damping": float("nan")}, "damping"),
        ({"damping": float("inf")}, "damping"), ({"damping": "1e-3"}, "damping"),
        ({"interval": 0}, "interval"), ({"interval": 1.5}, "interval"), ({"interval": -2}, "interval"),
        ({"lower": 0.0}, "lower"), ({"lower": 0.8, "upper": 0.7}, "lower"), ({"upper": 1.0}, "upper"),
        ({"lower": 0.5, "upper": 0.5}, "upper"),
        ({"min_damping": 0.0}, "min_damping"), ({"min_damping": -1e-3}, "min_damping"),
        ({"max_damping": 1e-9}, "max_damping"), ({"min_damping": 1.0, "max_damping": 1.0}, "max_damping"),
    ],
)
def test_adaptive_lm_invalid_config_names_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveLM(**kwargs)


@pytest.mark.parametrize("cls", [DampingPolicy, Tikhonov, FactoredPi])
@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf"), None])
def test_fixed_policies_reject_invalid_damping(cls, bad):
    with pytest.raises(ValueError, match="damping"):
        cls(bad)


def test_policy_state_round_trip():
    pol = FactoredPi(0.3)
    other = FactoredPi(1.0)
    other.load_state_dict(pol.state_dict())
    assert other.damping == 0.3


# ------------------------------------------------------------------------------ make_damping
def test_make_damping():
    pol = make_damping(0.01)
    assert type(pol) is Tikhonov and pol.damping == 0.01
    pol = make_damping(2)
    assert type(pol) is Tikhonov and pol.damping == 2.0 and isinstance(pol.damping, float)
    existing = AdaptiveLM(0.5)
    assert make_damping(existing) is existing
    for bad in (True, False, "0.1", None, [0.1], torch.tensor(0.1)):
        with pytest.raises(ValueError, match="damping"):
            make_damping(bad)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping"):
            make_damping(bad)


def test_pi_split_falls_back_at_a_mean_trace_equal_to_eps():
    """The π split needs tr A/d_A > eps and tr G/d_G > eps (eps = 1e-12): at equality it falls back to √λ each."""
    G = torch.diag(torch.tensor([1.0, 3.0], dtype=F64))  # tr/d = 2
    at = torch.diag(torch.tensor([1e-12], dtype=F64))
    assert pi_split(0.25, at, G) == (0.5, 0.5)
    assert pi_split(0.25, G, at) == (0.5, 0.5)
    above = torch.diag(torch.tensor([2e-12], dtype=F64))  # π = √(1e-12) = 1e-6
    assert pi_split(0.25, above, 2.0 * torch.eye(1, dtype=F64)) == pytest.approx((0.5e-6, 0.5e6), rel=1e-12)
