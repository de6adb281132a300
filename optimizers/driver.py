r"""The generic curvature optimizer: blocks per layer, one step protocol, first-order fallback.

One step at iteration :math:`k`, for every layer with a block (gradient matrix
:math:`\nabla_k = [\nabla W\mid\nabla b]`, parameters :math:`\tilde W = [W\mid b]`):

1. pass 1 (the closure, or the caller's own forward/backward before ``step()``) records the rows
   each block needs;
2. statistics are folded into the blocks every ``curvature_update_freq`` steps, and damped
   inverses refreshed every ``inverse_update_freq`` steps (and at every step
   :math:`k \le` ``inverse_warmup_steps``), batched over factors of one size;
3. momentum in EMA form on the L2-regularised gradient,
   :math:`m \leftarrow \beta m + (1-\beta)(\nabla_k + \tau\tilde W)`;
4. the direction :math:`d = P(m)` from the block; optional KL clipping scales it by
   :math:`\nu = \min(1, \sqrt{c / (\alpha^2\sum\langle d, m\rangle)})`;
5. :math:`\tilde W \leftarrow \tilde W - \alpha\nu d`;
6. when a block needs it (K-BFGS), pass 2: the closure again on the same batch at the new point,
   with parameters frozen so that only pre-activation gradients are computed; the blocks consume
   the pairs. With an :class:`~curvature.damping.AdaptiveLM` policy the same pass gives the
   reduction ratio.

With ``lag_factors=True`` (theory mode, AS.4) statistics of batch :math:`k` are folded in only
*after* the step, so the operator applied at step :math:`k` depends on batches before :math:`k`.

A step whose loss or gradient is not finite is skipped: parameters, momentum and curvature state
stay exactly as they were, and the skip is counted in :attr:`CurvatureOptimizer.counters`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from curvature.adapters import LayerAdapter, UnsupportedLayerError, adapter_for
from curvature.blocks import CurvatureBlock, a_statistic, g_statistic
from curvature.capture import InertOnCopy, LayerCapture, LayerRecord, frozen_parameters
from curvature.damping import DampingPolicy, make_damping
from curvature.inverter import BatchedInverter
from curvature.linalg import InversionStats, all_finite
from optimizers.communicator import Communicator, LocalCommunicator, TorchCommunicator
from optimizers.data_parallel import DataParallel
from optimizers.fallback import FALLBACK_RULES, fallback_update
from optimizers.likelihoods import LIKELIHOODS, draw_noise, sampled_loss
from optimizers.recipes import Recipe, RecipeContext


@dataclass
class LayerSlot:
    """One preconditioned layer: its name, module, adapter and block."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    block: CurvatureBlock


@dataclass
class StepInfo:
    """What step hooks (e.g. the convergence monitor) see after each step.

    ``grads`` are the raw batch gradient matrices (data loss), ``inputs`` the matrices fed to the
    preconditioner (after weight decay and momentum), ``directions`` the preconditioned
    :math:`d = P(m)`; the applied step is ``-lr * step_scale * d``. The operator used is the
    blocks' state *before* ``update_after_step`` ran (``operators_before`` holds dense copies
    when the hook asked for them).
    """

    step: int
    lr: float
    loss: float | None
    loss_after: float | None = None
    skipped: bool = False
    skip_reason: str | None = None
    step_scale: float = 1.0
    reduction_ratio: float | None = None
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    directions: dict[str, torch.Tensor] = field(default_factory=dict)
    records: dict[str, LayerRecord] = field(default_factory=dict)


