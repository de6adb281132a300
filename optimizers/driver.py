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

**Recovery** (:mod:`optimizers.recovery`, ``recovery=``): a step whose new point is not finite
(non-finite parameters after the update, or K-BFGS's second pass) is reverted; when the first
passes of two consecutive steps fail on finite inputs, the point itself is bad and the optimizer
rolls back to the point before the last applied step (parameters and momentum). After a revert or a
rollback the secant memory is reset and the step is shrunk, then relaxed back; all counted in
``counters``. Non-finite model inputs are a data fault: that step is only skipped.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from curvature.adapters import ADAPTERS, LayerAdapter, UnsupportedLayerError, adapter_for, contextual_adapters
from curvature.blocks import CurvatureBlock, a_statistic, g_statistic, revert_state
from curvature.capture import InertOnCopy, LayerCapture, LayerRecord, frozen_parameters
from curvature.chunked import ChunkedBlock
from curvature.damping import DampingPolicy, make_damping
from curvature.inverter import BatchedInverter
from curvature.linalg import InversionStats, all_finite, finite_flag, read_scalars
from curvature.protocols import BlockProtocol, declares
from optimizers.communicator import Communicator, LocalCommunicator, TorchCommunicator
from optimizers.data_parallel import DataParallel
from optimizers.fallback import FALLBACK_RULES, fallback_update
from optimizers.likelihoods import LIKELIHOODS, draw_noise, sampled_loss
from optimizers.recovery import Recovery, inputs_finite, make_recovery, reset_secant_memory
from optimizers.recipes import Recipe, RecipeContext
from optimizers.validation import check_float as _check_float, check_int as _check_int


@dataclass
class LayerSlot:
    """One preconditioned layer: its name, module, adapter and block."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    block: CurvatureBlock
    #: Tied weights: the other layers (name, adapter) holding the same weight and bias, whose calls
    #: are captured into this slot's statistics (see ``CurvatureOptimizer._assign_blocks``).
    shared: tuple[tuple[str, LayerAdapter], ...] = ()
    #: The recipe and context the block was built with (to rebuild it per chunk, see ``_apply_runtime_changes``).
    recipe: Any = None
    ctx: RecipeContext | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The parameter playing W (``module.weight``, or e.g. an attention's ``in_proj_weight``)."""
        return self.adapter.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The parameter playing b, or None when the layer has no bias."""
        return self.adapter.bias if self.adapter.has_bias else None


@dataclass
class StepInfo:
    """What step hooks (e.g. the convergence monitor) see after each step.

    ``grads`` are the raw batch gradient matrices (data loss), ``inputs`` the matrices fed to the
    preconditioner (after weight decay and momentum), ``directions`` the preconditioned
    :math:`d = P(m)`; the applied step is ``-lr * step_scale * d``, where ``lr`` is
    ``param_groups[0]["lr"]`` and ``layer_lrs[name] = (lr of the weight's group, lr of the bias's
    group)`` when parameter groups differ. The operator used is the
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
    layer_lrs: dict[str, tuple[float, float]] = field(default_factory=dict)


def _lazy_float(name: str) -> property:
    """A ``StepInfo`` attribute that may be set to a (device) tensor and reads as a Python float:
    the conversion, a host synchronization, happens on the first read, not in ``step()``."""
    key = "_" + name

    def get(self: Any) -> float | None:
        value = self.__dict__.get(key)  # documented below (``get.__doc__``)
        if isinstance(value, torch.Tensor):
            value = self.__dict__[key] = float(value)
        return value

    def put(self: Any, value: Any) -> None:
        self.__dict__[key] = value.detach() if isinstance(value, torch.Tensor) else (
            None if value is None else float(value))

    get.__doc__ = put.__doc__ = f"``{name}`` as a float (converted from the step's tensor on first read)"
    return property(get, put)


StepInfo.loss = _lazy_float("loss")  # type: ignore[assignment]
StepInfo.loss_after = _lazy_float("loss_after")  # type: ignore[assignment]


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


def _check_group(group: Mapping[str, Any], where: str) -> None:
    """Validate one parameter group's settings (read at every step, so schedulers may change them)."""
    def bad(key: str, rule: str) -> ValueError:
        return ValueError(f"{where}['{key}'] must be {rule}, got {group.get(key)!r}")

    def number(key: str) -> float | None:
        v = group.get(key)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = float(v)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    lr = number("lr")
    if lr is None or lr < 0:
        raise bad("lr", "a finite number >= 0")
    mom = number("momentum")
    if mom is None or not 0.0 <= mom < 1.0:
        raise bad("momentum", "a number in [0, 1)")
    wd = number("weight_decay")
    if wd is None or wd < 0:
        raise bad("weight_decay", "a finite number >= 0")
    lam = number("damping")
    if lam is None or not lam > 0:
        raise bad("damping", "a finite number > 0")
    if group.get("fallback_lr") is not None:
        flr = number("fallback_lr")
        if flr is None or flr < 0:
            raise bad("fallback_lr", "None or a finite number >= 0")
    betas = group.get("fallback_betas")
    if betas is not None:
        ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
        if not ok:
            raise bad("fallback_betas", "None or a pair (beta1, beta2) of numbers in [0, 1)")
    eps = number("fallback_eps")
    if eps is None or not eps > 0:
        raise bad("fallback_eps", "a finite number > 0")


@dataclass
class PartSettings:
    """The settings one preconditioned layer uses at a step: the weight's and the bias's group
    lr and weight decay, and the (shared) momentum and damping of the layer's block."""

    lr_w: float
    lr_b: float
    wd_w: float
    wd_b: float
    momentum: float
    damping: float


def _captured(block: CurvatureBlock) -> bool:
    """Whether a block consumes captured rows (its layer is hooked)."""
    return bool(block.needs_a or block.needs_g or block.needs_second_pass)


def _key_label(key: Any) -> str:
    if isinstance(key, type):
        return f"nn.{key.__name__}" if key.__module__.startswith("torch.nn") else key.__name__
    return repr(key)


def _check_blocks(model: nn.Module, blocks: Mapping[Any, Any]) -> None:
    """Every ``blocks`` entry can apply: keys are module types with an adapter or names of layers with
    parameters of their own; values are recipes ``recipe(name, adapter, ctx)`` or None."""
    from optimizers import recipes as recipe_module

    modules = dict(model.named_modules())
    for key, recipe in blocks.items():
        label = _key_label(key)
        if isinstance(key, str):
            if key not in modules:
                raise ValueError(f"blocks names layers that the model does not have: [{key!r}]")
            module = modules[key]
            if not any(True for _ in module.parameters(recurse=False)):
                layers = [n for n, m in module.named_modules(prefix=key) if any(True for _ in m.parameters(recurse=False))]
                raise ValueError(
                    f"blocks key {key!r} names a {type(module).__name__} with no parameters of its own, so a block can "
                    f"never apply to it; name its layers instead (e.g. {layers[:3]}) or use a module type as the key"
                )
        elif isinstance(key, type) and issubclass(key, nn.Module):
            if recipe is not None and not any(issubclass(key, cls) for cls in ADAPTERS):
                raise ValueError(
                    f"blocks key {label}: there is no adapter for {key.__name__}, so a block can never apply to it; map "
                    f"it to None for the fallback rule, or register an adapter with curvature.register_adapter"
                )
        else:
            raise TypeError(f"blocks key {key!r} must be a module type (e.g. nn.Linear) or a layer name (e.g. 'encoder.0')")
        if recipe is None:
            continue
        factories = {n for n in ("kfac_block", "kbfgs_block", "kbfgsl_block", "diagonal_block")
                     if getattr(recipe_module, n) is recipe}
        if factories:
            raise TypeError(f"blocks[{label}] = {factories.pop()}: call the factory, e.g. {{{label}: {recipe.__name__}()}}")
        if isinstance(recipe, type) or not callable(recipe):
            raise TypeError(
                f"blocks[{label}] = {recipe!r} is not a recipe: map it to a recipe such as kfac_block() or "
                "kbfgsl_block(memory=20) (a callable recipe(name, adapter, ctx) -> CurvatureBlock), or to None"
            )
        try:
            inspect.signature(recipe).bind("layer", None, None)
        except TypeError:
            raise TypeError(
                f"blocks[{label}] = {recipe!r} cannot be called as a recipe: a recipe is called as "
                "recipe(name, adapter, ctx) and returns a CurvatureBlock; use kfac_block(), kbfgs_block(), ..."
            ) from None
        except ValueError:  # no signature available (builtin): trust it, the call checks the result
            pass


#: Why a step is reverted when its update made a parameter non-finite.
_BAD_NEW_POINT = "non-finite parameters after the update (step reverted)"
_LOSS_ROSE = "loss rose by more than max_loss_rise at the new point (step reverted)"
#: Why a first pass is skipped.
_NONFINITE_LOSS, _NONFINITE_GRADIENT = "non-finite loss", "non-finite gradient"


def loss_rose(before: torch.Tensor | float, after: torch.Tensor | float, factor: float) -> torch.Tensor | bool:
    r"""Whether :math:`f^+ - f > (\text{factor} - 1)\,|f|` (on the device for tensors, no host read)."""
    if isinstance(before, torch.Tensor) or isinstance(after, torch.Tensor):
        f = before.detach() if isinstance(before, torch.Tensor) else torch.tensor(before)
        g = after.detach() if isinstance(after, torch.Tensor) else torch.tensor(after)
        g = g.to(f.device)
        return (g - f > (factor - 1.0) * f.abs()).reshape(())
    return after - before > (factor - 1.0) * abs(before)


def first_pass_flags(loss: torch.Tensor | None, grads: list[torch.Tensor]) -> torch.Tensor:
    """Two exact on-device flags, ``[loss finite, every gradient element finite]`` (no host read)."""
    device = grads[0].device if grads else (loss.device if loss is not None else None)
    loss_ok = torch.isfinite(loss.detach()).all() if loss is not None else torch.ones((), dtype=torch.bool, device=device)
    # exact and one reduction per gradient: NaN propagates into both extremes, ±inf is one of them (an
    # elementwise isfinite would write and reduce a boolean copy of every gradient)
    extremes = [e.to(device) for g in grads if g.numel()
                for e in torch.aminmax((torch.view_as_real(g) if g.is_complex() else g).detach())]
    grads_ok = (torch.isfinite(torch.stack(extremes)).all() if extremes
                else torch.ones((), dtype=torch.bool, device=device))
    return torch.stack([loss_ok, grads_ok.to(loss_ok.device)])


def first_pass_reason(values: list[float]) -> str | None:
    """The skip reason of a first pass from the values of :func:`first_pass_flags` (None when finite)."""
    loss_ok, grads_ok = values
    if not loss_ok:
        return _NONFINITE_LOSS
    return None if grads_ok else _NONFINITE_GRADIENT


def read_after_first_pass(first_flags: torch.Tensor | None, scalars: list[torch.Tensor]) -> list[float]:
    """Read ``scalars`` in one host read, with the deferred first-pass flags (``first_flags``, from
    :func:`first_pass_flags`) in front when given; raises :class:`_FirstPassNotFinite` when they say
    the first pass was not finite, else returns the values of ``scalars``."""
    flags = [] if first_flags is None else list(first_flags)
    values = read_scalars(flags + scalars)
    if flags and (reason := first_pass_reason(values[:len(flags)])) is not None:
        raise _FirstPassNotFinite(reason)
    return values[len(flags):]


class _FirstPassNotFinite(Exception):
    """Raised inside a step whose deferred first-pass check failed; carries the skip reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

#: State tensors whose leading sizes count stored pairs (L-BFGS memory) and so may differ.
_COUNTED = {"S": 1, "Y": 1, "SY": 2, "YY": 2}


def _compare_state(saved: Any, current: Any, path: str) -> None:
    """``saved`` has the structure of ``current``: same keys, and tensors of the same shape (a tensor
    may be None on one side, e.g. an inverse not computed yet; L-BFGS pair stacks may differ in count)."""
    if isinstance(current, Mapping):
        if not isinstance(saved, Mapping) or set(saved) != set(current):
            got = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
            raise ValueError(f"{path} has entries {got}, expected {sorted(current)}; the checkpoint is from a different optimizer")
        for key in current:
            _compare_state(saved[key], current[key], f"{path}.{key}")
        return
    if isinstance(current, torch.Tensor) and isinstance(saved, torch.Tensor):
        key = path.rpartition(".")[2]
        skip = _COUNTED.get(key, 0)
        if saved.ndim != current.ndim or saved.shape[skip:] != current.shape[skip:]:
            raise ValueError(
                f"{path} has shape {tuple(saved.shape)} but this model needs {tuple(current.shape)}; the checkpoint "
                "is from a different model"
            )


def _build_block(recipe: Any, name: str, adapter: LayerAdapter, ctx: RecipeContext) -> CurvatureBlock:
    """Call ``recipe(name, adapter, ctx)`` and check that it built a block."""
    block = recipe(name, adapter, ctx)
    if not isinstance(block, BlockProtocol):
        raise TypeError(f"the recipe for layer {name!r} returned {type(block).__name__}, not a curvature block "
                        "(a CurvatureBlock, or any object with the members of curvature.BlockProtocol)")
    return block


def _layer_block(recipe: Any, name: str, adapter: LayerAdapter, ctx: RecipeContext, data_parallel: bool) -> CurvatureBlock:
    """The layer's block: ``recipe``'s, or for a grouped/depthwise convolution a
    :class:`~curvature.chunked.ChunkedBlock` with one recipe-built block per group."""
    if getattr(adapter, "groups", 1) <= 1:
        return _build_block(recipe, name, adapter, ctx)
    if data_parallel:
        raise UnsupportedLayerError("per-group blocks of a grouped convolution have no data-parallel reduction")
    rows = adapter.chunk_rows()
    return ChunkedBlock(name, adapter, {
        c: (rows[c], _build_block(recipe, f"{name}[{c}]", a, ctx)) for c, a in adapter.chunk_adapters().items()
    }, split=adapter.split_record, label="group")


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
        fallback_lr: learning rate of the fallback rule (default None: 1e-3 for Adam, the group's
            ``lr`` for SGD; a scheduler changes ``lr``, not ``fallback_lr``).
        fallback_betas: Adam fallback (β1, β2) (default None: (the group's momentum, 0.999)).
        fallback_eps: Adam fallback ε.
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
        param_groups: optional torch.optim-style groups ``[{"params": ..., "lr": ...}, ...]`` that
            together cover every trainable parameter of ``model``. Keys (defaults from the arguments
            above): ``lr``, ``weight_decay``, ``momentum``, ``damping``, ``fallback_lr``,
            ``fallback_betas``, ``fallback_eps``. All are read at every step, so schedulers work
            per group. A layer's block and momentum follow the group of its weight; its bias may sit
            in another group with its own ``lr`` and ``weight_decay`` (but the same ``momentum``
            and ``damping``, else the step raises).
        recovery: the :class:`~optimizers.recovery.Recovery` policy after a fault at the new point
            (None/True: the default policy, which also reverts a second-pass step whose loss rose
            more than 10x, ``max_loss_rise``; False: revert/skip only, no rollback, no rise rule).
        strict: raise :class:`~curvature.linalg.InversionError` when a factor cannot be inverted
            even in float64, instead of keeping its previous inverse and raising its damping.
        exclude: layer names or glob patterns (``fnmatch``, e.g. ``"blocks.*.attn"``) that get the
            fallback rule whatever ``blocks`` says.

    **Fallback.** A layer without a block gets the fallback rule; ``describe()`` lists it with the
    reason (no block for its type, excluded, an unsupported configuration, parameters the adapter
    does not cover, a parametrized weight, tied weights that cannot share one block, an attention
    found at a step to be used for cross-attention). Lazy modules must run one forward first.
    Fully tied layers (the same weight and bias) share one summed block (see :meth:`_assign_blocks`).

    Attributes:
        counters: ``{"steps", "skipped_steps", "reverted_steps", "skip_reasons", "rollbacks",
            "recoveries", "secant_resets", "inversion_recoveries", "step_scale", "bad_point_streak",
            "runtime_fallbacks", "chunked_layers"}``
            (see :mod:`optimizers.recovery`); a skipped step
            (non-finite loss or gradient) leaves everything else unchanged, a reverted step (K-BFGS's
            second pass found a non-finite loss) is undone completely (see :meth:`step`).
        slots, blocks: the preconditioned layers and their blocks; ``fallback_modules`` the layers
            on the fallback rule.

    **Gradient accumulation.** Every forward with gradients enabled since the last ``zero_grad()``
    or ``step()`` is a micro-batch: with ``(loss / k).backward()`` per micro-batch the statistics
    and the step equal those of the full batch (see :mod:`curvature.capture`). ``zero_grad()`` and
    ``step()`` clear the captured statistics.
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
        fallback_lr: float | None = None,
        fallback_betas: tuple[float, float] | None = None,
        fallback_eps: float = 1e-8,
        loss_reduction: str = "mean",
        lag_factors: bool = False,
        require_closure: bool = False,
        fisher: str = "empirical",
        likelihood: str | None = None,
        kl_clip: float | None = None,
        inverse_method: str = "cholesky",
        seed: int = 0,
        param_groups: Iterable[Mapping[str, Any]] | None = None,
        exclude: Iterable[str] = (),
        recovery: Recovery | bool | None = None,
        strict: bool = False,
        distributed: bool | Communicator | None = None,
        distribute: str = "replicate",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        if ddp is not None:
            model = ddp.module  # layer names (and checkpoints) are those of the wrapped module
        self._ddp = ddp
        self.data_parallel = DataParallel(_communicator(distributed, ddp), distribute,
                                          loss_reduction if loss_reduction in ("mean", "sum") else "mean")
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

        if isinstance(exclude, str):
            raise TypeError("exclude must be a list of layer names or glob patterns, e.g. ['head', '*.norm*']")
        self.exclude = list(exclude)
        if not all(isinstance(e, str) for e in self.exclude):
            raise TypeError("exclude must be a list of layer names or glob patterns, e.g. ['head', '*.norm*']")
        self.model = model
        self.damping = make_damping(damping)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.curvature_update_freq, self.inverse_update_freq = curvature_update_freq, inverse_update_freq
        self.inverse_warmup_steps = inverse_warmup_steps
        self.fallback, self.loss_reduction, self.lag_factors = fallback, loss_reduction, bool(lag_factors)
        self.fisher, self.likelihood, self.kl_clip = fisher, likelihood, kl_clip
        self.inversion_stats = InversionStats()
        self.inverse_method = inverse_method
        self._built = False

        defaults = {"lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay),
                    "damping": float(self.damping.damping), "fallback_lr": fallback_lr,
                    "fallback_betas": None if fallback_betas is None else tuple(fallback_betas),
                    "fallback_eps": fallback_eps}
        _check_group(defaults, "the constructor")
        groups = self._initial_groups(model, param_groups)
        group_damping = {id(p): float(g.get("damping", defaults["damping"])) for g in groups for p in g["params"]}

        self.slots, self.fallback_modules = self._assign_blocks(model, blocks, group_damping)
        if not self.slots and not self.fallback_modules:
            raise ValueError("the model has no trainable parameters")
        self.data_parallel.attach(self.slots)
        self.require_closure = bool(require_closure) or any(s.block.needs_second_pass for s in self.slots.values())
        if self.damping.needs_reduction_ratio:
            lacking = [s.name for s in self.slots.values() if not s.block.has_quadratic_form]
            if lacking:
                raise ValueError(f"{type(self.damping).__name__} needs blocks with a quadratic model; {lacking} have none")

        super().__init__(groups, defaults)
        for i, group in enumerate(self.param_groups):
            _check_group(group, f"param_groups[{i}]")
        self._build_damping = {name: group_damping[id(s.weight)] for name, s in self.slots.items()}
        self._extra_params: OrderedDict[int, str] = OrderedDict()
        self.steps = 0
        self.counters: dict[str, Any] = {"steps": 0, "skipped_steps": 0, "reverted_steps": 0, "skip_reasons": {},
                                         "rollbacks": 0, "recoveries": 0, "secant_resets": 0,
                                         "inversion_recoveries": 0, "step_scale": 1.0,
                                         "bad_point_streak": 0,  # first passes failing on finite inputs in a row
                                         "runtime_fallbacks": 0,  # layers moved to the fallback rule at a step
                                         "chunked_layers": 0}  # layers given per-chunk blocks at a step
        self.runtime_fallbacks: dict[str, str] = {}
        self.runtime_chunked: list[str] = []
        self.recovery, self.strict = make_recovery(recovery), bool(strict)
        self._rollback_point: dict[str, Any] | None = None
        self._rollback_candidate: dict[str, Any] | None = None  # this step's point, kept if the step is accepted
        self._batch_inputs: list[tuple[tuple, dict]] = []
        first = next(p for g in self.param_groups for p in g["params"])
        self._generator = torch.Generator(device=first.device).manual_seed(seed)
        self._hooks: OrderedDict[int, Callable[[StepInfo], None]] = OrderedDict()
        self._precondition_hooks: OrderedDict[int, Callable] = OrderedDict()
        self.capture = LayerCapture({n: s.adapter for n, s in self.slots.items() if _captured(s.block)}, loss_reduction)
        for name, slot in self.slots.items():  # tied weights: every member's calls feed the one block
            for _, member in slot.shared if _captured(slot.block) else ():
                self.capture.share(name, member)
        self._inputs: list[tuple[tuple, dict]] = []
        self._internal_pass = False
        self._root_hook = model.register_forward_pre_hook(InertOnCopy(self._record_inputs), with_kwargs=True)
        self._param_layer: dict[int, str] = {id(p): name for name, m in model.named_modules()
                                             for p in m.parameters(recurse=False)}
        self._signature = self._model_signature()
        self._configure_capture(self.steps)
        self._built = True

    def _model_signature(self) -> tuple[int, ...]:
        return tuple(id(p) for p in self.model.parameters() if p.requires_grad)

    def _check_model(self) -> None:
        """The model's trainable parameters are those the optimizer was built (or extended) for."""
        if self._model_signature() == self._signature:
            return
        advice = ("the optimizer cannot follow a changed model: build a new optimizer after changing the model "
                  "(or add new parameters with add_param_group)")
        managed = {id(p) for g in self.param_groups for p in g["params"]}
        current = dict(self.model.named_modules())
        for name, slot in self.slots.items():
            if current.get(name) is not slot.module:
                what = "replaced" if name in current else "removed"
                raise RuntimeError(f"layer {name!r} was {what} after the optimizer was built; {advice}")
        for pname, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in managed:
                layer = pname.rpartition(".")[0]
                known = layer in self.slots or layer in self.fallback_modules
                what = f"has a new parameter {pname!r}" if known else "was added"
                raise RuntimeError(f"layer {layer!r} {what} after the optimizer was built; {advice}")
        names = {id(p) for p in self.model.parameters()}
        for p in (q for g in self.param_groups for q in g["params"]):
            layer = self._param_layer.get(id(p))
            if layer is None:
                continue
            if id(p) not in names:
                raise RuntimeError(f"a parameter of layer {layer!r} was removed from the model after the optimizer was built; {advice}")
            if not p.requires_grad and id(p) in self._signature:
                raise RuntimeError(
                    f"a parameter of layer {layer!r} was frozen (requires_grad=False) after the optimizer was built; "
                    f"{advice} (or set its group's lr to 0 to keep it fixed)"
                )
        self._signature = self._model_signature()  # e.g. parameters unfrozen again: nothing unknown

    @staticmethod
    def _initial_groups(model: nn.Module, param_groups) -> list[dict[str, Any]]:
        """The constructor's groups: one group of all trainable parameters, or the user's groups,
        which must cover every trainable parameter of the model (a parameter in no group would
        silently never be trained)."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        if param_groups is None:
            return [{"params": trainable}]
        if isinstance(param_groups, Mapping) or isinstance(param_groups, torch.Tensor):
            raise TypeError("param_groups must be a list of dicts like [{'params': [...], 'lr': 0.1}, ...]")
        groups = []
        for i, group in enumerate(param_groups):
            if not isinstance(group, Mapping) or "params" not in group:
                raise TypeError(f"param_groups[{i}] must be a dict with a 'params' entry, like "
                                "{'params': model.head.parameters(), 'lr': 0.01}")
            group = dict(group)
            params = group["params"]
            group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
            groups.append(group)
        listed = {id(p) for g in groups for p in g["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [names[id(p)] for p in trainable if id(p) not in listed]
        if missing:
            raise ValueError(
                f"parameters {missing} are trainable but in no entry of param_groups: add them to a group, "
                "or set requires_grad=False to freeze them"
            )
        return groups

    # ------------------------------------------------------------------ assignment
    def _assign_blocks(self, model: nn.Module, blocks: Mapping[type | str, Recipe | None], group_damping: Mapping[int, float]):
        """Give every module with trainable parameters a block, or the fallback rule with a reason.

        A module falls back (with ``fallback='error'``: raises) when it is excluded, when ``blocks``
        maps it to None or has no recipe for it, when it has no adapter or its adapter rejects its
        configuration, when it has parameters the adapter does not cover, when its weight is
        parametrized (``torch.nn.utils.parametrize``), or when the recipe rejects the layer.

        **Tied weights.** Modules sharing a Parameter form a tie group. The group gets *one* block
        (on the first module's slot; the others are listed in ``slot.shared``) when every member would
        get a block on its own with the same recipe, all members have the same adapter kind, hold the
        very same weight and bias (a *full* tie) and agree on the Kronecker shapes: the capture records
        every member's calls under the one layer name, so the statistics are those of one module
        applied to all the members' inputs (expand over calls, one sample count per pass). Otherwise
        every member falls back with the reason: a partial tie (only the weight shared), layers of
        different kinds (the embedding/output-head tie: the embedding's A is the token side, the
        head's the input side, a transposed Kronecker structure), attention projections, or a member
        that falls back on its own. Every parameter is assigned once.
        """
        _check_blocks(model, blocks)
        slots: OrderedDict[str, LayerSlot] = OrderedDict()
        fallback: OrderedDict[str, nn.Module] = OrderedDict()
        self.fallback_reasons: dict[str, str] = {}
        modules = [(n, m, [p for p in m.parameters(recurse=False) if p.requires_grad]) for n, m in model.named_modules()]
        lazy = [n for n, m, own in modules if any(isinstance(p, nn.parameter.UninitializedParameter) for p in own)]
        if lazy:
            raise ValueError(f"layers {lazy} are lazy and not initialized yet: run one forward pass on a batch "
                             "before building the optimizer")
        contextual = contextual_adapters(model)

        def fall_back(name: str, module: nn.Module, reason: str) -> None:
            if self.fallback == "error":
                raise UnsupportedLayerError(f"layer {name!r} ({type(module).__name__}): {reason}, and fallback='error'")
            fallback[name] = module
            self.fallback_reasons[name] = reason

        def candidate(name: str, module: nn.Module, own: list) -> tuple[Any, LayerAdapter, RecipeContext] | str:
            """(recipe, adapter, ctx) for the module on its own, or the reason it falls back."""
            if parametrize.is_parametrized(module) or isinstance(module, parametrize.ParametrizationList):
                return "parametrized weight (torch.nn.utils.parametrize)"
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
                return "excluded"
            if name in blocks:
                recipe = blocks[name]
            else:
                recipe = next((r for k, r in blocks.items() if isinstance(k, type) and isinstance(module, k)), None)
            if recipe is None:
                return "blocks maps it to None" if name in blocks or any(
                    isinstance(k, type) and isinstance(module, k) for k in blocks) else "no block for this layer type"
            try:
                adapter = contextual.get(id(module)) or adapter_for(module)
                if isinstance(adapter, UnsupportedLayerError):
                    raise adapter
            except UnsupportedLayerError as err:
                return str(err)
            if adapter is None:
                return f"no adapter for {type(module).__name__}"
            covered = {id(p) for p in adapter.parameters()}
            extra = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) not in covered]
            if extra:
                return f"parameters {extra} that {type(adapter).__name__} does not cover"
            if any(not p.requires_grad for p in adapter.parameters()):
                return "part of its weight/bias is frozen"
            weight = adapter.weight
            return recipe, adapter, RecipeContext(weight.dtype, weight.device, group_damping.get(id(weight), self.damping.damping))

        # tie groups: modules connected by shared trainable parameters (in model order)
        holder: dict[int, str] = {}
        group_of: dict[str, str] = {}

        def root(n: str) -> str:
            while group_of[n] != n:
                n = group_of[n]
            return n

        for name, _, own in modules:
            group_of[name] = name
            for p in own:
                other = holder.setdefault(id(p), name)
                if other != name:
                    a, b = root(other), root(name)
                    if a != b:
                        group_of[b] = a
        ties: dict[str, list[str]] = {}
        for name, _, own in modules:
            if own:
                ties.setdefault(root(name), []).append(name)
        info = {name: (module, own) for name, module, own in modules}

        for name, module, own in modules:
            if not own:
                continue
            members = ties[root(name)]
            if name != members[0]:
                continue  # handled with the group's first member
            found = {n: candidate(n, info[n][0], info[n][1]) for n in members}
            tie = self._tie_reason(members, found) if len(members) > 1 else None
            if tie is not None or isinstance(found[name], str):
                for n in members:
                    fall_back(n, info[n][0], found[n] if isinstance(found[n], str) else tie)
                continue
            recipe, adapter, ctx = found[name]
            try:
                block = _layer_block(recipe, name, adapter, ctx, self.data_parallel.active)
                if (block.needs_a or block.needs_g or block.needs_second_pass) and not getattr(adapter, "has_rows", True):
                    raise UnsupportedLayerError(f"{block.describe()} needs captured rows, which "
                                                f"{type(adapter).__name__} has none of (use diagonal_block(source='gradient'), which needs only "
                                                "the gradient)")
            except UnsupportedLayerError as err:
                for n in members:
                    fall_back(n, info[n][0], str(err) if n == name else f"tied weights shared with {name!r}, which "
                              f"falls back ({err})")
                continue
            slots[name] = LayerSlot(name, module, adapter, block,
                                    shared=tuple((n, found[n][1]) for n in members[1:]), recipe=recipe, ctx=ctx)
        return slots, fallback

    @staticmethod
    def _tie_reason(members: list[str], found: Mapping[str, Any]) -> str | None:
        """Why the tie group ``members`` cannot share one block (None: it can). ``found[n]`` is the
        member's own (recipe, adapter, ctx), or the reason it falls back on its own."""
        bad = [n for n in members if isinstance(found[n], str)]
        if bad:
            return f"tied weights shared with {bad}, which fall back on their own"
        adapters = {n: found[n][1] for n in members}
        kinds = {n: type(a).__name__ for n, a in adapters.items()}
        first = members[0]
        if len(set(kinds.values())) > 1:
            one_hot = [n for n, a in adapters.items() if getattr(a, "one_hot_input", False)]
            if one_hot:
                return (f"tied weights shared between {members}: an embedding's gradient matrix is the transpose of a "
                        "Linear-like layer's (its A is the token side, the other's A the input side), so the two "
                        "Kronecker structures are transposed and cannot be summed in one block")
            return f"tied weights shared between {members}, layers of different kinds ({sorted(set(kinds.values()))}); " \
                   "no common Kronecker block"
        if any(getattr(a, "functional_weight", None) is not None for a in adapters.values()):
            return f"tied weights shared between {members}: tied attention projections are not supported"
        params = {n: [id(p) for p in a.parameters()] for n, a in adapters.items()}
        if any(params[n] != params[first] for n in members):
            return (f"partial tie between {members}: they share some but not all of their weight/bias (one summed "
                    "block for tied weights needs the very same weight and bias in every layer)")
        if any((a.a_dim, a.g_dim) != (adapters[first].a_dim, adapters[first].g_dim) for a in adapters.values()):
            return f"tied weights shared between {members} with different Kronecker shapes"
        if any(found[n][0] is not found[first][0] for n in members):
            return f"tied weights shared between {members}, which blocks maps to different recipes"
        return None

    def _chunked_block(self, slot: LayerSlot) -> CurvatureBlock:
        """The block-diagonal block over the adapter's chunks, each built by the slot's recipe
        (raises UnsupportedLayerError when the recipe rejects a chunk or under data-parallel training)."""
        if self.data_parallel.active:
            raise UnsupportedLayerError("per-chunk blocks have no data-parallel reduction")
        chunks, rows = slot.adapter.chunk_adapters(), slot.adapter.chunk_rows()
        return ChunkedBlock(slot.name, slot.adapter, {
            c: (rows[c], _build_block(slot.recipe, f"{slot.name}[{c}]", a, slot.ctx)) for c, a in chunks.items()})

    def _apply_runtime_fallbacks(self, names: Mapping[str, str] | None = None,
                                 chunked: Iterable[str] | None = None) -> None:
        """Adapt layers to how the model calls them, before a step mutates anything (validate, then mutate).

        * A layer whose adapter found that its weight is applied in row chunks to different inputs
          (``adapter.modes == {"cross"}``: ``nn.MultiheadAttention`` used for cross-attention) gets a
          :class:`~curvature.chunked.ChunkedBlock`: one block per q/k/v chunk built by the layer's recipe
          (``counters["chunked_layers"]``, ``describe()`` says "per chunk").
        * A layer whose adapter found that its rows cannot be captured (``adapter.runtime_fallback``,
          e.g. an attention called both as self- and cross-attention), or whose recipe rejects the
          chunks, moves to the fallback rule: its block, capture hooks and momentum matrix are dropped,
          ``describe()`` lists it with the reason, ``counters["runtime_fallbacks"]`` counts it.

        Deterministic and permanent; ``state_dict()`` keeps both lists (``names``: name -> reason and
        ``chunked``, from a checkpoint) so that a reloaded optimizer does the same.
        """
        if chunked is None:
            chunked = [n for n, s in self.slots.items() if getattr(s.adapter, "modes", None) == {"cross"}
                       and _captured(s.block) and not isinstance(s.block, ChunkedBlock)]
        names = dict(names) if names is not None else {}
        for name in chunked:
            slot = self.slots.get(name)
            if slot is None or isinstance(slot.block, ChunkedBlock):
                continue
            try:
                slot.block = self._chunked_block(slot)
            except UnsupportedLayerError as err:
                names.setdefault(name, f"cross-attention: the packed q/k/v projection is applied in chunks to "
                                       f"different inputs, and the per-chunk blocks are not available ({err})")
                continue
            self.runtime_chunked.append(name)
            self.counters["chunked_layers"] = self.counters.get("chunked_layers", 0) + 1
        for n, s in self.slots.items():
            reason = getattr(s.adapter, "runtime_fallback", None)
            if reason and _captured(s.block):
                names.setdefault(n, reason)
        moved = [n for n in names if n in self.slots]
        if not moved:
            return
        if self.fallback == "error":
            name = moved[0]
            raise UnsupportedLayerError(f"layer {name!r} ({type(self.slots[name].module).__name__}): {names[name]}, "
                                        "and fallback='error'; exclude the layer (exclude=[...]) or use a fallback rule")
        for name in moved:
            slot = self.slots.pop(name)
            self.capture.remove_layer(name)
            self._build_damping.pop(name, None)
            for n, module in [(name, slot.module)] + [(m, a.module) for m, a in slot.shared]:
                self.fallback_modules[n] = module
                self.fallback_reasons[n] = names[name]
            self.state.get(slot.weight, {}).pop("momentum_matrix", None)
            if self._rollback_point is not None:
                self._rollback_point["state"].get(slot.weight, {}).pop("momentum_matrix", None)
            self.runtime_fallbacks[name] = names[name]
            if name in self.runtime_chunked:
                self.runtime_chunked.remove(name)
        self.counters["runtime_fallbacks"] = self.counters.get("runtime_fallbacks", 0) + len(moved)
        self.data_parallel.assign(self.slots)

    def describe(self) -> str:
        """A table of which adapter and block (or fallback rule, with its learning rate and reason) each
        layer got. Every trainable parameter is counted once (a tied parameter in the first layer that
        holds it; the other layers of a summed tied block are listed with 0 parameters).
        """
        rows = [("layer", "module", "adapter", "curvature", "parameters")]
        for name, slot in self.slots.items():
            rows.append((name, type(slot.module).__name__, type(slot.adapter).__name__, slot.block.describe(),
                         str(sum(p.numel() for p in slot.adapter.parameters()))))
            for member, adapter in slot.shared:
                rows.append((member, type(adapter.module).__name__, type(adapter).__name__,
                             f"one summed block with {name!r} (tied weights)", "0"))
        seen = {id(p) for s in self.slots.values() for p in s.adapter.parameters()}
        for name, module in self.fallback_modules.items():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            count = sum(p.numel() for p in own if id(p) not in seen)
            seen.update(id(p) for p in own)
            reason = self.fallback_reasons.get(name)
            text = self._fallback_text(own[0] if own else None) + (f": {reason}" if reason else "")
            rows.append((name, type(module).__name__, "-", text, str(count)))
        for pid, label in self._extra_params.items():
            p = next(q for g in self.param_groups for q in g["params"] if id(q) == pid)
            rows.append((label, "Parameter", "-", self._fallback_text(p), str(p.numel())))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def _group_of(self, param: torch.Tensor | None) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is param for q in group["params"]):
                return group
        return self.defaults

    def _fallback_settings(self, group: Mapping[str, Any]) -> tuple[float, float, float, float]:
        """(lr, beta1, beta2, eps) of the fallback rule for a parameter of ``group``."""
        flr = group.get("fallback_lr")
        if flr is None:
            flr = 1e-3 if self.fallback == "adam" else group["lr"]
        betas = group.get("fallback_betas")
        beta1, beta2 = (float(group["momentum"]), 0.999) if betas is None else (float(betas[0]), float(betas[1]))
        return float(flr), beta1, beta2, float(group.get("fallback_eps", 1e-8))

    def _fallback_text(self, param: torch.Tensor | None) -> str:
        flr, b1, b2, eps = self._fallback_settings(self._group_of(param))
        if self.fallback == "adam":
            return f"fallback (adam, lr={flr:g}, betas=({b1:g}, {b2:g}), eps={eps:g})"
        return f"fallback ({self.fallback}, lr={flr:g}, momentum={b1:g})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (torch.optim semantics; missing settings take the defaults).

        A new parameter gets the fallback rule; with ``param_group["block"] = recipe`` the layers
        whose weight is in the group get a curvature block instead (the layer must have an adapter,
        and its bias must be in the same group). A layer's weight and bias are its adapter's, as when
        the optimizer is built: e.g. ``nn.MultiheadAttention``'s ``in_proj_weight`` and
        ``in_proj_bias``, and its ``out_proj`` gets the adapter of the functionally applied
        projection. With ``fallback="error"`` a parameter without a block is an error. No parameter
        is ever ignored.
        """
        if not getattr(self, "_built", False):
            super().add_param_group(param_group)
            return
        group = dict(param_group)
        recipe = group.pop("block", None)
        super().add_param_group(group)
        index = len(self.param_groups) - 1
        new = self.param_groups[index]
        try:
            _check_group(new, f"param_groups[{index}]")
            self._adopt_group(new, index, recipe)
        except Exception:
            self.param_groups.pop()
            raise

    def _adopt_group(self, group: dict[str, Any], index: int, recipe: Recipe | None) -> None:
        owner = {id(p): (name, m) for name, m in self.model.named_modules() for p in m.parameters(recurse=False)}
        if recipe is not None and not callable(recipe):
            raise TypeError(f"param_groups[{index}]['block'] must be a recipe such as kfac_block(), got {recipe!r}")
        ids = {id(p) for p in group["params"]}
        contextual = contextual_adapters(self.model)
        new_slots: list[LayerSlot] = []
        extra: list[tuple[int, str]] = []
        for j, p in enumerate(group["params"]):
            name, module = owner.get(id(p), (None, None))
            adapter = None
            if recipe is not None and module is not None:
                adapter = self._group_adapter(module, contextual)
                if adapter is None and p is getattr(module, "weight", None):
                    raise UnsupportedLayerError(f"layer {name!r}: no adapter for {type(module).__name__}, so it cannot get a block")
            if adapter is not None and p is adapter.weight:
                others = [q for q in adapter.parameters() if id(q) not in ids]
                if others:
                    raise ValueError(f"layer {name!r}: put its weight and bias in the same new group to give it a block")
                ctx = RecipeContext(p.dtype, p.device, float(group["damping"]))
                new_slots.append(LayerSlot(name, module, adapter, _layer_block(
                    recipe, name, adapter, ctx, self.data_parallel.active), recipe=recipe, ctx=ctx))
                continue
            if adapter is not None and adapter.has_bias and p is adapter.bias and id(adapter.weight) in ids:
                continue  # the bias of a layer that gets a block
            if self.fallback == "error":
                label = name if name is not None else f"param_groups[{index}][{j}]"
                raise UnsupportedLayerError(
                    f"parameter of {label!r} has no curvature block and fallback='error': pass a 'block' recipe "
                    "in the group, or build the optimizer with fallback='sgd' or 'adam'"
                )
            if module is None:
                extra.append((id(p), f"param_groups[{index}][{j}]"))
            elif name not in self.fallback_modules:
                self.fallback_modules[name] = module
        if new_slots:
            self.data_parallel.attach({**self.slots, **{slot.name: slot for slot in new_slots}})
        for slot in new_slots:
            self.slots[slot.name] = slot
            if _captured(slot.block):
                self.capture.add_layer(slot.name, slot.adapter)
            self._build_damping[slot.name] = float(group["damping"])
            if slot.block.needs_second_pass:
                self.require_closure = True
        for pid, label in extra:
            self._extra_params[pid] = label
        for p in group["params"]:
            if id(p) in owner:
                self._param_layer[id(p)] = owner[id(p)][0]
        self._signature = self._model_signature()
        self._configure_capture(self.steps)

    @staticmethod
    def _group_adapter(module: nn.Module, contextual: Mapping[int, Any]) -> LayerAdapter | None:
        """The adapter ``module`` gets when the optimizer is built (its contextual one, e.g. an attention's
        out_proj, else the registered one; None without), raising the adapter's UnsupportedLayerError."""
        adapter = contextual.get(id(module)) or adapter_for(module)
        if isinstance(adapter, UnsupportedLayerError):
            raise adapter
        return adapter

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or unset) the gradients and forget the statistics captured since the last step."""
        super().zero_grad(set_to_none=set_to_none)
        self._clear_captured()

    def _clear_captured(self) -> None:
        self.capture.clear()
        self._inputs = []
        self._batch_inputs = []

    @property
    def blocks(self) -> dict[str, CurvatureBlock]:
        """Layer name -> its curvature block."""
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
        """Forward pre-hook on the model: every forward with gradients enabled starts a new capture
        pass (a micro-batch); its inputs are kept for the Monte-Carlo Fisher pass, and referenced
        (for the finiteness check of a failed step) until the next step."""
        if torch.is_grad_enabled() and not self._internal_pass:
            self._batch_inputs.append((args, kwargs))
        if self.capture.config.active and torch.is_grad_enabled():
            self.capture.begin_pass()
            if self.fisher == "mc" and not self._internal_pass:
                self._inputs.append((args, kwargs))

    # ------------------------------------------------------------------ capture scheduling
    def _stats_due(self, k: int) -> bool:
        return k % self.curvature_update_freq == 0

    def _inverse_due(self, k: int) -> bool:
        return (k % self.inverse_update_freq == 0 or k <= self.inverse_warmup_steps
                or any(getattr(s.block, "first_inverse_due", False) for s in self.slots.values()))

    def _configure_capture(self, k: int) -> None:
        blocks = [s.block for s in self.slots.values()]
        second = any(b.needs_second_pass for b in blocks)
        due = self._stats_due(k)
        self.capture.set(
            a=second or (due and any(b.needs_a for b in blocks)),
            g=second or (due and self.fisher == "empirical" and any(b.needs_g for b in blocks)),
            h=second,
        )
        self._inputs = []
        self._batch_inputs = []

    # ------------------------------------------------------------------ the step
    def _nonfinite_reason(self, loss: torch.Tensor | float | None) -> str | None:
        """Why the first pass is unusable (non-finite loss or gradient), or None.

        One fused on-device reduction over the loss and every gradient and one host
        synchronization (the skip decision needs the host); the exact classification runs only
        when that reduction is not finite.
        """
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        tensors = grads + ([loss] if isinstance(loss, torch.Tensor) else [])
        if loss is not None and not isinstance(loss, torch.Tensor) and not math.isfinite(float(loss)):
            return _NONFINITE_LOSS
        if not tensors or bool(finite_flag(*tensors)):
            return None
        if isinstance(loss, torch.Tensor) and not math.isfinite(_as_float(loss)):
            return _NONFINITE_LOSS
        if not all_finite(*grads):
            return _NONFINITE_GRADIENT
        return None

    def _skip(self, k: int, reason: str, loss) -> None:
        self.counters["skipped_steps"] += 1
        self.counters["skip_reasons"][reason] = self.counters["skip_reasons"].get(reason, 0) + 1
        self._emit(StepInfo(step=k, lr=self.param_groups[0]["lr"], loss=loss, skipped=True, skip_reason=reason))

    def _emit(self, info: StepInfo) -> None:
        for hook in list(self._hooks.values()):
            hook(info)

    def _layer_settings(self) -> dict[str, PartSettings]:
        """Every layer's settings from the groups holding its weight and bias (read at every step)."""
        group_of: dict[int, tuple[int, dict[str, Any]]] = {}
        for i, group in enumerate(self.param_groups):
            _check_group(group, f"param_groups[{i}]")
            for p in group["params"]:
                group_of[id(p)] = (i, group)
        if self.damping.needs_reduction_ratio:
            values = {float(g["damping"]) for g in self.param_groups}
            if len(values) > 1:
                raise ValueError(
                    f"{type(self.damping).__name__} adapts one damping for all layers, but the param groups set "
                    f"{sorted(values)}: give every group the same damping"
                )
            self.damping.damping = values.pop()
        out: dict[str, PartSettings] = {}
        for name, slot in self.slots.items():
            iw, gw = group_of[id(slot.weight)]
            ib, gb = group_of[id(slot.bias)] if slot.adapter.has_bias else (iw, gw)
            for key in ("momentum", "damping"):
                if float(gw[key]) != float(gb[key]):
                    raise ValueError(
                        f"layer {name!r}: its weight (param_groups[{iw}]) and bias (param_groups[{ib}]) have different "
                        f"{key} ({gw[key]} and {gb[key]}); the layer's block and momentum act on [W|b] as one matrix, "
                        f"so give both groups the same {key} (lr and weight_decay may differ)"
                    )
            lam = float(gw["damping"])
            if slot.block.needs_second_pass and lam != self._build_damping[name]:
                raise ValueError(
                    f"layer {name!r}: {slot.block.kind} fixed lambda_A and mu2 from damping={self._build_damping[name]} "
                    f"when the optimizer was built, but param_groups[{iw}]['damping'] is now {lam}; build a new "
                    "optimizer with the new damping (or pass lambda_a= and mu2= explicitly) instead of changing it"
                )
            out[name] = PartSettings(float(gw["lr"]), float(gb["lr"]), float(gw["weight_decay"]),
                                     float(gb["weight_decay"]), float(gw["momentum"]), lam)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        """One optimization step. ``closure`` re-evaluates the loss (forward and backward) on the batch.

        Without a closure, the statistics are those captured by every forward/backward since the last
        ``zero_grad()`` or ``step()`` (gradient accumulation: see the README). With a closure, the
        closure's own passes are used (it may run several micro-batches, each ``(loss_j / k).backward()``,
        and return the total loss). The captured statistics are cleared by the step.

        Returns the loss at the current point (from the closure), or None without a closure.
        """
        return self._step(closure)

    def _step(self, closure: Callable[[], torch.Tensor] | None) -> Any:
        """The body of :meth:`step`, run under its ``torch.no_grad()`` (undecorated: mutation testing reaches it)."""
        if self.require_closure and closure is None:
            raise RuntimeError(
                f"{type(self).__name__} needs step(closure): the closure must zero the gradients, run "
                "forward and backward on the current batch and return the loss; it is called again at the "
                "new parameters on the same batch"
            )
        if self.damping.needs_reduction_ratio and closure is None:
            raise RuntimeError("adaptive damping needs step(closure) to measure the reduction ratio")
        self._check_model()
        k = self.steps
        loss = None
        self.data_parallel.begin_step()
        if closure is not None:
            self._configure_capture(k)
            with torch.enable_grad():
                loss = closure()
            self._check_loss(loss, "the closure")
        self._apply_runtime_fallbacks()  # before anything of the step is mutated
        records, inputs, batch_inputs = self.capture.records, self._inputs, self._batch_inputs
        self._clear_captured()
        settings = self._layer_settings()
        stats_due = self._stats_due(k)
        self._check_records(records, stats_due)
        self._check_gradients()
        second_pass = any(s.block.needs_second_pass for s in self.slots.values()) or self.damping.needs_reduction_ratio
        guarded = second_pass or self._inverse_due(k) or bool(self._precondition_hooks)
        if self._first_check_deferrable(k, loss, stats_due, second_pass, guarded):
            info = self._deferred_step(k, closure, loss, records, inputs, settings, stats_due, second_pass, guarded)
            if isinstance(info, str):  # the first pass was not finite; nothing of the attempt remains
                self._skip(k, self._first_pass_fault(info, batch_inputs), loss)
                self._configure_capture(k)
                return loss
        else:
            # one rank's non-finite loss or gradient makes every rank skip (one small all-reduce)
            agreement = self.data_parallel.agree(self._nonfinite_reason(loss), loss, records, list(self.slots))
            if agreement.reason is not None:
                self._skip(k, self._first_pass_fault(agreement.reason, batch_inputs), loss)
                self._configure_capture(k)
                return loss
            self.counters["bad_point_streak"] = 0
            self.data_parallel.set_grad_scales(records)  # per-sample rows of the global batch

            # Everything checkable is checked; what can still fail (an inversion, a user hook, the closure's
            # second call) is undone from a snapshot, so a step that raises leaves no trace but the error.
            snapshot = self._snapshot() if guarded else None
            point = self._light_snapshot(snapshot) if self.recovery.rollback or snapshot is not None else None
            try:
                info = self._mutate(k, closure, loss, records, inputs, settings, stats_due, second_pass, snapshot, point)
            except BaseException:
                if snapshot is not None:
                    self._restore(snapshot)
                raise
            self._rollback_candidate = point
        point = self._rollback_candidate
        self._rollback_candidate = None
        if not info.skipped:
            self._rollback_point = point if self.recovery.rollback else None
            self.recovery.after_accepted_step()
            self.counters["step_scale"] = self.recovery.step_scale
        self.steps += 1
        self.counters["steps"] = self.steps
        self._configure_capture(self.steps)
        self._emit(info)
        return loss

    def _first_check_deferrable(self, k: int, loss, stats_due: bool, second_pass: bool, guarded: bool) -> bool:
        """Whether this step may check its first pass together with the new point (one host read).

        The common step: one process, no precondition hooks, fixed damping, no Monte-Carlo pass this
        step, a loss that is a tensor (or absent). With KL clipping the flags are read with the
        clipping's inner products instead (the clip needs its own read before the update). A step that keeps a full
        snapshot anyway (a second pass, an inverse refresh) undoes a bad first pass from it; otherwise
        recovery's rollback point does, and every block must precondition from cached inverses only
        (``applies_cached_inverse``), so that the batch statistics can be folded in after the check.
        """
        if (self.data_parallel.active or self._precondition_hooks
                or self.damping.needs_reduction_ratio
                or (loss is not None and not isinstance(loss, torch.Tensor))
                or self._monte_carlo_due(stats_due)):
            return False
        return guarded or (self.recovery.rollback and self._directions_from_cached_inverses())

    def _monte_carlo_due(self, stats_due: bool) -> bool:
        """Whether this step runs the Monte-Carlo Fisher pass (at the current parameters, before the update)."""
        return stats_due and self.fisher == "mc" and any(s.block.needs_g for s in self.slots.values())

    def _directions_from_cached_inverses(self) -> bool:
        """Whether every block's direction reads only what its last inverse refresh computed, so that
        folding in the batch's statistics after the update gives the same step."""
        return all(declares(s.block, "applies_cached_inverse") for s in self.slots.values())

    def _deferred_step(self, k, closure, loss, records, inputs, settings, stats_due, second_pass, guarded
                       ) -> StepInfo | str:
        """The step with the first-pass check deferred to the step's single host read.

        Exact on-device flags of the loss and of every gradient (:func:`first_pass_flags`) are read
        together with the new point's check (and, with a second pass, every pair decision). When they
        say the first pass was not finite, everything the attempt changed is restored bit for bit
        (parameters, per-parameter state, factors; the gradients' tensors are put back on the
        parameters) and the skip reason is returned: the caller skips exactly as the checked step
        does. An error raised by the attempt on a non-finite first pass is treated the same way, since
        the checked step would have skipped before reaching it.
        """
        grads = [(p, p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]
        flags = first_pass_flags(loss if isinstance(loss, torch.Tensor) else None, [g for _, g in grads])
        self.data_parallel.agree(None, loss, records, list(self.slots))  # one process: bookkeeping, no read
        snapshot = self._snapshot() if guarded else None
        point = self._light_snapshot(snapshot)
        inversions, recoveries = copy.deepcopy(vars(self.inversion_stats)), self.counters.get("inversion_recoveries")

        def undo() -> None:
            self._restore_step(snapshot, point)
            for p, g in grads:
                p.grad = g
            vars(self.inversion_stats).update(inversions)  # an inversion of this batch's factors never happened
            if recoveries is not None:
                self.counters["inversion_recoveries"] = recoveries

        try:
            info = self._mutate(k, closure, loss, records, inputs, settings, stats_due, second_pass, snapshot, point,
                                first_flags=flags)
        except _FirstPassNotFinite as fault:
            undo()
            return fault.reason
        except Exception:
            undo()
            reason = first_pass_reason(read_scalars(list(flags)))
            if reason is not None:
                return reason
            raise
        except BaseException:
            undo()
            raise
        self.counters["bad_point_streak"] = 0
        self._rollback_candidate = point
        return info

    def _mutate(self, k, closure, loss, records, inputs, settings, stats_due, second_pass, snapshot, point,
                first_flags: torch.Tensor | None = None) -> StepInfo:
        """The mutating part of a step (statistics, inverses, momentum, direction, update, second pass).

        With ``first_flags`` (a deferred first-pass check, see :meth:`_deferred_step`) the first pass is
        checked in the step's one read; without a second pass the batch statistics are then folded in
        after that read. Raises :class:`_FirstPassNotFinite` when the flags say the first pass was not
        finite (the caller restores).
        """
        grads = {name: slot.adapter.grad_matrix() for name, slot in self.slots.items()}
        monte_carlo = self._monte_carlo_due(stats_due)
        if monte_carlo:
            self._monte_carlo_fisher_pass(records, inputs)
        # without a snapshot, blocks that precondition from cached inverses fold the batch in after the
        # new point is known to be finite, so a reverted step leaves every factor as it was
        late_statistics = (snapshot is None and point is not None and not monte_carlo
                           and self._directions_from_cached_inverses())
        if stats_due and not self.lag_factors and not late_statistics:
            self._update_statistics(records, grads)
        if self._inverse_due(k):
            self._refresh_inverses(settings)

        lr = float(self.param_groups[0]["lr"])
        pre, directions = {}, {}
        for name, slot in self.slots.items():
            g = grads[name]
            part = settings[name]
            if part.wd_w or part.wd_b:
                w = slot.weight.detach()
                b = slot.bias.detach() if slot.adapter.has_bias else None
                # [λ_w W | λ_b b] is a fresh tensor (the products, or their concatenation): the gradient is
                # added into it in place (x + g == g + x exactly), one full-size temporary instead of three
                g = slot.adapter.to_matrix(part.wd_w * w, None if b is None else part.wd_b * b).add_(g)
            state = self.state[slot.weight]
            if part.momentum > 0:
                buf = state.get("momentum_matrix")
                if buf is None:
                    buf = state["momentum_matrix"] = torch.zeros_like(g)
                buf.mul_(part.momentum).add_(g, alpha=1.0 - part.momentum)
                g = buf
            pre[name] = g
            directions[name] = slot.block.precondition(g)
            for hook in list(self._precondition_hooks.values()):
                hook(k, name, slot.block, g, directions[name])
        scale = self._kl_scale(settings, pre, directions, first_flags) * self.recovery.step_scale
        if self.kl_clip is not None:  # the clip's read held the deferred first-pass flags
            first_flags = None

        for name, slot in self.slots.items():
            d_w, d_b = slot.adapter.split_matrix(directions[name])
            part = settings[name]
            slot.weight.add_(d_w, alpha=-part.lr_w * scale)
            if d_b is not None:
                slot.bias.add_(d_b, alpha=-part.lr_b * scale)
        self._fallback_step(self.recovery.step_scale)
        if stats_due and self.lag_factors and not late_statistics:
            self._update_statistics(records, grads)

        info = StepInfo(step=k, lr=lr, loss=loss, step_scale=scale,
                        grads=grads, inputs=pre, directions=directions, records=records,
                        layer_lrs={n: (p.lr_w, p.lr_b) for n, p in settings.items()})
        params = [p for g in self.param_groups for p in g["params"]]
        if second_pass:  # the new point's check is fused with the second pass's (one synchronization)
            step_sizes = {n: settings[n].lr_w * scale for n in self.slots}
            self._second_pass(closure, records, loss, step_sizes, grads, directions, snapshot, info,
                              params if point is not None else [], first_flags)
        elif point is not None:  # one read: the new point, and the first pass when its check was deferred
            (point_ok,) = read_after_first_pass(first_flags, [finite_flag(*params)])
            if not point_ok and not all_finite(*params):
                self._revert_update(snapshot, point, info)
            elif late_statistics and stats_due:
                self._update_statistics(records, grads)
        return info

    def _revert_update(self, snapshot, point, info: StepInfo) -> None:
        """Undo a step whose new point is not finite. Everything is as before the step when the step kept a
        snapshot or folded its statistics in late; otherwise (a block whose direction may read the running
        statistics, on a step without a snapshot) the batch's finite statistics stay folded in."""
        self._restore_step(snapshot, point)
        self._count_revert(_BAD_NEW_POINT, info)

    def _restore_step(self, snapshot: dict[str, Any] | None, point: dict[str, Any]) -> None:
        """Put back what a step changed: from its full snapshot when it kept one, else from its light point."""
        if snapshot is not None:
            self._restore(snapshot)
        else:
            self._restore_light(point)

    def _check_loss(self, loss: Any, what: str) -> None:
        """The closure's loss is a scalar tensor or a number (None only when no pass needs it)."""
        if loss is None:
            if self.require_closure or self.damping.needs_reduction_ratio:
                raise TypeError(
                    f"{what} returned None: return the loss (after loss.backward()); {type(self).__name__} "
                    "compares it with the loss at the new point"
                )
            return
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"{what} returned a loss of shape {tuple(loss.shape)}; return a scalar, e.g. loss.mean() "
                    "(and call backward on that scalar)"
                )
        elif isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(f"{what} must return the loss as a scalar tensor or a number, got {type(loss).__name__}")

    def _check_records(self, records: Mapping[str, LayerRecord], stats_due: bool) -> None:
        """Every layer that needs rows this step has them, from every recorded forward call."""
        for name, slot in self.slots.items():
            block = slot.block
            need_a = block.needs_second_pass or (stats_due and block.needs_a)
            need_g = block.needs_second_pass or (stats_due and block.needs_g and self.fisher == "empirical")
            rec = records.get(name)
            if rec is None:
                if need_a or need_g:
                    raise RuntimeError(
                        f"no statistics were captured for layer {name!r}: run forward and backward on the "
                        "batch (with gradients enabled) before step(), or pass a closure"
                    )
                continue
            rows = next((r for r in (rec.input_rows, rec.h_rows, rec.grad_rows) if r is not None), None)
            if rec.batch_size == 0 or (rows is not None and rows.shape[0] == 0):
                raise RuntimeError(
                    f"layer {name!r} saw an empty batch (0 samples): skip empty batches in the training loop (e.g. "
                    "DataLoader(..., drop_last=True), or `if len(x) == 0: continue`)"
                )
            if need_g and (rec.missing_grads or rec.grad_rows is None):
                raise RuntimeError(
                    f"layer {name!r}: {rec.missing_grads or rec.calls} of the {rec.calls} forward calls recorded since "
                    "the last zero_grad()/step() got no gradient; every forward with gradients enabled counts as a "
                    "micro-batch: call loss.backward() after every training forward (also in the closure), run "
                    "evaluation forwards under torch.no_grad(), and check that the loss depends on this layer"
                )

    def _check_gradients(self) -> None:
        """Dense gradients only: every rule of the step (checks, momentum, the fallback) is dense."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise TypeError(
                        f"a parameter of shape {tuple(p.shape)} has a {p.grad.layout} gradient; "
                        f"{type(self).__name__} needs dense gradients: create the module with sparse=False "
                        "(e.g. nn.Embedding(..., sparse=False)) or optimize that parameter with another optimizer"
                    )

    def _update_statistics(self, records: Mapping[str, LayerRecord], grads: Mapping[str, torch.Tensor]) -> None:
        for name, slot in self.slots.items():
            if records.get(name) is None and (slot.block.needs_a or slot.block.needs_g):
                raise RuntimeError(
                    f"no statistics were captured for layer {name!r}: run forward and backward on the "
                    "batch (with gradients enabled) before step(), or pass a closure"
                )
        # one process: each block folds its rows in; several: statistics averaged over ranks first
        self.data_parallel.update_statistics(self.slots, records, grads, LayerRecord)

    def _refresh_inverses(self, settings: Mapping[str, PartSettings]) -> None:
        # layerwise: each layer's owner inverts and broadcasts; otherwise the plain batched inverter
        inverter = self.data_parallel.inverter(BatchedInverter(self.inverse_method, self.inversion_stats, strict=self.strict))
        policies: dict[float, DampingPolicy] = {}
        for name, slot in self.slots.items():
            lam = settings[name].damping
            if lam == self.damping.damping:
                policy = self.damping
            else:  # a group with its own damping: the same policy with that λ
                policy = policies.get(lam)
                if policy is None:
                    policy = policies[lam] = copy.copy(self.damping)
                    policy.damping = lam
            slot.block.request_inverses(inverter.for_layer(name), policy)
        inverter.run()
        self.counters["inversion_recoveries"] = self.inversion_stats.recovered

    def _kl_scale(self, settings: Mapping[str, PartSettings], inputs, directions,
                  first_flags: torch.Tensor | None = None) -> float:
        r""":math:`\nu = \min(1, \sqrt{c / v})` with :math:`v = \sum \alpha^2\langle d, m\rangle` over
        layers (and over weight and bias parts with their own learning rates).

        One host read for every layer's inner products, together with a deferred first-pass check
        (``first_flags``; raises :class:`_FirstPassNotFinite` when it failed)."""
        if self.kl_clip is None:
            return 1.0
        sums = []  # every layer's inner products, read from the device at once
        for name, slot in self.slots.items():
            part, d, m = settings[name], directions[name], inputs[name]
            if part.lr_w == part.lr_b:
                sums.append(torch.sum(d * m))
            else:
                (dw, db), (mw, mb) = slot.adapter.split_matrix(d), slot.adapter.split_matrix(m)
                sums += [torch.sum(dw * mw), torch.sum(db * mb)]
        values = iter(read_after_first_pass(first_flags, sums))
        vg = 0.0
        for name in self.slots:  # the same Python arithmetic as one read per layer
            part = settings[name]
            if part.lr_w == part.lr_b:
                vg += next(values) * part.lr_w * part.lr_w
            else:
                vg += next(values) * part.lr_w**2 + next(values) * part.lr_b**2
        if not vg > 0:
            return 1.0
        return min(1.0, math.sqrt(self.kl_clip / vg))

    def _slot_param_ids(self) -> set[int]:
        return {id(p) for s in self.slots.values() for p in s.adapter.parameters()}

    def _fallback_step(self, scale: float = 1.0) -> None:
        """The fallback rule, with each group's settings (learning rate × ``scale``), on every parameter without a block."""
        in_slots = self._slot_param_ids()
        for group in self.param_groups:
            flr, beta1, beta2, eps = self._fallback_settings(group)
            for p in group["params"]:
                if id(p) in in_slots or p.grad is None:
                    continue
                fallback_update(p, p.grad, self.state[p], rule=self.fallback, lr=flr * scale, momentum=beta1,
                                weight_decay=float(group["weight_decay"]), betas2=beta2, eps=eps)

    def _snapshot(self) -> dict[str, Any]:
        """Copies of everything a step mutates apart from the counters: parameters, per-parameter
        state (momentum, fallback moments), every block's factors (by ``revert_state``: references to
        the tensors a step replaces), the damping policy and the sampler."""
        return {
            "params": [(p, p.detach().clone()) for g in self.param_groups for p in g["params"]],
            "state": {p: {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in s.items()}
                      for p, s in self.state.items()},
            # a block's revert_state may reference the tensors a step replaces instead of mutating in
            # place (load_state_dict copies); see curvature.factors.Factor.revert_state
            "blocks": {name: revert_state(slot.block) for name, slot in self.slots.items()},
            "damping": copy.deepcopy(self.damping.state_dict()),
            "groups_damping": [g["damping"] for g in self.param_groups],
            "generator": self._generator.get_state(),
        }

    def _light_snapshot(self, full: dict[str, Any] | None) -> dict[str, Any]:
        """Parameters and per-parameter state only (the point a rollback returns to); shared with
        ``full`` when the step already took a complete snapshot."""
        if full is not None:
            return {"params": full["params"], "state": full["state"]}
        return {"params": [(p, p.detach().clone()) for g in self.param_groups for p in g["params"]],
                "state": {p: {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in s.items()}
                          for p, s in self.state.items()}}

    def _restore_light(self, point: dict[str, Any]) -> None:
        """Put back parameters and per-parameter state from :meth:`_light_snapshot` (copies, so the
        point stays intact)."""
        with torch.no_grad():
            for p, value in point["params"]:
                p.copy_(value)
        for p in [q for q in self.state if q not in point["state"]]:
            del self.state[p]
        for p, s in point["state"].items():
            self.state[p] = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in s.items()}

    def _count_revert(self, reason: str, info: StepInfo) -> None:
        self.counters["reverted_steps"] += 1
        self.counters["skip_reasons"][reason] = self.counters["skip_reasons"].get(reason, 0) + 1
        info.skipped, info.skip_reason = True, reason
        self._recover()

    def _first_pass_fault(self, reason: str, batch_inputs: list) -> str:
        """Classify a non-finite first pass; roll back when the point itself is bad. Returns the skip reason.

        Non-finite model inputs are a data fault: the step is skipped and nothing else happens. On
        finite inputs, the second such step in a row means the parameters are the problem: the
        optimizer returns to the point before the last applied step (if it kept it) and recovers.
        """
        if batch_inputs and not inputs_finite(batch_inputs):
            return "non-finite input batch"
        self.counters["bad_point_streak"] = self.counters.get("bad_point_streak", 0) + 1
        if self.counters["bad_point_streak"] >= 2 and self._rollback_point is not None and self.recovery.enabled:
            self._restore_light(self._rollback_point)
            self._rollback_point = None
            self.counters["bad_point_streak"] = 0
            self.counters["rollbacks"] += 1
            self._recover()
            return "non-finite loss or gradient at the point of the last step (rolled back)"
        return reason

    def _recover(self) -> None:
        """The recovery policy after a revert or a rollback: reset the secant memory, shrink the step."""
        if not self.recovery.enabled:
            return
        self.counters["recoveries"] += 1
        if self.recovery.reset_secant:
            self.counters["secant_resets"] += reset_secant_memory(s.block for s in self.slots.values())
        self.recovery.after_fault()
        self.counters["step_scale"] = self.recovery.step_scale

    def _restore(self, snapshot: dict[str, Any]) -> None:
        """Put back what :meth:`_snapshot` copied (bit-identical)."""
        with torch.no_grad():
            for p, value in snapshot["params"]:
                p.copy_(value)
        for p in [q for q in self.state if q not in snapshot["state"]]:
            del self.state[p]
        for p, s in snapshot["state"].items():
            self.state[p] = s
        for name, state in snapshot["blocks"].items():
            self.slots[name].block.load_state_dict(state)
        self.damping.load_state_dict(snapshot["damping"])
        for g, lam in zip(self.param_groups, snapshot["groups_damping"]):
            g["damping"] = lam
        self._generator.set_state(snapshot["generator"])

    def _second_pass(self, closure, before, loss, step_sizes, grads, directions, snapshot, info: StepInfo,
                     params: list[torch.Tensor], first_flags: torch.Tensor | None = None) -> None:
        """The closure at the new point; the blocks consume the pairs, or the step is reverted.

        One host read on one process: a fused reduction over the new parameters (``params``, the
        new-point check; empty when recovery keeps no point), the loss and the pre-activation
        gradient rows at the new point, the deferred first-pass flags (``first_flags``) and every
        block's pair decisions (their candidates are computed on the device first). With several
        ranks the data-parallel agreement adds its all-reduce and the blocks read their decisions
        themselves; adaptive damping (the reduction ratio) reads its scalars on the host.
        Raises :class:`_FirstPassNotFinite` when ``first_flags`` say the first pass was not finite.
        """
        self.capture.set(h=True, g=True, preactivation_grads_only=True)
        self._internal_pass = True
        no_sync = self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()
        try:
            with frozen_parameters([p for g in self.param_groups for p in g["params"]]), torch.enable_grad(), no_sync:
                loss_after = closure()
        finally:
            self._internal_pass = False
        after = self.capture.records
        self.capture.clear()
        self._check_loss(loss_after, "the closure (second call, at the new point)")
        info.loss_after = loss_after
        rows = [r.grad_rows for r in after.values() if r.grad_rows is not None]
        fused = params + rows + ([loss_after] if isinstance(loss_after, torch.Tensor) else [])
        missing = [name for name, slot in self.slots.items() if slot.block.needs_second_pass
                   and (name not in after or name not in before or after[name].grad_rows is None)]
        rise = None if self.damping.needs_reduction_ratio else self.recovery.loss_rise_factor
        one_process = not self.data_parallel.active
        rose: list[torch.Tensor] = []
        if rise is not None and one_process and loss is not None and loss_after is not None:
            rose = [torch.as_tensor(loss_rose(loss, loss_after, rise))]
        finish = None
        if one_process and not missing:  # candidates first, then one read for everything
            scalars, finish = self.data_parallel.prepare_second_pass(self.slots, before, after)
            values = read_after_first_pass(first_flags, [finite_flag(*fused)] + rose + scalars)
            decisions = values[1 + len(rose):]
        else:
            values = read_after_first_pass(first_flags, [finite_flag(*fused)] + rose)
        blew_up = bool(rose) and bool(values[1])
        bad = bool(loss_after is not None and not isinstance(loss_after, torch.Tensor)
                   and not math.isfinite(float(loss_after))) or not values[0]
        if bad and params and not all_finite(*params):  # the update itself left the finite region
            self._restore(snapshot)
            self._count_revert(_BAD_NEW_POINT, info)
            return
        if bad:  # confirm exactly (the fused sum may overflow on finite values)
            bad = not (loss_after is None or math.isfinite(_as_float(loss_after))) or not all_finite(*rows)
        if not bad and missing:
            raise RuntimeError(
                f"layer {missing[0]!r} was not evaluated (forward and backward) by the closure on both calls: the "
                "closure must run the same batch through the model and call backward every time"
            )
        if not bad and blew_up:  # a finite blow-up on this batch: undone like a non-finite point
            self._restore(snapshot)
            self._count_revert(_LOSS_ROSE, info)
            return
        if finish is not None:
            if not bad:
                finish(decisions)
            loss_after_all = loss_after
        else:  # agreed over ranks; when no rank is bad the blocks consume the (global) batch means
            bad, loss_after_all = self.data_parallel.second_pass(self.slots, before, after, bad, loss_after)
        if bad:
            self._restore(snapshot)
            self._count_revert("non-finite loss or gradient at the new point (step reverted)", info)
            return
        if (rise is not None and not one_process and loss_after_all is not None
                and loss_rose(_as_float(self.data_parallel.agreed_loss(loss)), _as_float(loss_after_all), rise)):
            self._restore(snapshot)  # the rise of the losses agreed over ranks: every rank decides alike
            self._count_revert(_LOSS_ROSE, info)
            return
        if self.damping.needs_reduction_ratio:
            model_change = 0.0
            for name, slot in self.slots.items():
                delta = -step_sizes[name] * directions[name]
                model_change += float(torch.sum(grads[name] * delta))
                model_change += 0.5 * float(slot.block.curvature_quadratic(delta) + self.damping.damping * torch.sum(delta * delta))
            loss_before = _as_float(self.data_parallel.agreed_loss(loss))
            loss_after_all = _as_float(loss_after_all)
            rho = (loss_after_all - loss_before) / model_change if model_change < 0 else -math.inf
            info.reduction_ratio = rho
            self.damping.observe_reduction_ratio(rho)
            for group in self.param_groups:  # the adapted λ is visible (and settable) in every group
                group["damping"] = self.damping.damping

    def _monte_carlo_fisher_pass(self, records: dict[str, LayerRecord], inputs: list[tuple[tuple, dict]]) -> None:
        """G rows from targets sampled from the model: one forward per recorded micro-batch, each
        sampled loss divided by the number of micro-batches (the ``loss / k`` convention)."""
        if not inputs:
            raise RuntimeError("the Monte-Carlo Fisher needs the model's inputs: no forward pass was recorded")
        self.capture.set(g=True, preactivation_grads_only=True)
        self._internal_pass = True
        try:
            with frozen_parameters([p for g in self.param_groups for p in g["params"]]), torch.enable_grad():
                for args, kwargs in inputs:
                    out = self.model(*args, **kwargs)
                    # several ranks: noise drawn once for the global batch, this rank's rows of it
                    noise = self.data_parallel.mc_noise(
                        next(iter(self.slots)), lambda n, out=out: draw_noise(self.likelihood, out, n, self._generator),
                        out.shape[0]) if self.slots else None
                    loss = sampled_loss(out, self.likelihood, self.loss_reduction, self._generator, noise=noise)
                    if len(inputs) > 1 and self.loss_reduction == "mean":
                        loss = loss / len(inputs)
                    loss.backward()
        finally:
            self._internal_pass = False
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
        return self._warm_start(batches, loss_fn)

    def _warm_start(self, batches: Iterable, loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None) -> int:
        """The body of :meth:`warm_start`, run under its ``torch.no_grad()`` (undecorated: mutation testing reaches it)."""
        need_g = any(s.block.needs_g for s in self.slots.values()) and (loss_fn is not None or self.fisher == "mc")
        sums: dict[str, list] = {n: [None, None] for n in self.slots}
        count = 0
        for batch in batches:
            inputs, targets = (batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None))
            self.capture.set(a=True, g=need_g, preactivation_grads_only=True)
            self._internal_pass = True
            try:
                with frozen_parameters([p for g in self.param_groups for p in g["params"]]), torch.enable_grad():
                    out = self.model(inputs)
                    if need_g:
                        if self.fisher == "mc":
                            loss = sampled_loss(out, self.likelihood, self.loss_reduction, self._generator)
                        else:
                            loss = loss_fn(out, targets)
                        loss.backward()
            finally:
                self._internal_pass = False
            for name, slot in self.slots.items():
                rec = self.capture.records.get(name)
                if rec is None:
                    continue
                approx = getattr(slot.block, "approx", "expand")
                a = a_statistic(rec, slot.adapter, approx) if rec.input_rows is not None else None
                g = g_statistic(rec, approx) if need_g else None
                if a is None:
                    continue
                sums[name][0] = a if sums[name][0] is None else sums[name][0] + a
                if g is not None:
                    sums[name][1] = g if sums[name][1] is None else sums[name][1] + g
            count += 1
        self.capture.clear()
        if count == 0:
            raise ValueError("warm_start got no batches")
        for name, slot in self.slots.items():
            a_sum, g_sum = sums[name]
            a_avg = None if a_sum is None else a_sum / count
            g_avg = None if g_sum is None else g_sum / count
            present = [t for t in (a_avg, g_avg) if t is not None]
            reduced = iter(self.data_parallel.comm.weighted_mean([(t, count) for t in present]))  # over ranks' batches
            a_avg = None if a_avg is None else next(reduced)
            g_avg = None if g_avg is None else next(reduced)
            slot.block.warm_start(a_avg, g_avg)
        self._configure_capture(self.steps)
        return count

    # ------------------------------------------------------------------ state
    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because the loss or a gradient was not finite (``counters["skipped_steps"]``)."""
        return int(self.counters["skipped_steps"])

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state (groups, momentum, fallback moments) plus ``"secondorder"``: step count,
        counters, damping policy, sampler state, every block's factors and the block kinds."""
        state = super().state_dict()
        state["secondorder"] = {
            "version": 1,
            "steps": self.steps,
            "counters": {**self.counters, "skip_reasons": dict(self.counters["skip_reasons"])},
            "damping": self.damping.state_dict(),
            "generator": self._generator.get_state(),
            "blocks": {name: slot.block.state_dict() for name, slot in self.slots.items()},
            "kinds": {name: slot.block.describe() for name, slot in self.slots.items()},
            "recovery": self.recovery.state_dict(),
            "inversion_recovered": self.inversion_stats.recovered,
            "runtime_fallbacks": dict(self.runtime_fallbacks),
            "runtime_chunked": list(self.runtime_chunked),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of the same optimizer on the same model.

        Everything is validated before anything is loaded: the kind of every block, the layer names,
        and the shape of every tensor (factors, momentum, fallback moments); the first mismatch is
        named in a ``ValueError`` and the optimizer is left unchanged.
        """
        state_dict = copy.deepcopy(dict(state_dict))  # never alias the caller's checkpoint
        extra = state_dict.pop("secondorder", None)
        if extra is None:
            raise ValueError("not a secondorder optimizer state_dict (missing the 'secondorder' entry)")
        pending: dict[str, CurvatureBlock] = {}  # per-chunk blocks the saved optimizer had switched to
        for name in extra.get("runtime_chunked") or []:
            slot = self.slots.get(name)
            if slot is not None and not isinstance(slot.block, ChunkedBlock):
                try:
                    pending[name] = self._chunked_block(slot)
                except UnsupportedLayerError as err:
                    raise ValueError(f"layer {name!r}: the checkpoint holds per-chunk blocks, which this optimizer "
                                     f"cannot build ({err})") from None
        self._validate_checkpoint(extra, state_dict, pending)
        for name, block in pending.items():  # as the saved optimizer did
            self.slots[name].block = block
            self.runtime_chunked.append(name)
        self._apply_runtime_fallbacks(extra.get("runtime_fallbacks") or {}, chunked=())
        super().load_state_dict(state_dict)
        self.steps = int(extra["steps"])
        self.counters = {**extra["counters"], "skip_reasons": dict(extra["counters"]["skip_reasons"])}
        self.damping.load_state_dict(extra["damping"])
        self._generator.set_state(extra["generator"])
        for name, slot in self.slots.items():
            slot.block.load_state_dict(extra["blocks"][name])
        if "recovery" in extra:
            self.recovery.load_state_dict(extra["recovery"])
        self.inversion_stats.recovered = int(extra.get("inversion_recovered", 0))
        self._configure_capture(self.steps)

    def _validate_checkpoint(self, extra: Mapping[str, Any], torch_state: Mapping[str, Any],
                             pending: Mapping[str, CurvatureBlock] = {}) -> None:
        saved = extra.get("blocks", {})
        moved = extra.get("runtime_fallbacks") or {}  # layers the saved optimizer moved to the fallback rule
        slots = {n: s for n, s in self.slots.items() if n not in moved}
        missing, unexpected = sorted(set(slots) - set(saved)), sorted(set(saved) - set(slots))
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint's curvature layers do not match this optimizer's: missing {missing}, unexpected "
                f"{unexpected}; load it into an optimizer built the same way on the same model"
            )
        kinds = extra.get("kinds") or {}
        for name, slot in slots.items():
            block = pending.get(name, slot.block)
            if name in kinds and kinds[name] != block.describe():
                raise ValueError(
                    f"layer {name!r}: the checkpoint holds a {kinds[name]} block but this optimizer has "
                    f"{block.describe()}; load it into the same kind of optimizer"
                )
            _compare_state(saved[name], block.state_dict(), f"layer {name!r}: block state")
        groups = torch_state.get("param_groups", [])
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(h["params"]) for g, h in zip(groups, self.param_groups)):
            raise ValueError(
                f"the checkpoint has param groups of sizes {[len(g['params']) for g in groups]}, this optimizer "
                f"{[len(g['params']) for g in self.param_groups]}"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        matrix_shape = {id(s.weight): (s.adapter.g_dim, s.adapter.a_dim) for s in slots.values()}
        for index, pstate in torch_state.get("state", {}).items():
            p = params[int(index)]
            layer = self._param_layer.get(id(p), f"parameter {index}")
            for key, value in pstate.items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0:
                    continue
                want = matrix_shape.get(id(p)) if key == "momentum_matrix" else tuple(p.shape)
                if want is not None and tuple(value.shape) != tuple(want):
                    raise ValueError(
                        f"layer {layer!r}: the checkpoint's {key!r} has shape {tuple(value.shape)} but this model needs "
                        f"{tuple(want)}; the checkpoint is from a different model"
                    )
