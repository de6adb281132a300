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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from curvature.adapters import LayerAdapter

LossReduction = Literal["mean", "sum"]


class LayerRecord:
    """What was recorded for one layer in the last forward/backward pass.

    The hooks store raw tensors and nothing is copied until asked for: ``input_rows`` (the input
    rows without the homogeneous coordinate) and ``grad_rows`` (autograd's ∂L/∂h rows) with the
    per-sample ``grad_scale``. ``a_rows`` (with the 1 appended when the layer has a bias) and
    ``g_rows`` (= ``grad_scale · grad_rows``) are built on first access and cached; assigning
    them replaces the raw data.
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
        if a_rows is not None:
            self.a_rows = a_rows
        if g_rows is not None:
            self.g_rows = g_rows

    @property
    def a_rows(self) -> torch.Tensor | None:
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
        if self._g_rows is None and self.grad_rows is not None:
            self._g_rows = self.grad_rows * self.grad_scale if self.grad_scale != 1.0 else self.grad_rows
        return self._g_rows

    @g_rows.setter
    def g_rows(self, rows: torch.Tensor | None) -> None:
        self._g_rows, self.grad_rows, self.grad_scale = rows, rows, 1.0

    def a_mean(self) -> torch.Tensor:
        r"""The mean homogeneous input row :math:`\bar{\bar a}` (1 in the bias coordinate)."""
        mean = self.input_rows.mean(0)
        return torch.cat([mean, mean.new_ones(1)]) if self.has_bias else mean

    def take_grads(self, other: "LayerRecord") -> None:
        """Use ``other``'s pre-activation gradients (e.g. from a Monte-Carlo Fisher pass)."""
        self.grad_rows, self.grad_scale, self._g_rows = other.grad_rows, other.grad_scale, None

    def g_mean(self) -> torch.Tensor:
        """The mean per-sample pre-activation gradient row."""
        return self.grad_rows.mean(0) * self.grad_scale


@dataclass
class CaptureConfig:
    """Which quantities the hooks record (all off: the hooks cost nothing)."""

    a: bool = False
    h: bool = False
    g: bool = False
    preactivation_grads_only: bool = False

    @property
    def active(self) -> bool:
        return self.a or self.h or self.g


@dataclass
class LayerCapture:
    """Hooks on a set of layers (name -> adapter) recording rows according to :attr:`config`."""

    layers: dict[str, LayerAdapter]
    loss_reduction: LossReduction = "mean"
    config: CaptureConfig = field(default_factory=CaptureConfig)
    records: dict[str, LayerRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        self._handles = [
            adapter.module.register_forward_hook(InertOnCopy(self._make_forward_hook(name, adapter)))
            for name, adapter in self.layers.items()
        ]

    def remove(self) -> None:
        """Remove all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set(self, **flags: bool) -> None:
        """Replace the configuration (flags of :class:`CaptureConfig`) and forget old records."""
        self.config = CaptureConfig(**flags)
        self.records = {}

    def clear(self) -> None:
        self.records = {}

    def _make_forward_hook(self, name: str, adapter: LayerAdapter):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            cfg = self.config
            if not cfg.active or not torch.is_grad_enabled():
                return None
            x = inputs[0]
            n = x.shape[0]
            record = LayerRecord(batch_size=n)
            if cfg.a:
                record.input_rows = adapter.input_rows(x.detach())
                record.has_bias = adapter.has_bias
                record.rows_per_sample = record.input_rows.shape[0] // n
            if cfg.h:
                record.h_rows = adapter.output_rows(output.detach())
                record.rows_per_sample = record.h_rows.shape[0] // n
            self.records[name] = record
            replaced = None
            if cfg.g:
                if not output.requires_grad:
                    if not cfg.preactivation_grads_only:
                        return None
                    output = replaced = output.detach().requires_grad_(True)
                scale = float(n) if self.loss_reduction == "mean" else 1.0

                def grad_hook(grad: torch.Tensor, record: LayerRecord = record) -> None:
                    rows = adapter.output_rows(grad.detach())
                    record.rows_per_sample = rows.shape[0] // n
                    record.grad_rows, record.grad_scale, record._g_rows = rows, scale, None

                output.register_hook(grad_hook)
            return replaced

        return hook


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
