r"""Layer adapters: what curvature needs from one module type, and the layer gradient as one matrix.

A layer computes pre-activations :math:`h = W\bar a` with the homogeneous input
:math:`\bar a = [a; 1]` (the 1 only when the layer has a bias). Each adapter turns a module's
input and output (or output gradient) into *rows*: one row per sample, or per sample and spatial
location, so that

* ``input_rows(x)`` is :math:`R \times d_{in}` (the rows :math:`a^\top`; the homogeneous 1 of
  :math:`\bar a` is appended by the capture's record only when asked for),
* ``output_rows(h)`` is :math:`R \times d_g` (pre-activations or their gradients),

and it reads/writes the gradient as the single matrix :math:`[\nabla W \mid \nabla b]` of shape
:math:`d_g \times d_a`, so that :math:`\nabla W = \sum_{\text{rows}} g\,\bar a^\top`.

Adding a layer type means writing one adapter (any object with the members of
:class:`~curvature.protocols.AdapterProtocol`; subclassing :class:`LayerAdapter` gives the
``weight``/``bias`` defaults) and calling :func:`register_adapter`.

Kronecker factor convention (one formula for every adapter): with :math:`R = N T` rows from
:math:`N` samples and :math:`T` rows per sample,
:math:`A = \frac{c}{R}\sum \bar a\bar a^\top` and :math:`G = \frac1R\sum g g^\top`, where
:math:`c = T` for Conv2d (KFC, Grosse & Martens 2016: :math:`\Omega = \frac1N\sum_i\sum_t \bar a\bar a^\top`,
:math:`\Gamma = \frac1{NT}\sum_i\sum_t g g^\top`) and :math:`c = 1` for Linear, whose extra leading
dimensions are treated as extra samples.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedLayerError(TypeError):
    """A module has no adapter (and the optimizer was told not to fall back)."""


class LayerAdapter:
    """Base adapter: subclasses implement the row extraction for one module type."""

    #: Whether A sums over the locations of one sample (KFC) instead of averaging.
    sums_over_locations: bool = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.has_bias = getattr(module, "bias", None) is not None

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def a_dim(self) -> int:
        """d_a: columns of the gradient matrix ``[∇W | ∇b]`` (inputs per row, +1 with a bias); size of A."""
        raise NotImplementedError

    @property
    def g_dim(self) -> int:
        """d_g: rows of the gradient matrix (outputs per row); size of G."""
        raise NotImplementedError

    # --- rows ----------------------------------------------------------------------------------
    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of the input without the homogeneous coordinate, ``R × d_in``."""
        raise NotImplementedError

    def output_rows(self, h: torch.Tensor) -> torch.Tensor:
        """Rows of the pre-activation (or of its gradient), ``R × d_g``."""
        raise NotImplementedError

    # --- gradient as one matrix -------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        params = [self.module.weight]
        if self.has_bias:
            params.append(self.module.bias)
        return params

    def weight_matrix(self) -> torch.Tensor:
        """The parameters as one matrix ``[W | b]`` (``d_g × d_a``)."""
        return self.to_matrix(self.module.weight.detach(), self.module.bias.detach() if self.has_bias else None)

    def grad_matrix(self) -> torch.Tensor:
        r"""The gradient as one matrix :math:`[\nabla W \mid \nabla b]`; zeros where a gradient is None."""
        w = self.module.weight
        gw = w.grad if w.grad is not None else torch.zeros_like(w)
        gb = None
        if self.has_bias:
            b = self.module.bias
            gb = b.grad if b.grad is not None else torch.zeros_like(b)
        return self.to_matrix(gw, gb)

    def to_matrix(self, weight_like: torch.Tensor, bias_like: torch.Tensor | None) -> torch.Tensor:
        mat = weight_like.reshape(weight_like.shape[0], -1)
        if bias_like is not None:
            mat = torch.cat([mat, bias_like.reshape(-1, 1)], dim=1)
        return mat

    def split_matrix(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of :meth:`to_matrix`: ``(weight-shaped, bias-shaped or None)``."""
        w = self.module.weight
        if self.has_bias:
            return matrix[:, :-1].reshape(w.shape), matrix[:, -1].reshape(self.module.bias.shape)
        return matrix.reshape(w.shape), None


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on ``[N, d_in]`` or ``[N, ..., d_in]`` inputs (leading dims become extra rows)."""

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_features

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, h.shape[-1])


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` (groups = 1, any stride/padding/dilation, zeros padding) via unfold patches."""

    sums_over_locations = True

    def __init__(self, module: nn.Conv2d) -> None:
        if module.groups != 1:
            raise UnsupportedLayerError(f"Conv2d with groups={module.groups} is not supported (groups must be 1)")
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(f"Conv2d with padding_mode={module.padding_mode!r} is not supported")
        if isinstance(module.padding, str):
            raise UnsupportedLayerError("Conv2d with string padding ('same'/'valid') is not supported; use integers")
        super().__init__(module)

    @property
    def a_dim(self) -> int:
        m = self.module
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1] + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_channels

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Patch rows ``[N·H'·W', C_in·kh·kw]``, in the weight's (C_in, kh, kw) order, location-major.

        Built from strided views (``Tensor.unfold``) and one copy; this is what ``F.unfold`` computes,
        without its im2col kernel, which is slow on CPU when threads are contended.
        """
        m = self.module
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        windows = windows[..., ::dh, ::dw]  # [N, C, H', W', kh, kw]
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)

    def output_rows(self, h: torch.Tensor) -> torch.Tensor:
        return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # [N*H'*W', C_out]


#: Module type -> adapter factory (the public way to change it is :func:`register_adapter`).
ADAPTERS: dict[type[nn.Module], Callable[[nn.Module], LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
}


def register_adapter(module_type: type[nn.Module], adapter: Callable[[nn.Module], LayerAdapter], *,
                     replace: bool = False) -> None:
    """Make ``adapter(module)`` the adapter of every module of ``module_type`` (and of its subclasses
    that have no adapter of their own).

    Args:
        module_type: an ``nn.Module`` subclass.
        adapter: a callable (usually the adapter class) taking the module and returning an object
            with the members of :class:`~curvature.protocols.AdapterProtocol`; it may raise
            :class:`UnsupportedLayerError` for configurations it cannot handle.
        replace: allow replacing an existing registration (including the shipped ones).

    Raises:
        TypeError: ``module_type`` is not an ``nn.Module`` subclass or ``adapter`` is not callable.
        ValueError: ``module_type`` already has an adapter and ``replace`` is False.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(adapter):
        raise TypeError(f"adapter must be callable (e.g. an adapter class), got {adapter!r}")
    if module_type in ADAPTERS and not replace:
        raise ValueError(f"{module_type.__name__} already has the adapter {_name(ADAPTERS[module_type])}; "
                         "pass replace=True to replace it")
    ADAPTERS[module_type] = adapter


def unregister_adapter(module_type: type[nn.Module]) -> None:
    """Remove the adapter registered for exactly ``module_type`` (KeyError if there is none)."""
    if module_type not in ADAPTERS:
        raise KeyError(f"{getattr(module_type, '__name__', module_type)} has no registered adapter")
    del ADAPTERS[module_type]


def registered_adapters() -> dict[type[nn.Module], Callable[[nn.Module], LayerAdapter]]:
    """A copy of the registry: module type -> adapter factory."""
    return dict(ADAPTERS)


def _name(obj: object) -> str:
    return getattr(obj, "__name__", type(obj).__name__)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module``, or None if no class in its MRO has one (the most specific wins)."""
    for cls in type(module).__mro__:
        factory = ADAPTERS.get(cls)
        if factory is not None:
            return factory(module)
    return None
