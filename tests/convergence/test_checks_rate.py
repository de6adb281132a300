"""E8: running means, the general bound U_N and the tail slope of G_N.

Oracle run: plain SGD (an SQN method with H_k = I, so kappa_lo = kappa_hi = 1) on least squares,
whose L = lambda_max(X̄ᵀX̄/N) and per-example gradients are known in closed form, with
alpha_k = k^-beta/L (the theorem's step size).  Planted violations: a "gradient" sequence that does
not decay, and one that decays but sits far above U_N.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convergence.checks.rate import (
    RateConfig,
    check_rate,
    cumulative_sums,
    general_bound,
    rate_exponent,
    running_average,
    tail_points,
    weighted_average,
)
from convergence.results import Verdict


def test_cumulative_sums_exact_and_interpolated():
    v = np.array([[1.0, 2.0, 4.0, 8.0]])
    np.testing.assert_allclose(cumulative_sums([1, 2, 3, 4], v), [[1, 3, 7, 15]])
    # linear values on a sparse grid are summed exactly
    k = np.arange(1, 101, dtype=float)
    lin = 3.0 + 0.5 * k
    steps = np.array([1, 2, 5, 10, 40, 100])
    got = cumulative_sums(steps, lin[steps - 1])
    want = np.cumsum(lin)[steps - 1]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # a power law on a geometric grid is close
    pw = k ** -0.7
    steps = np.unique(np.round(np.geomspace(1, 100, 25)).astype(int))
    np.testing.assert_allclose(cumulative_sums(steps, pw[steps - 1])[-1], pw.sum(), rtol=0.02)
    np.testing.assert_allclose(running_average([1, 2], np.array([2.0, 4.0])), [2.0, 3.0])
    np.testing.assert_allclose(weighted_average([1, 2], np.array([2.0, 4.0]), np.array([1.0, 3.0])), [2.0, 3.5])
    with pytest.raises(ValueError, match="strictly increasing"):
        cumulative_sums([1, 1, 2], np.ones(3))


def test_general_bound_and_exponent():
    u = general_bound(10.0, 2.0, f_gap=1.0, lipschitz_upper=4.0, sigma2=3.0, kappa_lo=0.5, kappa_hi=2.0, batch_size=6)
    assert u == pytest.approx(2 * (1.0 + 4.0 * 3.0 * 4.0 / 12.0 * 2.0) / (0.5 * 10.0))
    assert rate_exponent(0.75) == pytest.approx(-0.25)
    assert rate_exponent(0.3) == pytest.approx(-0.3)
    idx = tail_points(np.arange(1, 1001), 0.1, 10)
    assert idx[0] == 99 and idx[-1] == 999 and len(idx) == 10


def _sgd_least_squares(seeds: int, steps: int, beta: float, m: int):
    gen = torch.Generator().manual_seed(0)
    n, d = 96, 3
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    y = xb @ torch.tensor([1.0, -2.0, 0.5, 0.3], dtype=torch.float64) + 0.7 * torch.randn(n, generator=gen,
                                                                                           dtype=torch.float64)
    L = float(torch.linalg.eigvalsh(xb.T @ xb / n)[-1])
    w0 = torch.full((d + 1,), 2.0, dtype=torch.float64)
    alphas = np.array([(k ** -beta) / L for k in range(1, steps + 1)])
    g2 = np.zeros((seeds, steps))
    sigma2 = 0.0
    f0 = float(0.5 * ((xb @ w0 - y) ** 2).mean())
    for s in range(seeds):
        w = w0.clone()
        rng = torch.Generator().manual_seed(100 + s)
        for k in range(steps):
            r = xb @ w - y
            per = r[:, None] * xb  # per-example gradients
            full = per.mean(0)
            g2[s, k] = float(full @ full)
            sigma2 = max(sigma2, float(((per - full) ** 2).sum(1).mean()))
            idx = torch.randint(0, n, (m,), generator=rng)
            w = w - alphas[k] * per[idx].mean(0)
    return g2, alphas, f0, L, sigma2


def test_sgd_on_least_squares_satisfies_the_rate():
    beta, m = 0.6, 4
    g2, alphas, f0, L, sigma2 = _sgd_least_squares(8, 300, beta, m)
    res = check_rate(g2, beta=beta, step_sizes=alphas, f_initial=f0, lipschitz=L, lipschitz_is_upper=True,
                     sigma2=sigma2, kappa=(1.0, 1.0), batch_size=m, alpha=1e-6)
    assert res.verdict is Verdict.PASS, (res.notes, res.evidence["slope"])
    bound = res.evidence["bound"]
    assert bound["applies"] is True
    assert bound["W_N_lcb"] <= bound["W_N_mean"] <= bound["U_N"]
    slope = res.evidence["slope"]
    assert slope["upper"] <= rate_exponent(beta) + 0.1
    assert res.evidence["G_N"]["mean"][-1] < res.evidence["G_N"]["mean"][0]
    assert res.evidence["liminf_proxy"]["decreased_in_second_half"] > 0.5


def test_non_decaying_gradient_sequence_fails():
    rng = np.random.default_rng(0)
    g2 = 1.0 + 0.2 * rng.random((8, 400))
    res = check_rate(g2, beta=0.75, alpha=0.01)
    assert res.verdict is Verdict.FAIL
    assert res.evidence["p_parts"]["slope"] < 1e-9
    assert res.evidence["slope"]["lower"] > rate_exponent(0.75) + 0.1
    assert res.evidence["bound"]["applies"] is False  # constants not given


def test_flat_gradients_fail_through_the_general_bound():
    """With the constants given, the sound bound decides: a flat sequence ends far above U_N."""
    rng = np.random.default_rng(2)
    steps = 400
    g2 = 1.0 + 0.2 * rng.random((8, steps))
    alphas = np.arange(1, steps + 1) ** -0.75
    res = check_rate(g2, beta=0.75, step_sizes=alphas, f_initial=1.0, lipschitz=1.0, lipschitz_is_upper=True,
                     sigma2=0.1, kappa=(1.0, 1.0), batch_size=1)
    assert res.verdict is Verdict.FAIL
    assert res.evidence["bound"]["U_N"] < 0.2 < res.evidence["bound"]["W_N_lcb"]
    assert res.evidence["p_parts"].keys() == {"bound"}  # the slope is reported, the bound decides
    assert res.evidence["slope"]["rejected_if_tested"] is True


def test_slow_decay_within_the_bound_is_not_a_failure():
    """A flat stretch far below U_N (small steps, early in the run) does not contradict the theorem: the bound,
    which could have failed, holds (PASS), and the slow slope is reported."""
    rng = np.random.default_rng(3)
    g2 = 1e-3 * (1.0 + 0.1 * rng.random((8, 100)))
    res = check_rate(g2, beta=0.75, step_sizes=np.arange(1, 101) ** -0.75, f_initial=10.0, lipschitz=1.0,
                     lipschitz_is_upper=True, sigma2=1.0, kappa=(1.0, 1.0), batch_size=1)
    assert res.verdict is Verdict.PASS and "bound" in res.evidence["p_parts"]
    assert any("asymptotic" in n for n in res.notes)
    strict = check_rate(g2, beta=0.75, step_sizes=np.arange(1, 101) ** -0.75, f_initial=10.0, lipschitz=1.0,
                        lipschitz_is_upper=True, sigma2=1.0, kappa=(1.0, 1.0), batch_size=1, shape_rule="fail")
    assert strict.verdict is Verdict.FAIL


def test_gradients_above_the_general_bound_fail():
    beta, m = 0.6, 4
    g2, alphas, f0, L, sigma2 = _sgd_least_squares(8, 200, beta, m)
    res = check_rate(1e3 * g2, beta=beta, step_sizes=alphas, f_initial=f0, lipschitz=L, lipschitz_is_upper=True,
                     sigma2=sigma2, kappa=(1.0, 1.0), batch_size=m)
    assert res.verdict is Verdict.FAIL
    assert res.evidence["bound"]["rejected"] is True
    assert res.evidence["bound"]["W_N_lcb"] > res.evidence["bound"]["U_N"]
    assert res.evidence["slope"]["rejected"] is False  # the shape is fine, only the level is wrong


def test_step_size_above_the_limit_disables_the_bound_and_one_seed_is_not_applicable():
    g2 = (np.arange(1, 101) ** -1.0)[None, :]
    res = check_rate(g2, beta=0.6, step_sizes=np.full(100, 10.0), f_initial=1.0, lipschitz=1.0,
                     lipschitz_is_upper=True, sigma2=1.0, kappa=(1.0, 1.0), batch_size=1)
    assert res.evidence["bound"]["applies"] is False
    assert res.verdict is Verdict.NOT_APPLICABLE
    assert any("one seed" in n for n in res.notes)


def test_no_failure_when_the_step_size_condition_does_not_hold():
    """alpha_k > kappa_lo/(L kappa_hi^2): the theorem promises nothing, so a flat sequence is not a FAIL."""
    rng = np.random.default_rng(0)
    g2 = 1.0 + 0.2 * rng.random((8, 100))
    res = check_rate(g2, beta=0.75, step_sizes=np.full(100, 10.0), f_initial=1.0, lipschitz=1.0,
                     lipschitz_is_upper=True, sigma2=1.0, kappa=(1.0, 1.0), batch_size=1)
    assert res.verdict is Verdict.NOT_APPLICABLE  # nothing that could fail was tested
    assert res.evidence["p_parts"] == {}
    assert res.evidence["slope"]["p_value"] < 1e-9  # reported, not used
    assert any("step-size condition fails" in n for n in res.notes)


def test_validation():
    with pytest.raises(ValueError, match="K >= 2"):
        check_rate(np.ones((3, 1)), beta=0.5)
    with pytest.raises(ValueError, match="non-negative"):
        check_rate(-np.ones((3, 4)), beta=0.5)
    with pytest.raises(ValueError, match="tail_start"):
        RateConfig(tail_start=1.0)
    with pytest.raises(ValueError, match="shape_rule"):
        RateConfig(shape_rule="maybe")


def test_violated_step_size_condition_and_constant_step_is_not_applicable():
    """alpha_k above kappa_lo/(L kappa_hi^2): U_N does not apply, a constant step gives no slope rule:
    nothing the theorem promises can be tested here (the old check reported PASS)."""
    g2 = np.linspace(1.0, 0.5, 40)[None, :].repeat(4, 0)
    res = check_rate(g2, beta=0.0, step_sizes=np.full(40, 10.0), f_initial=1.0, lipschitz=1.0, lipschitz_is_upper=True,
                     sigma2=1.0, kappa=(1.0, 1.0), batch_size=1)
    assert res.verdict is Verdict.NOT_APPLICABLE and "step-size condition" in res.reason


def test_plateau_ratio_rule():
    """E8p on synthetic floors reached after a fast transient: ratio 4 passes, ratio 1 fails, a still-falling
    tail (at m or at 4m) is not applicable."""
    from convergence.checks.rate import check_plateau_ratio

    rng = np.random.default_rng(0)
    steps = np.arange(1, 61)
    transient = np.exp(-steps / 4.0)  # decays below the floors long before the tail (steps >= 40)
    small = 4e-3 * (1 + 0.2 * rng.random((6, 60))) + transient
    large = 1e-3 * (1 + 0.2 * rng.random((6, 60))) + transient
    ok = check_plateau_ratio(small, large, steps)
    assert ok.verdict is Verdict.PASS and 3 < ok.statistic < 5
    same = check_plateau_ratio(small, 4 * large - 3 * transient, steps)
    assert same.verdict is Verdict.FAIL and same.evidence["ratio_ci"][1] < 4 / 1.5
    falling = check_plateau_ratio(small * np.exp(-steps / 5.0), large, steps)
    assert falling.verdict is Verdict.NOT_APPLICABLE and "noise floor" in falling.reason
    falling_4m = check_plateau_ratio(small, large * np.exp(-steps / 5.0), steps)
    assert falling_4m.verdict is Verdict.NOT_APPLICABLE and "run at 4m" in falling_4m.reason


def test_plateau_ratio_slow_transient_is_not_a_floor():
    """A step far below the limit: both batch sizes are still on the same slowly decaying transient, which looks
    flat over the tail (drop 1.02 < 1.25). The ratio is 1, but that is not a noise floor: NOT_APPLICABLE, never
    FAIL (the tail-flatness rule alone gave a false FAIL here)."""
    from convergence.checks.rate import check_plateau_ratio

    rng = np.random.default_rng(1)
    steps = np.arange(1, 61)
    slow = np.exp(-steps / 600.0)
    small = slow * (1 + 0.05 * rng.random((4, 60)))
    large = slow * (1 + 0.05 * rng.random((4, 60)))
    res = check_plateau_ratio(small, large, steps)
    assert res.evidence["tail_drop_m"] < 1.25 and res.evidence["decrease_m"] < 2
    assert res.verdict is Verdict.NOT_APPLICABLE and "transient" in res.reason
