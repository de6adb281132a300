r"""E6 — expected descent (lemma L0/L2 of the theory notes §1) and the SQN-form side-check.

At a snapshot :math:`x_k` (the current model and optimizer state), for each of :math:`R` batches
:math:`\xi^{(r)}` drawn through the caller's real loader, the optimizer's own step is run from the
snapshot with a precondition-hook spy that records the raw batch gradient :math:`g^{(r)}` and
applies the operator of that step, :math:`H_k^{(r)}` (the same for every r when E5 passes), to it
and to the full gradient. Then, with the full objective :math:`f` (all of ``full_data``),

.. math::

    x^{(r)} = x_k - \alpha_k H_k g^{(r)},\qquad \Delta_r = f(x^{(r)}) - f(x_k),\qquad
    \mathrm{LCB} = \bar\Delta - t_{R-1,1-a}\,\mathrm{sd}(\Delta)/\sqrt R,

    \mathrm{RHS}_{L0} = -\alpha_k\,\overline{\nabla f^\top H_k\nabla f}
                        + \tfrac{L_{up}}2\alpha_k^2\,\overline{\|H_kg^{(r)}\|^2}.

**NOT_APPLICABLE** if RHS :math:`\ge 0` (the lemma then promises no descent and the test cannot
discriminate) and LCB :math:`\le` RHS. **FAIL** if LCB > RHS (one-sided test at level ``alpha``; the p-value is reported so several
checkpoints can be Holm-corrected with :func:`convergence.multiple.holm_adjust`). ``L_up`` is
:math:`2\max(\hat L, L_H)` from E1 by default (an estimate is a lower bound on L, and using it
unchanged would make the test anti-conservative), or a declared upper bound used as is.
Parameters of layers without a block count with :math:`H = I` (the SGD fallback).

The **L2 form** (looser, the one the theorem uses) is reported:
:math:`-(\alpha\kappa_{lo}/2)\|\nabla f\|^2 + L_{up}\alpha^2\kappa_{hi}^2\,\hat\sigma^2_m/2` with
:math:`\hat\sigma^2_m = \overline{\|g^{(r)} - \nabla f\|^2}` and κ's given (E4) or measured on the
operators of these steps; it applies when :math:`\alpha \le \kappa_{lo}/(L_{up}\kappa_{hi}^2)`.

**SQN-form side-check** (deterministic): the displacement the step actually made, read off the
parameters (:math:`x_k - x_{k+1}`, not the optimizer's own report), must equal
:math:`\alpha_k H_k g_k` (the applied operator on the raw batch gradient) to
:math:`10^{-12}` (float64) / :math:`10^{-5}` (float32) relative; momentum, weight decay outside f
and KL clipping break it and are flagged.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Sequence

import torch
from scipy import stats
from torch import nn

from convergence.checks import MakeClosure, RunSnapshot, closure_factory
from convergence.monitor import OperatorSnapshot, theory_mode_violations
from convergence.results import CheckResult, Verdict

__all__ = ["check_expected_descent", "check_expected_descent_steps", "descent_rhs_l0", "descent_rhs_l2", "one_sided_lcb"]


def descent_rhs_l0(alpha: float, grad_h_grad: float, mean_hg_sq: float, lipschitz_upper: float) -> float:
    r"""RHS of L0: :math:`-\alpha\nabla f^\top H\nabla f + (L/2)\alpha^2 E\|Hg\|^2`."""
    return -alpha * grad_h_grad + 0.5 * lipschitz_upper * alpha * alpha * mean_hg_sq


def descent_rhs_l2(alpha: float, grad_sq: float, kappa_lo: float, kappa_hi: float, lipschitz_upper: float,
                   sigma2_over_m: float) -> float:
    r"""RHS of L2: :math:`-(\alpha\kappa_{lo}/2)\|\nabla f\|^2 + L\alpha^2\kappa_{hi}^2\sigma^2/(2m)`."""
    return -0.5 * alpha * kappa_lo * grad_sq + 0.5 * lipschitz_upper * alpha * alpha * kappa_hi ** 2 * sigma2_over_m


def one_sided_lcb(values: Sequence[float], alpha: float) -> tuple[float, float, float]:
    """(mean, sd, lower confidence bound at level 1 − alpha) with the t quantile."""
    r = len(values)
    mean = math.fsum(values) / r
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (r - 1)) if r > 1 else 0.0
    lcb = mean - float(stats.t.ppf(1.0 - alpha, r - 1)) * sd / math.sqrt(r) if r > 1 else mean
    return mean, sd, lcb


def _form_tolerance(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


def check_expected_descent(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    full_data: tuple[Any, Any],
    optimizer,
    batches: Iterable[Any],
    *,
    lipschitz: float,
    lipschitz_is_upper: bool = False,
    make_closure: MakeClosure | None = None,
    alpha: float = 0.01,
    kappa: tuple[float, float] | None = None,
    lr: float | None = None,
) -> list[CheckResult]:
    r"""E6 at the current state; returns ``[L0 check ("E6"), SQN-form side-check ("E6.form")]``.

    Args:
        model, loss_fn: the network and the batch-mean loss; ``full_data = (inputs, targets)``
            defines f (use eval-mode, deterministic f_i).
        optimizer: the curvature optimizer (state snapshotted and restored; nothing changes).
        batches: the R batches (``(inputs, targets)``), drawn through the real loader.
        lipschitz: :math:`\max(\hat L, L_H)` from E1, or a declared upper bound L.
        lipschitz_is_upper: True when ``lipschitz`` is a true upper bound (then
            :math:`L_{up} = L`), else :math:`L_{up} = 2L`.
        make_closure: closure factory (default :func:`~convergence.checks.closure_factory`).
        alpha: one-sided test level.
        kappa: (κ_lo, κ_hi) for the L2 report (default: measured on the operators used here).
        lr: α_k (default: the optimizer's current lr).
    """
    if not lipschitz > 0:
        raise ValueError(f"lipschitz must be > 0, got {lipschitz}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    make_closure = make_closure or closure_factory(model, optimizer, loss_fn)
    batches = list(batches)  # drawn now, before any RNG state is restored
    l_up = float(lipschitz) if lipschitz_is_upper else 2.0 * float(lipschitz)
    step_lr = float(optimizer.param_groups[0]["lr"]) if lr is None else float(lr)
    x_in, y_in = full_data
    params = [p for p in model.parameters() if p.requires_grad]
    slot_params = {id(p) for s in optimizer.slots.values() for p in s.adapter.parameters()}
    free = [p for p in params if id(p) not in slot_params]
    snapshot = RunSnapshot(model, optimizer)
    try:
        reference = copy.deepcopy(model)  # the optimizer's capture hooks are inert in a copy
        with torch.enable_grad():
            f0_t = loss_fn(reference(x_in), y_in)
            full_grads = torch.autograd.grad(f0_t, [p for p in reference.parameters() if p.requires_grad])
        del reference
        f0 = float(f0_t.detach())
        grad_of = {id(p): g.detach() for p, g in zip(params, full_grads)}
        grad_sq = float(sum(g.double().pow(2).sum() for g in full_grads))
        grad_mat = {}
        for name, slot in optimizer.slots.items():
            w = slot.adapter.module.weight
            b = slot.adapter.module.bias if slot.adapter.has_bias else None
            grad_mat[name] = slot.adapter.to_matrix(grad_of[id(w)], None if b is None else grad_of[id(b)])

        snapshot.restore()
        start = {id(p): p.detach().clone() for p in params}
        deltas, ghg, hg_sq, dev_sq, form_err, skipped = [], [], [], [], [], 0
        kappa_meas = [math.inf, -math.inf]
        dtype = params[0].dtype
        for r, batch in enumerate(batches):
            snapshot.restore()
            seen: dict[str, Any] = {}

            def spy(step, name, block, inputs, direction, seen=seen, first=(r == 0)):
                raw = optimizer.slots[name].adapter.grad_matrix().detach().clone()
                same = inputs.shape == raw.shape and bool(torch.equal(inputs, raw))
                hg = (direction if same else block.precondition(raw)).detach().clone()
                hgf = block.precondition(grad_mat[name].to(raw))
                seen[name] = {"raw": raw, "hg": hg, "d": direction.detach().clone(),
                              "fhf": float((grad_mat[name].double() * hgf.double()).sum())}
                if "free" not in seen:
                    seen["free"] = [None if p.grad is None else p.grad.detach().clone() for p in free]
                if first:
                    lo, hi = OperatorSnapshot.from_block(block).bounds()
                    kappa_meas[0], kappa_meas[1] = min(kappa_meas[0], lo), max(kappa_meas[1], hi)

            def after(info, seen=seen):
                seen["info"] = info

            handles = [optimizer.register_precondition_hook(spy), optimizer.register_step_hook(after)]
            try:
                optimizer.step(make_closure(batch))
            finally:
                for h in handles:
                    h.remove()
            info = seen.get("info")
            if info is None or info.skipped or not any(n in seen for n in optimizer.slots):
                skipped += 1
                continue
            # the displacement the step really made, read off the parameters (not the optimizer's report)
            moved = {}
            for name, slot in optimizer.slots.items():
                w = slot.module.weight
                b = slot.module.bias if slot.adapter.has_bias else None
                moved[name] = slot.adapter.to_matrix(start[id(w)] - w.detach(),
                                                     None if b is None else start[id(b)] - b.detach()).double()
            # x^(r) = x_k - alpha H g^(r), evaluated with the full objective
            snapshot.restore()
            sq = fhf = dev = 0.0
            err_num = err_den = 0.0
            with torch.no_grad():
                for name, slot in optimizer.slots.items():
                    rec = seen[name]
                    d_w, d_b = slot.adapter.split_matrix(rec["hg"])
                    slot.module.weight.sub_(step_lr * d_w)
                    if d_b is not None:
                        slot.module.bias.sub_(step_lr * d_b)
                    hg64 = rec["hg"].double()
                    sq += float(hg64.pow(2).sum())
                    fhf += rec["fhf"]
                    dev += float((rec["raw"].double() - grad_mat[name].double()).pow(2).sum())
                    applied = moved[name]
                    err_num += float((applied - step_lr * hg64).pow(2).sum())
                    err_den += float((step_lr * hg64).pow(2).sum())
                for p, g in zip(free, seen.get("free", [])):
                    if g is None:
                        continue
                    p.sub_(step_lr * g)
                    g64 = g.double()
                    sq += float(g64.pow(2).sum())
                    fhf += float((grad_of[id(p)].double() * g64).sum())
                    dev += float((g64 - grad_of[id(p)].double()).pow(2).sum())
                f_r = float(loss_fn(model(x_in), y_in))
            deltas.append(f_r - f0)
            hg_sq.append(sq)
            ghg.append(fhf)
            dev_sq.append(dev)
            form_err.append(math.sqrt(err_num / err_den) if err_den > 0 else (0.0 if err_num == 0 else math.inf))
    finally:
        snapshot.restore()

    assumption = "expected descent lemma L0 (AS.1, AS.2a, AS.4)"
    flags = [v for v in theory_mode_violations(optimizer) if v.startswith(("momentum", "weight_decay", "kl_clip"))]
    if free and getattr(optimizer, "fallback", "sgd") != "sgd":
        flags.append(f"layers without a block use the {optimizer.fallback!r} fallback: H = I assumed for them here")
    if len(deltas) < 2:
        res = CheckResult("E6", assumption, math.nan, math.nan, 1.0 - alpha, Verdict.INCONCLUSIVE,
                          {"valid_batches": len(deltas), "skipped": skipped}, ["fewer than 2 usable batches"])
        form = CheckResult("E6.form", "SQN form x+ = x - alpha H g", math.nan, 0.0, 1.0, Verdict.INCONCLUSIVE, {}, flags)
        return [res, form]

    R = len(deltas)
    mean, sd, lcb = one_sided_lcb(deltas, alpha)
    mean_ghg = math.fsum(ghg) / R
    mean_hg_sq = math.fsum(hg_sq) / R
    rhs = descent_rhs_l0(step_lr, mean_ghg, mean_hg_sq, l_up)
    if sd > 0:
        t_stat = (mean - rhs) / (sd / math.sqrt(R))
        p_value = float(stats.t.sf(t_stat, R - 1))
    else:
        p_value = 0.0 if mean > rhs else 1.0
    k_lo, k_hi = kappa if kappa is not None else (kappa_meas[0], kappa_meas[1])
    if free and getattr(optimizer, "fallback", "sgd") == "sgd" and kappa is None:
        k_lo, k_hi = min(k_lo, 1.0), max(k_hi, 1.0)
    sigma2_m = math.fsum(dev_sq) / R
    l2_applies = k_lo > 0 and step_lr <= k_lo / (l_up * k_hi ** 2)
    rhs_l2 = descent_rhs_l2(step_lr, grad_sq, k_lo, k_hi, l_up, sigma2_m)
    failed = lcb > rhs
    notes = list(flags)
    if skipped:
        notes.append(f"{skipped} of {R + skipped} steps were skipped (non-finite) and left out")
    if failed:
        notes.append("the mean decrease is significantly worse than lemma L0 allows: an assumption (unbiased "
                     "gradients, independence of H, or the L used) does not hold here")
    evidence = {
        "R": R, "alpha_k": step_lr, "L_up": l_up, "f": f0, "grad_norm_sq": grad_sq,
        "delta_mean": mean, "delta_sd": sd, "lcb": lcb, "rhs_l0": rhs, "p_value": p_value,
        "grad_H_grad": mean_ghg, "grad_H_grad_range": [min(ghg), max(ghg)], "mean_Hg_sq": mean_hg_sq,
        "sigma2_over_m": sigma2_m, "kappa": [k_lo, k_hi], "kappa_source": "given" if kappa is not None else "measured",
        "l2": {"rhs": rhs_l2, "applies": l2_applies, "lcb_below_rhs": lcb <= rhs_l2,
               "step_size_limit": k_lo / (l_up * k_hi ** 2) if k_lo > 0 else math.nan},
        "deltas": deltas,
    }
    evidence["verdict_if_not_rejected"] = (Verdict.NOT_APPLICABLE if rhs >= 0 else Verdict.PASS).value
    if failed:
        res = CheckResult("E6", assumption, lcb, rhs, 1.0 - alpha, Verdict.FAIL, evidence, notes)
    elif rhs >= 0:
        from convergence.results import not_applicable

        res = not_applicable("E6", assumption, f"the L0 right-hand side {rhs:.3g} is >= 0: at alpha_k = {step_lr:.3g} "
                             f"with L_up = {l_up:.3g} the lemma promises no descent, so the test cannot discriminate",
                             evidence=evidence, expected=rhs)
    else:
        res = CheckResult("E6", assumption, lcb, rhs, 1.0 - alpha, Verdict.PASS, evidence, notes)
    tol = _form_tolerance(dtype)
    worst = max(form_err)
    form_notes = list(flags)
    if worst > tol:
        form_notes.append("the applied step is not -alpha_k H_k g_k (momentum, weight decay or step scaling)")
    form = CheckResult("E6.form", "SQN form x+ = x - alpha H g", worst, tol, 1.0,
                       Verdict.FAIL if worst > tol else Verdict.PASS,
                       {"relative_error": form_err, "tolerance": tol}, form_notes)
    return [res, form]


def check_expected_descent_steps(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    full_data: tuple[Any, Any],
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    *,
    lipschitz: float,
    lipschitz_is_upper: bool = False,
    make_closure: MakeClosure | None = None,
    alpha: float = 0.01,
    lr: float | None = None,
) -> list[CheckResult]:
    r"""E6 in step form, for any optimizer (e.g. ``torch.optim.Adam``): no preconditioner is needed.

    For each batch the optimizer's own step is run from the snapshot (restored after each), giving
    :math:`x^{(r)}` and :math:`d_r = (x_k - x^{(r)})/\alpha_k`. L-smoothness alone gives, for any
    direction, :math:`\mathbb E\Delta \le -\alpha_k\nabla f^\top\mathbb E d + (L_{up}/2)\alpha_k^2
    \mathbb E\|d\|^2` (which is L0 when :math:`d = H_kg` with AS.2a and AS.4). FAIL if the
    one-sided LCB of :math:`\bar\Delta` exceeds it (the loss rose more than the smoothness constant
    allows: L is wrong or f is not smooth along the steps); NOT_APPLICABLE when the right-hand side
    is :math:`\ge 0` (nothing promised). Returns ``[E6]``.
    """
    from convergence.results import not_applicable

    if not lipschitz > 0:
        raise ValueError(f"lipschitz must be > 0, got {lipschitz}")
    make_closure = make_closure or closure_factory(model, optimizer, loss_fn)
    batches = list(batches)
    l_up = float(lipschitz) if lipschitz_is_upper else 2.0 * float(lipschitz)
    step_lr = float(optimizer.param_groups[0]["lr"]) if lr is None else float(lr)
    x_in, y_in = full_data
    params = [p for p in model.parameters() if p.requires_grad]
    snapshot = RunSnapshot(model, optimizer)
    deltas, lin, sq = [], [], []
    try:
        snapshot.restore()
        with torch.enable_grad():
            f0_t = loss_fn(model(x_in), y_in)
            full = torch.autograd.grad(f0_t, params)
        f0 = float(f0_t.detach())
        x0 = torch.cat([p.detach().reshape(-1) for p in params]).double()
        gf = torch.cat([g.detach().reshape(-1) for g in full]).double()
        for batch in batches:
            snapshot.restore()
            optimizer.step(make_closure(batch))
            with torch.no_grad():
                x1 = torch.cat([p.detach().reshape(-1) for p in params]).double()
                f1 = float(loss_fn(model(x_in), y_in))
            d = (x0 - x1) / step_lr
            deltas.append(f1 - f0)
            lin.append(float(gf @ d))
            sq.append(float(d @ d))
    finally:
        snapshot.restore()
    assumption = "expected descent (step form: L-smoothness along the optimizer's steps)"
    finite = [i for i, v in enumerate(deltas) if math.isfinite(v) and math.isfinite(sq[i])]
    if len(finite) < 2:
        return [not_applicable("E6", assumption, "fewer than 2 finite steps")]
    deltas = [deltas[i] for i in finite]
    R = len(deltas)
    mean, sd, lcb = one_sided_lcb(deltas, alpha)
    rhs = -step_lr * math.fsum(lin[i] for i in finite) / R + 0.5 * l_up * step_lr ** 2 * math.fsum(sq[i] for i in finite) / R
    if sd > 0:
        p_value = float(stats.t.sf((mean - rhs) / (sd / math.sqrt(R)), R - 1))
    else:
        p_value = 0.0 if mean > rhs else 1.0
    evidence = {"R": R, "alpha_k": step_lr, "L_up": l_up, "f": f0, "delta_mean": mean, "delta_sd": sd, "lcb": lcb,
                "rhs_step_form": rhs, "p_value": p_value, "deltas": deltas, "form": "step",
                "verdict_if_not_rejected": (Verdict.NOT_APPLICABLE if rhs >= 0 else Verdict.PASS).value}
    notes = ["step form (reads only the optimizer's own steps, whatever its preconditioner): tests "
             "L-smoothness along them"]
    if lcb > rhs:
        notes.append("the loss rose more than L-smoothness with L_up allows along these steps")
        return [CheckResult("E6", assumption, lcb, rhs, 1.0 - alpha, Verdict.FAIL, evidence, notes)]
    if rhs >= 0:
        return [not_applicable("E6", assumption, f"the right-hand side {rhs:.3g} is >= 0: the bound promises no "
                               "descent at this step size", evidence=evidence, expected=rhs)]
    return [CheckResult("E6", assumption, lcb, rhs, 1.0 - alpha, Verdict.PASS, evidence, notes)]
