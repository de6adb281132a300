r"""A block-diagonal block over row chunks of one layer's gradient matrix.

For a weight whose row chunks act on *different* inputs -- ``nn.MultiheadAttention``'s packed
``in_proj_weight`` in cross-attention, where :math:`W_q` projects the query and :math:`W_k, W_v`
the key/value -- one Kronecker block :math:`A\otimes G` on the whole matrix does not exist (there is
no single input A). :class:`ChunkedBlock` keeps one block per chunk :math:`c` (rows :math:`r_c` of
:math:`M = [\nabla W \mid \nabla b]`), each with its own statistics from the chunk's own record
(:class:`~curvature.capture.ChunkedRecord`), and applies

.. math:: P(M)[r_c] = P_c(M[r_c]),

i.e. the curvature is block-diagonal over the chunks (cross-chunk curvature is dropped, as KFAC
drops cross-layer curvature). With KFAC chunks, :math:`P_c = (A_c + \pi_c\sqrt\lambda I)^{-1}\otimes
(G_c + \sqrt\lambda/\pi_c I)^{-1}` with :math:`A_c` from the chunk's inputs (the query rows for q,
the key/value rows for k and v) and :math:`G_c` from the gradients of its outputs, scaled as for a
Linear layer on that input (every leading index a sample, see :mod:`curvature.capture`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from curvature.adapters import LayerAdapter
from curvature.blocks import CurvatureBlock
from curvature.damping import DampingPolicy
from curvature.inverter import BatchedInverter
from curvature.protocols import declares


class ChunkedBlock(CurvatureBlock):
    """Block-diagonal over row chunks: ``parts[c] = (rows, block)`` preconditions ``M[rows]``.

    Args:
        name: layer name.
        adapter: the adapter of the whole layer (its gradient matrix is ``g_dim × a_dim``).
        parts: chunk name -> (row slice of the gradient matrix, the chunk's block); the slices
            partition the rows, and every block has the chunk's shape.
        split: how to get the chunks' records from the layer's record when it is not a
            :class:`~curvature.capture.ChunkedRecord` (a grouped convolution:
            :meth:`~curvature.adapters.ConvAdapter.split_record`).
        label: what a chunk is, for :meth:`describe` ("chunk", or "group" for a grouped convolution).

    ``update_statistics``/``update_after_step`` take a :class:`~curvature.capture.ChunkedRecord`
    (``record.parts[c]`` feeds chunk ``c``). ``first_inverse_due`` is True until the inverses were
    requested once (the optimizer then refreshes inverses at the next step, whatever its schedule).
    ``warm_start`` takes the whole layer's statistics (``A`` over all input columns, the homogeneous
    coordinate last, ``G`` over all output rows) when the chunks are column/row slices of them (a
    grouped convolution: :attr:`in_cols`), and is skipped otherwise.
    """

    def __init__(self, name: str, adapter: LayerAdapter, parts: Mapping[str, tuple[slice, CurvatureBlock]],
                 split: Callable[[Any], Mapping[str, Any]] | None = None, label: str = "chunk") -> None:
        super().__init__(name, adapter)
        self.split, self.label = split, label
        if not parts:
            raise ValueError("ChunkedBlock needs at least one chunk")
        self.parts = dict(parts)
        covered = sorted((r.start, r.stop) for r, _ in self.parts.values())
        if covered[0][0] != 0 or covered[-1][1] != adapter.g_dim or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise ValueError(f"the chunks' rows {covered} must partition the {adapter.g_dim} rows of the gradient matrix")
        for chunk, (rows, block) in self.parts.items():
            want = (rows.stop - rows.start, adapter.a_dim)
            if tuple(block.shape) != want:
                raise ValueError(f"chunk {chunk!r}: block of shape {tuple(block.shape)}, expected {want}")
        blocks = [b for _, b in self.parts.values()]
        first = blocks[0]
        self.kind = first.kind
        self.approx = getattr(first, "approx", "expand")
        self.needs_a = any(b.needs_a for b in blocks)
        self.needs_g = any(b.needs_g for b in blocks)
        self.needs_second_pass = any(b.needs_second_pass for b in blocks)
        self.has_quadratic_form = all(b.has_quadratic_form for b in blocks)
        self.applies_cached_inverse = all(declares(b, "applies_cached_inverse") for b in blocks)
        self.first_inverse_due = True

    def _parts(self, record: Any) -> Mapping[str, Any]:
        if getattr(record, "parts", None) is None and self.split is not None:
            return self.split(record)
        return _parts_of(record, self.name)

    def update_statistics(self, record: Any, grad: torch.Tensor) -> None:
        parts = self._parts(record)
        for chunk, (rows, block) in self.parts.items():
            block.update_statistics(parts[chunk], grad[rows])

    def warm_start(self, a_stat: torch.Tensor | None, g_stat: torch.Tensor | None) -> None:
        if self.split is None or getattr(self.adapter, "groups", None) is None:
            return  # per-chunk inputs (cross-attention): the layer has no one A to take blocks of
        cols = self.adapter.a_dim - int(self.adapter.has_bias)
        for j, (rows, block) in enumerate(self.parts.values()):
            a_sub = None
            if a_stat is not None:
                idx = list(range(j * cols, (j + 1) * cols)) + ([a_stat.shape[0] - 1] if self.adapter.has_bias else [])
                a_sub = a_stat[idx][:, idx]
            block.warm_start(a_sub, None if g_stat is None else g_stat[rows, rows])

    def request_inverses(self, inverter: BatchedInverter, policy: DampingPolicy) -> None:
        for _, block in self.parts.values():
            block.request_inverses(inverter, policy)
        self.first_inverse_due = False

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(grad)
        for rows, block in self.parts.values():
            out[rows] = block.precondition(grad[rows])
        return out

    def update_after_step(self, before: Any, after: Any) -> None:
        b, a = self._parts(before), self._parts(after)
        for chunk, (_, block) in self.parts.items():
            if block.needs_second_pass:
                block.update_after_step(b[chunk], a[chunk])

    def curvature_quadratic(self, delta: torch.Tensor) -> torch.Tensor:
        return sum(block.curvature_quadratic(delta[rows]) for rows, block in self.parts.values())

    def to_dense(self) -> torch.Tensor:
        """The operator on column-major ``vec(M)``: chunk ``c``'s dense block placed on the entries of rows ``r_c``."""
        g_dim, a_dim = self.adapter.g_dim, self.adapter.a_dim
        n = g_dim * a_dim
        blocks = [(rows, block.to_dense()) for rows, block in self.parts.values()]
        ref = blocks[0][1]
        out = torch.zeros(n, n, dtype=ref.dtype, device=ref.device)
        for rows, dense in blocks:
            r = torch.arange(rows.start, rows.stop, device=ref.device)
            idx = (torch.arange(a_dim, device=ref.device).unsqueeze(1) * g_dim + r).reshape(-1)  # vec_c order
            out[idx.unsqueeze(1), idx.unsqueeze(0)] = dense
        return out

    def spectrum_bounds(self) -> tuple[float, float]:
        bounds = [block.spectrum_bounds() for _, block in self.parts.values()]
        return min(lo for lo, _ in bounds), max(hi for _, hi in bounds)

    def diagnostics(self) -> dict[str, Any]:
        return {f"{chunk}_{key}": value for chunk, (_, block) in self.parts.items()
                for key, value in block.diagnostics().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"parts": {chunk: block.state_dict() for chunk, (_, block) in self.parts.items()},
                "first_inverse_due": self.first_inverse_due}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for chunk, (_, block) in self.parts.items():
            block.load_state_dict(state["parts"][chunk])
        self.first_inverse_due = bool(state["first_inverse_due"])

    def describe(self) -> str:
        first = next(iter(self.parts.values()))[1]
        if self.label == "group":
            return f"{first.describe()} per group ({len(self.parts)} groups)"
        return f"{first.describe()} per {self.label} ({', '.join(self.parts)})"


def _parts_of(record: Any, name: str) -> Mapping[str, Any]:
    parts = getattr(record, "parts", None)
    if parts is None:
        raise RuntimeError(f"layer {name!r}: its chunked block needs the per-chunk records of a chunked call "
                           "(e.g. cross-attention), but the layer was called as one projection")
    return parts
