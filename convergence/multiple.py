r"""Family-wise error control across checks and checkpoints: Holm–Bonferroni (theory notes §3, E0).

Holm's step-down procedure on :math:`F` p-values sorted as :math:`p_{(1)}\le\dots\le p_{(F)}`:
reject :math:`H_{(1)},\dots,H_{(j)}` for the largest :math:`j` with
:math:`p_{(i)}\le\alpha/(F-i+1)` for every :math:`i\le j`.  It controls the family-wise error
rate at :math:`\alpha` under any dependence between the tests, and it is uniformly more powerful
than plain Bonferroni.  Equivalently, with the adjusted p-values

.. math::

    \tilde p_{(i)} = \max_{j\le i}\ \min\{1, (F-j+1)\,p_{(j)}\},

:math:`H_{(i)}` is rejected iff :math:`\tilde p_{(i)}\le\alpha`.

:func:`holm_adjust` applies this to a list of :class:`~convergence.results.CheckResult`: the
family is every result whose ``evidence["p_value"]`` is a finite number (statistical checks:
E2, E3, E6, E8 at every checkpoint); deterministic checks (E1, E4, E5, E7, and results with
``evidence["deterministic_fail"]``) keep their verdicts.  A family member is FAIL iff Holm rejects
it; otherwise it gets ``evidence["verdict_if_not_rejected"]`` (default PASS, "not rejected")
when its own, uncorrected decision was FAIL, and keeps its verdict otherwise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace

from convergence.results import CheckResult, Verdict

__all__ = ["FAMILY_ALPHA", "holm_adjusted_p_values", "holm_bonferroni", "family_members", "holm_adjust"]

#: The protocol's family-wise level.
FAMILY_ALPHA = 0.01


def _check_p(p_values: Sequence[float]) -> list[float]:
    out = [float(p) for p in p_values]
    for p in out:
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"p-values must lie in [0, 1], got {p}")
    return out


def holm_adjusted_p_values(p_values: Sequence[float]) -> list[float]:
    r"""Holm-adjusted p-values :math:`\tilde p_i` (same order as the input)."""
    ps = _check_p(p_values)
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def holm_bonferroni(p_values: Sequence[float], alpha: float = FAMILY_ALPHA) -> list[bool]:
    """Which hypotheses Holm's procedure rejects at family-wise level ``alpha`` (input order)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return [p <= alpha for p in holm_adjusted_p_values(p_values)]


def _p_value(result: CheckResult) -> float | None:
    p = result.evidence.get("p_value") if isinstance(result.evidence, dict) else None
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(float(p)):
        return None
    return float(p)


def family_members(results: Sequence[CheckResult]) -> list[int]:
    """Indices of the results that carry a finite ``evidence["p_value"]`` (the Holm family);
    NOT_APPLICABLE and ERROR results are never members."""
    return [i for i, r in enumerate(results) if _p_value(r) is not None
            and r.verdict not in (Verdict.NOT_APPLICABLE, Verdict.ERROR)]


def holm_adjust(results: Sequence[CheckResult], alpha: float = FAMILY_ALPHA) -> list[CheckResult]:
    """Re-decide the statistical results jointly with Holm at family-wise level ``alpha``.

    Returns new results (the inputs are not modified), in the same order.  Family members get
    ``evidence["p_holm"]``, ``evidence["holm_rejected"]``, ``evidence["family_size"]`` and
    ``evidence["family_alpha"]``; a note records any verdict that changed.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    members = family_members(results)
    adjusted = holm_adjusted_p_values([_p_value(results[i]) for i in members])  # type: ignore[misc]
    out = list(results)
    for i, p_adj in zip(members, adjusted):
        r = results[i]
        evidence = copy.copy(r.evidence)
        rejected = p_adj <= alpha
        evidence.update({"p_holm": p_adj, "holm_rejected": rejected, "family_size": len(members), "family_alpha": alpha})
        if rejected or evidence.get("deterministic_fail"):
            verdict = Verdict.FAIL
        elif r.verdict is Verdict.FAIL:
            verdict = Verdict(evidence.get("verdict_if_not_rejected", Verdict.PASS.value))
        else:
            verdict = r.verdict
        notes = list(r.notes)
        if verdict is not r.verdict:
            notes.append(f"Holm over {len(members)} tests at family-wise alpha={alpha:g}: "
                         f"{r.verdict.value} -> {verdict.value} (adjusted p = {p_adj:.3g})")
        out[i] = replace(r, verdict=verdict, evidence=evidence, notes=notes)
    return out
