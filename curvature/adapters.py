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

**Samples and groups.** ``num_samples(x)`` is how many *samples* (loss terms of a mean loss) one
call's input holds and ``num_groups(x)`` how many *weight-sharing groups* (sequences, images): the
rows of one call are group-major, ``R / num_groups`` rows per group. A Linear-like layer treats
every leading index as a sample (``[B, S, D]``: ``B·S`` samples, one row each, ``B`` groups of
``S`` rows); a convolution treats each image as a sample whose locations are its rows (``N``
samples = ``N`` groups). See :mod:`curvature.capture` for how calls combine, and
:mod:`curvature.blocks` for the KFAC-expand / KFAC-reduce statistics built from the rows.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedLayerError(TypeError):
    """A module has no adapter (and the optimizer was told not to fall back)."""


class LayerAdapter:
    """Base adapter: subclasses implement the row extraction for one module type."""

    #: Whether the Kronecker A side is a one-hot input given as indices (Embedding): its A is diagonal.
    one_hot_input: bool = False
    #: The module whose forward call is hooked (default: the adapter's own module).
    hook_module: nn.Module | None = None
    #: When set, the rows come from ``F.linear(x, functional_weight, ...)`` calls made inside
    #: ``hook_module``'s forward (the module itself is never called, e.g. MultiheadAttention's out_proj).
    functional_weight: torch.Tensor | None = None
    #: Set (to the reason) when a forward call showed that this layer's rows cannot be captured, e.g.
    #: an attention called with distinct query/key/value; the optimizer then moves the layer to its
    #: fallback rule before the next step mutates anything (see ``CurvatureOptimizer.describe``).
    runtime_fallback: str | None = None

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
    def num_samples(self, x: torch.Tensor) -> int:
        """Samples in one call's input (default: the leading dimension)."""
        return int(x.shape[0])

    def num_groups(self, x: torch.Tensor) -> int:
        """Weight-sharing groups in one call's input (default: the leading dimension)."""
        return int(x.shape[0])

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of the input without the homogeneous coordinate, ``R × d_in``."""
        raise NotImplementedError

    def output_rows(self, h: torch.Tensor) -> torch.Tensor:
        """Rows of the pre-activation (or of its gradient), ``R × d_g``."""
        raise NotImplementedError

    # --- gradient as one matrix -------------------------------------------------------------------
    @property
    def weight(self) -> nn.Parameter:
        """The parameter playing the role of W (default: ``module.weight``)."""
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:
        """The parameter playing the role of b, or None (default: ``module.bias``)."""
        return self.module.bias if self.has_bias else None

    def parameters(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.has_bias else [])

    def weight_matrix(self) -> torch.Tensor:
        """The parameters as one matrix ``[W | b]`` (``d_g × d_a``)."""
        return self.to_matrix(self.weight.detach(), self.bias.detach() if self.has_bias else None)

    def grad_matrix(self) -> torch.Tensor:
        r"""The gradient as one matrix :math:`[\nabla W \mid \nabla b]`; zeros where a gradient is None."""
        w = self.weight
        gw = w.grad if w.grad is not None else torch.zeros_like(w)
        gb = None
        if self.has_bias:
            b = self.bias
            gb = b.grad if b.grad is not None else torch.zeros_like(b)
        return self.to_matrix(gw, gb)

    def to_matrix(self, weight_like: torch.Tensor, bias_like: torch.Tensor | None) -> torch.Tensor:
        mat = weight_like.reshape(weight_like.shape[0], -1)
        if bias_like is not None:
            mat = torch.cat([mat, bias_like.reshape(-1, 1)], dim=1)
        return mat

    def split_matrix(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of :meth:`to_matrix`: ``(weight-shaped, bias-shaped or None)``."""
        w = self.weight
        if self.has_bias:
            return matrix[:, :-1].reshape(w.shape), matrix[:, -1].reshape(self.bias.shape)
        return matrix.reshape(w.shape), None


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on ``[N, d_in]`` or ``[N, ..., d_in]`` inputs (leading dims become extra rows)."""

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_features

    def num_samples(self, x: torch.Tensor) -> int:
        """Every leading index is a sample: ``x.numel() / d_in`` (``B·S`` for ``[B, S, D]``)."""
        return int(x.numel() // x.shape[-1]) if x.dim() > 1 else 1

    def num_groups(self, x: torch.Tensor) -> int:
        return int(x.shape[0]) if x.dim() > 1 else 1

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, h.shape[-1])


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d`` / ``nn.Conv2d`` (any stride/padding/dilation, zeros padding) via patches.

    Each image (sequence for Conv1d) is one sample whose output locations are its rows (KFC).

    **Grouped and depthwise convolutions** (``groups = g > 1``) are ``g`` independent convolutions:
    the output channels of group :math:`j` see only its ``C_in/g`` input channels. The gradient matrix
    is the weight reshaped, ``C_out × (C_in/g·k + 1)``, whose row block :math:`j` (``C_out/g`` rows)
    is group :math:`j`'s; the input rows are the patches of *all* ``C_in`` channels (group :math:`j`'s
    columns are a contiguous slice). Such a layer gets a block-diagonal block over the groups
    (:class:`~curvature.chunked.ChunkedBlock`, one block per group built on :meth:`chunk_adapters`,
    fed by :meth:`split_record`); a plain Kronecker block on the whole matrix does not apply.
    """

    spatial_dims = 2

    def __init__(self, module: nn.Module) -> None:
        kind = type(module).__name__
        self.groups = int(module.groups)
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(f"{kind} with padding_mode={module.padding_mode!r} is not supported")
        if isinstance(module.padding, str):
            raise UnsupportedLayerError(f"{kind} with string padding ('same'/'valid') is not supported; use integers")
        super().__init__(module)

    @property
    def a_dim(self) -> int:
        m = self.module
        return m.in_channels // self.groups * math.prod(m.kernel_size) + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_channels

    # --- groups (only for groups > 1) -------------------------------------------------------------
    def chunk_rows(self) -> dict[str, slice]:
        """The rows of the gradient matrix (output channels) of every group, ``"g0"``, ``"g1"``, ..."""
        n = self.module.out_channels // self.groups
        return {f"g{j}": slice(j * n, (j + 1) * n) for j in range(self.groups)}

    def chunk_adapters(self) -> dict[str, "ConvGroupAdapter"]:
        """One adapter per group (its sizes: ``C_out/g × (C_in/g·k + 1)``), to build the group's block."""
        return {name: ConvGroupAdapter(self, j) for j, name in enumerate(self.chunk_rows())}

    def split_record(self, record):
        """The record of each group: its input columns (patches of its channels) and output columns."""
        width = self.a_dim - int(self.has_bias)
        return {name: record.sliced(slice(j * width, (j + 1) * width), rows)
                for j, (name, rows) in enumerate(self.chunk_rows().items())}

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0) if x.dim() == self.spatial_dims + 1 else x

    def num_samples(self, x: torch.Tensor) -> int:
        return int(self._batched(x).shape[0])

    num_groups = num_samples

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Patch rows ``[N·L, C_in·prod(kernel)]``, in the weight's (C_in, k...) order, location-major.

        Built from strided views (``Tensor.unfold``) and one copy; this is what ``F.unfold`` computes,
        without its im2col kernel, which is slow on CPU when threads are contended.
        """
        m, x = self.module, self._batched(x)
        nd = self.spatial_dims
        pad = [p for p in reversed(m.padding) for _ in range(2)]
        if any(pad):
            x = F.pad(x, pad)
        for i in range(nd):
            k, st, dl = m.kernel_size[i], m.stride[i], m.dilation[i]
            x = x.unfold(2 + i, dl * (k - 1) + 1, st)
        index = tuple(slice(None, None, dl) for dl in m.dilation)
        windows = x[(Ellipsis, *index)]  # [N, C, L1.., k1..]
        order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
        return windows.permute(*order).reshape(-1, x.shape[1] * math.prod(m.kernel_size))

    def output_rows(self, h: torch.Tensor) -> torch.Tensor:
        h = self._batched(h)
        return h.movedim(1, -1).reshape(-1, h.shape[1])  # [N*L, C_out]


class ConvGroupAdapter(LayerAdapter):
    """The sizes of group ``index`` of a grouped convolution (what its block is built on); the rows
    come from :meth:`ConvAdapter.split_record` and the parameters through the whole layer's adapter."""

    def __init__(self, whole: ConvAdapter, index: int) -> None:
        super().__init__(whole.module)
        self.whole, self.index = whole, index

    @property
    def a_dim(self) -> int:
        return self.whole.a_dim

    @property
    def g_dim(self) -> int:
        return self.whole.g_dim // self.whole.groups

    num_samples = property(lambda self: self.whole.num_samples)
    num_groups = property(lambda self: self.whole.num_groups)


