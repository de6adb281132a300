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


@dataclass
class LayerRecord:
    """What was recorded for one layer in the last forward/backward pass."""

    batch_size: int = 0
    rows_per_sample: int = 1
    a_rows: torch.Tensor | None = None
    h_rows: torch.Tensor | None = None
    g_rows: torch.Tensor | None = None


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
                record.a_rows = adapter.activation_rows(x.detach())
                record.rows_per_sample = record.a_rows.shape[0] // n
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
                    record.g_rows = rows * scale if scale != 1.0 else rows

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
