r"""Layer capture: forward and tensor hooks that record what curvature blocks need.

For every registered layer and every forward pass with gradients enabled, the capture can record

* ``a``: the homogeneous input rows :math:`\bar a` (``R × d_a``),
* ``h``: the pre-activation rows :math:`h` (``R × d_g``),
* ``g``: the per-sample pre-activation gradient rows :math:`g_i = \partial \ell_i / \partial h`.

**Scaling.** Autograd gives :math:`\partial L/\partial h` of the *total* loss. For a batch-mean loss
:math:`L = \frac1N\sum_i \ell_i` that is :math:`g_i / N`, so with ``loss_reduction="mean"`` the rows
are multiplied by :math:`N` (the leading dimension of the layer input); with ``"sum"`` they are taken
as they are.

**Pre-activation-gradient-only passes.** With ``preactivation_grads_only`` the optimizer turns off
``requires_grad`` on the parameters; a layer whose output then does not require grad gets its
output replaced by a detached leaf that does, so backward computes :math:`\partial L/\partial h`
for every layer but no weight gradient (K-BFGS's second pass pays only for what it uses).

**Accumulation: every call's rows are extra rows.** Between two :meth:`LayerCapture.clear` (the
optimizer clears at ``zero_grad()`` and after every ``step()``) the capture keeps *every* forward
call of a layer, grouped into *passes*. A pass is one forward/backward of the model: it starts when
the owner calls :meth:`LayerCapture.begin_pass` (the optimizer does so from a forward pre-hook on
the model) and also at the first forward call after a backward reached a layer. The record of a
layer is built from all its calls by one rule:

* within a pass, the calls of a layer are the *same samples* seen several times ("expand", e.g. a
  module applied to several inputs in one forward, an RNN cell, a shared block): call :math:`c`
  contributes its rows to every weight-sharing group, and the rows of group :math:`i` are all its
  calls' rows (group-major order, exactly as if the inputs had been stacked along an extra
  dimension of one call); the pass's sample count is that of its first call (the adapter's
  ``num_samples``: every leading index for a Linear-like layer, every image for a convolution);
* different passes are *different samples* (gradient accumulation over micro-batches): the batch
  size is :math:`N = \sum_p N_p` and the rows are concatenated.

For ``loss_reduction="mean"`` the per-sample scale is this total :math:`N`: with the PyTorch
convention ``(loss_p / k).backward()`` for :math:`k` equal micro-batches of a mean loss, autograd's
rows are :math:`g_i / (kN_p) = g_i / N`, so the record is exactly the one a single full batch would
give (A over all rows, G with the full batch's per-sample scaling). Micro-batches of unequal size
with ``loss_p / k`` are not a full-batch mean, and are taken as they come.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from curvature.adapters import LayerAdapter

LossReduction = Literal["mean", "sum"]


class LayerRecord:
    """What was recorded for one layer since the last clear (all its forward calls, see the module doc).

    ``input_rows`` (the input rows without the homogeneous coordinate) and ``grad_rows`` (autograd's
    ∂L/∂h rows) with the per-sample ``grad_scale``; ``batch_size`` samples with ``rows_per_sample``
    rows each (on average); ``groups`` weight-sharing groups (sequences, images) whose rows are
    contiguous, ``group_rows`` listing ``(number of groups, rows per group)`` per pass, and
    ``reduce_scale`` the per-group scale of a mean loss over the groups (KFAC-reduce). ``a_rows`` (with the 1 appended when the layer has a bias) and ``g_rows``
    (= ``grad_scale · grad_rows``) are built on first access and cached; assigning them replaces
    the raw data. ``calls`` is the number of forward calls the record joins and ``missing_grads``
    how many of them received no gradient (a forward with gradients enabled but no backward).

    Args:
        batch_size: number of samples N.
        rows_per_sample: rows per sample T (R = N·T).
        a_rows, h_rows, g_rows: optional rows to set directly (tests, warm starts).
    """

    def __init__(self, batch_size: int = 0, rows_per_sample: int = 1, a_rows: torch.Tensor | None = None,
                 h_rows: torch.Tensor | None = None, g_rows: torch.Tensor | None = None) -> None:
        self.batch_size, self.rows_per_sample = batch_size, rows_per_sample
        self.h_rows = h_rows
        self.input_rows: torch.Tensor | None = None
        self.has_bias = False
        self.grad_rows: torch.Tensor | None = None
        self.grad_scale = 1.0
        self._a_rows: torch.Tensor | None = None
        self._g_rows: torch.Tensor | None = None
        self.calls = 1
        self.missing_grads = 0
        self.groups = batch_size
        self.group_rows: list[tuple[int, int]] | None = None
        self.reduce_scale = 1.0
        self.sample_major = True
        if a_rows is not None:
            self.a_rows = a_rows
        if g_rows is not None:
            self.g_rows = g_rows

    @property
    def a_rows(self) -> torch.Tensor | None:
        """The homogeneous input rows ``[a | 1]`` (``R × d_a``), built on first access; None if not captured."""
        if self._a_rows is None and self.input_rows is not None:
            rows = self.input_rows
            if self.has_bias:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
            self._a_rows = rows
        return self._a_rows

    @a_rows.setter
    def a_rows(self, rows: torch.Tensor | None) -> None:
        self._a_rows, self.input_rows, self.has_bias = rows, rows, False

    @property
    def g_rows(self) -> torch.Tensor | None:
        """The per-sample pre-activation gradient rows ``grad_scale · grad_rows``; None if not captured."""
        if self._g_rows is None and self.grad_rows is not None:
            self._g_rows = self.grad_rows * self.grad_scale if self.grad_scale != 1.0 else self.grad_rows
        return self._g_rows

    @g_rows.setter
    def g_rows(self, rows: torch.Tensor | None) -> None:
        self._g_rows, self.grad_rows, self.grad_scale = rows, rows, 1.0

    def group_index(self) -> torch.Tensor:
        """The group of every row (``R`` integers in ``[0, groups)``)."""
        rows = next(r for r in (self.input_rows, self.h_rows, self.grad_rows) if r is not None)
        plan = self.group_rows or [(self.groups, rows.shape[0] // max(self.groups, 1))]
        sizes = torch.cat([torch.full((n,), t, dtype=torch.long) for n, t in plan])
        return torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(rows.device)

    def group_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-group sums of ``rows`` (``groups × d``)."""
        out = rows.new_zeros(self.groups, rows.shape[1])
        return out.index_add_(0, self.group_index(), rows)

    def group_mean(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-group means of ``rows`` (``groups × d``)."""
        counts = torch.bincount(self.group_index(), minlength=self.groups).to(rows)
        return self.group_sum(rows) / counts.unsqueeze(1)

    def a_mean(self, approx: str = "expand") -> torch.Tensor:
        r"""The mean homogeneous input :math:`\bar{\bar a}` (1 in the bias coordinate): the mean over
        rows (expand) or over groups of the group means (reduce)."""
        rows = self.input_rows if approx == "expand" else self.group_mean(self.input_rows)
        mean = rows.mean(0)
        return torch.cat([mean, mean.new_ones(1)]) if self.has_bias else mean

    def h_mean(self, approx: str = "expand") -> torch.Tensor:
        r"""The mean pre-activation :math:`\bar h` (over rows, or over groups of the group means)."""
        rows = self.h_rows if approx == "expand" else self.group_mean(self.h_rows)
        return rows.mean(0)

    def sliced(self, in_cols: slice, out_cols: slice) -> "LayerRecord":
        """The record of a part of the layer that sees the input columns ``in_cols`` and produces the
        output columns ``out_cols`` (a group of a grouped convolution): the same rows, samples,
        weight-sharing groups and scales, the selected columns (views, no copy)."""
        part = LayerRecord(self.batch_size, self.rows_per_sample)
        for key in ("calls", "missing_grads", "groups", "group_rows", "reduce_scale", "sample_major", "has_bias",
                    "grad_scale"):
            setattr(part, key, getattr(self, key))
        part.input_rows = None if self.input_rows is None else self.input_rows[:, in_cols]
        part.h_rows = None if self.h_rows is None else self.h_rows[:, out_cols]
        part.grad_rows = None if self.grad_rows is None else self.grad_rows[:, out_cols]
        return part

    def take_grads(self, other: "LayerRecord") -> None:
        """Use ``other``'s pre-activation gradients (e.g. from a Monte-Carlo Fisher pass)."""
        self.grad_rows, self.grad_scale, self._g_rows = other.grad_rows, other.grad_scale, None
        self.reduce_scale = other.reduce_scale

    def g_mean(self, approx: str = "expand") -> torch.Tensor:
        r"""The mean pre-activation gradient :math:`\bar g`: of the per-sample rows ``grad_scale·g``
        (expand), or of the per-group sums ``reduce_scale·Σ_{rows of the group} g`` (reduce)."""
        if approx == "expand":
            return self.grad_rows.mean(0) * self.grad_scale
        return self.group_sum(self.grad_rows).mean(0) * self.reduce_scale


class ChunkedRecord:
    """The record of a layer whose weight was applied in row chunks to different inputs (an
    attention's q/k/v projections in cross-attention): ``parts`` maps each chunk to its own
    :class:`LayerRecord`. For the optimizer's checks it also carries ``batch_size`` (the first
    chunk's), ``calls`` and ``missing_grads`` (summed) and ``grad_rows`` (every chunk's gradient rows
    stacked; None if a chunk has none); ``input_rows``/``h_rows`` are None (there is no one input).
    """

    def __init__(self, parts: dict[str, LayerRecord]) -> None:
        self.parts = parts
        first = next(iter(parts.values()))
        self.batch_size = first.batch_size
        self.calls = sum(p.calls for p in parts.values())
        self.missing_grads = sum(p.missing_grads for p in parts.values())
        self.input_rows = self.h_rows = None
        self.has_bias = first.has_bias
        self._stack()

    def _stack(self) -> None:
        rows = [p.grad_rows for p in self.parts.values()]
        self.grad_rows = None if any(r is None for r in rows) else torch.cat(rows, dim=0)
        self.grad_scale = 1.0

    def take_grads(self, other: "ChunkedRecord") -> None:
        """Use ``other``'s pre-activation gradients chunk by chunk (e.g. from a Monte-Carlo Fisher pass)."""
        for chunk, part in self.parts.items():
            part.take_grads(other.parts[chunk])
        self._stack()


@dataclass
class CaptureConfig:
    """Which quantities the hooks record (all off: the hooks cost nothing)."""

    a: bool = False
    h: bool = False
    g: bool = False
    preactivation_grads_only: bool = False

    @property
    def active(self) -> bool:
        """Whether anything is recorded at all."""
        return self.a or self.h or self.g


@dataclass
class _Call:
    """One forward call of a layer: its pass, its sample count and the raw rows (grads come later)."""

    pass_id: int
    n: int
    has_bias: bool
    samples: int = 0
    input_rows: torch.Tensor | None = None
    h_rows: torch.Tensor | None = None
    grad_rows: torch.Tensor | None = None
    wants_grad: bool = False


def _join(calls: list[_Call], attr: str) -> torch.Tensor | None:
    """The rows ``attr`` of all calls as one ``R × d`` matrix (sample-major within a pass), or None
    if any call lacks them."""
    parts = [getattr(c, attr) for c in calls]
    if any(p is None for p in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    per_pass: list[torch.Tensor] = []
    i = 0
    while i < len(calls):
        j = i
        while j < len(calls) and calls[j].pass_id == calls[i].pass_id:
            j += 1
        chunk = parts[i:j]
        if len(chunk) == 1:
            per_pass.append(chunk[0])
        else:  # the same samples seen several times: each sample's rows from every call, in call order
            n, d = calls[i].n, chunk[0].shape[1]
            per_pass.append(torch.cat([c.reshape(n, -1, d) for c in chunk], dim=1).reshape(-1, d))
        i = j
    return per_pass[0] if len(per_pass) == 1 else torch.cat(per_pass, dim=0)


@dataclass
class LayerCapture:
    """Hooks on a set of layers (name -> adapter) recording rows according to :attr:`config`.

    ``records`` maps each layer that ran forward since the last :meth:`clear` (or :meth:`set`) to
    its :class:`LayerRecord`, built from *all* its calls by the accumulation rule of the module doc.

    Args:
        layers: layer name -> adapter (the adapter's module gets a forward hook).
        loss_reduction: "mean" (the loss averages over the batch) or "sum".
    """

    layers: dict[str, LayerAdapter]
    loss_reduction: LossReduction = "mean"
    config: CaptureConfig = field(default_factory=CaptureConfig)

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        self.layers = dict(self.layers)
        self._calls: dict[str, list[_Call]] = {}
        self._pass = 0
        self._new_pass = True
        self._version = 0
        self._cache: tuple[int, dict[str, LayerRecord]] | None = None
        self._handles: dict[str, list] = {}
        self._chunks: dict[str, list[tuple[str, str]]] = {}  # layer -> [(chunk, name of its calls)]
        for name, adapter in self.layers.items():
            self._hook(name, adapter)

    def _hook(self, name: str, adapter: LayerAdapter) -> None:
        hook = self._make_forward_hook(name, adapter)
        weight = getattr(adapter, "functional_weight", None)
        handles = self._handles.setdefault(name, [])
        if weight is None:
            handles.append(adapter.module.register_forward_hook(InertOnCopy(hook)))
            return
        handles.extend(watch_functional_linear(adapter.hook_module, weight, hook,
                                               getattr(adapter, "observe_call", None)))
        chunks = getattr(adapter, "chunk_adapters", None)
        if chunks is not None:  # F.linear on row views of the weight (cross-attention): one layer per chunk
            self._chunks[name] = []
            for chunk, chunk_adapter in chunks().items():
                sub = f"{name}[{chunk}]"
                self._chunks[name].append((chunk, sub))
                handles.extend(watch_functional_linear(
                    adapter.hook_module, weight, self._make_forward_hook(sub, chunk_adapter),
                    rows=chunk_adapter.weight_rows()))

    def add_layer(self, name: str, adapter: LayerAdapter) -> None:
        """Start capturing one more layer."""
        if name in self.layers:
            raise ValueError(f"layer {name!r} is already captured")
        self.layers[name] = adapter
        self._hook(name, adapter)

    def share(self, name: str, adapter: LayerAdapter) -> None:
        """Record ``adapter``'s module under the existing layer ``name`` as well (tied weights).

        Its forward calls join ``name``'s calls by the rule of the module doc: within a pass they are
        further calls on the same samples (expand over calls), exactly as if ``name``'s own module had
        been applied to both inputs. ``adapter`` must be of the kind of ``name``'s adapter and hold the
        same parameters (the caller checks this).
        """
        if name not in self.layers:
            raise ValueError(f"layer {name!r} is not captured")
        self._hook(name, adapter)

    def remove_layer(self, name: str) -> None:
        """Stop capturing one layer (its hooks, including shared ones, are removed; its calls forgotten)."""
        for handle in self._handles.pop(name, []):
            handle.remove()
        self.layers.pop(name, None)
        for sub in [name] + [sub for _, sub in self._chunks.pop(name, [])]:
            if self._calls.pop(sub, None) is not None:
                self._version += 1

    def remove(self) -> None:
        """Remove all hooks."""
        for handles in self._handles.values():
            for handle in handles:
                handle.remove()
        self._handles = {}

    def set(self, **flags: bool) -> None:
        """Replace the configuration (flags of :class:`CaptureConfig`) and forget old records."""
        self.config = CaptureConfig(**flags)
        self.clear()

    def clear(self) -> None:
        """Forget every recorded call (the next forward starts a new accumulation)."""
        self._calls = {}
        self._pass = 0
        self._new_pass = True
        self._version += 1

    def begin_pass(self) -> None:
        """Mark the start of a new forward pass of the model: the next calls are new samples."""
        self._new_pass = True

    @property
    def records(self) -> dict[str, LayerRecord]:
        """Layer name -> the record joining all its calls since the last clear (built lazily, cached)."""
        if self._cache is None or self._cache[0] != self._version:
            records = {}
            for name, calls in self._calls.items():
                try:
                    records[name] = self._record(calls)
                except RuntimeError as err:  # name the layer (tied layers share the name of their block)
                    raise RuntimeError(f"layer {name!r}: {err}") from None
            for name, chunks in self._chunks.items():  # chunk calls: one ChunkedRecord under the layer's name
                parts = {chunk: records.pop(sub) for chunk, sub in chunks if sub in records}
                if parts and name not in records:
                    records[name] = ChunkedRecord(parts)
            self._cache = (self._version, records)
        return self._cache[1]

    def _record(self, calls: list[_Call]) -> LayerRecord:
        first = calls[0]
        batch, groups = 0, 0
        plan: list[list[int]] = []  # per pass: [groups, rows of the pass]
        sample_major = True
        for i, call in enumerate(calls):
            if i == 0 or call.pass_id != calls[i - 1].pass_id:
                batch += call.samples
                groups += call.n
                plan.append([call.n, 0])
            elif call.n != calls[i - 1].n:
                raise RuntimeError(
                    f"a layer was called with different batch sizes ({calls[i - 1].n} and {call.n}) within one "
                    "forward pass; every call of a layer in one forward must see the same samples"
                )
            else:
                sample_major = sample_major and call.samples == call.n
            rows = next((r for r in (call.input_rows, call.h_rows, call.grad_rows) if r is not None), None)
            plan[-1][1] += 0 if rows is None else rows.shape[0]
        record = LayerRecord(batch_size=batch)
        record.calls = len(calls)
        record.groups = groups
        record.group_rows = [(n, r // n if n else 0) for n, r in plan]
        record.sample_major = sample_major
        record.input_rows = _join(calls, "input_rows")
        record.has_bias = first.has_bias if record.input_rows is not None else False
        record.h_rows = _join(calls, "h_rows")
        if any(c.wants_grad for c in calls):
            record.missing_grads = sum(c.grad_rows is None for c in calls)
            record.grad_rows = _join(calls, "grad_rows")
            mean = self.loss_reduction == "mean"
            record.grad_scale = float(batch) if mean else 1.0
            record.reduce_scale = float(groups) if mean else 1.0
        rows = next((r for r in (record.input_rows, record.h_rows, record.grad_rows) if r is not None), None)
        if rows is not None and batch > 0:
            r = rows.shape[0]
            record.rows_per_sample = r // batch if r % batch == 0 else r / batch
        return record

    def _make_forward_hook(self, name: str, adapter: LayerAdapter):
        """The hook recording one call of layer ``name``. For a chunk of a watched weight it is called as
        ``hook(None, (x,), output, columns)`` for an ``F.linear`` on a row view of that weight, and the
        layer's output (and gradient) rows are ``output[..., columns]``."""
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, columns: slice | None = None):
            cfg = self.config
            if not cfg.active or not torch.is_grad_enabled():
                return None
            if self._new_pass:
                self._pass += 1
                self._new_pass = False
            x = inputs[0]
            groups = adapter.num_groups(x) if hasattr(adapter, "num_groups") else int(x.shape[0])
            samples = adapter.num_samples(x) if hasattr(adapter, "num_samples") else int(x.shape[0])
            call = _Call(self._pass, groups, adapter.has_bias, samples)
            if cfg.a:
                call.input_rows = _factor_dtype(adapter.input_rows(x.detach()), adapter)
            if cfg.h:
                out = output.detach()
                call.h_rows = _factor_dtype(adapter.output_rows(out if columns is None else out[..., columns]), adapter)
            self._calls.setdefault(name, []).append(call)
            self._version += 1
            replaced = None
            if cfg.g:
                call.wants_grad = True
                if not output.requires_grad:
                    if not cfg.preactivation_grads_only:
                        return None
                    output = replaced = output.detach().requires_grad_(True)

                def grad_hook(grad: torch.Tensor, call: _Call = call) -> None:
                    grad = grad.detach()
                    call.grad_rows = _factor_dtype(adapter.output_rows(grad if columns is None else grad[..., columns]),
                                                   adapter)
                    self._version += 1
                    self._new_pass = True  # a backward ran: the next forward call is a new pass

                output.register_hook(grad_hook)
            return replaced

        return hook


def _factor_dtype(rows: torch.Tensor, adapter: LayerAdapter) -> torch.Tensor:
    """Rows in the dtype of the layer's weight (the factors' dtype): under ``torch.autocast`` the
    hooks see bfloat16/float16 activations and gradients, which are widened once here so that every
    statistic, mean and secant difference is formed in the factors' precision."""
    if rows.dtype not in _HALF:  # the common case, without looking up the weight
        return rows
    dtype = adapter.weight.dtype
    return rows.to(dtype) if dtype.is_floating_point and dtype != rows.dtype else rows


_HALF = (torch.float16, torch.bfloat16)


_original_linear = F.linear
_watched: dict[int, list] = {}
_watched_rows: dict[int, list[tuple[int, int, object]]] = {}


def _watching_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that also calls the capture hooks watching ``weight``, or watching rows of the
    tensor ``weight`` is a row view of (installed only while a watched module runs its forward)."""
    out = _original_linear(input, weight, bias)
    for hook in list(_watched.get(id(weight), ())):
        replaced = hook(None, (input,), out)
        if replaced is not None:
            out = replaced
    base = weight._base
    if base is not None and id(base) in _watched_rows and base.dim() == 2 and weight.dim() == 2:
        offset = weight.storage_offset() - base.storage_offset()
        if weight.stride() == base.stride() and offset % base.stride(0) == 0:
            start = offset // base.stride(0)
            stop = start + weight.shape[0]
            for r0, r1, hook in list(_watched_rows[id(base)]):
                if start <= r0 and r1 <= stop:
                    replaced = hook(None, (input,), out, slice(r0 - start, r1 - start))
                    if replaced is not None:
                        out = replaced
    return out


def watch_functional_linear(module: nn.Module, weight: torch.Tensor, hook, on_enter=None,
                            rows: tuple[int, int] | None = None) -> list:
    """Call ``hook(None, (x,), out)`` for every ``F.linear(x, weight, ...)`` made inside ``module``'s
    forward, as a module forward hook would be called.

    For layers whose weight is used functionally, never through its module (``nn.MultiheadAttention``
    calls ``F.linear`` on ``in_proj_weight`` and on ``out_proj.weight``). While ``module`` runs forward,
    ``torch.nn.functional.linear`` is replaced by a wrapper that looks the weight up; the original is
    restored when the forward ends (also when it raises). ``on_enter(args, kwargs)`` is called with
    the module's call arguments first. With ``rows=(r0, r1)`` the hook watches instead the calls on
    row *views* of ``weight`` (e.g. ``weight.chunk(3)``) that contain rows ``r0..r1-1``, and is called
    as ``hook(None, (x,), out, columns)`` with the columns of ``out`` those rows produced.
    Returns the hook handles.
    """
    table = _watched if rows is None else _watched_rows
    entry = hook if rows is None else (rows[0], rows[1], hook)

    def enter(mod, args, kwargs):
        if on_enter is not None:
            on_enter(args, kwargs)
        table.setdefault(id(weight), []).append(entry)
        F.linear = _watching_linear

    def leave(mod, args, output):
        hooks = table.get(id(weight), [])
        if entry in hooks:
            hooks.remove(entry)
        if not hooks:
            table.pop(id(weight), None)
        if not _watched and not _watched_rows:
            F.linear = _original_linear

    return [module.register_forward_pre_hook(InertOnCopy(enter), with_kwargs=True),
            module.register_forward_hook(InertOnCopy(leave), always_call=True)]


class InertOnCopy:
    """A hook callable that becomes a no-op in a deep copy of the module it is registered on.

    Optimizers register hooks on the user's model; ``copy.deepcopy(model)`` would otherwise copy
    (or share) them, so the copy would write into the original optimizer's records.
    """

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo) -> "InertOnCopy":
        return InertOnCopy(_inert_hook)


def _inert_hook(*args, **kwargs) -> None:
    return None


class frozen_parameters:
    """Context manager: parameters stop requiring grad inside, and are restored exactly on exit."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    def __enter__(self) -> "frozen_parameters":
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for p, flag in zip(self.params, self.saved):
            p.requires_grad_(flag)