def _as_float(value: torch.Tensor | float | None) -> float | None:
    """A loss as a Python float (detached), or None."""
    if value is None:
        return None
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _communicator(distributed: bool | Communicator | None, ddp: nn.Module | None) -> Communicator:
    """The communicator for the ``distributed`` argument (see :class:`CurvatureOptimizer`)."""
    if isinstance(distributed, Communicator):
        return distributed
    if distributed is None:
        return TorchCommunicator(ddp.process_group) if ddp is not None else LocalCommunicator()
    if distributed is True:
        return TorchCommunicator(ddp.process_group if ddp is not None else None)
    if distributed is False:
        if ddp is not None:
            raise ValueError("distributed=False with a DistributedDataParallel model would let the ranks' curvature "
                             "drift apart; pass the unwrapped module to train on one process")
        return LocalCommunicator()
    raise TypeError(f"distributed must be None, a bool or a Communicator, got {type(distributed).__name__}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
    if not ok:
        lo_b, hi_b = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be a finite number in {lo_b}{lo}, {'inf' if hi is None else hi}{hi_b}, got {value!r}")


class CurvatureOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that preconditions each supported layer with its own curvature block.

    Args:
        model: the module to train; its layers are matched to ``blocks``.
        lr: learning rate α (read from ``param_groups`` at every step, so LR schedulers work).
        blocks: mapping from a module *type* or a layer *name* (as in ``named_modules``) to a
            recipe (see :mod:`optimizers.recipes`), or to ``None`` to force the fallback rule.
            Names take precedence over types.
        damping: λ, a number (Tikhonov split √λ/√λ) or a :class:`~curvature.damping.DampingPolicy`.
        momentum: β of the EMA momentum (0 disables it).
        weight_decay: τ, added to the gradient as τ·W (weights and biases).
        curvature_update_freq, inverse_update_freq: T_cov and T_inv in steps.
        inverse_warmup_steps: also refresh inverses at every step k ≤ this.
        fallback: rule for parameters of modules without a block: "sgd", "adam", or "error".
        loss_reduction: "mean" (the loss averages over the batch) or "sum".
        lag_factors: theory mode: statistics of the current batch are used only from the next step.
        require_closure: K-BFGS needs ``step(closure)``.
        fisher: "empirical" (G from the training loss) or "mc" (G from targets sampled from the
            model's predictive distribution, with ``likelihood``).
        kl_clip: KL-clipping constant c, or None.
        inverse_method: "cholesky" or "eigh" for damped factor inverses.
        seed: seed of the optimizer's own generator (MC Fisher sampling).
        distributed: data-parallel training (see :mod:`optimizers.data_parallel`): None (default)
            follows the model -- a ``DistributedDataParallel`` model trains over its process group,
            anything else on one process; True: the default ``torch.distributed`` group (a plain
            module whose gradients the user averages, e.g. with
            :func:`~optimizers.data_parallel.all_reduce_gradients`); False: one process; or a
            :class:`~optimizers.communicator.Communicator`.
        distribute: "replicate" (every rank computes every inverse and BFGS update) or "layerwise"
            (each layer's on one rank, results broadcast).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        blocks: Mapping[type | str, Recipe | None],
        *,
        damping: float | DampingPolicy = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        curvature_update_freq: int = 1,
        inverse_update_freq: int = 1,
        inverse_warmup_steps: int = 0,
        fallback: str = "sgd",
        loss_reduction: str = "mean",
        lag_factors: bool = False,
        require_closure: bool = False,
        fisher: str = "empirical",
        likelihood: str | None = None,
        kl_clip: float | None = None,
        inverse_method: str = "cholesky",
        seed: int = 0,
        distributed: bool | Communicator | None = None,
        distribute: str = "replicate",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        comm = _communicator(distributed, ddp)
        if ddp is not None:
            model = ddp.module  # layer names (and checkpoints) are those of the wrapped module
        self._ddp = ddp
        self.data_parallel = DataParallel(comm, distribute, loss_reduction if loss_reduction in ("mean", "sum") else "mean")
        _check_float("lr", lr, 0.0, lo_open=True, hi=None)
        _check_float("momentum", momentum, 0.0, 1.0)
        _check_float("weight_decay", weight_decay, 0.0, None)
        _check_int("curvature_update_freq", curvature_update_freq, 1)
        _check_int("inverse_update_freq", inverse_update_freq, 1)
        _check_int("inverse_warmup_steps", inverse_warmup_steps, 0)
        if fallback not in FALLBACK_RULES:
            raise ValueError(f"fallback must be one of {FALLBACK_RULES}, got {fallback!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if fisher not in ("empirical", "mc"):
            raise ValueError(f"fisher must be 'empirical' or 'mc', got {fisher!r}")
        if fisher == "mc" and likelihood not in LIKELIHOODS:
            raise ValueError(f"fisher='mc' needs likelihood in {LIKELIHOODS}, got {likelihood!r}")
        if kl_clip is not None:
            _check_float("kl_clip", kl_clip, 0.0, None, lo_open=True)
        if inverse_method not in ("cholesky", "eigh"):
            raise ValueError(f"inverse_method must be 'cholesky' or 'eigh', got {inverse_method!r}")
        if not isinstance(blocks, Mapping):
            raise TypeError("blocks must be a mapping from module types or layer names to recipes")

        self.model = model
        self.damping = make_damping(damping)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.curvature_update_freq, self.inverse_update_freq = curvature_update_freq, inverse_update_freq
        self.inverse_warmup_steps = inverse_warmup_steps
        self.fallback, self.loss_reduction, self.lag_factors = fallback, loss_reduction, bool(lag_factors)
        self.fisher, self.likelihood, self.kl_clip = fisher, likelihood, kl_clip
        self.inversion_stats = InversionStats()
        self.inverse_method = inverse_method

        self.slots, self.fallback_modules = self._assign_blocks(model, blocks)
        if not self.slots and not self.fallback_modules:
            raise ValueError("the model has no trainable parameters")
        self.data_parallel.attach(self.slots)
        self.require_closure = bool(require_closure) or any(s.block.needs_second_pass for s in self.slots.values())
        if self.damping.needs_reduction_ratio:
            lacking = [s.name for s in self.slots.values() if not s.block.has_quadratic_form]
            if lacking:
                raise ValueError(f"{type(self.damping).__name__} needs blocks with a quadratic model; {lacking} have none")

        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr})
        self.steps = 0
        self.counters: dict[str, Any] = {"steps": 0, "skipped_steps": 0, "reverted_steps": 0, "skip_reasons": {}}
        self._generator = torch.Generator(device=params[0].device).manual_seed(seed)
        self._hooks: OrderedDict[int, Callable[[StepInfo], None]] = OrderedDict()
        self._precondition_hooks: OrderedDict[int, Callable] = OrderedDict()
        self.capture = LayerCapture({n: s.adapter for n, s in self.slots.items()}, loss_reduction)
        self._last_inputs: tuple[tuple, dict] | None = None
        self._root_hook = model.register_forward_pre_hook(InertOnCopy(self._record_inputs), with_kwargs=True)
        self._configure_capture(self.steps)

    # ------------------------------------------------------------------ assignment
    def _assign_blocks(self, model: nn.Module, blocks: Mapping[type | str, Recipe | None]):
        names = {k for k in blocks if isinstance(k, str)}
        known = {n for n, _ in model.named_modules()}
        unknown = names - known
        if unknown:
            raise ValueError(f"blocks names layers that the model does not have: {sorted(unknown)}")
        slots: OrderedDict[str, LayerSlot] = OrderedDict()
        fallback: OrderedDict[str, nn.Module] = OrderedDict()
        owner: dict[int, str] = {}
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            for p in own:
                if id(p) in owner:
                    raise ValueError(f"parameter shared between layers {owner[id(p)]!r} and {name!r}: tied weights are not supported")
                owner[id(p)] = name
            if name in blocks:
                recipe = blocks[name]
            else:
                recipe = next((r for k, r in blocks.items() if isinstance(k, type) and isinstance(module, k)), None)
            if recipe is None:
                if self.fallback == "error":
                    raise UnsupportedLayerError(
                        f"layer {name!r} ({type(module).__name__}) has parameters but no curvature block, "
                        "and fallback='error'"
                    )
                fallback[name] = module
                continue
            adapter = adapter_for(module)
            if adapter is None:
                raise UnsupportedLayerError(f"layer {name!r}: no adapter for {type(module).__name__}")
            extra = [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
            if extra:
                raise UnsupportedLayerError(f"layer {name!r} has parameters {extra} the adapter does not know")
            weight = module.weight
            ctx = RecipeContext(weight.dtype, weight.device, self.damping.damping)
            slots[name] = LayerSlot(name, module, adapter, recipe(name, adapter, ctx))
        return slots, fallback

    def describe(self) -> str:
        """A table of which block (or fallback rule) each layer got."""
        rows = [("layer", "module", "curvature", "parameters")]
        for name, slot in self.slots.items():
            rows.append((name, type(slot.module).__name__, slot.block.describe(),
                         str(sum(p.numel() for p in slot.adapter.parameters()))))
        for name, module in self.fallback_modules.items():
            n = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
            rows.append((name, type(module).__name__, f"fallback ({self.fallback})", str(n)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    @property
    def blocks(self) -> dict[str, CurvatureBlock]:
        return {name: slot.block for name, slot in self.slots.items()}

    # ------------------------------------------------------------------ hooks
    def register_step_hook(self, hook: Callable[[StepInfo], None]) -> RemovableHandle:
        """Call ``hook(info)`` after every step (skipped ones included)."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    def register_precondition_hook(
        self, hook: Callable[[int, str, CurvatureBlock, torch.Tensor, torch.Tensor], None]
    ) -> RemovableHandle:
        """Call ``hook(step, layer_name, block, preconditioner_input, direction)`` right after each
        block's ``precondition`` at every step: the block is then exactly the operator that was applied
        (before any update that follows the step)."""
        handle = RemovableHandle(self._precondition_hooks)
        self._precondition_hooks[handle.id] = hook
        return handle

    def _record_inputs(self, module, args, kwargs):
        if self.capture.config.active and torch.is_grad_enabled():
            self._last_inputs = (args, kwargs)

    # ------------------------------------------------------------------ capture scheduling
    def _stats_due(self, k: int) -> bool:
        return k % self.curvature_update_freq == 0

    def _inverse_due(self, k: int) -> bool:
        return k % self.inverse_update_freq == 0 or k <= self.inverse_warmup_steps

    def _configure_capture(self, k: int) -> None:
        blocks = [s.block for s in self.slots.values()]
        second = any(b.needs_second_pass for b in blocks)
        due = self._stats_due(k)
        self.capture.set(
            a=second or (due and any(b.needs_a for b in blocks)),
            g=second or (due and self.fisher == "empirical" and any(b.needs_g for b in blocks)),
            h=second,
        )

    # ------------------------------------------------------------------ the step
    def _nonfinite_reason(self, loss: torch.Tensor | float | None) -> str | None:
        if loss is not None and not math.isfinite(_as_float(loss)):
            return "non-finite loss"
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not all_finite(*grads):
            return "non-finite gradient"
        return None

    def _skip(self, k: int, reason: str, loss) -> None:
        self.counters["skipped_steps"] += 1
        self.counters["skip_reasons"][reason] = self.counters["skip_reasons"].get(reason, 0) + 1
        self._emit(StepInfo(step=k, lr=self.param_groups[0]["lr"], loss=_as_float(loss),
                            skipped=True, skip_reason=reason))

    def _emit(self, info: StepInfo) -> None:
        for hook in list(self._hooks.values()):
            hook(info)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        """One optimization step. ``closure`` re-evaluates the loss (forward and backward) on the batch.

        Returns the loss at the current point (from the closure), or None without a closure.
        """
        if self.require_closure and closure is None:
            raise RuntimeError(
                f"{type(self).__name__} needs step(closure): the closure must zero the gradients, run "
                "forward and backward on the current batch and return the loss; it is called again at the "
                "new parameters on the same batch"
            )
        if self.damping.needs_reduction_ratio and closure is None:
            raise RuntimeError("adaptive damping needs step(closure) to measure the reduction ratio")
        k = self.steps
        loss = None
        self.data_parallel.begin_step()
        if closure is not None:
            self._configure_capture(k)
            with torch.enable_grad():
                loss = closure()
        records = self.capture.records
        self.capture.clear()
        agreement = self.data_parallel.agree(self._nonfinite_reason(loss), _as_float(loss), records, list(self.slots))
        if agreement.reason is not None:
            self._skip(k, agreement.reason, loss)
            self._configure_capture(k)
            return loss
        self.data_parallel.set_grad_scales(records)

        grads = {name: slot.adapter.grad_matrix() for name, slot in self.slots.items()}
        stats_due = self._stats_due(k)
        if stats_due and self.fisher == "mc" and any(s.block.needs_g for s in self.slots.values()):
            self._monte_carlo_fisher_pass(records)
        if stats_due and not self.lag_factors:
            self._update_statistics(records, grads)
        if self._inverse_due(k):
            self._refresh_inverses()

        lr = float(self.param_groups[0]["lr"])
        inputs, directions = {}, {}
        for name, slot in self.slots.items():
            g = grads[name]
            if self.weight_decay:
                g = g + self.weight_decay * slot.adapter.weight_matrix()
            state = self.state[slot.module.weight]
            if self.momentum > 0:
                buf = state.get("momentum_matrix")
                if buf is None:
                    buf = state["momentum_matrix"] = torch.zeros_like(g)
                buf.mul_(self.momentum).add_(g, alpha=1.0 - self.momentum)
                g = buf
            inputs[name] = g
            directions[name] = slot.block.precondition(g)
            for hook in list(self._precondition_hooks.values()):
                hook(k, name, slot.block, g, directions[name])
        scale = self._kl_scale(lr, inputs, directions)

        second_pass = any(s.block.needs_second_pass for s in self.slots.values()) or self.damping.needs_reduction_ratio
        snapshot = self._snapshot() if second_pass else None
        for name, slot in self.slots.items():
            d_w, d_b = slot.adapter.split_matrix(directions[name])
            slot.module.weight.add_(d_w, alpha=-lr * scale)
            if d_b is not None:
                slot.module.bias.add_(d_b, alpha=-lr * scale)
        self._fallback_step(lr)
        if stats_due and self.lag_factors:
            self._update_statistics(records, grads)

        info = StepInfo(step=k, lr=lr, loss=_as_float(loss), step_scale=scale,
                        grads=grads, inputs=inputs, directions=directions, records=records)
        if second_pass:
            self._second_pass(closure, records, loss, lr * scale, grads, directions, snapshot, info)
        self.steps += 1
        self.counters["steps"] = self.steps
        self._configure_capture(self.steps)
        self._emit(info)
        return loss

    def _update_statistics(self, records: Mapping[str, LayerRecord], grads: Mapping[str, torch.Tensor]) -> None:
        for name, slot in self.slots.items():
            if records.get(name) is None and (slot.block.needs_a or slot.block.needs_g):
                raise RuntimeError(
                    f"no statistics were captured for layer {name!r}: run forward and backward on the "
                    "batch (with gradients enabled) before step(), or pass a closure"
                )
        self.data_parallel.update_statistics(self.slots, records, grads, LayerRecord)

    def _refresh_inverses(self) -> None:
        inverter = self.data_parallel.inverter(BatchedInverter(self.inverse_method, self.inversion_stats))
        for name, slot in self.slots.items():
            slot.block.request_inverses(inverter.for_layer(name), self.damping)
        inverter.run()

    def _kl_scale(self, lr: float, inputs, directions) -> float:
        if self.kl_clip is None:
            return 1.0
        vg = sum(float(torch.sum(directions[n] * inputs[n])) for n in directions) * lr * lr
        if not vg > 0:
            return 1.0
        return min(1.0, math.sqrt(self.kl_clip / vg))

    def _fallback_step(self, lr: float) -> None:
        for module in self.fallback_modules.values():
            for p in module.parameters(recurse=False):
                if p.requires_grad and p.grad is not None:
                    fallback_update(p, p.grad, self.state[p], rule=self.fallback, lr=lr,
                                    momentum=self.momentum, weight_decay=self.weight_decay)

    def _snapshot(self) -> tuple[dict, dict]:
        params = {p: p.detach().clone() for g in self.param_groups for p in g["params"]}
        state = {p: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for p, s in self.state.items()}
        return params, state

    def _restore(self, snapshot: tuple[dict, dict]) -> None:
        params, state = snapshot
        for p, value in params.items():
            p.copy_(value)
        for p, s in state.items():
            self.state[p] = s

    def _second_pass(self, closure, before, loss, step_size, grads, directions, snapshot, info: StepInfo) -> None:
        self.capture.set(h=True, g=True, preactivation_grads_only=True)
        no_sync = self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()
        with frozen_parameters([p for g in self.param_groups for p in g["params"]]), torch.enable_grad(), no_sync:
            loss_after = closure()
        after = self.capture.records
        self.capture.clear()
        info.loss_after = _as_float(loss_after)
        bad = loss_after is None or not math.isfinite(info.loss_after) or not all_finite(
            *[r.grad_rows for r in after.values() if r.grad_rows is not None]
        )
        bad, global_after = self.data_parallel.second_pass(self.slots, before, after, bad, info.loss_after)
        if bad:
            self._restore(snapshot)
            self.counters["reverted_steps"] += 1
            reason = "non-finite loss or gradient at the new point (step reverted)"
            self.counters["skip_reasons"][reason] = self.counters["skip_reasons"].get(reason, 0) + 1
            info.skipped, info.skip_reason = True, reason
            return
        if self.damping.needs_reduction_ratio:
            model_change = 0.0
            for name, slot in self.slots.items():
                delta = -step_size * directions[name]
                model_change += float(torch.sum(grads[name] * delta))
                model_change += 0.5 * float(slot.block.curvature_quadratic(delta) + self.damping.damping * torch.sum(delta * delta))
            loss_before = self.data_parallel.agreed_loss(_as_float(loss))
            rho = (global_after - loss_before) / model_change if model_change < 0 else -math.inf
            info.reduction_ratio = rho
            self.damping.observe_reduction_ratio(rho)

    def _monte_carlo_fisher_pass(self, records: dict[str, LayerRecord]) -> None:
        if self._last_inputs is None:
            raise RuntimeError("the Monte-Carlo Fisher needs the model's inputs: no forward pass was recorded")
        args, kwargs = self._last_inputs
        self.capture.set(g=True, preactivation_grads_only=True)
        with frozen_parameters([p for g in self.param_groups for p in g["params"]]), torch.enable_grad():
            out = self.model(*args, **kwargs)
            noise = self.data_parallel.mc_noise(
                next(iter(self.slots)), lambda n: draw_noise(self.likelihood, out, n, self._generator), out.shape[0])
            sampled_loss(out, self.likelihood, self.loss_reduction, self._generator, noise=noise).backward()
        for name, rec in self.capture.records.items():
            if name in records:
                records[name].take_grads(rec)
        self.capture.clear()

    # ------------------------------------------------------------------ warm start
    @torch.no_grad()
    def warm_start(self, batches: Iterable, loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None) -> int:
        """Set the blocks' running statistics to plain averages over ``batches`` at the current weights.

        ``batches`` yields model inputs, or ``(inputs, targets)`` pairs when G statistics are needed:
        with ``loss_fn`` (empirical Fisher) or with ``fisher="mc"`` (sampled targets). The parameters
        do not change. Returns the number of batches used.
        """
        need_g = any(s.block.needs_g for s in self.slots.values()) and (loss_fn is not None or self.fisher == "mc")
        sums: dict[str, list] = {n: [None, None] for n in self.slots}
        count = 0
        for batch in batches:
            inputs, targets = (batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None))
            self.capture.set(a=True, g=need_g, preactivation_grads_only=True)
            with frozen_parameters([p for g in self.param_groups for p in g["params"]]), torch.enable_grad():
                out = self.model(inputs)
                if need_g:
                    if self.fisher == "mc":
                        loss = sampled_loss(out, self.likelihood, self.loss_reduction, self._generator)
                    else:
                        loss = loss_fn(out, targets)
                    loss.backward()
            for name, slot in self.slots.items():
                rec = self.capture.records[name]
                a = a_statistic(rec, slot.adapter)
                g = g_statistic(rec) if need_g else None
                sums[name][0] = a if sums[name][0] is None else sums[name][0] + a
                if g is not None:
                    sums[name][1] = g if sums[name][1] is None else sums[name][1] + g
            count += 1
        self.capture.clear()
        if count == 0:
            raise ValueError("warm_start got no batches")
        for name, slot in self.slots.items():
            a_sum, g_sum = sums[name]
            averages = [a_sum / count] + ([] if g_sum is None else [g_sum / count])
            averages = self.data_parallel.comm.weighted_mean([(t, count) for t in averages])  # over ranks' batches
            slot.block.warm_start(averages[0], averages[1] if g_sum is not None else None)
        self._configure_capture(self.steps)
        return count

    # ------------------------------------------------------------------ state
    @property
    def skipped_steps(self) -> int:
        return int(self.counters["skipped_steps"])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["secondorder"] = {
            "version": 1,
            "steps": self.steps,
            "counters": {**self.counters, "skip_reasons": dict(self.counters["skip_reasons"])},
            "damping": self.damping.state_dict(),
            "generator": self._generator.get_state(),
            "blocks": {name: slot.block.state_dict() for name, slot in self.slots.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = copy.deepcopy(dict(state_dict))  # never alias the caller's checkpoint
        extra = state_dict.pop("secondorder", None)
        if extra is None:
            raise ValueError("not a secondorder optimizer state_dict (missing the 'secondorder' entry)")
        missing = set(self.slots) - set(extra["blocks"])
        if missing:
            raise ValueError(f"state_dict has no curvature state for layers {sorted(missing)}")
        super().load_state_dict(state_dict)
        self.steps = int(extra["steps"])
        self.counters = {**extra["counters"], "skip_reasons": dict(extra["counters"]["skip_reasons"])}
        self.damping.load_state_dict(extra["damping"])
        self._generator.set_state(extra["generator"])
        for name, slot in self.slots.items():
            slot.block.load_state_dict(extra["blocks"][name])
        self._configure_capture(self.steps)