class Conv2dAdapter(ConvAdapter):
    """``nn.Conv2d`` (see :class:`ConvAdapter`)."""

    spatial_dims = 2


class Conv1dAdapter(ConvAdapter):
    """``nn.Conv1d`` (see :class:`ConvAdapter`)."""

    spatial_dims = 1


class EmbeddingAdapter(LayerAdapter):
    r"""``nn.Embedding``: :math:`h = W^\top e_t` for token :math:`t` (one-hot input), so the gradient
    matrix is :math:`\nabla W^\top` (``embedding_dim × num_embeddings``) and A is diagonal (token counts).

    Every index is a sample (like a Linear on its one-hot rows); the input rows are the indices
    (one integer column), never one-hot vectors. ``max_norm`` (renormalizes the weight in forward)
    and ``sparse`` gradients are not supported.
    """

    one_hot_input = True

    def __init__(self, module: nn.Embedding) -> None:
        if module.max_norm is not None:
            raise UnsupportedLayerError("Embedding with max_norm rewrites its weight during forward; not supported")
        if module.sparse:
            raise UnsupportedLayerError("Embedding with sparse=True has sparse gradients; not supported")
        super().__init__(module)
        self.has_bias = False

    @property
    def a_dim(self) -> int:
        return self.module.num_embeddings

    @property
    def g_dim(self) -> int:
        return self.module.embedding_dim

    @property
    def bias(self) -> None:
        return None

    def num_samples(self, x: torch.Tensor) -> int:
        return int(x.numel())

    def num_groups(self, x: torch.Tensor) -> int:
        return int(x.shape[0]) if x.dim() > 1 else 1

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1)

    def output_rows(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, h.shape[-1])

    def to_matrix(self, weight_like: torch.Tensor, bias_like: torch.Tensor | None) -> torch.Tensor:
        return weight_like.T

    def split_matrix(self, matrix: torch.Tensor) -> tuple[torch.Tensor, None]:
        return matrix.T.reshape(self.weight.shape), None


