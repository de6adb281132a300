r"""The harness for whole-model (matrix-free) optimizers: Hessian-free, saddle-free Newton, LM.

These optimizers (:class:`optimizers.matrix_free.MatrixFreeOptimizer`) precondition the gradient of
*all* parameters with one operator known through curvature-vector products, have no per-layer
blocks, and need the batch targets at every step. This module gives the harness what it needs for
them, alongside the per-layer :class:`~convergence.monitor.TrainingMonitor`:

* :func:`with_targets` -- a closure factory whose closures carry their batch's targets
  (:class:`~optimizers.matrix_free.BatchClosure`), so every ``optimizer.step(closure)`` of the
  harness and of the checks (training, E6's step form, E8's runs) works unchanged;
* :class:`WholeModelMonitor` -- a step hook recording, per step, :math:`\|g_k\|`, the applied step,
  :math:`\alpha_k`, the damping, the reduction ratio and the cost, and every ``probe_interval``
  steps the **dense operator the step solved with**,
  :math:`A_k = C_k + \operatorname{diag}(\delta_k)` (:math:`C_k` the curvature -- GGN or Hessian --
  at the step's point and batch, built from ``n`` products of the optimizer's own product entry
  point; :math:`\delta_k` = L2 τ + damping), in float64;
* :func:`check_whole_model_preconditioner` (E4) and :func:`check_whole_model_step_form`
  (E4.apply), and :func:`whole_model_violations` (what breaks the theory's setting).

**What E4 checks, and on which map.** The theory's preconditioner is
:math:`H_k = A_k^{-1} = (C_k + \lambda_k I + \tau I)^{-1}`. For a PSD curvature (the GGN of a convex
loss) the damped-inverse interval :math:`\operatorname{spec}(H_k) \subset [1/(\lambda_{\max}(C_k)
+ \max\delta),\ 1/\min\delta]` holds; E4 checks on every probed step that :math:`A_k` is finite
and symmetric, that :math:`C_k \succeq 0` (the interval's hypothesis), that the damping is
positive, and that the observed spectrum of :math:`H_k` lies in that interval (FAIL otherwise:
e.g. ``curvature="hessian"`` at an indefinite point, a sign error in a product, a negative
damping). It reports :math:`\kappa_{lo,obs} = \min_k 1/\lambda_{\max}(A_k)` and
:math:`\kappa_{hi,obs} = \max_k 1/\lambda_{\min}(A_k)`.

Truncated CG does not apply :math:`A_k^{-1}`: its iterate is :math:`p_i(A_k)\,g` for a polynomial
that depends on :math:`g`, so the applied map is not a fixed linear :math:`H_k`. What the descent
lemma uses of AS.3 is its **step form**, :math:`-g^\top d \ge \kappa_{lo}\|g\|^2` and
:math:`\|d\| \le \kappa_{hi}\|g\|` for the direction :math:`d` (step :math:`= \alpha_k d`), and CG
started from zero satisfies both with the bounds of :math:`A_k^{-1}`: every iterate satisfies
:math:`x_i^\top A x_i = -g^\top x_i` and :math:`\varphi(x_i) = \tfrac12 g^\top x_i` decreases, so
:math:`-g^\top x_i \ge -g^\top x_1 = \|g\|^4/g^\top A g \ge \|g\|^2/\lambda_{\max}(A)`; and
:math:`\|x_i\|` increases to :math:`\|A^{-1}g\| \le \|g\|/\lambda_{\min}(A)` (Steihaug 1983). With
a diagonal CG preconditioner :math:`M` the same argument on :math:`M^{-1/2}AM^{-1/2}` gives the
bounds :math:`\lambda_{\min}(M^{-1})/\lambda_{\max}(\tilde A)` and
:math:`\lambda_{\max}(M^{-1})/\lambda_{\min}(\tilde A)`. **E4.apply checks these step-form
inequalities on the CG-applied direction** at every probed step (and reports
:math:`\|d + A_k^{-1}g\|/\|A_k^{-1}g\|`, how far truncation left the step from the exact solve).
Steps started from a warm CG solution (HF's :math:`\zeta p_{k-1}`) or combined with the previous
step (LM's momentum) are affine in the previous step: the argument does not cover them, they are
counted as not checked (theory mode turns both off).

Saddle-free Newton exposes no operator: its :math:`|H|^{-1}` is built from the current batch's
Hessian (Ritz values in absolute value, a damping re-chosen by the batch loss), not a quasi-Newton
:math:`H_k`, so E4/E5 are NOT_APPLICABLE for it with that reason. E5 (AS.4) is NOT_APPLICABLE for
every whole-model method: each builds its operator from the step's own batch, so AS.4 fails by
construction (listed among the theory-mode violations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from convergence.bounds import spectral_tolerance
from convergence.results import CheckResult, Verdict, not_applicable

__all__ = [
    "is_matrix_free_optimizer",
    "with_targets",
    "OperatorProbe",
    "WholeModelRecord",
    "WholeModelMonitor",
    "check_whole_model_preconditioner",
    "check_whole_model_step_form",
    "check_whole_model_step_size",
    "whole_model_violations",
    "operator_reason",
    "AS4_REASON",
    "SFN_REASON",
]

#: why E5 (AS.4) does not apply to the whole-model methods
AS4_REASON = ("the whole-model operator is built from the step's own batch (the curvature products use batch k, "
              "the same batch as g_k): AS.4 (H_k depends only on past batches) fails by construction, so there is "
              "no batch-independent H_k to test (see the theory-mode violations)")
#: why saddle-free Newton has no preconditioner check
SFN_REASON = ("saddle-free Newton's |H|^-1 is built from the current batch's Hessian (absolute Ritz values, damping "
              "re-chosen by the batch loss), not a quasi-Newton H_k: AS.3/AS.4's preconditioner is not defined for it")
#: the symmetry rule for the product-built operator: ‖A − Aᵀ‖_F ≤ SYMMETRY_FACTOR·n·ε·‖A‖_F
SYMMETRY_FACTOR = 10.0


def is_matrix_free_optimizer(optimizer: Any) -> bool:
    """True for the whole-model matrix-free optimizers (HF, SFN, LM and their subclasses)."""
    from optimizers.matrix_free import MatrixFreeOptimizer

    return isinstance(optimizer, MatrixFreeOptimizer)


def operator_reason(optimizer: Any) -> str | None:
    """None when ``optimizer`` exposes the operator its step solves with, else why it does not."""
    from optimizers.saddle_free import SaddleFreeNewton

    if isinstance(optimizer, SaddleFreeNewton):
        return SFN_REASON
    return None


def with_targets(make: Callable[[Any], Callable[[], torch.Tensor]]) -> Callable[[Any], Callable[[], torch.Tensor]]:
    """Wrap a closure factory ``make(batch) -> closure`` so that each closure carries ``batch``'s targets
    (the second element of an ``(inputs, targets)`` batch): what a matrix-free optimizer needs from
    ``optimizer.step(closure)``."""
    from optimizers.matrix_free import BatchClosure

    def made(batch: Any) -> Callable[[], torch.Tensor]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("a matrix-free optimizer needs (inputs, targets) batches to take the targets of its "
                            f"curvature products from, got a {type(batch).__name__}")
        closure = make(batch)
        return BatchClosure(closure, batch[1])

    return made


# ============================================================================================ records
@dataclass
class OperatorProbe:
    r"""The dense operator :math:`A = C + \operatorname{diag}(\delta)` of one step (float64 scalars).

    ``c_min``/``c_max``: spectrum of the symmetric part of :math:`C`; ``a_min``/``a_max`` of
    :math:`A`; ``shift_min``/``shift_max``: of :math:`\delta`; ``asymmetry``:
    :math:`\|C - C^\top\|_F/\|C\|_F`; ``kappa_lo``/``kappa_hi``: :math:`1/a_{\max}`, :math:`1/a_{\min}`
    (NaN when :math:`A` is not positive definite); ``step_form``: the E4.apply quantities when the
    step's direction was checked (else the reason it was not, under ``"skipped"``).
    """

    n: int
    eps: float
    finite: bool
    asymmetry: float
    c_min: float
    c_max: float
    shift_min: float
    shift_max: float
    a_min: float
    a_max: float
    kappa_lo: float
    kappa_hi: float
    step_form: dict[str, Any] = field(default_factory=dict)


@dataclass
class WholeModelRecord:
    """One step of a whole-model optimizer (``alpha`` = the applied scale of the direction)."""

    step: int
    lr: float
    alpha: float
    loss: float | None
    loss_after: float | None
    skipped: bool
    skip_reason: str | None
    accepted: bool
    reduction_ratio: float | None
    damping: float | None
    grad_norm: float
    step_norm: float
    descent: float
    products: int
    details: dict[str, Any]
    probe: OperatorProbe | None = None


def _scalar_details(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in details.items() if isinstance(v, (bool, int, float, str)) or v is None}


class WholeModelMonitor:
    r"""Record every step of a matrix-free optimizer through its step hook (reads, never writes).

    Args:
        optimizer: a :class:`~optimizers.matrix_free.MatrixFreeOptimizer`.
        probe_interval: build the dense operator every this many steps (0: never).
        max_dense: largest parameter count for which the dense operator is built (``n`` products and
            an ``n × n`` eigen-decomposition per probe).
    """

    def __init__(self, optimizer: Any, *, probe_interval: int = 1, max_dense: int = 1024) -> None:
        self.optimizer = optimizer
        self.probe_interval = int(probe_interval)
        self.max_dense = int(max_dense)
        self.records: list[WholeModelRecord] = []
        self.unprobed_reason: str | None = None
        self._handle = optimizer.register_step_hook(self._on_step)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _on_step(self, info: Any) -> None:
        g = info.grad.detach().double() if info.grad is not None else None
        upd = info.update.detach().double() if info.update is not None else None
        rec = WholeModelRecord(
            step=int(info.step), lr=float(info.lr), alpha=float(info.step_scale), loss=info.loss,
            loss_after=info.loss_after, skipped=bool(info.skipped), skip_reason=info.skip_reason,
            accepted=bool(info.accepted), reduction_ratio=info.reduction_ratio,
            damping=None if info.damping is None else float(info.damping),
            grad_norm=float(g.norm()) if g is not None else math.nan,
            step_norm=float(upd.norm()) if upd is not None else 0.0,
            descent=float(g @ upd) if g is not None and upd is not None else math.nan,
            products=int(info.products), details=_scalar_details(info.details))
        if info.operator is not None and self.probe_interval > 0 and info.step % self.probe_interval == 0:
            n = int(info.operator_shift.numel())
            if n <= self.max_dense:
                rec.probe = self._probe(info, g, upd)
            else:
                self.unprobed_reason = f"n = {n} parameters > max_dense = {self.max_dense}: the dense operator was not built"
        self.records.append(rec)

    @staticmethod
    def _probe(info: Any, g: torch.Tensor | None, upd: torch.Tensor | None) -> OperatorProbe:
        shift = info.operator_shift.detach()
        n = int(shift.numel())
        eps = float(torch.finfo(shift.dtype).eps)
        eye = torch.eye(n, dtype=shift.dtype, device=shift.device)
        c = torch.stack([info.operator(eye[i]).detach() for i in range(n)], dim=1).to(torch.float64)
        delta = shift.to(torch.float64)
        finite = bool(torch.isfinite(c).all())
        nan = math.nan
        if not finite:
            return OperatorProbe(n, eps, False, nan, nan, nan, float(delta.min()), float(delta.max()), nan, nan, nan,
                                 nan)
        norm = float(torch.linalg.matrix_norm(c))
        asym = float(torch.linalg.matrix_norm(c - c.T)) / norm if norm > 0 else 0.0
        c_sym = 0.5 * (c + c.T)
        c_eig = torch.linalg.eigvalsh(c_sym)
        a = c_sym + torch.diag(delta)
        a_eig = torch.linalg.eigvalsh(a)
        a_min, a_max = float(a_eig[0]), float(a_eig[-1])
        pd = a_min > 0
        probe = OperatorProbe(n, eps, True, asym, float(c_eig[0]), float(c_eig[-1]), float(delta.min()),
                              float(delta.max()), a_min, a_max, 1.0 / a_max if pd else nan, 1.0 / a_min if pd else nan)
        probe.step_form = WholeModelMonitor._step_form(info, a, g, upd, pd)
        return probe

    @staticmethod
    def _step_form(info: Any, a: torch.Tensor, g: torch.Tensor | None, upd: torch.Tensor | None,
                   pd: bool) -> dict[str, Any]:
        if upd is None or not info.step_scale > 0 or g is None:
            return {"skipped": "no step was applied"}
        if info.details.get("cg_warm_start"):
            return {"skipped": "CG was warm-started from the previous solution (the direction is affine in it)"}
        if "momentum" in info.details:
            return {"skipped": "the direction was combined with the previous step (momentum)"}
        if not pd:
            return {"skipped": "the operator is not positive definite (see E4)"}
        d = upd / float(info.step_scale)
        g_sq = float(g @ g)
        if info.cg_preconditioner is not None:
            m = info.cg_preconditioner.detach().to(torch.float64)
            s = m.sqrt()
            ev = torch.linalg.eigvalsh(s[:, None] * a * s[None, :])
            lo, hi = float(m.min()) / float(ev[-1]), float(m.max()) / float(ev[0])
        else:
            ev = torch.linalg.eigvalsh(a)
            lo, hi = 1.0 / float(ev[-1]), 1.0 / float(ev[0])
        exact = torch.linalg.solve(a, -g)
        return {"descent": float(-(g @ d)), "direction_norm": float(d.norm()), "grad_sq": g_sq,
                "grad_norm": math.sqrt(g_sq), "kappa_lo": lo, "kappa_hi": hi, "preconditioned":
                info.cg_preconditioner is not None,
                "deviation_from_exact": float((d - exact).norm() / exact.norm()) if float(exact.norm()) > 0 else 0.0}

    # ------------------------------------------------------------------ accessors
    def probes(self) -> list[tuple[int, OperatorProbe]]:
        return [(r.step, r.probe) for r in self.records if r.probe is not None]

    def kappa_observed(self) -> tuple[float, float]:
        """(min_k 1/λmax(A_k), max_k 1/λmin(A_k)) over the probed steps (NaN if none is positive definite)."""
        lo = [p.kappa_lo for _, p in self.probes() if math.isfinite(p.kappa_lo)]
        hi = [p.kappa_hi for _, p in self.probes() if math.isfinite(p.kappa_hi)]
        return (min(lo) if lo else math.nan, max(hi) if hi else math.nan)

    def damping_series(self) -> dict[str, list]:
        return {"step": [r.step for r in self.records], "damping": [r.damping for r in self.records],
                "alpha": [r.alpha for r in self.records], "reduction_ratio": [r.reduction_ratio for r in self.records]}

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return {"records": [clean(asdict(r)) for r in self.records]}


# ============================================================================================ checks
def _tolerance(p: OperatorProbe) -> float:
    return spectral_tolerance(max(p.n, 1), p.eps, max(abs(p.c_max), abs(p.c_min), abs(p.shift_max), 1e-300))


def check_whole_model_preconditioner(monitor: WholeModelMonitor) -> CheckResult:
    r"""E4 on the probed operators :math:`A_k` (rules in the module docstring).

    Statistic: the number of violated rules (expected 0); evidence: per rule the count of checks and
    violations, the first violations, :math:`\kappa_{lo,obs}`, :math:`\kappa_{hi,obs}` and the series.
    """
    assumption = "AS.3 bounded preconditioner H_k = (C_k + lambda_k I + tau I)^-1"
    probes = monitor.probes()
    if not probes:
        reason = monitor.unprobed_reason or "no step exposed its operator (every step was skipped or probes were off)"
        return not_applicable("E4", assumption, reason)
    rules = {name: 0 for name in ("finite", "symmetric", "curvature PSD", "damping positive",
                                  "positive definite", "damped-inverse interval")}
    violations: list[dict[str, Any]] = []

    def rule(name: str, ok: bool, step: int, observed: float, bound: float) -> None:
        rules[name] += 1
        if not ok:
            violations.append({"rule": name, "step": step, "observed": observed, "bound": bound})

    series = {"step": [], "kappa_lo_obs": [], "kappa_hi_obs": [], "kappa_lo_th": [], "kappa_hi_th": []}
    for step, p in probes:
        rule("finite", p.finite, step, math.nan if not p.finite else 0.0, 0.0)
        if not p.finite:
            continue
        tol = _tolerance(p)
        rule("symmetric", p.asymmetry <= SYMMETRY_FACTOR * p.n * p.eps, step, p.asymmetry,
             SYMMETRY_FACTOR * p.n * p.eps)
        rule("curvature PSD", p.c_min >= -tol, step, p.c_min, -tol)
        rule("damping positive", p.shift_min > 0, step, p.shift_min, 0.0)
        rule("positive definite", p.a_min > tol, step, p.a_min, tol)
        # spec(A) within [min delta, lambda_max(C) + max delta]  <=>  spec(H) within the damped-inverse interval
        rule("damped-inverse interval", p.a_min >= p.shift_min - tol and p.a_max <= max(p.c_max, 0.0) + p.shift_max + tol,
             step, p.a_min, p.shift_min - tol)
        series["step"].append(step)
        series["kappa_lo_obs"].append(p.kappa_lo)
        series["kappa_hi_obs"].append(p.kappa_hi)
        th_ok = p.shift_min > 0
        series["kappa_lo_th"].append(1.0 / (max(p.c_max, 0.0) + p.shift_max) if th_ok else None)
        series["kappa_hi_th"].append(1.0 / p.shift_min if th_ok else None)
    lo, hi = monitor.kappa_observed()
    evidence = {"kappa_lo_obs": lo, "kappa_hi_obs": hi, "probed_steps": [s for s, _ in probes],
                "rules": {k: {"checked": v, "violations": sum(x["rule"] == k for x in violations)}
                          for k, v in rules.items()},
                "violations": violations[:200], "series": series, "operator": "dense C_k + diag(delta_k) from "
                "the optimizer's own products at the step's point and batch",
                "deterministic_fail": bool(violations)}
    notes = []
    if violations:
        first = violations[0]
        notes.append(f"{len(violations)} violated, first: {first['rule']} at step {first['step']}: "
                     f"{first['observed']:.4g} vs bound {first['bound']:.4g}")
    expected = f"0 of {sum(rules.values())} rules violated; kappa_lo={lo:.3g}, kappa_hi={hi:.3g}"
    return CheckResult("E4", assumption, float(len(violations)), expected, 1.0,
                       Verdict.FAIL if violations else Verdict.PASS, evidence, notes)


def check_whole_model_step_form(monitor: WholeModelMonitor) -> CheckResult:
    r"""E4.apply on the CG-applied direction :math:`d` of every probed step:
    :math:`-g^\top d \ge \kappa_{lo}\|g\|^2(1-r)` and :math:`\|d\| \le \kappa_{hi}\|g\|(1+r)` with the
    bounds of the operator the step solved with (preconditioned: of :math:`M^{-1/2}AM^{-1/2}`, see the
    module docstring), :math:`r = \max(10^{-8}, 10^3\varepsilon)`. FAIL if either is violated."""
    assumption = "step form of AS.3 on the CG-applied direction (-g'd >= kappa_lo |g|^2, |d| <= kappa_hi |g|)"
    probes = monitor.probes()
    rows = [(s, p) for s, p in probes if "descent" in p.step_form]
    skipped: dict[str, int] = {}
    for _, p in probes:
        why = p.step_form.get("skipped")
        if why:
            skipped[why] = skipped.get(why, 0) + 1
    if not rows:
        reason = monitor.unprobed_reason or "no step exposed its operator"
        if skipped:
            reason = "no probed step could be checked: " + "; ".join(f"{v}x {k}" for k, v in skipped.items())
        return not_applicable("E4.apply", assumption, reason, evidence={"skipped": skipped})
    bad = []
    worst = 0.0
    for step, p in rows:
        sf = p.step_form
        r = max(1e-8, 1e3 * p.eps)
        lower = sf["kappa_lo"] * sf["grad_sq"]
        upper = sf["kappa_hi"] * sf["grad_norm"]
        ratio_lo = lower / sf["descent"] if sf["descent"] > 0 else math.inf
        ratio_hi = sf["direction_norm"] / upper if upper > 0 else math.inf
        worst = max(worst, ratio_lo, ratio_hi)
        if not sf["descent"] >= lower * (1 - r):
            bad.append({"step": step, "rule": "-g'd >= kappa_lo |g|^2", "observed": sf["descent"], "bound": lower})
        if not sf["direction_norm"] <= upper * (1 + r):
            bad.append({"step": step, "rule": "|d| <= kappa_hi |g|", "observed": sf["direction_norm"], "bound": upper})
    deviation = [p.step_form["deviation_from_exact"] for _, p in rows]
    evidence = {"checked_steps": [s for s, _ in rows], "violations": bad[:200], "skipped": skipped,
                "deviation_from_exact": deviation, "max_deviation_from_exact": max(deviation),
                "deterministic_fail": bool(bad)}
    notes = [f"the CG-applied step is within {max(deviation):.2g} (relative) of the exact -A^-1 g at the checked steps"]
    if skipped:
        notes.append("not checked: " + "; ".join(f"{v}x {k}" for k, v in skipped.items()))
    if bad:
        notes.insert(0, f"{len(bad)} violated, first at step {bad[0]['step']}: {bad[0]['rule']} "
                        f"({bad[0]['observed']:.4g} vs {bad[0]['bound']:.4g})")
    return CheckResult("E4.apply", assumption, worst, f"<= 1 at {len(rows)} steps", 1.0,
                       Verdict.FAIL if bad else Verdict.PASS, evidence, notes)


def check_whole_model_step_size(monitor: WholeModelMonitor, lipschitz: float) -> CheckResult:
    r"""E7a for a whole-model operator: FAIL if an applied scale :math:`lpha_k` (``lr`` times the line
    search's factor) exceeds :math:`\kappa_{lo,obs}/(\hat L\kappa_{hi,obs}^2)` with the κ of E4's probes.

    Only the probed steps are compared (their κ is known); NOT_APPLICABLE without a positive-definite probe."""
    from convergence.checks.stepsize import step_size_limit

    assumption = "step size alpha_k <= kappa_lo/(L kappa_hi^2)"
    if not lipschitz > 0:
        raise ValueError(f"lipschitz must be > 0, got {lipschitz}")
    lo, hi = monitor.kappa_observed()
    rows = [r for r in monitor.records if r.probe is not None and r.accepted]
    if not rows or not (math.isfinite(lo) and math.isfinite(hi)):
        return not_applicable("E7a", assumption, "no accepted step with a positive-definite probed operator (see E4)")
    limit = step_size_limit(lo, hi, lipschitz)
    ratios = [r.alpha / limit if limit > 0 else math.inf for r in rows]
    bad = [r.step for r, q in zip(rows, ratios) if q > 1.0]
    evidence = {"lipschitz": lipschitz, "kappa_lo_obs": lo, "kappa_hi_obs": hi, "limit": limit,
                "steps": [r.step for r in rows], "alpha": [r.alpha for r in rows], "ratio_global": ratios,
                "violating_steps": bad[:200], "deterministic_fail": bool(bad)}
    notes = []
    if bad:
        notes.append(f"{len(bad)} of {len(rows)} probed steps exceed kappa_lo/(L kappa_hi^2) = {limit:.3g} (the "
                     "line search accepts up to the full step alpha = lr): the theorems' step-size condition is violated")
    return CheckResult("E7a", assumption, max(ratios), 1.0, 1.0, Verdict.FAIL if bad else Verdict.PASS, evidence, notes)


# ====================================================================================== theory mode
def whole_model_violations(optimizer: Any, loader: Any = None) -> list[str]:
    """What in a matrix-free optimizer's run breaks the SQN theory's setting (the step -alpha_k H_k g_k
    with H_k bounded and independent of batch k)."""
    from convergence.monitor import _sampler_violations

    name = type(optimizer).__name__
    out = [f"{name} builds its operator from the current batch (curvature products on batch k): H_k depends on "
           "batch k (AS.4 fails by construction)"]
    if operator_reason(optimizer) is not None:
        out.append(f"{name}'s |H|^-1 is not a quasi-Newton H_k (E4/E5 do not apply)")
        if len(getattr(optimizer, "damping_grid", ())) > 1:
            out.append("the damping is re-chosen every step by the loss on the current batch")
    if float(getattr(optimizer, "cg_decay", 0.0) or 0.0) > 0:
        out.append(f"cg_decay={optimizer.cg_decay:g} > 0: CG starts from the previous solution, so the step is affine "
                   "in the previous step (like momentum), not -alpha*H_k*g_k")
    if getattr(optimizer, "momentum", False) is True:
        out.append("momentum=True: the step combines the LM direction with the previous step")
    if getattr(optimizer, "uphill", False):
        out.append("uphill=True: steps that increase the batch loss may be accepted")
    if getattr(optimizer, "line_search", True) or getattr(optimizer, "max_line_search", 0):
        out.append("the step scale is chosen (and steps rejected) by the loss on the current batch: alpha_k depends "
                   "on batch k")
    wd = float(getattr(optimizer, "weight_decay", 0.0) or 0.0)
    if wd > 0:
        out.append(f"weight_decay={wd:g} > 0 is not part of f: g_k is not an unbiased gradient of f")
    if loader is not None:
        out.extend(_sampler_violations(loader))
    return out

