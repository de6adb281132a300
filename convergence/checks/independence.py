r"""E5 — independence of the preconditioner from the current batch (AS.4: :math:`H_k \in \sigma(\xi_1..\xi_{k-1})`).

**E5a, counterfactual batch swap** (:func:`check_batch_swap`; exact and deterministic). From a
snapshot :math:`S_k` (``state_dict`` of model and optimizer, RNG states) the step is run once with
the batch :math:`\xi_k` and once, from the same snapshot, with an independent :math:`\xi'_k`.
A precondition-hook spy applies the operator *actually used* to form :math:`d_k` (``block.
precondition``, while the block is that operator) to :math:`q` fixed Rademacher probe matrices
:math:`V` per layer. PASS iff

.. math:: \|P(\xi)V - P(\xi')V\|_F \le \tau\,\|P(\xi)V\|_F,

:math:`\tau = 0` under ``torch.use_deterministic_algorithms(True)``, else :math:`10^{-12}`
(float64) or :math:`10^{-5}` (float32). Any failure is design-level: the operator reads the
current batch (e.g. KFAC's EMA of A and G updated before an inverse refresh). The snapshot is
restored afterwards, so the run continues exactly as if the check had not happened.

**E5b, data-flow audit** (:class:`DataFlowAudit`, :func:`check_data_flow`). Hook timing decides
when each factor statistic read data: the auditor fingerprints every factor's data-reading state
(EMA statistic update counts, secant-pair counts, Hessian-action update counts; a diagonal
block's running statistic) at the end of each step and again at the step's first precondition
hook. Within step :math:`k` the only data available is batch :math:`\xi_k`, so a change between
the two is a read of :math:`\xi_k` *before* :math:`d_k` was formed; a change after the hook is a
(legal) read after it. Each factor's provenance (the batch ids it has read) is accumulated; the
rule is that the ids read before :math:`d_k` are :math:`\subseteq\{\xi_1..\xi_{k-1}\}`, i.e. no
factor reads the current batch before the direction. Derived quantities (inverses, H refreshed
from already-read statistics) are not reads. This audit is stricter than E5a: KFAC with
``lag_factors=False`` fails it at every step, while E5a fails only at inverse refreshes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Sequence

import torch
from torch import nn

from convergence.checks import MakeClosure, RunSnapshot
from convergence.results import CheckResult, Verdict
from curvature.blocks import CurvatureBlock, DiagonalBlock, KroneckerBlock
from curvature.factors import EMACovarianceFactor, HessianActionFactor, SecantFactor

__all__ = ["swap_tolerance", "check_batch_swap", "DataFlowAudit", "check_data_flow", "check_independence_bias"]


def swap_tolerance(dtype: torch.dtype) -> float:
    r"""τ of E5a: 0 with deterministic algorithms, else 1e-12 (float64) or 1e-5 (lower precision)."""
    if torch.are_deterministic_algorithms_enabled():
        return 0.0
    return 1e-12 if dtype == torch.float64 else 1e-5


def _rademacher(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator, dtype=torch.int64).to(torch.float64).mul_(2).sub_(1)


def _probe_run(optimizer, make_closure: MakeClosure, batch: Any, probes: dict[str, torch.Tensor], q: int,
               generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    out: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {}

    def spy(step, name, block, inputs, direction):
        if name not in probes:
            probes[name] = _rademacher((q, *inputs.shape), generator)
        v = probes[name].to(dtype=inputs.dtype, device=inputs.device)
        out[name] = torch.stack([block.precondition(v[j]) for j in range(q)]).detach().clone()
        info["step"] = step

    def after(step_info):
        info["skipped"] = bool(step_info.skipped)

    handles = [optimizer.register_precondition_hook(spy), optimizer.register_step_hook(after)]
    try:
        optimizer.step(make_closure(batch))
    finally:
        for h in handles:
            h.remove()
    return out, info


def _same_batch(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same_batch(x, y) for x, y in zip(a, b))
    return a is b


def check_batch_swap(model: nn.Module, optimizer, make_closure: MakeClosure, batch: Any, alt_batch: Any, *,
                     probes: int = 8, seed: int = 0, tolerance: float | None = None) -> CheckResult:
    r"""E5a at the current state: is the operator applied at this step the same for ``batch`` and ``alt_batch``?

    Args:
        model, optimizer: the run (its state is snapshotted and restored; nothing changes).
        make_closure: ``make_closure(batch)`` -> the closure for ``optimizer.step``.
        batch, alt_batch: :math:`\xi_k` and an independent :math:`\xi'_k`.
        probes: :math:`q`, the number of Rademacher probe matrices per layer.
        seed: seed of the probes.
        tolerance: τ (default :func:`swap_tolerance` of the layers' dtype).

    Statistic: :math:`\|P(\xi)V - P(\xi')V\|_F/\|P(\xi)V\|_F` over all layers; FAIL if it exceeds τ,
    INCONCLUSIVE if either step was skipped or the two batches are identical.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    gen = torch.Generator().manual_seed(seed)
    probe_store: dict[str, torch.Tensor] = {}
    snapshot = RunSnapshot(model, optimizer)
    try:
        first, info1 = _probe_run(optimizer, make_closure, batch, probe_store, probes, gen)
        snapshot.restore()
        second, info2 = _probe_run(optimizer, make_closure, alt_batch, probe_store, probes, gen)
    finally:
        snapshot.restore()
    assumption = "AS.4 preconditioner independent of the current batch"
    notes: list[str] = []
    if info1.get("skipped") or info2.get("skipped") or not first or not second:
        return CheckResult("E5a", assumption, math.nan, 0.0, 1.0, Verdict.INCONCLUSIVE,
                           evidence={"skipped": [info1.get("skipped"), info2.get("skipped")]},
                           notes=["a step was skipped (non-finite) or applied no preconditioner"])
    if set(first) != set(second):
        return CheckResult("E5a", assumption, math.inf, 0.0, 1.0, Verdict.FAIL,
                           evidence={"layers": sorted(first), "alt_layers": sorted(second)},
                           notes=["the two batches preconditioned different sets of layers"])
    dtypes = {t.dtype for t in first.values()}
    tau = tolerance if tolerance is not None else max(swap_tolerance(d) for d in dtypes)
    per_layer = {}
    diff_sq = norm_sq = 0.0
    for name in first:
        a, b = first[name].double(), second[name].double()
        d, n = float(torch.linalg.vector_norm(a - b)), float(torch.linalg.vector_norm(a))
        per_layer[name] = {"diff": d, "norm": n, "relative": d / n if n > 0 else (0.0 if d == 0 else math.inf)}
        diff_sq += d * d
        norm_sq += n * n
    diff, norm = math.sqrt(diff_sq), math.sqrt(norm_sq)
    rel = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    verdict = Verdict.PASS if diff <= tau * norm else Verdict.FAIL
    if _same_batch(batch, alt_batch):
        from convergence.results import not_applicable

        return not_applicable("E5a", assumption, "batch and alt_batch are identical: the swap tests nothing",
                              expected=tau)
    if verdict is Verdict.FAIL:
        notes.append("the operator applied at this step depends on the current batch (design-level AS.4 violation)")
    return CheckResult("E5a", assumption, rel, tau, 1.0, verdict,
                       evidence={"step": info1.get("step"), "probes": probes, "tolerance": tau, "per_layer": per_layer,
                                 "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()},
                       notes=notes)


# ======================================================================================== E5b
def _read_state(block: CurvatureBlock) -> dict[str, Any]:
    """Fingerprints of what reads data in a block (counters, or a copy of a running statistic)."""
    out: dict[str, Any] = {}
    if isinstance(block, KroneckerBlock):
        for side, factor in (("a", block.a_factor), ("g", block.g_factor)):
            if isinstance(factor, EMACovarianceFactor):
                out[f"{side}:statistic"] = factor.updates
            elif isinstance(factor, HessianActionFactor):
                out[f"{side}:statistic"] = factor.covariance.updates
                out[f"{side}:hessian_action"] = factor.updates + sum(factor.skips.values())
            elif isinstance(factor, SecantFactor):
                out[f"{side}:pairs"] = factor.counters.pairs
            else:
                out[f"{side}:state"] = _tensor_fingerprint(factor.state_dict())
    elif isinstance(block, DiagonalBlock):
        out["statistic"] = (block.initialized, block.v.detach().clone())
    else:
        out["state"] = _tensor_fingerprint(block.state_dict())
    return out


def _tensor_fingerprint(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _tensor_fingerprint(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_tensor_fingerprint(v) for v in state]
    return state


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@dataclass
class DataFlowEvent:
    """What the factors read during one step: ``before`` (before d_k was formed) and ``after``."""

    step: int
    batch_id: Hashable
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    ids_read_before: list[Hashable] = field(default_factory=list)
    exempt: bool = False

    @property
    def violation(self) -> bool:
        return bool(self.before) and not self.exempt


class DataFlowAudit:
    """E5b auditor attached to a curvature optimizer through its hooks (reads only).

    Call :meth:`label` before a step to name its batch (default: the step number ``k``);
    :attr:`events` holds one :class:`DataFlowEvent` per step, :meth:`result` the verdict.

    Args:
        optimizer: a :class:`~optimizers.driver.CurvatureOptimizer`.
        exempt_first_step: do not count reads before the direction at the optimizer's step 0 (the
            theory's AS.4 is stated for k ≥ 2); strict by default.
    """

    def __init__(self, optimizer, *, exempt_first_step: bool = False) -> None:
        self.optimizer = optimizer
        self.exempt_first_step = bool(exempt_first_step)
        self.events: list[DataFlowEvent] = []
        self.provenance: dict[str, set] = {}
        self._label: Hashable | None = None
        self._state = self._snapshot()
        self._current: DataFlowEvent | None = None
        self._handles = [optimizer.register_precondition_hook(self._on_precondition),
                         optimizer.register_step_hook(self._on_step)]

    def label(self, batch_id: Hashable) -> None:
        """Name the batch of the next step."""
        self._label = batch_id

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "DataFlowAudit":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _snapshot(self) -> dict[str, Any]:
        return {f"{name}/{key}": value for name, block in self.optimizer.blocks.items()
                for key, value in _read_state(block).items()}

    def _changed(self, new: dict[str, Any]) -> list[str]:
        return sorted(k for k, v in new.items() if k not in self._state or not _equal(self._state[k], v))

    def _begin(self, step: int) -> DataFlowEvent:
        batch_id = self._label if self._label is not None else step
        self._label = None
        return DataFlowEvent(step=step, batch_id=batch_id, exempt=self.exempt_first_step and step == 0)

    def _on_precondition(self, step, name, block, inputs, direction) -> None:
        if self._current is not None and self._current.step == step:
            return  # statistics are folded in before the first block is applied
        event = self._current = self._begin(step)
        new = self._snapshot()
        event.before = self._changed(new)
        for key in event.before:
            self.provenance.setdefault(key, set()).add(event.batch_id)
        event.ids_read_before = sorted({i for ids in self.provenance.values() for i in ids}, key=repr)
        self._state = new

    def _on_step(self, info) -> None:
        event = self._current if self._current is not None and self._current.step == info.step else self._begin(info.step)
        new = self._snapshot()
        event.after = self._changed(new)
        for key in event.after:
            self.provenance.setdefault(key, set()).add(event.batch_id)
        self._state = new
        self._current = None
        self.events.append(event)

    def result(self) -> CheckResult:
        """FAIL if at some audited step a factor read the current batch before d_k was formed."""
        bad = [e for e in self.events if e.violation]
        evidence = {
            "steps": len(self.events),
            "violations": [{"step": e.step, "batch_id": e.batch_id, "read_before_direction": e.before}
                           for e in bad[:100]],
            "events": [{"step": e.step, "batch_id": e.batch_id, "before": e.before, "after": e.after,
                        "exempt": e.exempt, "num_ids_read_before": len(e.ids_read_before)} for e in self.events[:200]],
        }
        if not self.events:
            return CheckResult("E5b", "AS.4 data flow", math.nan, 0, 1.0, Verdict.INCONCLUSIVE, evidence,
                               ["no step was audited"])
        notes = []
        if bad:
            notes.append("factor statistics read the current batch before the direction was formed "
                         "(the operator may depend on xi_k; run with lag_factors=True)")
        return CheckResult("E5b", "AS.4 data flow", float(len(bad)), 0, 1.0,
                           Verdict.FAIL if bad else Verdict.PASS, evidence, notes)


def check_data_flow(model: nn.Module, optimizer, make_closure: MakeClosure, batches: Iterable[Any], *,
                    batch_ids: Sequence[Hashable] | None = None, exempt_first_step: bool = False,
                    restore: bool = True) -> CheckResult:
    """E5b over the steps on ``batches`` (one step per batch), then restore the run (``restore=True``).

    ``batch_ids`` name the batches (default: the optimizer's step numbers).
    """
    snapshot = RunSnapshot(model, optimizer) if restore else None
    audit = DataFlowAudit(optimizer, exempt_first_step=exempt_first_step)
    try:
        for i, batch in enumerate(batches):
            if batch_ids is not None:
                audit.label(batch_ids[i])
            optimizer.step(make_closure(batch))
    finally:
        audit.detach()
        if snapshot is not None:
            snapshot.restore()
    return audit.result()


# ======================================================================================== E5c
def check_independence_bias(model: nn.Module, loss_fn, full_data: tuple[Any, Any], optimizer, batches: Sequence[Any], *,
                            make_closure: MakeClosure, alpha: float = 0.01, bootstrap: int = 2000,
                            seed: int = 0) -> CheckResult:
    r"""E5c -- the size of the bias that a batch-dependent preconditioner introduces (run when E5a fails).

    From the current state, for each batch :math:`\xi_r` the step is run (state restored after each)
    with a spy that, while the block is the operator :math:`H(\xi_r)` applied at that step, computes
    :math:`z_r = H(\xi_r)\,(g(\xi_r) - \nabla f)` (per layer, concatenated) and :math:`H(\xi_r)\nabla f`.
    The bias of the preconditioned step is

    .. math:: b = \mathbb E[H(\xi)g(\xi)] - \mathbb E[H(\xi)]\nabla f = \mathbb E[z],

    zero under AS.4. :math:`\hat B = \|\bar z\|^2 - \hat V/R` is unbiased for :math:`\|b\|^2`
    (:func:`~convergence.checks.unbiasedness.bias_norm_estimate`); the statistic is
    :math:`\|b\|/\|\overline{H\nabla f}\|` with a percentile-bootstrap interval. FAIL when the lower
    :math:`1-\alpha` bound of :math:`\hat B` is above 0 (a detectable bias), PASS otherwise (the
    dependence exists, E5a, but biases the step by less than the noise can reveal).
    """
    import numpy as np

    from convergence.checks.unbiasedness import bias_norm_estimate

    x_in, y_in = full_data
    params = [p for p in model.parameters() if p.requires_grad]
    import copy as _copy

    reference = _copy.deepcopy(model)
    with torch.enable_grad():
        loss = loss_fn(reference(x_in), y_in)
        full = torch.autograd.grad(loss, [p for p in reference.parameters() if p.requires_grad])
    del reference
    grad_of = {id(p): g.detach() for p, g in zip(params, full)}
    grad_mat = {}
    for name, slot in optimizer.slots.items():
        w = slot.adapter.module.weight
        b = slot.adapter.module.bias if slot.adapter.has_bias else None
        grad_mat[name] = slot.adapter.to_matrix(grad_of[id(w)], None if b is None else grad_of[id(b)])
    zs, hfs = [], []
    snapshot = RunSnapshot(model, optimizer)
    try:
        for batch in batches:
            snapshot.restore()
            seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

            def spy(step, name, block, inputs, direction, seen=seen):
                raw = optimizer.slots[name].adapter.grad_matrix().detach()
                gf = grad_mat[name].to(raw)
                seen[name] = (block.precondition(raw - gf).detach().double().reshape(-1),
                              block.precondition(gf).detach().double().reshape(-1))

            handle = optimizer.register_precondition_hook(spy)
            try:
                optimizer.step(make_closure(batch))
            finally:
                handle.remove()
            if set(seen) != set(optimizer.slots):
                continue
            zs.append(torch.cat([seen[n][0] for n in optimizer.slots]))
            hfs.append(torch.cat([seen[n][1] for n in optimizer.slots]))
    finally:
        snapshot.restore()
    assumption = "AS.4 size of the bias E[H g] - E[H] grad f"
    R = len(zs)
    if R < 3:
        from convergence.results import not_applicable

        return not_applicable("E5c", assumption, f"only {R} usable steps (needs >= 3)")
    Z = torch.stack(zs)
    ref = float(torch.linalg.vector_norm(torch.stack(hfs).mean(0)))
    gram = (Z @ Z.T).cpu().numpy()
    b_hat = float(bias_norm_estimate(gram)[0])
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, R, R), minlength=R) for _ in range(bootstrap)])
    boot = bias_norm_estimate(gram, counts)
    lower = float(np.quantile(boot, alpha))
    upper = float(np.quantile(boot, 1.0 - alpha))
    rel = math.sqrt(max(b_hat, 0.0)) / ref if ref > 0 else math.inf
    detected = lower > 0
    evidence = {"R": R, "bias_norm_sq_estimate": b_hat, "bias_norm_sq_ci": [lower, upper],
                "relative_bias": rel, "relative_bias_upper": math.sqrt(max(upper, 0.0)) / ref if ref > 0 else math.inf,
                "H_grad_norm": ref}
    notes = [f"|b|/|E[H] grad f| = {rel:.3g} (bias of the preconditioned step caused by the batch dependence)"]
    if detected:
        notes.append("the bias is detectable: E[H_k g_k] != E[H_k] grad f, the descent lemma's AS.4 step fails")
    return CheckResult("E5c", assumption, rel, "|b|^2 lower bound <= 0 (no detectable bias)", 1.0 - alpha,
                       Verdict.FAIL if detected else Verdict.PASS, evidence, notes)
