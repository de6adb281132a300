r"""The harness engine: train with the monitor on, run each selected check under its own guard, report.

Used by the public :func:`convergence.check` (any model, any optimizer built from the blocks, and
any ``torch.optim`` optimizer for the checks that only need steps) and by the CLI
(``python -m convergence check``). One run:

1. **train** ``steps`` steps on batches of the *training* loader with
   :math:`\alpha_k = \text{lr}\,(k+1)^{-\beta}`, through a closure wrapped by a
   :class:`GradientTap`: the tap records the gradient the optimizer actually received at every step
   (for a :class:`~optimizers.driver.CurvatureOptimizer` through its step hook, ``StepInfo.grads``;
   for any other optimizer from ``p.grad`` right after the first closure call of the step), and the
   trainer keeps every batch it fed to the optimizer and :math:`\nabla f(x_k)` on the full data;
2. **E0 run health** (always first): the loss must stay finite, must not end above where it
   started, and at most ``max_skip_fraction`` of the steps may be skipped or reverted;
3. the selected checks, **each under its own guard** (a crash is an ``ERROR`` result for that check
   only): E1 on the snapshot iterates; E2 on the tapped gradients against :math:`\nabla f(x_k)`;
   E3 on the recorded training batches (the batches the optimizer got); E4 on the monitor's records
   (including the probes of the applied operator); E5a/b/c, E6, E7d at the snapshots; E7a-c on the
   records; E8 over ``rate_seeds`` runs (plus the plateau comparison m vs 4m for a constant step);
4. Holm-Bonferroni over the statistical results.

Verdicts: PASS only when the check could have failed on this run; NOT_APPLICABLE (with the reason)
when its hypothesis does not hold or its statistic cannot discriminate; ERROR when it raised.
Exit status (:attr:`Report.exit_status`): 0 every check ran and none FAILed, 1 some check
(E0 included) FAILed, 2 the run could not be made or a check raised (ERROR).
"""

from __future__ import annotations

import copy
import math
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from convergence.results import CheckResult, Verdict, error_result, not_applicable

__all__ = ["CHECKS", "HarnessConfig", "Trace", "GradientTap", "Report", "train", "run_harness", "check_run_health",
           "snapshot_steps", "EXIT_OK", "EXIT_FAIL", "EXIT_ERROR"]

CHECKS = ("E1", "E2", "E3", "E4", "E5", "E6", "E7", "E8")
#: the checks that only need the optimizer's steps (any ``torch.optim`` optimizer)
STEP_ONLY_CHECKS = ("E2", "E3", "E6", "E7", "E8")
EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


class HarnessError(RuntimeError):
    """The run could not be made (bad problem, missing data ...): exit status 2."""


# ============================================================================================ config
@dataclass
class HarnessConfig:
    """Settings of one harness run (the CLI flags, and the keywords of :func:`convergence.check`).

    ``lr`` None keeps the optimizer's own learning rate as the base of the schedule
    :math:`\\alpha_k = \\text{lr}\\,(k+1)^{-\\beta}`. ``max_skip_fraction`` is E0's limit on skipped or
    reverted steps; ``probe_every`` the interval (in steps) of E4's probes of the applied operator
    (0: ``max(1, steps // 10)``); ``plateau`` runs E8's constant-step comparison of batch sizes m and 4m.
    """

    steps: int = 60
    checks: tuple[str, ...] = CHECKS
    lr: float | None = None
    beta: float = 0.0
    seed: int = 0
    checkpoints: int = 3
    rate_seeds: int = 4
    descent_batches: int = 64
    alpha: float = 0.01
    max_skip_fraction: float = 0.1
    probes: int = 4
    probe_every: int = 0
    plateau: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        unknown = [c for c in self.checks if c not in CHECKS]
        if unknown:
            raise ValueError(f"unknown check(s) {unknown}; choose from {CHECKS}")
        self.checks = tuple(c for c in CHECKS if c in self.checks)
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta!r}")
        if self.checkpoints < 1 or self.rate_seeds < 1 or self.descent_batches < 2:
            raise ValueError("checkpoints and rate_seeds must be >= 1 and descent_batches >= 2")
        if "E8" in self.checks and self.rate_seeds < 2:
            raise ValueError("E8 needs rate_seeds >= 2 (the protocol asks for >= 8)")
        if "E8" in self.checks and self.steps < 4:
            raise ValueError("E8 needs steps >= 4 to fit a tail slope")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not 0.0 <= self.max_skip_fraction < 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1), got {self.max_skip_fraction!r}")


# ============================================================================================ source
@dataclass
class Source:
    """What the engine trains on: the problem (model, loss, evaluation set defining f), the optimizer
    factory, and where training batches come from.

    ``make_loader(seed, batch_size, num_batches)`` builds a fresh training loader (None when the user
    gave a fixed loader, then ``loader`` is iterated); ``make_closure(optimizer)`` the closure factory
    (default: the problem's standard closure).
    """

    problem: Any
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    batch_size: int
    make_loader: Callable[[int, int, int], Iterable] | None = None
    loader: Iterable | None = None
    make_closure: Callable[[Any], Callable[[Any], Callable[[], torch.Tensor]]] | None = None
    theory_mode: bool | None = None
    name: str = "problem"

    def closure_factory(self, optimizer):
        make = self.make_closure(optimizer) if self.make_closure is not None else self.problem.make_closure(optimizer)
        from convergence.whole_model import is_matrix_free_optimizer, with_targets

        if is_matrix_free_optimizer(optimizer):  # its step needs the batch targets: the closures carry them
            return with_targets(make)
        return make

    def training_loader(self, seed: int, num_batches: int, batch_size: int | None = None) -> Iterable:
        if self.make_loader is not None:
            return self.make_loader(seed, batch_size or self.batch_size, num_batches)
        if batch_size not in (None, self.batch_size):
            raise HarnessError("a fixed loader was given: batches of another size cannot be drawn")
        assert self.loader is not None
        return self.loader


