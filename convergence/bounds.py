r"""Damping and eigenvalue bounds of the theory notes (§2.4–2.6), evaluated on a monitored run.

Every bound is evaluated at every recorded update with the run's *own* constants
(:math:`\mu_1, \mu_2, \lambda_A`, memory :math:`p`, :math:`h_0`) and *measured* pair constants, from
the :class:`~convergence.monitor.StepRecord` list of a :class:`~convergence.monitor.TrainingMonitor`:

* **Lemma DD** (§2.4, property P10/P11), for every pair that went through double damping, with
  :math:`H` the factor before the update and :math:`y` the pair before damping:

  - step 1 (Powell on H, P10): :math:`\tilde s^\top y \ge \mu_1\, y^\top H y`;
  - (i) :math:`\tilde s^\top\tilde y \ge \mu_2\|\tilde s\|^2` (hence (iii) :math:`\tilde s^\top\tilde y > 0`);
  - (ii) :math:`\tilde y^\top H\tilde y \le (1/\mu_1 + \mu_2\lambda_{\max}(H))\,\tilde s^\top\tilde y`
    (only under the lemma's hypotheses :math:`\mu_2 < 1` and :math:`H \succ 0`).

* **One BFGS update** (§2.5), :math:`H^+` from :math:`H` and a pair with
  :math:`C_s = \|s\|^2/s^\top y`, :math:`C_y = \|y\|^2/s^\top y`:
  :math:`\lambda_{\min}(H^+) \ge 1/(1/\lambda_{\min}(H) + C_y)` and
  :math:`\lambda_{\max}(H^+) \le (1+\sqrt{C_sC_y})^2\lambda_{\max}(H) + C_s` (measured constants);
  for double-damped pairs also, with :math:`c = 1/\mu_1 + \mu_2\lambda_{\max}(H)`,
  :math:`\lambda_{\min}(H^+) \ge \lambda_{\min}(H)/(1+c)` and
  :math:`\lambda_{\max}(H^+) \le (\sqrt{\lambda_{\max}(H)} + \sqrt{c/\mu_2})^2 + 1/\mu_2`;
  for Hessian-action pairs (§2.6) also with :math:`C_s = 1/\lambda_A`,
  :math:`C_y = \lambda_{\max}(A) + \lambda_A`. A full L-BFGS memory drops its oldest pair, so
  :math:`H^+` is then not one update of :math:`H` and only the L-BFGS bound applies.

* **L-BFGS** (§2.5, P14), memory of :math:`p` pairs and :math:`H^{(0)} = h_0 I`,
  :math:`q = (1+\sqrt{C_sC_y})^2` with the maxima over the memory:
  :math:`1/(1/h_0 + \sum_j \|y_j\|^2/s_j^\top y_j) \le \lambda(H) \le q^p h_0 + C_s(q^p-1)/(q-1)`.

* **A-factor** (§2.6), :math:`y_a = Ms_a`, :math:`M = \bar A + \lambda_A I`:
  :math:`s_a^\top y_a \ge \lambda_A\|s_a\|^2` (:math:`C_s \le 1/\lambda_A`),
  :math:`\|y_a\|^2/s_a^\top y_a \le \lambda_{\max}(M)`, and when :math:`H_a = M^{-1}` exactly
  (its initialisation) :math:`\operatorname{spec}(H_a)\subset[1/(\lambda_{\max}(\bar A)+\lambda_A), 1/\lambda_A]`.

* **Damped inverses** (KFAC factors, diagonal blocks), refreshed from a PSD statistic :math:`F` with
  damping :math:`\lambda`: :math:`\operatorname{spec}((F+\lambda I)^{-1}) \subset [1/(\lambda_{\max}(F)+\lambda), 1/\lambda]`.

**Tolerances** (spec §3 E4 and §5). Spectral bounds: absolute
:math:`\tau = 10\,d\,\varepsilon\,\cdot\text{scale}` with :math:`\varepsilon` the factor's dtype
epsilon and scale :math:`\lambda_{\max}` — never relative to :math:`\lambda_{\min}`. Where the
matrix itself was computed by an inversion, the scale is multiplied by the condition number of
the inverted matrix (backward error of the inverse); where it was computed by a BFGS update, the
scale is the magnitude of the terms summed (:math:`\lambda_{\max}(H) + 2\rho\|s\|\|Hy\| +
(\rho^2 y^\top Hy + \rho)\|s\|^2`). Pair inequalities: relative to the magnitude of the terms,
with factor :math:`\max(10\,d\,\varepsilon, r)`, :math:`r = 10^{-10}` (float64) or :math:`10^{-4}`
(float32) as in P11.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from convergence.monitor import FactorRecord, StepRecord
from convergence.results import CheckResult, Verdict

__all__ = [
    "Violation",
    "BoundReport",
    "dd_constant",
    "dd_update_interval",
    "bfgs_update_interval",
    "lbfgs_interval",
    "hessian_action_initial_interval",
    "damped_inverse_interval",
    "spectral_tolerance",
    "pair_tolerance",
    "dd_lemma_report",
    "update_bounds_report",
    "lbfgs_report",
    "a_factor_report",
    "inverse_report",
    "check_dd_lemma",
    "check_update_bounds",
    "check_lbfgs_bounds",
    "check_a_factor_bounds",
    "check_inverse_bounds",
    "check_damping_bounds",
]


# ================================================================================== the inequalities
def dd_constant(mu1: float, mu2: float, lmax_h: float) -> float:
    r""":math:`c(H) = 1/\mu_1 + \mu_2\lambda_{\max}(H)` of Lemma DD (ii)."""
    return 1.0 / mu1 + mu2 * lmax_h


def dd_update_interval(lmin_h: float, lmax_h: float, mu1: float, mu2: float) -> tuple[float, float]:
    r"""§2.5 DD bounds for :math:`H^+`: :math:`[\lambda_{\min}/(1+c),\ (\sqrt{\lambda_{\max}}+\sqrt{c/\mu_2})^2 + 1/\mu_2]`."""
    c = dd_constant(mu1, mu2, lmax_h)
    return lmin_h / (1.0 + c), (math.sqrt(max(lmax_h, 0.0)) + math.sqrt(c / mu2)) ** 2 + 1.0 / mu2


def bfgs_update_interval(lmin_h: float, lmax_h: float, c_s: float, c_y: float) -> tuple[float, float]:
    r"""§2.5 bounds for one inverse BFGS update with :math:`\|s\|^2/s^\top y \le C_s`, :math:`\|y\|^2/s^\top y \le C_y`:
    :math:`[1/(1/\lambda_{\min} + C_y),\ (1+\sqrt{C_sC_y})^2\lambda_{\max} + C_s]` (needs :math:`H \succ 0`, :math:`s^\top y > 0`)."""
    return 1.0 / (1.0 / lmin_h + c_y), (1.0 + math.sqrt(c_s * c_y)) ** 2 * lmax_h + c_s


def lbfgs_interval(h0: float, y_ratios: Sequence[float], s_ratios: Sequence[float]) -> tuple[float, float]:
    r"""P14: the spectrum of L-BFGS with :math:`H^{(0)} = h_0 I` and the pairs' measured ratios.

    Lower :math:`1/(1/h_0 + \sum_j\|y_j\|^2/s_j^\top y_j)`; upper :math:`q^p h_0 + C_s(q^p-1)/(q-1)`
    with :math:`C_s = \max_j \|s_j\|^2/s_j^\top y_j`, :math:`C_y = \max_j\|y_j\|^2/s_j^\top y_j`,
    :math:`q = (1+\sqrt{C_sC_y})^2` (:math:`+\infty` on overflow; :math:`p C_s` when :math:`q = 1`).
    """
    p = len(y_ratios)
    if p == 0:
        return h0, h0
    c_s, c_y = max(s_ratios), max(y_ratios)
    lo = 1.0 / (1.0 / h0 + math.fsum(y_ratios))
    q = (1.0 + math.sqrt(c_s * c_y)) ** 2
    if p * math.log(q) > 700.0:
        return lo, math.inf
    qp = q ** p
    hi = qp * h0 + (c_s * (qp - 1.0) / (q - 1.0) if q > 1.0 else c_s * p)
    return lo, hi


def hessian_action_initial_interval(stat_lmax: float, lambda_a: float) -> tuple[float, float]:
    r"""§2.6: :math:`H_a = (\bar A + \lambda_A I)^{-1}` has its spectrum in :math:`[1/(\lambda_{\max}(\bar A)+\lambda_A), 1/\lambda_A]`."""
    return damped_inverse_interval(stat_lmax, lambda_a)


def damped_inverse_interval(stat_lmax: float, damping: float) -> tuple[float, float]:
    r""":math:`\operatorname{spec}((F+\lambda I)^{-1}) \subset [1/(\lambda_{\max}(F)+\lambda), 1/\lambda]` for PSD :math:`F`."""
    return 1.0 / (max(stat_lmax, 0.0) + damping), 1.0 / damping


def spectral_tolerance(dim: int, eps: float, scale: float, condition: float = 1.0) -> float:
    r"""Absolute tolerance :math:`10\,d\,\varepsilon\cdot\text{scale}\cdot\max(1,\text{condition})` for a spectral bound."""
    return 10.0 * dim * eps * abs(scale) * max(1.0, condition)


def pair_tolerance(dim: int, eps: float, scale: float) -> float:
    r"""Tolerance :math:`\max(10\,d\,\varepsilon, r)\cdot\text{scale}` for a pair inequality (:math:`r` of P11)."""
    floor = 1e-10 if eps < 1e-12 else 1e-4
    return max(10.0 * dim * eps, floor) * abs(scale)


# ================================================================================== records walking
@dataclass(frozen=True)
class Violation:
    """One bound that did not hold: ``observed`` must be ≥ ``bound − tolerance`` (``sense="lower"``)
    or ≤ ``bound + tolerance`` (``sense="upper"``)."""

    rule: str
    step: int
    layer: str
    side: str
    sense: str
    observed: float
    bound: float
    tolerance: float

    @property
    def excess(self) -> float:
        """How far beyond ``bound ± tolerance`` the observation lies (positive for a violation)."""
        if self.sense == "lower":
            return (self.bound - self.tolerance) - self.observed
        return self.observed - (self.bound + self.tolerance)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "excess": self.excess}


#: A bound more than this factor away from the observed value is vacuous (e.g. an upper bound of 1e59).
VACUOUS_FACTOR = 1e6


def is_vacuous(sense: str, observed: float, bound: float) -> bool:
    """True when a finite, satisfied bound is so loose that it could not have failed in practice:
    an upper bound above ``VACUOUS_FACTOR`` times a positive observation, or a positive lower bound
    below it divided by ``VACUOUS_FACTOR``, or an infinite bound. (The positivity rule's bound 0 is
    never vacuous.)"""
    if not math.isfinite(observed):
        return False
    if sense == "upper":
        return bound == math.inf or (observed > 0 and bound > VACUOUS_FACTOR * observed)
    return bound == -math.inf or (bound > 0 and observed > 0 and bound * VACUOUS_FACTOR < observed)


@dataclass
class BoundReport:
    """How many inequalities were evaluated, which failed, and which were not applicable (and why)."""

    name: str
    checked: int = 0
    violations: list[Violation] = field(default_factory=list)
    not_applicable: dict[str, int] = field(default_factory=dict)
    worst_margin: float = math.inf  # min over checks of (slack / tolerance-scaled), informational
    vacuous: int = 0  # inequalities whose bound is off by more than VACUOUS_FACTOR (counted apart, never as passes)

    def lower(self, rule: str, rec: StepRecord, layer: str, side: str, observed: float, bound: float, tol: float) -> None:
        self._add(rule, rec, layer, side, "lower", observed, bound, tol)

    def upper(self, rule: str, rec: StepRecord, layer: str, side: str, observed: float, bound: float, tol: float) -> None:
        self._add(rule, rec, layer, side, "upper", observed, bound, tol)

    def _add(self, rule, rec, layer, side, sense, observed, bound, tol) -> None:
        if is_vacuous(sense, observed, bound):
            self.vacuous += 1
            return
        self.checked += 1
        if not (math.isfinite(observed) or (sense == "lower" and observed == math.inf)):
            self.violations.append(Violation(rule, rec.step, layer, side, sense, observed, bound, tol))
            return
        if sense == "lower":
            ok, slack = observed >= bound - tol, observed - bound
        else:
            ok, slack = observed <= bound + tol, bound - observed
        if not ok:
            self.violations.append(Violation(rule, rec.step, layer, side, sense, observed, bound, tol))
        if math.isfinite(slack):
            self.worst_margin = min(self.worst_margin, slack)

    def skip(self, reason: str) -> None:
        self.not_applicable[reason] = self.not_applicable.get(reason, 0) + 1

    def to_check(self, check: str, assumption: str) -> CheckResult:
        if self.violations:
            verdict = Verdict.FAIL
        elif self.checked:
            verdict = Verdict.PASS
        else:
            verdict = Verdict.INCONCLUSIVE
        notes = [] if self.checked else ["nothing to check in these records (not applicable)"]
        return CheckResult(
            check=check, assumption=assumption, statistic=float(len(self.violations)), expected=0,
            confidence=1.0, verdict=verdict,
            evidence={"checked": self.checked, "vacuous": self.vacuous,
                      "violations": [v.as_dict() for v in self.violations[:200]],
                      "num_violations": len(self.violations), "not_applicable": dict(self.not_applicable)},
            notes=notes,
        )


def _records(source: Any) -> list[StepRecord]:
    records = getattr(source, "records", source)
    return list(records)


def _factors(records: Iterable[StepRecord]):
    for rec in records:
        for name, layer in rec.layers.items():
            for f in layer.factors():
                yield rec, name, f


def dd_lemma_report(records: Any) -> BoundReport:
    """Step 1 (P10) and Lemma DD (i), (ii) on every double-damped pair of the records."""
    rep = BoundReport("dd_lemma")
    for rec, name, f in _factors(_records(records)):
        pair = f.pair
        if pair is None or f.kind not in ("bfgs", "lbfgs", "other") or f.mu1 is None:
            continue
        if not pair.damped:
            rep.skip(f"pair not damped ({pair.skip_reason})")
            continue
        d, eps = f.dim, f.eps
        # step 1 (Powell on H): s~ᵀy ≥ μ1 yᵀHy
        scale1 = pair.s_norm * pair.raw_y_norm + f.mu1 * abs(f.lmax) * pair.raw_y_norm ** 2
        rep.lower("Powell step 1 (P10): s~'y >= mu1 y'Hy", rec, name, f.side, pair.s1y, f.mu1 * pair.raw_yHy,
                  pair_tolerance(d, eps, scale1))
        # (i) s~ᵀy~ ≥ μ2 ‖s~‖²
        scale_i = pair.s_norm * pair.y_norm + f.mu2 * pair.ss
        rep.lower("DD (i): s~'y~ >= mu2 |s~|^2", rec, name, f.side, pair.sy, f.mu2 * pair.ss, pair_tolerance(d, eps, scale_i))
        # (ii) y~ᵀHy~ ≤ (1/μ1 + μ2 λmax(H)) s~ᵀy~
        if not f.mu2 < 1.0:
            rep.skip("DD (ii): mu2 >= 1 is outside the lemma's hypotheses")
            continue
        if not (f.finite and f.lmin > 0):
            rep.skip("DD (ii): H before the update is not positive definite")
            continue
        c = dd_constant(f.mu1, f.mu2, f.lmax)
        scale_ii = f.lmax * pair.yy + c * pair.s_norm * pair.y_norm
        rep.upper("DD (ii): y~'Hy~ <= (1/mu1 + mu2 lmax(H)) s~'y~", rec, name, f.side, pair.yHy, c * pair.sy,
                  pair_tolerance(d, eps, scale_ii))
    return rep


def _update_scale(f: FactorRecord) -> float:
    """Magnitude of the terms summed by the inverse BFGS update (the rounding scale of H⁺)."""
    p = f.pair
    rho = 1.0 / p.sy if p.sy != 0 else math.inf
    terms = abs(f.lmax) + 2 * abs(rho) * p.s_norm * p.Hy_norm + (rho * rho * abs(p.yHy) + abs(rho)) * p.ss
    return max(abs(f.lmax_after or 0.0), terms)


def update_bounds_report(records: Any) -> BoundReport:
    """One-update bounds (§2.5, §2.6) on every update whose H and H⁺ were both recorded."""
    rep = BoundReport("one_update")
    for rec, name, f in _factors(_records(records)):
        p = f.pair
        if p is None or not p.incorporated or not f.updated or f.lmin_after is None:
            continue
        if f.kind == "lbfgs" and f.memory_full_before:
            rep.skip("full L-BFGS memory: H+ drops the oldest pair (use the L-BFGS bound)")
            continue
        if f.kind not in ("bfgs", "lbfgs", "hessian_action"):
            continue
        if not (f.finite and f.lmin > 0 and p.sy > 0):
            rep.skip("H not positive definite or s'y <= 0 (no bound applies)")
            continue
        tol = spectral_tolerance(f.dim, f.eps, _update_scale(f))
        lo, hi = bfgs_update_interval(f.lmin, f.lmax, p.c_s, p.c_y)
        rep.lower("one update, measured C_y: lmin(H+) >= 1/(1/lmin(H) + C_y)", rec, name, f.side, f.lmin_after, lo, tol)
        rep.upper("one update, measured C_s, C_y: lmax(H+) <= (1+sqrt(C_s C_y))^2 lmax(H) + C_s", rec, name, f.side,
                  f.lmax_after, hi, tol)
        if f.kind == "hessian_action" and f.lambda_a and f.stat_lmax_at_update is not None:
            lo, hi = bfgs_update_interval(f.lmin, f.lmax, 1.0 / f.lambda_a, f.stat_lmax_at_update + f.lambda_a)
            rep.lower("A-factor update: lmin(H+) >= 1/(1/lmin(H) + lmax(A) + lambda_A)", rec, name, f.side, f.lmin_after, lo, tol)
            rep.upper("A-factor update: lmax(H+) <= (1+sqrt(C_s C_y))^2 lmax(H) + 1/lambda_A", rec, name, f.side,
                      f.lmax_after, hi, tol)
        elif p.damped and f.mu1 is not None:
            if not f.mu2 < 1.0:
                rep.skip("DD update bounds: mu2 >= 1 is outside the lemma's hypotheses")
                continue
            lo, hi = dd_update_interval(f.lmin, f.lmax, f.mu1, f.mu2)
            rep.lower("DD update: lmin(H+) >= lmin(H)/(1+c)", rec, name, f.side, f.lmin_after, lo, tol)
            rep.upper("DD update: lmax(H+) <= (sqrt(lmax(H)) + sqrt(c/mu2))^2 + 1/mu2", rec, name, f.side, f.lmax_after, hi, tol)
    return rep


def lbfgs_report(records: Any) -> BoundReport:
    """P14 on every applied L-BFGS factor, with the measured ratios of the pairs in its memory."""
    rep = BoundReport("lbfgs")
    for rec, name, f in _factors(_records(records)):
        if f.kind != "lbfgs" or f.memory is None:
            continue
        mem = f.memory
        tol = spectral_tolerance(f.dim, f.eps, f.lmax if math.isfinite(f.lmax) else 1.0)
        if mem.size and not mem.min_sy > 0:
            rep.lower("L-BFGS memory: s_j'y_j > 0", rec, name, f.side, mem.min_sy, 0.0, 0.0)
            continue
        lo, hi = lbfgs_interval(mem.h0, mem.y_ratios, mem.s_ratios)
        rep.lower("L-BFGS (P14): lmin(H) >= 1/(1/h0 + sum_j |y_j|^2/s_j'y_j)", rec, name, f.side, f.lmin, lo, tol)
        rep.upper("L-BFGS (P14): lmax(H) <= q^p h0 + C_s (q^p - 1)/(q - 1)", rec, name, f.side, f.lmax, hi, tol)
    return rep


def a_factor_report(records: Any) -> BoundReport:
    """§2.6 on every Hessian-action factor: C_s ≤ 1/λ_A, C_y ≤ λmax(A) + λ_A, and the initial interval."""
    rep = BoundReport("a_factor")
    for rec, name, f in _factors(_records(records)):
        if f.kind != "hessian_action":
            continue
        lam = f.lambda_a
        if f.initial and f.inverse_stat_lmax is not None and f.inverse_damping is not None:
            lo, hi = hessian_action_initial_interval(f.inverse_stat_lmax, f.inverse_damping)
            cond = (max(f.inverse_stat_lmax, 0.0) + f.inverse_damping) / f.inverse_damping
            tol = spectral_tolerance(f.dim, f.eps, f.lmax, cond)
            rep.lower("A-factor init: lmin(H_a) >= 1/(lmax(A) + lambda_A)", rec, name, f.side, f.lmin, lo, tol)
            rep.upper("A-factor init: lmax(H_a) <= 1/lambda_A", rec, name, f.side, f.lmax, hi, tol)
        p = f.pair
        if p is None or lam is None or f.stat_lmax_at_update is None:
            continue
        rep.lower("A-factor pair: s_a'y_a >= lambda_A |s_a|^2", rec, name, f.side, p.sy, lam * p.ss,
                  pair_tolerance(f.dim, f.eps, p.s_norm * p.y_norm + lam * p.ss))
        m_max = f.stat_lmax_at_update + lam
        rep.upper("A-factor pair: |y_a|^2 <= lmax(A + lambda_A I) s_a'y_a", rec, name, f.side, p.yy, m_max * p.sy,
                  pair_tolerance(f.dim, f.eps, p.yy + m_max * p.s_norm * p.y_norm))
    return rep


def inverse_report(records: Any) -> BoundReport:
    """Damped-inverse intervals of KFAC factors and diagonal blocks (when the refresh was observed)."""
    rep = BoundReport("damped_inverse")
    for rec in _records(records):
        for name, layer in rec.layers.items():
            for f in layer.factors():
                if f.kind != "ema_covariance":
                    continue
                if f.inverse_damping is None or f.inverse_stat_lmax is None:
                    rep.skip("inverse refreshed before the monitor was attached")
                    continue
                lo, hi = damped_inverse_interval(f.inverse_stat_lmax, f.inverse_damping)
                cond = (max(f.inverse_stat_lmax, 0.0) + f.inverse_damping) / f.inverse_damping
                tol = spectral_tolerance(f.dim, f.eps, f.lmax, cond)
                rep.lower("damped inverse: lmin >= 1/(lmax(F) + lambda)", rec, name, f.side, f.lmin, lo, tol)
                rep.upper("damped inverse: lmax <= 1/lambda", rec, name, f.side, f.lmax, hi, tol)
            diag = layer.diagonal
            if diag is not None:
                if diag.get("damping") is None:
                    rep.skip("diagonal scale refreshed before the monitor was attached")
                    continue
                lam, vmax, power = diag["damping"], max(diag["v_max"], 0.0), diag["power"]
                lo, hi = (vmax + lam) ** (-power), lam ** (-power)
                tol = spectral_tolerance(1, diag["eps"], hi)
                rep.lower("diagonal: lmin >= (max v + lambda)^-p", rec, name, "diag", layer.lmin, lo, tol)
                rep.upper("diagonal: lmax <= lambda^-p", rec, name, "diag", layer.lmax, hi, tol)
    return rep


# ================================================================================== CheckResults
def check_dd_lemma(records: Any) -> CheckResult:
    """Lemma DD and Powell step 1 on every double-damped pair: FAIL on any violation beyond tolerance."""
    return dd_lemma_report(records).to_check("E4.dd", "double damping invariants (Lemma DD, P10/P11)")


def check_update_bounds(records: Any) -> CheckResult:
    """One-update eigenvalue bounds (§2.5, §2.6) with measured C_s, C_y: FAIL on any violation."""
    return update_bounds_report(records).to_check("E4.update", "one-update eigenvalue bounds (§2.5)")


def check_lbfgs_bounds(records: Any) -> CheckResult:
    """L-BFGS spectrum bounds (P14) with the measured ratios of the pairs in memory."""
    return lbfgs_report(records).to_check("E4.lbfgs", "L-BFGS spectrum bounds (§2.5, P14)")


def check_a_factor_bounds(records: Any) -> CheckResult:
    """A-factor bounds (§2.6): C_s ≤ 1/λ_A, C_y ≤ λmax(M), and the interval of H_a = M⁻¹."""
    return a_factor_report(records).to_check("E4.afactor", "Hessian-action A-factor bounds (§2.6)")


def check_inverse_bounds(records: Any) -> CheckResult:
    """Damped-inverse intervals of KFAC factors and diagonal blocks."""
    return inverse_report(records).to_check("E4.inverse", "damped-inverse spectrum bounds")


def check_damping_bounds(records: Any) -> list[CheckResult]:
    """All bound checks of this module, in the order DD, one-update, L-BFGS, A-factor, inverses."""
    return [check_dd_lemma(records), check_update_bounds(records), check_lbfgs_bounds(records),
            check_a_factor_bounds(records), check_inverse_bounds(records)]
