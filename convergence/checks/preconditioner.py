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
    VACUOUS_FACTOR,
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

__all__ = ["check_preconditioner", "check_applied_operator", "factor_interval", "theoretical_kappa", "kappa_observed", "SYMMETRY_FACTOR"]

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
            applied = layer.applied
            if applied is not None:
                if not applied.get("finite", True) or not math.isfinite(applied.get("lmin", math.nan)):
                    pos.lower("applied operator is finite", rec, name, "applied", math.nan, 0.0, 0.0)
                else:
                    tol_a = spectral_tolerance(max(layer.dim, 1), max(layer.eps, 2.0 ** -52),
                                               max(abs(applied["lmax"]), abs(applied["lmin"])))
                    pos.lower("applied operator positive definite: lmin(P_applied) >= -tau", rec, name, "applied",
                              applied["lmin"], 0.0, tol_a)
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
        from convergence.results import not_applicable

        return not_applicable("E4", "AS.3 bounded preconditioner", "no recorded step applied a preconditioner")
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
    checked = sum(rep.checked for rep in reports)
    vacuous = sum(rep.vacuous for rep in reports)
    evidence["checked"], evidence["vacuous"], evidence["violated"] = checked, vacuous, len(violations)
    if vacuous:
        notes.append(f"{vacuous} theory bounds were vacuous (off by > {VACUOUS_FACTOR:g}x, e.g. an upper bound far "
                     "above the observed spectrum) and are not counted as checked")
    expected = (f"{len(violations)} of {checked} inequalities violated ({vacuous} vacuous, not counted); "
                f"kappa_lo={lo_obs:.3g}, kappa_hi={hi_obs:.3g}")
    if violations:
        verdict = Verdict.FAIL
        first = violations[0]
        notes.insert(0, f"{len(violations)} violated, first: {first.rule} at step {first.step}, layer "
                        f"{first.layer or '<model>'}/{first.side}: {first.observed:.4g} vs bound {first.bound:.4g}")
    elif checked:
        verdict = Verdict.PASS
    else:
        from convergence.results import not_applicable

        return not_applicable("E4", "AS.3 bounded preconditioner", "no inequality could be checked (every theory "
                              "bound vacuous or not applicable)", evidence=evidence)
    return CheckResult("E4", "AS.3 bounded preconditioner", float(len(violations)), expected, 1.0, verdict,
                       evidence=evidence, notes=notes)


def check_applied_operator(records: Any) -> CheckResult:
    r"""E4.apply: the operator each block applied (``block.precondition``, probed by the monitor with
    Rademacher matrices, :mod:`convergence.applied`) equals the one its ``to_dense()`` describes:
    FAIL if :math:`\max\|P(V) - D(V)\|_F/\|D(V)\|_F > \tau` at any probed step and layer.
    NOT_APPLICABLE when the monitor probed nothing (``probes=0``)."""
    from convergence.results import not_applicable

    assumption = "applied operator = to_dense() (precondition vs materialized factors)"
    recs: list[StepRecord] = list(getattr(records, "records", records))
    rows = [(r.step, name, layer.applied) for r in recs for name, layer in r.layers.items() if layer.applied]
    rows = [row for row in rows if math.isfinite(row[2].get("mismatch", math.nan))]
    if not rows:
        return not_applicable("E4.apply", assumption, "no applied operator was probed (monitor probes=0, or the "
                              "blocks have no to_dense)")
    bad = [(s, n, a) for s, n, a in rows if not a["mismatch"] <= a["tolerance"]]
    worst = max(a["mismatch"] for _, _, a in rows)
    evidence = {"probed": len(rows), "probed_steps": sorted({s for s, _, _ in rows}), "mismatched": len(bad), "worst": worst,
                "tolerance": max(a["tolerance"] for _, _, a in rows),
                "mismatches": [{"step": s, "layer": n, "mismatch": a["mismatch"], "tolerance": a["tolerance"]}
                               for s, n, a in bad[:50]],
                "deterministic_fail": bool(bad)}
    notes = []
    if bad:
        s, n, a = bad[0]
        notes.append(f"block.precondition differs from to_dense() at {len(bad)} of {len(rows)} probed (step, layer) "
                     f"pairs; first at step {s}, layer {n or '<model>'}: relative difference {a['mismatch']:.3g} > "
                     f"{a['tolerance']:.2g}. The stored factors are not the operator the step applies")
    return CheckResult("E4.apply", assumption, worst, f"<= {evidence['tolerance']:.2g} at {len(rows)} probes", 1.0,
                       Verdict.FAIL if bad else Verdict.PASS, evidence, notes)