def is_curvature_optimizer(optimizer: Any) -> bool:
    """True for optimizers built from the blocks (they expose the monitor's hooks and ``slots``)."""
    return all(hasattr(optimizer, a) for a in ("register_precondition_hook", "register_step_hook", "slots"))


# ============================================================================================ tap
class GradientTap:
    r"""Record the gradient the optimizer received at every step, as one flat vector (parameter order
    of ``model.named_parameters()``, trainable only).

    Every closure made by :meth:`wrap` copies ``p.grad`` after its *first* call in a step (later calls,
    e.g. K-BFGS's pass at the new point, are not the step's gradient). For a curvature optimizer the
    block layers' entries are then replaced by what the optimizer itself reports to its step hook
    (``StepInfo.grads``, split back into weight and bias by the layer's adapter), so E2 measures the
    gradient that was preconditioned. ``gradients[k]`` is the vector of step ``k``.
    """

    def __init__(self, model: nn.Module, optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        offsets, off = {}, 0
        for p in self.params:
            offsets[id(p)] = (off, p.numel())
            off += p.numel()
        self.offsets, self.n = offsets, off
        self.gradients: dict[int, torch.Tensor] = {}
        self.step = 0
        self._called = False
        self.hooked = False
        self._handle = None
        if is_curvature_optimizer(optimizer):
            self._handle = optimizer.register_step_hook(self._on_step)
            self.hooked = True

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def begin(self, step: int) -> None:
        self.step, self._called = step, False

    def wrap(self, closure: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        targets = getattr(closure, "targets", None)  # a matrix-free optimizer's closure carries its targets

        def tapped() -> torch.Tensor:
            loss = closure()
            if not self._called:
                self._called = True
                flat = torch.zeros(self.n, dtype=torch.float64, device=self.params[0].device)
                for p in self.params:
                    if p.grad is not None:
                        o, k = self.offsets[id(p)]
                        flat[o:o + k] = p.grad.detach().reshape(-1).to(torch.float64)
                self.gradients[self.step] = flat
            return loss

        if targets is not None:
            tapped.targets = targets  # type: ignore[attr-defined]
        return tapped

    def _on_step(self, info) -> None:
        flat = self.gradients.get(self.step)
        if flat is None or not info.grads:
            return
        for name, g in info.grads.items():
            slot = self.optimizer.slots[name]
            d_w, d_b = slot.adapter.split_matrix(g)
            for p, piece in ((slot.module.weight, d_w), (getattr(slot.module, "bias", None), d_b)):
                if p is None or piece is None or id(p) not in self.offsets:
                    continue
                o, k = self.offsets[id(p)]
                flat[o:o + k] = piece.detach().reshape(-1).to(torch.float64)


# ============================================================================================ training
@dataclass
class Trace:
    """What a training run leaves for the checks (steps are 0-based; ``grad_steps`` are 1-based N)."""

    grad_steps: list[int] = field(default_factory=list)
    grad_norm_sq: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    snapshots: dict[int, Any] = field(default_factory=dict)
    iterates: dict[int, torch.Tensor] = field(default_factory=dict)
    after: dict[int, torch.Tensor] = field(default_factory=dict)
    batches: dict[int, Any] = field(default_factory=dict)  # k -> batch of step k (snapshot steps)
    all_batches: list[Any] = field(default_factory=list)  # every batch fed to the optimizer (up to a cap)
    step_lrs: list[float] = field(default_factory=list)  # alpha_k of every step
    batch_sizes: list[int] = field(default_factory=list)
    full_gradients: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> grad f(x_k)
    closure_gradients: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> what the optimizer got
    sigma_points: dict[int, torch.Tensor] = field(default_factory=dict)
    final_loss: float = math.nan
    skipped_steps: int = 0
    steps: int = 0


def _flat(model: nn.Module) -> torch.Tensor:
    from convergence.checks.variance import flat_parameters

    return flat_parameters(model)


def gradient_steps(steps: int, budget: int = 400) -> list[int]:
    """0-based steps at which the full gradient is measured: all, or a geometric grid of ``budget``."""
    if steps <= budget:
        return list(range(steps))
    grid = np.unique(np.round(np.geomspace(1, steps, budget)).astype(int)) - 1
    return sorted(set(grid.tolist()) | {0, steps - 1})


def snapshot_steps(steps: int, count: int) -> list[int]:
    """``count`` snapshot steps spread over ``0 .. steps-1`` (the last one when ``count`` is 1)."""
    count = min(count, steps)
    if count == 1:
        return [steps - 1]
    return sorted({int(round(i * (steps - 1) / (count - 1))) for i in range(count)})


def _forever(loader: Iterable):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise HarnessError("the data loader yielded no batch")


def _batch_size(batch: Any) -> int | None:
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _skipped(optimizer) -> int:
    counters = getattr(optimizer, "counters", None)
    if not isinstance(counters, dict):
        return 0
    # a matrix-free optimizer's rejected step (no decrease found) leaves the parameters unchanged, like a skip
    return (int(counters.get("skipped_steps", 0)) + int(counters.get("reverted_steps", 0))
            + int(counters.get("rejected_steps", 0)))


def train(problem, optimizer, loader, *, steps: int, lr: float, beta: float, make_closure=None,
          snapshot_steps: Sequence[int] = (), sigma_steps: Sequence[int] = (), tap: GradientTap | None = None,
          keep_batches: int = 4096, keep_gradients: bool = False, progress: bool = False,
          desc: str = "train") -> Trace:
    """Run ``steps`` steps of ``optimizer`` on batches of ``loader`` with alpha_k = lr (k+1)^-beta.

    Records the full loss and ``|grad f(x_k)|^2`` (every step up to 400, then a geometric grid), every
    batch fed to the optimizer (up to ``keep_batches``), snapshots (model, optimizer, RNG) at
    ``snapshot_steps``, and with ``keep_gradients`` ``grad f(x_k)`` and the tapped gradients.
    """
    from convergence.checks import RunSnapshot
    from convergence.checks.variance import full_gradient

    model, loss_fn = problem.model, problem.loss_fn
    x_all, y_all = problem.full_batch
    device = next(p for p in model.parameters()).device
    trace = Trace(steps=steps)
    grad_at = set(gradient_steps(steps))
    snap = set(snapshot_steps)
    make = make_closure if make_closure is not None else problem.make_closure(optimizer)
    batches = _forever(loader)
    skipped_before = _skipped(optimizer)
    iterator: Iterable[int] = range(steps)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(iterator, desc=desc, unit="step", leave=False, file=sys.stderr)
        iterator = bar
    for k in iterator:
        alpha_k = lr * (k + 1) ** (-beta)
        for group in optimizer.param_groups:
            group["lr"] = alpha_k
        trace.step_lrs.append(alpha_k)
        if k in grad_at:
            f, g = full_gradient(model, loss_fn, x_all, y_all)
            trace.grad_steps.append(k + 1)
            trace.grad_norm_sq.append(float(g.double().pow(2).sum()) if torch.isfinite(g).all() else math.inf)
            trace.losses.append(f)
            trace.lrs.append(alpha_k)
            if keep_gradients:
                trace.full_gradients[k] = g.detach().to(torch.float64)
            if bar is not None:
                bar.set_postfix(loss=f"{f:.4g}", refresh=False)
        if k in snap:
            trace.snapshots[k] = RunSnapshot(model, optimizer)
            trace.iterates[k] = _flat(model)
        if k in sigma_steps:
            trace.sigma_points[k] = _flat(model)
        batch = _to_device(next(batches), device)
        if len(trace.all_batches) < keep_batches:
            trace.all_batches.append(batch)
        size = _batch_size(batch)
        if size is not None:
            trace.batch_sizes.append(size)
        closure = make(batch)
        if tap is not None:
            tap.begin(k)
            closure = tap.wrap(closure)
        optimizer.step(closure)
        if k in snap:
            trace.after[k] = _flat(model)
            trace.batches[k] = batch
    if bar is not None:
        bar.close()
    with torch.no_grad():
        trace.final_loss = float(loss_fn(model(x_all), y_all))
    trace.skipped_steps = _skipped(optimizer) - skipped_before
    if tap is not None:
        trace.closure_gradients = dict(tap.gradients)
    return trace


# ============================================================================================ E0
def check_run_health(trace: Trace, *, max_skip_fraction: float = 0.1, divergence_factor: float = 10.0) -> CheckResult:
    r"""E0 -- run health, reported first: FAIL if the loss became non-finite or exceeded
    ``divergence_factor`` times :math:`\max(|f_0|, \text{tiny})` above :math:`f_0` (diverged), if the final
    loss is above the initial one, or if more than ``max_skip_fraction`` of the steps were skipped or
    reverted. Always applicable: a run that trains passes it, a run that does not fails it.
    """
    losses = list(trace.losses) + [trace.final_loss]
    f0, f_end = losses[0], trace.final_loss
    problems = []
    finite = all(math.isfinite(v) for v in losses)
    scale = max(abs(f0), 1e-12) if math.isfinite(f0) else math.nan
    worst = max((v for v in losses if math.isfinite(v)), default=math.nan)
    if not finite:
        first = next(i for i, v in enumerate(losses) if not math.isfinite(v))
        problems.append(f"the loss became non-finite (at evaluation {first})")
    elif worst - f0 > divergence_factor * scale:
        problems.append(f"the loss diverged: max f = {worst:.4g} from f_0 = {f0:.4g}")
    if math.isfinite(f_end) and math.isfinite(f0) and f_end > f0:
        problems.append(f"the final loss {f_end:.4g} is worse than the initial loss {f0:.4g}")
    fraction = trace.skipped_steps / max(trace.steps, 1)
    if fraction > max_skip_fraction:
        problems.append(f"{trace.skipped_steps} of {trace.steps} steps were skipped or reverted "
                        f"(more than {max_skip_fraction:.0%})")
    evidence = {"f_initial": f0, "f_final": f_end, "f_max": worst, "finite": finite,
                "skipped_or_reverted": trace.skipped_steps, "steps": trace.steps,
                "max_skip_fraction": max_skip_fraction, "divergence_factor": divergence_factor,
                "deterministic_fail": bool(problems)}
    statistic = f_end - f0 if math.isfinite(f_end) and math.isfinite(f0) else math.inf
    expected = f"f_final <= f_0, finite, no divergence, skipped <= {max_skip_fraction:.0%}"
    return CheckResult("E0", "run health (the run trains)", statistic, expected, 1.0,
                       Verdict.FAIL if problems else Verdict.PASS, evidence, problems)


# ============================================================================================ context
@dataclass
class Context:
    source: Source
    config: HarnessConfig
    optimizer: Any
    monitor: Any
    trace: Trace
    lr: float
    results: list[CheckResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lipschitz_hat: float | None = None
    lipschitz_h: float | None = None
    sigma_history: list[tuple[int, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    whole_model: Any = None  # the WholeModelMonitor of a matrix-free optimizer (convergence.whole_model)

    @property
    def problem(self):
        return self.source.problem

    @property
    def curvature(self) -> bool:
        return self.monitor is not None


def _tag(results: CheckResult | list[CheckResult], step: int | None) -> list[CheckResult]:
    items = results if isinstance(results, list) else [results]
    if step is None:
        return items
    return [replace(r, check=f"{r.check}@{step}") for r in items]


def _guard(ctx: Context, check: str, fn: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    """Run one check; a crash becomes an ERROR result for that check only."""
    try:
        out = fn()
    except HarnessError:
        raise
    except Exception as exc:  # noqa: BLE001 - a crashing check is reported, the others still run
        ctx.errors.append(f"{check}: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        out = [error_result(check, exc)]
    ctx.results.extend(out)
    return out


def _restore(ctx: Context, k: int) -> None:
    ctx.trace.snapshots[k].restore()


def _no_preconditioner(check: str, assumption: str) -> CheckResult:
    return not_applicable(check, assumption, "the optimizer has no curvature blocks (not built from the blocks): "
                          "there is no preconditioner H_k to check")


def _sigma_history(ctx: Context) -> list[tuple[int, float]]:
    from convergence.checks.variance import gradient_noise, loaded_parameters

    if not ctx.sigma_history:
        p = ctx.problem
        x, y = p.full_batch
        for k, theta in sorted(ctx.trace.sigma_points.items()):
            with loaded_parameters(p.model, theta):
                ctx.sigma_history.append((k, gradient_noise(p.model, p.loss_fn, x, y).sigma1_sq))
    return ctx.sigma_history


def _lipschitz_for_bounds(ctx: Context) -> tuple[float | None, bool]:
    """(L, is_upper): the problem's declared global bound if known, else max(L_hat, L_H) (doubled later)."""
    if ctx.problem.lipschitz is not None:
        return float(ctx.problem.lipschitz), True
    vals = [v for v in (ctx.lipschitz_hat, ctx.lipschitz_h) if v is not None and math.isfinite(v)]
    return (max(vals), False) if vals else (None, False)


# ============================================================================================ checks
def _run_e1(ctx: Context, report: bool = True) -> list[CheckResult]:
    from convergence.checks.smoothness import check_smoothness

    p, tr = ctx.problem, ctx.trace
    pts, steps, pairs = [], [], []
    for k in sorted(tr.iterates):
        pairs.append((len(pts), len(pts) + 1))
        pts.extend([tr.iterates[k], tr.after[k]])
        steps.extend([k, k + 1])
    x, y = p.full_batch
    res = check_smoothness(p.model, p.loss_fn, x, y, pts, centers=[i for i, _ in pairs], steps=steps,
                           iterate_pairs=pairs, seed=ctx.config.seed)
    ctx.lipschitz_hat = float(res.evidence.get("L_hat", math.nan))
    ctx.lipschitz_h = float(res.evidence.get("L_H", math.nan))
    if p.lipschitz is not None:
        res.evidence["declared_L"] = float(p.lipschitz)
        if res.evidence.get("L_hat", 0.0) > p.lipschitz * (1 + 1e-6):
            res.notes.append(f"L_hat = {res.evidence['L_hat']:.4g} exceeds the problem's analytic L = {p.lipschitz:.4g}")
    return [res]


def _ensure_lipschitz(ctx: Context) -> None:
    """E6/E7/E8 need L_hat; compute E1's estimates (without reporting E1) when E1 was not requested."""
    if ctx.lipschitz_hat is None:
        _run_e1(ctx)


def _run_e2(ctx: Context) -> list[CheckResult]:
    from convergence.checks.unbiasedness import check_unbiasedness_along_run

    tr = ctx.trace
    steps = sorted(set(tr.closure_gradients) & set(tr.full_gradients))
    return [check_unbiasedness_along_run([tr.closure_gradients[k] for k in steps],
                                         [tr.full_gradients[k] for k in steps], steps=steps,
                                         blocks=_parameter_blocks(ctx.problem.model), alpha=ctx.config.alpha,
                                         seed=ctx.config.seed)]


def _parameter_blocks(model: nn.Module) -> list[tuple[str, int]]:
    sizes: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            layer = name.rsplit(".", 1)[0] if "." in name else name
            sizes[layer] = sizes.get(layer, 0) + p.numel()
    return list(sizes.items())


def _run_e3(ctx: Context, k: int) -> list[CheckResult]:
    from convergence.checks.variance import check_variance_of_batches

    from convergence.checks.variance import loaded_parameters

    p, tr = ctx.problem, ctx.trace
    x, y = p.full_batch
    replacement = ctx.source.theory_mode is not False
    with loaded_parameters(p.model, tr.iterates[k]):
        res = check_variance_of_batches(p.model, p.loss_fn, x, y, tr.all_batches, replacement=replacement,
                                        alpha=ctx.config.alpha, seed=ctx.config.seed + k,
                                        sigma_history=list(_sigma_history(ctx)))
    if not replacement:
        res.notes.append("no theory mode: V(m) predicted for uniform subsets (finite-population correction)")
    return _tag(res, k)


def _run_e4(ctx: Context) -> list[CheckResult]:
    from convergence.checks.preconditioner import check_applied_operator, check_preconditioner

    if ctx.whole_model is not None:
        from convergence.whole_model import (check_whole_model_preconditioner, check_whole_model_step_form,
                                             operator_reason)

        reason = operator_reason(ctx.optimizer)
        if reason is not None:
            return [not_applicable("E4", "AS.3 bounded preconditioner", reason),
                    not_applicable("E4.apply", "applied operator", reason)]
        res = check_whole_model_preconditioner(ctx.whole_model)
        ctx.extra["e4_series"] = res.evidence.get("series")
        return [res, check_whole_model_step_form(ctx.whole_model)]
    if not ctx.curvature:
        return [_no_preconditioner("E4", "AS.3 bounded preconditioner"),
                _no_preconditioner("E4.apply", "applied operator = to_dense()")]
    res = check_preconditioner(ctx.monitor)
    ctx.extra["e4_series"] = res.evidence.get("series")
    return [res, check_applied_operator(ctx.monitor)]


def _take(loader: Iterable, count: int) -> list[Any]:
    out = []
    for batch in _forever(loader):
        out.append(batch)
        if len(out) >= count:
            break
    return out


def _fresh_batches(ctx: Context, seed: int, count: int) -> list[Any] | None:
    """``count`` batches from a fresh copy of the training loader (None for a fixed user loader)."""
    device = next(ctx.problem.model.parameters()).device
    if ctx.source.make_loader is None:
        return None
    return [_to_device(b, device) for b in _take(ctx.source.training_loader(seed, count), count)]


def _other_batches(ctx: Context, k: int, seed: int, count: int) -> list[Any]:
    """Batches independent of step k's: a fresh loader when possible, else the run's other batches."""
    fresh = _fresh_batches(ctx, seed, count)
    if fresh is not None:
        return fresh
    pool = [b for i, b in enumerate(ctx.trace.all_batches) if i != k]
    if len(pool) < count:
        raise HarnessError(f"needs {count} batches other than step {k}'s; the run recorded {len(pool)}")
    return pool[:count]


def _run_e5(ctx: Context, k: int) -> list[CheckResult]:
    from convergence.checks.independence import check_batch_swap, check_data_flow, check_independence_bias

    if ctx.whole_model is not None:
        from convergence.whole_model import AS4_REASON, operator_reason

        reason = operator_reason(ctx.optimizer) or AS4_REASON
        return _tag([not_applicable("E5a", "AS.4 preconditioner independent of the batch", reason),
                     not_applicable("E5b", "AS.4 data flow", reason),
                     not_applicable("E5c", "AS.4 size of the bias", reason)], k)
    if not ctx.curvature:
        return _tag([_no_preconditioner("E5a", "AS.4 preconditioner independent of the batch"),
                     _no_preconditioner("E5b", "AS.4 data flow"),
                     _no_preconditioner("E5c", "AS.4 size of the bias")], k)
    a, p = ctx.config, ctx.problem
    make = ctx.source.closure_factory(ctx.optimizer)
    alt = _other_batches(ctx, k, 20_000 + 97 * k + a.seed, 4)
    out: list[CheckResult] = []
    _restore(ctx, k)
    swap = _tag(check_batch_swap(p.model, ctx.optimizer, make, ctx.trace.batches[k], alt[0], seed=a.seed + k), k)[0]
    out.append(swap)
    _restore(ctx, k)
    out += _tag(check_data_flow(p.model, ctx.optimizer, make, [ctx.trace.batches[k]] + alt[1:]), k)
    if swap.verdict is Verdict.FAIL:
        batches = _other_batches(ctx, k, 40_000 + 97 * k + a.seed, max(a.descent_batches, 8))
        _restore(ctx, k)
        out += _tag(check_independence_bias(p.model, p.loss_fn, p.full_batch, ctx.optimizer, batches,
                                            make_closure=make, alpha=a.alpha, seed=a.seed + k), k)
    else:
        out += _tag(not_applicable("E5c", "AS.4 size of the bias E[H g] - E[H] grad f",
                                   f"E5a did not fail ({swap.verdict.value}): H_k does not depend on the current "
                                   "batch, so there is no bias to quantify"), k)
    _restore(ctx, k)
    return out


def _run_e6(ctx: Context, k: int) -> list[CheckResult]:
    from convergence.checks.descent import check_expected_descent, check_expected_descent_steps

    a, p = ctx.config, ctx.problem
    _ensure_lipschitz(ctx)
    lipschitz, is_upper = _lipschitz_for_bounds(ctx)
    if lipschitz is None or not lipschitz > 0:
        return _tag(not_applicable("E6", "expected descent lemma L0", "no positive smoothness constant L "
                                   "could be estimated (E1)"), k)
    batches = _other_batches(ctx, k, 30_000 + 97 * k + a.seed, a.descent_batches)
    _restore(ctx, k)
    make = ctx.source.closure_factory(ctx.optimizer)
    lr_k = ctx.lr * (k + 1) ** (-a.beta)
    if ctx.curvature:
        res = check_expected_descent(p.model, p.loss_fn, p.full_batch, ctx.optimizer, batches, lipschitz=lipschitz,
                                     lipschitz_is_upper=is_upper, make_closure=make, alpha=a.alpha, lr=lr_k)
    else:
        res = check_expected_descent_steps(p.model, p.loss_fn, p.full_batch, ctx.optimizer, batches,
                                           lipschitz=lipschitz, lipschitz_is_upper=is_upper, make_closure=make,
                                           alpha=a.alpha, lr=lr_k)
        res = [res] if isinstance(res, CheckResult) else list(res)
        if not any(r.check == "E6.form" for r in res):
            res.append(not_applicable("E6.form", "SQN form x+ = x - alpha H g", "the optimizer has no curvature "
                                      "blocks (not built from the blocks): there is no captured H_k whose step "
                                      "-alpha_k H_k g_k could be compared with the displacement"))
    _restore(ctx, k)
    return _tag(res, k)


class _StepView:
    """A minimal step record (step, lr, alpha, batch size) for the schedule/batch checks of any optimizer."""

    def __init__(self, step: int, lr: float, batch_size: int | None) -> None:
        self.step, self.lr, self.step_scale, self.batch_size = step, lr, 1.0, batch_size
        self.alpha, self.layers, self.skipped = lr, {}, False


def _run_e7a(ctx: Context) -> list[CheckResult]:
    from convergence.checks.stepsize import check_step_size

    if ctx.whole_model is not None:
        from convergence.whole_model import check_whole_model_step_size, operator_reason

        reason = operator_reason(ctx.optimizer)
        if reason is not None:
            return [not_applicable("E7a", "step size alpha_k <= kappa_lo/(L kappa_hi^2)", reason)]
        _ensure_lipschitz(ctx)
        l_hat = max(v for v in (ctx.lipschitz_hat, ctx.lipschitz_h) if v is not None and math.isfinite(v))
        return [check_whole_model_step_size(ctx.whole_model, l_hat)]
    if not ctx.curvature:
        return [_no_preconditioner("E7a", "step size alpha_k <= kappa_lo/(L kappa_hi^2)")]
    _ensure_lipschitz(ctx)
    l_hat = max(v for v in (ctx.lipschitz_hat, ctx.lipschitz_h) if v is not None and math.isfinite(v))
    return [check_step_size(ctx.monitor, l_hat)]


def _step_views(ctx: Context) -> list[Any]:
    if ctx.curvature:
        return list(ctx.monitor.records)
    sizes = ctx.trace.batch_sizes
    return [_StepView(k, lr, sizes[k] if k < len(sizes) else None) for k, lr in enumerate(ctx.trace.step_lrs)]


def _run_e7b(ctx: Context) -> list[CheckResult]:
    from convergence.checks.stepsize import check_schedule

    res = check_schedule(_step_views(ctx), step_offset=1, allow_constant=True)
    if res.evidence.get("kind") == "constant":
        return [not_applicable("E7b", res.assumption, "constant step: the diminishing-step conditions "
                               "(sum alpha = inf, sum alpha^2 < inf) are not claimed; only the randomized-output "
                               "result applies", evidence=dict(res.evidence))]
    return [res]


def _run_e7c(ctx: Context) -> list[CheckResult]:
    from convergence.checks.stepsize import check_batch_size

    views = _step_views(ctx)
    if sum(v.batch_size is not None for v in views) < 2:
        return [not_applicable("E7c", "constant batch size m_k = m", "fewer than 2 steps with a known batch size")]
    return [check_batch_size(views, ctx.source.batch_size)]


def _run_e7d(ctx: Context) -> list[CheckResult]:
    from convergence.checks.stepsize import check_eos_corollary

    if ctx.whole_model is not None:
        return _tag([not_applicable("E7d", "EoS corollary", "the corollary's operator capture is per layer "
                                    "(block precondition hooks); a whole-model matrix-free optimizer has none")],
                    max(ctx.trace.snapshots))
    if not ctx.curvature:
        return _tag([_no_preconditioner("E7d", "EoS corollary")], max(ctx.trace.snapshots))
    _ensure_lipschitz(ctx)
    p = ctx.problem
    # the L the run's claims rest on: the problem's declared L when it has one (E8's bound and E8p's
    # step-size gate use it), else E1's estimate max(L_hat, L_H)
    if p.lipschitz is not None:
        l_hat, l_source = float(p.lipschitz), "declared by the problem"
    else:
        l_hat = max(v for v in (ctx.lipschitz_hat, ctx.lipschitz_h) if v is not None and math.isfinite(v))
        l_source = "E1 estimate max(L_hat, L_H)"
    k = max(ctx.trace.snapshots)
    _restore(ctx, k)
    method = "dense" if p.num_parameters <= 400 else "lanczos"
    lr_k = ctx.lr * (k + 1) ** (-ctx.config.beta)
    res = check_eos_corollary(p.model, p.loss_fn, p.full_batch, ctx.optimizer, ctx.trace.batches[k], l_hat,
                              make_closure=ctx.source.closure_factory(ctx.optimizer), lr=lr_k, method=method)
    _restore(ctx, k)
    res.evidence["lipschitz"], res.evidence["lipschitz_source"] = l_hat, l_source
    if p.lipschitz is not None and res.verdict is Verdict.FAIL and res.evidence.get("step_size_condition"):
        res.notes.append(f"the problem's declared L = {l_hat:.4g} is below the local curvature: E8's bound and "
                         "E8p's step-size gate, which use it, are not sound")
    return _tag(res, k)


def _seed_runs(ctx: Context, batch_size: int, seeds: Sequence[int], initial_state: dict) -> list[Trace]:
    """Independent runs from the same initial point (fresh optimizer, fresh sampler seed)."""
    a, src, p = ctx.config, ctx.source, ctx.problem
    out = []
    iterator: Iterable[int] = seeds
    if a.progress:
        from tqdm import tqdm

        iterator = tqdm(list(seeds), desc=f"E8 seeds (m={batch_size})", unit="run", leave=False, file=sys.stderr)
    saved = copy.deepcopy(p.model.state_dict())
    try:
        for s in iterator:
            with torch.no_grad():
                p.model.load_state_dict(initial_state)
            opt = src.make_optimizer(p.model)
            loader = src.training_loader(a.seed * 1000 + s, a.steps, batch_size)
            out.append(train(p, opt, loader, steps=a.steps, lr=ctx.lr, beta=a.beta,
                             make_closure=src.closure_factory(opt), keep_batches=0))
    finally:
        with torch.no_grad():
            p.model.load_state_dict(saved)
    return out


def _run_e8(ctx: Context) -> list[CheckResult]:
    from convergence.checks.rate import check_rate

    a = ctx.config
    _ensure_lipschitz(ctx)
    initial = ctx.extra["initial_state"]
    runs = _seed_runs(ctx, ctx.source.batch_size, range(1, a.rate_seeds), initial)
    rows = [ctx.trace.grad_norm_sq] + [t.grad_norm_sq for t in runs]
    f_initial = [ctx.trace.losses[0]] + [t.losses[0] for t in runs]
    lipschitz, is_upper = _lipschitz_for_bounds(ctx)
    kappa = (ctx.monitor.kappa_observed() if ctx.curvature else
             ctx.whole_model.kappa_observed() if ctx.whole_model is not None else (math.nan, math.nan))
    sigma2 = max(v for _, v in _sigma_history(ctx))
    kappa_ok = all(math.isfinite(v) for v in kappa) and kappa[0] > 0
    out: list[CheckResult] = []
    if not all(np.all(np.isfinite(r)) for r in rows):
        out.append(not_applicable("E8", "rate of E|grad f|^2", "a run diverged (non-finite gradient norms, see E0)"))
    else:
        res = check_rate(np.array(rows), ctx.trace.grad_steps, beta=a.beta, step_sizes=ctx.trace.lrs,
                         f_initial=f_initial, f_low=0.0, lipschitz=lipschitz, lipschitz_is_upper=is_upper,
                         sigma2=sigma2, kappa=kappa if kappa_ok else None, batch_size=ctx.source.batch_size,
                         alpha=a.alpha, seed=a.seed)
        if not kappa_ok:
            res.notes.append("no positive, finite observed kappa (no preconditioner, or AS.3 fails): the general "
                             "bound was not evaluated")
        ctx.extra["rate_rows"] = rows
        out.append(res)
    if a.beta == 0.0 and a.plateau:
        out.append(_run_plateau(ctx, rows, initial))
    return out


def _run_plateau(ctx: Context, rows: list[list[float]], initial: dict) -> CheckResult:
    from convergence.checks.rate import check_plateau_ratio

    m = ctx.source.batch_size
    n = len(ctx.problem.dataset)
    assumption = "constant-step noise floor ~ 1/m (plateau ratio m vs 4m contains 4)"
    if ctx.source.make_loader is None:
        return not_applicable("E8p", assumption, "a fixed DataLoader was given: batches of 4m cannot be drawn")
    if 4 * m > n:
        return not_applicable("E8p", assumption, f"4m = {4 * m} exceeds the {n} examples")
    # the 1/m floor is a small-step prediction (theory notes E8): only inside the theorem's step-size condition
    if ctx.whole_model is not None:
        from convergence.whole_model import operator_reason

        reason = operator_reason(ctx.optimizer)
        if reason is not None:
            return not_applicable("E8p", assumption, reason)
    elif not ctx.curvature:
        return not_applicable("E8p", assumption, "no preconditioner: the step-size condition alpha <= "
                              "kappa_lo/(L kappa_hi^2) under which the floor scales as 1/m cannot be evaluated")
    from convergence.checks.stepsize import step_size_limit

    lipschitz, is_upper = _lipschitz_for_bounds(ctx)
    k_lo, k_hi = ctx.monitor.kappa_observed() if ctx.curvature else ctx.whole_model.kappa_observed()
    l_up = (lipschitz if is_upper else 2.0 * lipschitz) if lipschitz else math.nan
    limit = step_size_limit(k_lo, k_hi, l_up) if math.isfinite(l_up) else 0.0
    if not max(ctx.trace.step_lrs) <= limit:
        return not_applicable("E8p", assumption, f"alpha_k up to {max(ctx.trace.step_lrs):.3g} exceeds "
                              f"kappa_lo/(L_up kappa_hi^2) = {limit:.3g}: the 1/m noise floor is a small-step "
                              "prediction and is not claimed here", expected=4.0)
    runs = _seed_runs(ctx, 4 * m, range(100, 100 + len(rows)), initial)
    big = [t.grad_norm_sq for t in runs]
    return check_plateau_ratio(np.array(rows), np.array(big), ctx.trace.grad_steps, ratio=4.0, alpha=ctx.config.alpha)


# ============================================================================================ report
@dataclass
class Report:
    """The outcome of a harness run.

    ``results``: every :class:`~convergence.results.CheckResult`, E0 first; ``summary``: counts per
    verdict (NOT_APPLICABLE on its own); ``exit_status``: 0 every check ran and none FAILed, 1 some
    check FAILed (E0 included), 2 a check raised (ERROR) or the run could not be made.
    """

    results: list[CheckResult]
    meta: dict[str, Any]
    trace: Trace
    monitor: Any
    violations: list[str]
    theory_mode: bool | None
    errors: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    #: the :class:`~convergence.whole_model.WholeModelMonitor` of a matrix-free optimizer (else None)
    whole_model: Any = None

    @property
    def summary(self) -> dict[str, int]:
        from convergence.report import summary_counts

        return summary_counts(self.results)

    @property
    def exit_status(self) -> int:
        if self.errors or any(r.verdict is Verdict.ERROR for r in self.results):
            return EXIT_ERROR
        if any(r.verdict is Verdict.FAIL for r in self.results):
            return EXIT_FAIL
        return EXIT_OK

    def __getitem__(self, check: str) -> CheckResult:
        for r in self.results:
            if r.check == check:
                return r
        raise KeyError(f"no result {check!r}; have {[r.check for r in self.results]}")

    def verdicts(self) -> dict[str, str]:
        """``{check id: verdict}``."""
        return {r.check: r.verdict.value for r in self.results}

    def table(self, title: str | None = None) -> str:
        from convergence.report import format_table

        return format_table(self.results, theory_mode=self.theory_mode, violations=self.violations,
                            title=title or self.meta.get("title"))

    def __str__(self) -> str:
        return self.table()


def run_harness(source: Source, config: HarnessConfig) -> Report:
    """Train ``source`` under ``config`` with the monitor on, run the selected checks, return the :class:`Report`."""
    from convergence.monitor import TrainingMonitor, theory_mode_violations
    from convergence.multiple import holm_adjust

    started = time.time()
    torch.manual_seed(config.seed)
    p = source.problem
    optimizer = source.make_optimizer(p.model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise HarnessError(f"make_optimizer returned a {type(optimizer).__name__}, not a torch.optim.Optimizer")
    curvature = is_curvature_optimizer(optimizer)
    from convergence.whole_model import WholeModelMonitor, is_matrix_free_optimizer, whole_model_violations

    matrix_free = is_matrix_free_optimizer(optimizer)
    lr = float(config.lr) if config.lr is not None else float(optimizer.param_groups[0]["lr"])
    initial_state = copy.deepcopy(p.model.state_dict())
    loader = source.training_loader(config.seed * 1000, config.steps)
    violations = (theory_mode_violations(optimizer, loader) if curvature else
                  whole_model_violations(optimizer, loader) if matrix_free else _generic_violations(optimizer, loader))
    snaps = snapshot_steps(config.steps, config.checkpoints)
    sigma_steps = sorted(set(snaps) | set(snapshot_steps(config.steps, min(6, config.steps))))
    monitor = None
    if curvature:
        every = config.probe_every or max(1, config.steps // 10)
        monitor = TrainingMonitor(optimizer, keep_pairs=False, probes=config.probes if "E4" in config.checks else 0,
                                  probe_interval=every, probe_seed=config.seed)
    whole = None
    if matrix_free:  # the whole-model path: one operator, recorded through the optimizer's step hook
        every = config.probe_every or max(1, config.steps // 10)
        probing = any(c in config.checks for c in ("E4", "E7", "E8"))  # E7a, E8 and E8p use E4's kappa
        whole = WholeModelMonitor(optimizer, probe_interval=every if probing else 0)
    tap = GradientTap(p.model, optimizer)
    try:
        trace = train(p, optimizer, loader, steps=config.steps, lr=lr, beta=config.beta,
                      make_closure=source.closure_factory(optimizer), snapshot_steps=snaps, sigma_steps=sigma_steps,
                      tap=tap, keep_gradients="E2" in config.checks, progress=config.progress)
    finally:
        tap.detach()
        if monitor is not None:
            monitor.detach()
        if whole is not None:
            whole.detach()
    final_state = _flat(p.model)
    ctx = Context(source, config, optimizer, monitor, trace, lr, whole_model=whole)
    ctx.extra["initial_state"] = initial_state

    _guard(ctx, "E0", lambda: [check_run_health(trace, max_skip_fraction=config.max_skip_fraction)])
    selected = set(config.checks)
    if "E1" in selected:
        _guard(ctx, "E1", lambda: _run_e1(ctx))
    if "E2" in selected:
        _guard(ctx, "E2", lambda: _run_e2(ctx))
    for k in snaps:
        if "E3" in selected:
            _guard(ctx, f"E3@{k}", lambda k=k: _run_e3(ctx, k))
    if "E4" in selected:
        _guard(ctx, "E4", lambda: _run_e4(ctx))
    for k in snaps:
        if "E5" in selected:
            _guard(ctx, f"E5@{k}", lambda k=k: _run_e5(ctx, k))
        if "E6" in selected:
            _guard(ctx, f"E6@{k}", lambda k=k: _run_e6(ctx, k))
    if "E7" in selected:
        _guard(ctx, "E7a", lambda: _run_e7a(ctx))
        _guard(ctx, "E7b", lambda: _run_e7b(ctx))
        _guard(ctx, "E7c", lambda: _run_e7c(ctx))
        _guard(ctx, f"E7d@{max(snaps)}", lambda: _run_e7d(ctx))
    if "E8" in selected:
        _guard(ctx, "E8", lambda: _run_e8(ctx))
    results = holm_adjust(ctx.results, alpha=config.alpha)
    meta = {
        "steps": config.steps, "batch_size": source.batch_size, "lr": lr, "beta": config.beta, "seed": config.seed,
        "checks": list(config.checks), "checkpoints": snaps, "alpha_family": config.alpha,
        "rate_seeds": config.rate_seeds if "E8" in selected else None, "num_parameters": p.num_parameters,
        "num_examples": len(p.dataset), "optimizer": type(optimizer).__name__,
        "optimizer_description": optimizer.describe() if hasattr(optimizer, "describe") else repr(optimizer),
        "curvature_optimizer": curvature, "lipschitz_declared": p.lipschitz, "L_hat": ctx.lipschitz_hat,
        "L_H": ctx.lipschitz_h,
        "kappa_observed": (list(monitor.kappa_observed()) if monitor is not None else
                           list(whole.kappa_observed()) if whole is not None else None),
        "matrix_free_optimizer": matrix_free,
        "initial_loss": trace.losses[0] if trace.losses else None, "final_loss": trace.final_loss,
        "skipped_or_reverted_steps": trace.skipped_steps, "sigma1_sq_history": ctx.sigma_history,
        "errors": ctx.errors, "seconds": time.time() - started,
        "exit_status_policy": "0 every check ran and none FAILed; 1 a check FAILed (E0 included); "
                              "2 the run could not be made or a check raised (ERROR)",
    }
    ctx.extra["final_state"] = final_state
    return Report(results, meta, trace, monitor, violations, source.theory_mode, ctx.errors,
                  extra={k: v for k, v in ctx.extra.items() if k != "initial_state"}, whole_model=whole)


def _generic_violations(optimizer, loader) -> list[str]:
    """Theory-mode notes for an optimizer not built from the blocks (e.g. Adam)."""
    from convergence.monitor import _sampler_violations

    out = [f"{type(optimizer).__name__} is not built from the curvature blocks: E1-E3 and the step-only checks "
           "(E6 in step form, E7b/c, E8) apply; E4, E5, E7a and E7d need a preconditioner"]
    group = optimizer.param_groups[0]
    if group.get("momentum", 0) or group.get("betas") is not None:
        out.append("the step uses moment estimates of past gradients, not -alpha*H_k*g_k with H_k independent of g_k")
    if loader is not None:
        out.extend(_sampler_violations(loader))
    return out