class NormAffineAdapter(LayerAdapter):
    r"""The elementwise affine parameters of ``LayerNorm``/``BatchNorm*``/``GroupNorm``:
    :math:`y = \hat x\odot\gamma + \beta`, as the ``C × 2`` matrix :math:`[\gamma \mid \beta]`
    (one row per channel; ``C`` the number of affine entries).

    Only blocks that need no captured rows fit (a diagonal block on the gradient, the default); the
    layer is not hooked.
    """

    has_rows = False

    def __init__(self, module: nn.Module) -> None:
        if getattr(module, "weight", None) is None:
            raise UnsupportedLayerError(f"{type(module).__name__} without affine weight has no block")
        super().__init__(module)

    @property
    def a_dim(self) -> int:
        return 1 + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.weight.numel()

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        raise UnsupportedLayerError("normalization layers have no Kronecker rows; use diagonal_block(source='gradient')")

    output_rows = input_rows

    def to_matrix(self, weight_like: torch.Tensor, bias_like: torch.Tensor | None) -> torch.Tensor:
        mat = weight_like.reshape(-1, 1)
        return mat if bias_like is None else torch.cat([mat, bias_like.reshape(-1, 1)], dim=1)


class _AttentionProjection(LayerAdapter):
    """Common part of the two ``nn.MultiheadAttention`` projections, captured from its ``F.linear``
    calls (the projections are never called as modules)."""

    def __init__(self, module: nn.Module, attention: nn.MultiheadAttention) -> None:
        if not attention._qkv_same_embed_dim:
            raise UnsupportedLayerError("MultiheadAttention with kdim/vdim != embed_dim uses separate q/k/v weights; "
                                        "not supported")
        if attention.bias_k is not None:
            raise UnsupportedLayerError("MultiheadAttention with add_bias_kv is not supported")
        super().__init__(module)
        self.hook_module = attention
        self.attention = attention

    def num_samples(self, x: torch.Tensor) -> int:
        return int(x.numel() // x.shape[-1])


class AttentionInProjAdapter(_AttentionProjection):
    r"""``nn.MultiheadAttention``'s packed q/k/v projection: ``in_proj_weight`` (``3E × E``) and
    ``in_proj_bias`` as one Linear-like layer whose output is :math:`[q; k; v]`.

    **Self-attention** (query, key and value the same tensor): captured from
    ``F.linear(x, in_proj_weight, in_proj_bias)``, one Kronecker block on the packed projection.
    **Cross-attention** (distinct query/key/value, or key is value but query differs): the attention
    applies row *chunks* of the weight to different inputs (``torch.nn.functional._in_projection_packed``:
    ``W_q`` on the query, ``W_k``/``W_v`` -- or ``W_kv`` packed -- on key/value), which one Kronecker
    block cannot describe. The capture then records each chunk as a layer of its own
    (:meth:`chunk_adapters`, each ``E × (E+1)``) and the optimizer gives the layer a block-diagonal
    block over the chunks (:class:`~curvature.blocks.ChunkedBlock`: one Kronecker block per chunk,
    with its own input A and output-gradient G). :meth:`observe_call` notes which kind of call the
    attention gets (:attr:`modes`); a layer called both ways gets :attr:`runtime_fallback`.
    Inside the attention the layout is ``[S, B, E]``; rows are reordered batch-major (B groups).
    """

    #: The chunks of the packed projection, in row order.
    CHUNKS = ("q", "k", "v")

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__(attention, attention)
        self.has_bias = attention.in_proj_bias is not None
        self.functional_weight = attention.in_proj_weight
        self.modes: set[str] = set()

    def observe_call(self, args: tuple, kwargs: dict) -> None:
        """Note whether this call is self-attention (query is key is value) or cross-attention
        (called before the attention's forward)."""
        names = ("query", "key", "value")
        qkv = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
        self.modes.add("self" if qkv[0] is qkv[1] and qkv[1] is qkv[2] else "cross")
        if len(self.modes) > 1 and self.runtime_fallback is None:
            self.runtime_fallback = (
                "called both as self-attention (query, key and value the same tensor) and as cross-attention; "
                "the packed block and the per-chunk blocks would each see only part of the calls"
            )

    def chunk_adapters(self) -> dict[str, "AttentionChunkAdapter"]:
        """One Linear-like adapter per q/k/v chunk (what the capture records under ``name[q]`` etc.)."""
        return {c: AttentionChunkAdapter(self.attention, i) for i, c in enumerate(self.CHUNKS)}

    def chunk_rows(self) -> dict[str, slice]:
        """The rows of the gradient matrix ``[∇W | ∇b]`` (``3E × (E+1)``) that each chunk holds."""
        e = self.attention.embed_dim
        return {c: slice(i * e, (i + 1) * e) for i, c in enumerate(self.CHUNKS)}

    @property
    def weight(self) -> nn.Parameter:
        return self.attention.in_proj_weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.attention.in_proj_bias

    @property
    def a_dim(self) -> int:
        return self.attention.embed_dim + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return 3 * self.attention.embed_dim

    def num_groups(self, x: torch.Tensor) -> int:
        return int(x.shape[1])

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).reshape(-1, x.shape[-1])

    output_rows = input_rows


