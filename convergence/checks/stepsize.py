r"""E7 — step-size conditions of the SQN theorems (deterministic, sound).

* **E7a** (:func:`check_step_size`): the theorems need :math:`\alpha_k \le \kappa_{lo}/(L\kappa_{hi}^2)`
  with global :math:`\kappa_{lo} \le \lambda_{\min}(H_j)`, :math:`\kappa_{hi} \ge \lambda_{\max}(H_j)`
  for all j and :math:`L \ge \hat L`. Hence, with the observed
  :math:`\kappa_{lo,obs} = \min_j\lambda_{\min}(H_j)`, :math:`\kappa_{hi,obs} = \max_j\lambda_{\max}(H_j)`
  and the estimate :math:`\hat L` (E1, a lower bound on L),
  :math:`\alpha_k > \kappa_{lo,obs}/(\hat L\kappa_{hi,obs}^2)` implies
  :math:`\alpha_k > \kappa_{lo}/(L\kappa_{hi}^2)`: a **definite FAIL** (the per-step form
  :math:`\alpha_k > \lambda_{\min}(H_k)/(\hat L\lambda_{\max}(H_k)^2)` is implied and reported).
  Eigenvalues are moved by the E4 tolerance τ in the direction that favours the run, so rounding
  never produces a FAIL.
* **E7b** (:func:`check_schedule`): :math:`\alpha_k = c\,k^{-\beta}` needs :math:`\beta \in (1/2, 1]`
  (:math:`\sum\alpha_k = \infty`, :math:`\sum\alpha_k^2 < \infty`; the rate theorem takes
  :math:`\beta < 1`). A constant step only supports the randomized-output (RSQN) result.
* **E7c** (:func:`check_batch_size`): the batch size :math:`m_k` is constant (or as declared).
* **E7d** (:func:`check_eos_corollary`): if :math:`\alpha \le \lambda_{\min}(P)/(\hat L\lambda_{\max}(P)^2)`
  and :math:`\hat L` is a valid curvature bound, then
  :math:`\alpha\lambda_{\max}(P\nabla^2 f) \le \alpha\lambda_{\max}(P)\max(\lambda_{\max}(\nabla^2f), 0)
  \le \lambda_{\min}(P)/\lambda_{\max}(P) \le 1 < 2`: a theory-mode run never reaches the edge of
  stability. The preconditioned sharpness is measured with
  :func:`convergence.sharpness.preconditioned_sharpness` on the operator of the current step; a
  violation means the :math:`\hat L` fed to E7a is below the local curvature (E7a is then not
  sound) or the operator's reported bounds are wrong.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from convergence.bounds import spectral_tolerance
from convergence.checks import MakeClosure, capture_operators, closure_factory
from convergence.hessian import HessianOperator, MatvecOperator
from convergence.monitor import StepRecord
from convergence.results import CheckResult, Verdict
from convergence.sharpness import edge_of_stability_ratio, gd_is_stable, preconditioned_sharpness, sharpness

__all__ = [
    "step_size_limit",
    "check_step_size",
    "fit_schedule",
    "check_schedule",
    "check_batch_size",
    "check_eos_corollary",
    "check_step_size_conditions",
]


def step_size_limit(kappa_lo: float, kappa_hi: float, lipschitz: float) -> float:
    r""":math:`\kappa_{lo}/(L\kappa_{hi}^2)`, the largest step the theorems allow."""
    if not (kappa_lo > 0 and kappa_hi > 0 and lipschitz > 0):
        return 0.0
    return kappa_lo / (lipschitz * kappa_hi * kappa_hi)


def _records(source: Any) -> list[StepRecord]:
    return list(getattr(source, "records", source))


def _layer_tolerance(rec: StepRecord) -> float:
    return max((spectral_tolerance(max(l.dim, 1), l.eps, l.lmax) for l in rec.layers.values()
                if math.isfinite(l.lmax)), default=0.0)


def check_step_size(records: Any, lipschitz: float) -> CheckResult:
    r"""E7a: FAIL if some :math:`\alpha_k > \kappa_{lo,obs}/(\hat L\kappa_{hi,obs}^2)` (definite).

    ``lipschitz`` is :math:`\hat L` (E1). Statistic: :math:`\max_k \alpha_k/\text{limit}`
    (expected ≤ 1); evidence has the per-step ratios :math:`\alpha_k\hat L\lambda_{\max}(H_k)^2/\lambda_{\min}(H_k)`.
    """
    if not lipschitz > 0:
        raise ValueError(f"lipschitz must be > 0, got {lipschitz}")
    recs = [r for r in _records(records) if r.layers and not r.skipped]
    assumption = "step size alpha_k <= kappa_lo/(L kappa_hi^2)"
    if not recs:
        return CheckResult("E7a", assumption, math.nan, 1.0, 1.0, Verdict.INCONCLUSIVE, notes=["no recorded steps"])
    if not all(math.isfinite(r.lambda_min) and math.isfinite(r.lambda_max) for r in recs):
        return CheckResult("E7a", assumption, math.inf, 1.0, 1.0, Verdict.FAIL,
                           notes=["a preconditioner was not finite: AS.3 fails (see E4)"])
    taus = [_layer_tolerance(r) for r in recs]
    lo = min(r.lambda_min + t for r, t in zip(recs, taus))  # rounding in the run's favour
    hi = max(max(r.lambda_max - t, 0.0) for r, t in zip(recs, taus))
    limit = step_size_limit(lo, hi, lipschitz)
    per_step = []
    for r, t in zip(recs, taus):
        step_limit = step_size_limit(r.lambda_min + t, max(r.lambda_max - t, 0.0), lipschitz)
        per_step.append(r.alpha / step_limit if step_limit > 0 else math.inf)
    ratios = [r.alpha / limit if limit > 0 else math.inf for r in recs]
    worst = max(ratios)
    bad = [r.step for r, q in zip(recs, ratios) if q > 1.0]
    notes = []
    if lo <= 0:
        notes.append("lambda_min(H_k) <= 0 at some step: no positive step size satisfies the condition (AS.3 fails)")
    if bad:
        notes.append(f"{len(bad)} steps exceed kappa_lo/(L kappa_hi^2): the theorems' step-size condition is violated")
    evidence = {"lipschitz": lipschitz, "kappa_lo_obs": lo, "kappa_hi_obs": hi, "limit": limit,
                "steps": [r.step for r in recs], "alpha": [r.alpha for r in recs],
                "ratio_global": ratios, "ratio_per_step": per_step, "violating_steps": bad[:200],
                "per_step_violations": sum(q > 1.0 for q in per_step)}
    return CheckResult("E7a", assumption, worst, 1.0, 1.0, Verdict.FAIL if bad else Verdict.PASS, evidence, notes)


def fit_schedule(steps: Sequence[int], lrs: Sequence[float], *, step_offset: int = 1, rtol: float = 1e-6) -> dict[str, Any]:
    r"""Classify a learning-rate sequence: ``{"kind": "constant"|"power"|"other", "c", "beta", "residual"}``.

    ``power``: :math:`\text{lr}_k = c\,(k + \text{offset})^{-\beta}` within relative ``rtol`` (OLS of
    :math:`\log\text{lr}` on :math:`\log(k+\text{offset})`).
    """
    if len(steps) != len(lrs) or not lrs:
        raise ValueError("steps and lrs must be non-empty and of equal length")
    if any(not (lr > 0) for lr in lrs):
        return {"kind": "other", "c": math.nan, "beta": math.nan, "residual": math.inf}
    first = lrs[0]
    if all(abs(lr - first) <= rtol * first for lr in lrs):
        return {"kind": "constant", "c": first, "beta": 0.0, "residual": max(abs(lr - first) / first for lr in lrs)}
    xs = [math.log(k + step_offset) for k in steps]
    ys = [math.log(lr) for lr in lrs]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return {"kind": "other", "c": math.nan, "beta": math.nan, "residual": math.inf}
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    c = math.exp(my - slope * mx)
    residual = max(abs(lr - c * (k + step_offset) ** slope) / lr for k, lr in zip(steps, lrs))
    return {"kind": "power" if residual <= rtol else "other", "c": c, "beta": -slope, "residual": residual}


def check_schedule(records: Any, *, step_offset: int = 1, allow_constant: bool = False, rtol: float = 1e-6) -> CheckResult:
    r"""E7b: the recorded learning rates follow :math:`c\,(k+\text{offset})^{-\beta}` with :math:`\beta\in(1/2, 1]`.

    PASS for such a schedule; FAIL for a power law with β outside (1/2, 1] or a constant step
    (unless ``allow_constant``: the randomized-output result only needs a constant step);
    INCONCLUSIVE for fewer than 3 records or a schedule that is not a power law.
    """
    recs = _records(records)
    assumption = "step-size schedule: sum alpha = inf, sum alpha^2 < inf"
    if len(recs) < 3:
        return CheckResult("E7b", assumption, math.nan, "(0.5, 1]", 1.0, Verdict.INCONCLUSIVE,
                           notes=["fewer than 3 recorded steps"])
    fit = fit_schedule([r.step for r in recs], [r.lr for r in recs], step_offset=step_offset, rtol=rtol)
    notes = []
    if fit["kind"] == "constant":
        if allow_constant:
            verdict = Verdict.PASS
            notes.append("constant step: only the randomized-output (RSQN) complexity result applies")
        else:
            verdict = Verdict.FAIL
            notes.append("constant step: sum alpha_k^2 = inf, so the almost-sure convergence theorem does not apply")
    elif fit["kind"] == "power":
        beta = fit["beta"]
        verdict = Verdict.PASS if 0.5 < beta <= 1.0 + rtol else Verdict.FAIL
        if verdict is Verdict.FAIL:
            notes.append(f"beta = {beta:.4g} is outside (1/2, 1]")
        elif beta > 1.0 - rtol:
            notes.append("beta = 1: the a.s. result applies, the rate theorem needs beta < 1")
    else:
        verdict = Verdict.INCONCLUSIVE
        notes.append("the learning rates are not c (k + offset)^-beta: the conditions cannot be read off a finite run")
    return CheckResult("E7b", assumption, fit["beta"], "(0.5, 1]", 1.0, verdict, fit, notes)


def check_batch_size(records: Any, expected: int | None = None) -> CheckResult:
    """E7c: every recorded step used the same batch size (equal to ``expected`` when given)."""
    sizes = [r.batch_size for r in _records(records) if r.batch_size is not None]
    assumption = "constant batch size m_k = m"
    if not sizes:
        return CheckResult("E7c", assumption, math.nan, expected, 1.0, Verdict.INCONCLUSIVE,
                           notes=["no recorded batch sizes"])
    distinct = sorted(set(sizes))
    ok = len(distinct) == 1 and (expected is None or distinct[0] == expected)
    return CheckResult("E7c", assumption, float(len(distinct)), expected if expected is not None else 1, 1.0,
                       Verdict.PASS if ok else Verdict.FAIL, {"batch_sizes": distinct, "steps": len(sizes)},
                       [] if ok else [f"batch sizes {distinct[:10]} (expected {expected if expected is not None else 'one size'})"])


def _flat_preconditioner(model: nn.Module, optimizer, ops, functional) -> Callable[[torch.Tensor], torch.Tensor]:
    """P on flat parameter vectors (``named_parameters`` order): blocks per layer, identity elsewhere."""
    names = {id(p): n for n, p in model.named_parameters()}
    layout = {}
    for slot_name, slot in optimizer.slots.items():
        w = names[id(slot.module.weight)]
        b = names[id(slot.module.bias)] if slot.adapter.has_bias else None
        layout[slot_name] = (slot, w, b)

    def apply(v: torch.Tensor) -> torch.Tensor:
        parts = functional.unflatten(v)
        out = dict(parts)
        for slot_name, (slot, w, b) in layout.items():
            m = slot.adapter.to_matrix(parts[w], parts[b] if b is not None else None)
            pm = ops[slot_name].apply(m).to(dtype=v.dtype, device=v.device)
            dw, db = slot.adapter.split_matrix(pm)
            out[w] = dw
            if b is not None:
                out[b] = db
        return functional.flatten(out)

    return apply


def check_eos_corollary(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    full_data: tuple[Any, Any],
    optimizer,
    batch: Any,
    lipschitz: float,
    *,
    make_closure: MakeClosure | None = None,
    lr: float | None = None,
    method: str = "dense",
) -> CheckResult:
    r"""E7d at the current state: the operator :math:`P` of this step (captured on ``batch``, state
    restored), the full-batch Hessian :math:`\nabla^2 f` at the current point, and
    :math:`\alpha\lambda_{\max}(P\nabla^2 f)`.

    FAIL if :math:`\lambda_{\max}(P\nabla^2f) > \lambda_{\max}(P)\max(\lambda_{\max}(\nabla^2 f),0)`
    (inconsistent measurements), or if the step-size condition holds with ``lipschitz``
    (:math:`\hat L`) but :math:`\alpha\lambda_{\max}(P\nabla^2f) > \lambda_{\min}(P)/\lambda_{\max}(P)`.
    ``method`` is passed to :func:`~convergence.sharpness.preconditioned_sharpness` ("dense" for small
    nets, "lanczos" otherwise; both are sound here because Lanczos under-estimates).
    """
    if not lipschitz > 0:
        raise ValueError(f"lipschitz must be > 0, got {lipschitz}")
    make_closure = make_closure or closure_factory(model, optimizer, loss_fn)
    alpha = float(optimizer.param_groups[0]["lr"]) if lr is None else float(lr)
    ops = capture_operators(model, optimizer, make_closure, batch)
    if not ops:
        from convergence.results import not_applicable

        return not_applicable("E7d", "EoS corollary", "the step applied no preconditioner")
    bounds = [op.bounds() for op in ops.values()]
    p_lo, p_hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
    slot_params = {id(p) for s in optimizer.slots.values() for p in s.adapter.parameters()}
    if any(p.requires_grad and id(p) not in slot_params for p in model.parameters()):
        p_lo, p_hi = min(p_lo, 1.0), max(p_hi, 1.0)  # identity on parameters without a block
    if not (p_lo > 0 and math.isfinite(p_hi)):
        from convergence.results import not_applicable

        return not_applicable("E7d", "EoS corollary: alpha lambda_max(P H) <= kappa_lo/kappa_hi < 2",
                              f"the applied preconditioner is not positive definite (lambda_min = {p_lo:.3g}, see E4): "
                              "P^(1/2) and the corollary do not exist", evidence={"lambda_min_P": p_lo, "lambda_max_P": p_hi})
    reference = copy.deepcopy(model)  # the optimizer's capture hooks are inert in a copy
    x_in, y_in = full_data
    hess = HessianOperator(reference, loss_fn, x_in, y_in)
    apply = _flat_preconditioner(model, optimizer, ops, hess.functional)
    n = hess.n
    if method == "dense":  # materialize the Hessian once for both eigenvalue problems
        h = hess.to_dense(max_n=max(n, 1)).detach()
        h = 0.5 * (h + h.T)
        sharp = float(torch.linalg.eigvalsh(h.to(torch.float64))[-1])
        hess_op = MatvecOperator(lambda v: h @ v, n, dtype=h.dtype, device=h.device)
    else:
        sharp = sharpness(hess, n, seed=0)
        hess_op = hess
    psharp = preconditioned_sharpness(hess_op, apply, n, method=method, seed=0)
    eps = float(torch.finfo(hess.dtype).eps)
    tol = 100.0 * n * eps * max(abs(psharp), p_hi * max(sharp, 0.0), 1e-300)
    consistency = psharp <= p_hi * max(sharp, 0.0) + tol
    limit = step_size_limit(p_lo, p_hi, lipschitz)
    condition = p_lo > 0 and alpha <= limit
    ratio = alpha * psharp
    corollary = (not condition) or ratio <= p_lo / p_hi + alpha * tol
    notes = []
    if not consistency:
        notes.append("lambda_max(P H) exceeds lambda_max(P) lambda_max(H): the operator's reported bounds are wrong")
    if condition and not corollary:
        notes.append("the step-size condition holds with this L_hat, yet alpha lambda_max(P H) > kappa_lo/kappa_hi: "
                     "L_hat is below the local curvature, so E7a with this L_hat is not sound")
    if lipschitz < sharp:
        notes.append(f"L_hat = {lipschitz:.4g} < lambda_max(Hessian) = {sharp:.4g} at this point")
    evidence = {
        "alpha": alpha, "lambda_min_P": p_lo, "lambda_max_P": p_hi, "sharpness": sharp,
        "preconditioned_sharpness": psharp, "alpha_times_psharp": ratio, "kappa_ratio": p_lo / p_hi if p_hi > 0 else math.nan,
        "step_size_condition": condition, "step_size_limit": limit,
        "edge_of_stability_ratio": edge_of_stability_ratio(alpha, psharp), "gd_stable": gd_is_stable(alpha, psharp),
        "consistency": consistency, "method": method,
    }
    verdict = Verdict.PASS if consistency and corollary else Verdict.FAIL
    return CheckResult("E7d", "EoS corollary: alpha lambda_max(P H) <= kappa_lo/kappa_hi < 2", ratio,
                       p_lo / p_hi if p_hi > 0 else math.nan, 1.0, verdict, evidence, notes)


def check_step_size_conditions(records: Any, lipschitz: float, *, expected_batch_size: int | None = None,
                               step_offset: int = 1, allow_constant: bool = False) -> list[CheckResult]:
    """E7a, E7b and E7c on the records of a monitored run (E7d needs the live run: :func:`check_eos_corollary`)."""
    return [check_step_size(records, lipschitz),
            check_schedule(records, step_offset=step_offset, allow_constant=allow_constant),
            check_batch_size(records, expected_batch_size)]
