"""Holm–Bonferroni: adjusted p-values, family-wise error control, and re-deciding CheckResults."""

from __future__ import annotations

import numpy as np
import pytest

from convergence.multiple import FAMILY_ALPHA, family_members, holm_adjust, holm_adjusted_p_values, holm_bonferroni
from convergence.results import CheckResult, Verdict


def test_adjusted_p_values_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.06, 0.04*1) = 0.06
    adj = holm_adjusted_p_values([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])
    assert holm_bonferroni([0.01, 0.04, 0.03, 0.005], alpha=0.05) == [True, False, False, True]
    assert holm_adjusted_p_values([]) == []
    assert holm_adjusted_p_values([0.9, 0.8]) == [1.0, 1.0]


def _step_down(p, alpha):
    """Holm's procedure as defined: walk the sorted p-values, stop at the first p_(i) > alpha/(m-i+1)."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out = [False] * len(p)
    for rank, i in enumerate(order):
        if p[i] > alpha / (len(p) - rank):
            break
        out[i] = True
    return out


def test_agrees_with_the_step_down_definition():
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = int(rng.integers(1, 12))
        p = rng.random(m) ** 3
        alpha = float(rng.choice([0.01, 0.05, 0.2]))
        ours = holm_bonferroni(p.tolist(), alpha)
        assert ours == _step_down(p.tolist(), alpha)
        # Holm is never less powerful than Bonferroni, never more than unadjusted testing
        assert all(o >= (pi <= alpha / m) for o, pi in zip(ours, p))
        assert all((not o) or pi <= alpha for o, pi in zip(ours, p))


def test_family_wise_error_rate_under_the_global_null():
    rng = np.random.default_rng(1)
    families, m, alpha = 20000, 10, 0.05
    p = rng.random((families, m))
    any_rejection = np.array([any(holm_bonferroni(row.tolist(), alpha)) for row in p])
    rate = any_rejection.mean()
    se = np.sqrt(alpha * (1 - alpha) / families)
    assert rate <= alpha + 6 * se
    assert rate >= alpha - 6 * se  # independent p-values: Holm's FWER is exactly 1-(1-a/m)^m ~ a


def _result(check, verdict, p=None, **evidence):
    if p is not None:
        evidence["p_value"] = p
    return CheckResult(check, "a", 1.0, 0.0, 0.99, verdict, evidence, [])


def test_holm_adjust_redecides_only_the_statistical_results():
    results = [
        _result("E2@0", Verdict.FAIL, 0.004, verdict_if_not_rejected="INCONCLUSIVE"),  # 0.004*5 = 0.02 > 0.01
        _result("E3@0", Verdict.FAIL, 1e-6),  # rejected
        _result("E6@0", Verdict.PASS, 0.5),
        _result("E8", Verdict.PASS, 0.2),
        _result("E1", Verdict.FAIL, deterministic_fail=True),  # no p-value: untouched
        _result("E4", Verdict.PASS),
        _result("E3@9", Verdict.FAIL, 0.003, deterministic_fail=True),  # stays FAIL whatever Holm says
    ]
    assert family_members(results) == [0, 1, 2, 3, 6]
    out = holm_adjust(results, alpha=FAMILY_ALPHA)
    verdicts = [r.verdict for r in out]
    assert verdicts == [Verdict.INCONCLUSIVE, Verdict.FAIL, Verdict.PASS, Verdict.PASS, Verdict.FAIL,
                        Verdict.PASS, Verdict.FAIL]
    assert out[0].evidence["p_holm"] == pytest.approx(0.012)  # sorted second: max(5e-6, 4*0.003=0.012, 3*0.004)
    assert out[1].evidence["holm_rejected"] is True and out[1].evidence["family_size"] == 5
    assert any("Holm" in n for n in out[0].notes)
    assert "p_holm" not in out[4].evidence
    # inputs are not modified
    assert results[0].verdict is Verdict.FAIL and "p_holm" not in results[0].evidence


def test_validation():
    with pytest.raises(ValueError, match="alpha"):
        holm_bonferroni([0.1], alpha=0.0)
    with pytest.raises(ValueError, match="p-values"):
        holm_adjusted_p_values([1.5])
