r"""E4 — the preconditioner spectrum (AS.3: :math:`\kappa_{lo} I \preceq H_k \preceq \kappa_{hi} I`).

Evaluated on the records of a :class:`~convergence.monitor.TrainingMonitor` (every factor
materialized in float64 by the monitor, ``eigvalsh`` of the symmetric part, at the step where it
was applied). Deterministic rules (spec §3 E4):

* **positivity / finiteness**: every applied block operator is finite and
  :math:`\lambda_{\min}(P_l) \ge -\tau` with :math:`\tau = 10\,d\,\varepsilon\,|\lambda_{\max}|`
  absolute (never relative to :math:`\lambda_{\min}`); :math:`|\lambda_{\min}| \le \tau` is reported
  as numerically singular;
* **theory bounds**: :math:`\kappa^{th}_{lo} - \tau \le \lambda_{\min}`,
  :math:`\lambda_{\max} \le \kappa^{th}_{hi} + \tau` for every interval of
  :mod:`convergence.bounds` that applies (damped inverses, A-factor, L-BFGS P14, one-update
  bounds with the measured :math:`C_s, C_y`);
* **symmetry**: :math:`\|M - M^\top\|_F \le 10\,\varepsilon\,\|M\|_F` for every factor;
* **live DD invariants** (P10/P11) on every double-damped pair.

FAIL if any rule is violated, PASS otherwise (INCONCLUSIVE without a single recorded operator).
The observed :math:`\kappa_{lo,obs} = \min_k\lambda_{\min}(H_k)` and
:math:`\kappa_{hi,obs} = \max_k\lambda_{\max}(H_k)` (block-diagonal over layers) are reported for
E6–E8, with the per-step theoretical :math:`\kappa^{th}` where every layer has an interval.
"""

from __future__ import annotations

import math
from typing import Any

from convergence.bounds import (
    BoundReport,
    a_factor_report,
    bfgs_update_interval,
    damped_inverse_interval,
    dd_lemma_report,
    dd_update_interval,
    inverse_report,
    lbfgs_interval,
    lbfgs_report,
    spectral_tolerance,
    update_bounds_report,
)
from convergence.monitor import FactorRecord, StepRecord, kappa_observed
from convergence.results import CheckResult, Verdict

__all__ = ["check_preconditioner", "factor_interval", "theoretical_kappa", "kappa_observed", "SYMMETRY_FACTOR"]

#: Symmetry rule: ‖M − Mᵀ‖_F ≤ SYMMETRY_FACTOR · ε · ‖M‖_F.
SYMMETRY_FACTOR = 10.0


def factor_interval(f: FactorRecord, prev: FactorRecord | None = None) -> tuple[float, float, str] | None:
    """The theory's interval for the spectrum of the applied factor ``f``, or None if none applies.

    ``prev`` is the same factor at the previous step (if it was recorded); its update, when
    observed, gives the one-update interval for ``f``.
    """
    if f.kind == "ema_covariance" and f.inverse_damping is not None and f.inverse_stat_lmax is not None:
        return (*damped_inverse_interval(f.inverse_stat_lmax, f.inverse_damping), "damped inverse")
    if f.kind == "lbfgs" and f.memory is not None:
        return (*lbfgs_interval(f.memory.h0, f.memory.y_ratios, f.memory.s_ratios), "L-BFGS (P14)")
    if f.kind == "hessian_action" and f.initial and f.inverse_stat_lmax is not None and f.inverse_damping is not None:
        return (*damped_inverse_interval(f.inverse_stat_lmax, f.inverse_damping), "A-factor initial inverse")
    if f.kind == "bfgs" and f.updates == 0 and f.h0 is not None:
        return f.h0, f.h0, "initial H = h0 I"
    if prev is None or not prev.updated or prev.pair is None or not prev.pair.incorporated or not prev.lmin > 0:
        return None
    if f.kind == "hessian_action" and prev.lambda_a and prev.stat_lmax_at_update is not None:
        lo, hi = bfgs_update_interval(prev.lmin, prev.lmax, 1.0 / prev.lambda_a, prev.stat_lmax_at_update + prev.lambda_a)
        return lo, hi, "A-factor one update (§2.6)"
    if f.kind == "bfgs" and prev.pair.damped and prev.mu1 is not None and prev.mu2 < 1.0:
        return (*dd_update_interval(prev.lmin, prev.lmax, prev.mu1, prev.mu2), "DD one update (§2.5)")
    return None