class AttentionChunkAdapter(AttentionInProjAdapter):
    """One chunk (q, k or v: ``index`` 0, 1, 2) of the packed in_proj as a Linear-like layer
    ``E × (E+1)`` on its own input (the query, key or value inside the attention, ``[S, B, E]``).

    Used by the capture (rows of the ``F.linear`` calls on row views of ``in_proj_weight``) and to
    build the chunk's block; the optimizer reads and writes the parameters through the packed adapter.
    """

    def __init__(self, attention: nn.MultiheadAttention, index: int) -> None:
        super().__init__(attention)
        self.index = index
        self.functional_weight = None

    @property
    def g_dim(self) -> int:
        return self.attention.embed_dim

    def weight_rows(self) -> tuple[int, int]:
        """The rows ``[start, stop)`` of ``in_proj_weight`` this chunk projects with."""
        e = self.attention.embed_dim
        return self.index * e, (self.index + 1) * e


class AttentionOutProjAdapter(_AttentionProjection):
    """``nn.MultiheadAttention.out_proj``: a Linear applied by ``F.linear`` on the attention's
    ``[S·B, E]`` output (sequence-major); rows are reordered batch-major (B groups)."""

    def __init__(self, out_proj: nn.Linear, attention: nn.MultiheadAttention) -> None:
        super().__init__(out_proj, attention)
        self.functional_weight = out_proj.weight
        self._batch = 1

    def observe_call(self, args: tuple, kwargs: dict) -> None:
        """Read the batch size from the attention's query (called before its forward)."""
        query = args[0] if args else kwargs["query"]
        if query.dim() == 2:
            self._batch = 1
        else:
            self._batch = int(query.shape[0] if self.attention.batch_first else query.shape[1])

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_features

    def num_groups(self, x: torch.Tensor) -> int:
        return self._batch

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        d, b = x.shape[-1], self._batch
        return x.reshape(-1, b, d).transpose(0, 1).reshape(-1, d)

    output_rows = input_rows


#: Module type -> adapter factory (the public way to change it is :func:`register_adapter`).
ADAPTERS: dict[type[nn.Module], Callable[[nn.Module], LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
    nn.Conv1d: Conv1dAdapter,
    nn.Embedding: EmbeddingAdapter,
    nn.LayerNorm: NormAffineAdapter,
    nn.GroupNorm: NormAffineAdapter,
    nn.modules.batchnorm._BatchNorm: NormAffineAdapter,
    nn.MultiheadAttention: AttentionInProjAdapter,
}


def contextual_adapters(model: nn.Module) -> dict[int, LayerAdapter]:
    """Adapters that depend on where a module sits (by ``id(module)``): the ``out_proj`` of every
    ``nn.MultiheadAttention``, which the attention applies functionally. Configurations the adapter
    cannot handle are left out (the module then gets the plain lookup, and usually falls back)."""
    out: dict[int, LayerAdapter] = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            try:
                out[id(module.out_proj)] = AttentionOutProjAdapter(module.out_proj, module)
            except UnsupportedLayerError as err:
                out[id(module.out_proj)] = err  # type: ignore[assignment]
    return out


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