def theoretical_kappa(record: StepRecord, previous: StepRecord | None = None) -> tuple[float, float] | None:
    r"""(κ_lo^th, κ_hi^th) of the whole operator at ``record`` (min/max over layers of the products of
    the factors' intervals), or None when some layer has no applicable interval."""
    if previous is not None and previous.step != record.step - 1:
        previous = None
    los, his = [], []
    for name, layer in record.layers.items():
        if layer.a is None or layer.g is None:
            return None
        prev_layer = previous.layers.get(name) if previous is not None else None
        ia = factor_interval(layer.a, prev_layer.a if prev_layer else None)
        ig = factor_interval(layer.g, prev_layer.g if prev_layer else None)
        if ia is None or ig is None:
            return None
        los.append(ia[0] * ig[0])
        his.append(ia[1] * ig[1])
    if not los:
        return None
    if record.fallback == "sgd":
        los.append(1.0)
        his.append(1.0)
    return min(los), max(his)


def _positivity_and_symmetry(records: list[StepRecord]) -> tuple[BoundReport, BoundReport, list[dict[str, Any]]]:
    pos = BoundReport("positivity")
    sym = BoundReport("symmetry")
    singular = []
    for rec in records:
        for name, layer in rec.layers.items():
            finite = all(f.finite for f in layer.factors()) and math.isfinite(layer.lmin) and math.isfinite(layer.lmax)
            if not finite:
                pos.lower("operator is finite", rec, name, "block", math.nan, 0.0, 0.0)
                continue
            tol = spectral_tolerance(max(layer.dim, 1), layer.eps, layer.lmax)
            pos.lower("positive definite: lmin(P) >= -tau", rec, name, "block", layer.lmin, 0.0, tol)
            if abs(layer.lmin) <= tol:
                singular.append({"step": rec.step, "layer": name, "lmin": layer.lmin, "tolerance": tol})
            for f in layer.factors():
                if f.finite:
                    sym.upper("symmetry: |M - M'|_F <= 10 eps |M|_F", rec, name, f.side, f.asymmetry, SYMMETRY_FACTOR * f.eps,
                              0.0)
    return pos, sym, singular


def check_preconditioner(records: Any) -> CheckResult:
    """E4 on the records of a :class:`~convergence.monitor.TrainingMonitor` (or the monitor itself).

    Returns one :class:`~convergence.results.CheckResult` (check ``"E4"``): statistic = number of
    violated rules, expected 0; evidence holds each sub-rule's counts and violations,
    ``kappa_lo_obs``/``kappa_hi_obs`` and the per-step series of observed and theoretical κ.
    """
    recs: list[StepRecord] = list(getattr(records, "records", records))
    operated = [r for r in recs if r.layers]
    if not operated:
        return CheckResult("E4", "AS.3 bounded preconditioner", math.nan, 0, 1.0, Verdict.INCONCLUSIVE,
                           notes=["no recorded step applied a preconditioner"])
    pos, sym, singular = _positivity_and_symmetry(operated)
    reports = [pos, sym, inverse_report(operated), a_factor_report(operated), lbfgs_report(operated),
               update_bounds_report(operated), dd_lemma_report(operated)]
    violations = [v for rep in reports for v in rep.violations]
    lo_obs, hi_obs = kappa_observed(operated)
    series = {"step": [], "kappa_lo_obs": [], "kappa_hi_obs": [], "kappa_lo_th": [], "kappa_hi_th": []}
    prev = None
    for r in operated:
        th = theoretical_kappa(r, prev)
        series["step"].append(r.step)
        series["kappa_lo_obs"].append(r.lambda_min)
        series["kappa_hi_obs"].append(r.lambda_max)
        series["kappa_lo_th"].append(th[0] if th else None)
        series["kappa_hi_th"].append(th[1] if th else None)
        prev = r
    evidence = {
        "kappa_lo_obs": lo_obs,
        "kappa_hi_obs": hi_obs,
        "rules": {rep.name: {"checked": rep.checked, "violations": len(rep.violations),
                             "not_applicable": dict(rep.not_applicable)} for rep in reports},
        "violations": [v.as_dict() for v in violations[:200]],
        "numerically_singular": singular[:50],
        "series": series,
    }
    notes = []
    if singular:
        notes.append(f"{len(singular)} applied operators are numerically singular (|lmin| <= tau)")
    verdict = Verdict.FAIL if violations else Verdict.PASS
    return CheckResult("E4", "AS.3 bounded preconditioner", float(len(violations)), 0, 1.0, verdict,
                       evidence=evidence, notes=notes)
