r"""Vectors of several lengths as the rows of one zero-padded matrix, for batching small vector work.

K-BFGS updates every layer's factors after each step with a handful of inner products, largest
entries and scaled sums of vectors of the layer's width. Done layer by layer that is some thirty
small kernels per factor, whose launch cost dwarfs their arithmetic on small networks. Stacked as
the rows of :math:`V \in \mathbb{R}^{L\times w}` (``w`` the largest length, zeros beyond each row's
length), the same work is a few kernels for all ``L`` vectors: an inner product of two vectors is a
row sum of the padded product (the padding adds zeros), a largest absolute entry a row maximum, and
a per-vector scalar multiplies its row. Row reductions are computed over the padded width, so they
may round differently from the same reduction over the row's own length.

A row's padding stays zero under the operations used here except where a row's own scalars are not
finite, and then its real part is not finite either; :func:`unpadded` returns the real parts only.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch


def padded(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 1-D ``vectors`` (one dtype and device) as the rows of an ``L × max length`` matrix, zero-padded.

    One concatenation scattered into zeros (a fixed number of kernels, where ``pad_sequence`` copies row by row)."""
    lengths = tuple(v.shape[0] for v in vectors)
    width = max(lengths)
    if all(n == width for n in lengths):
        return torch.stack(list(vectors))
    flat = torch.cat(list(vectors))
    rows = flat.new_zeros(len(lengths) * width)
    return rows.index_copy_(0, _unpadded_index(lengths, width, flat.device), flat).view(len(lengths), width)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Row-wise inner products :math:`a_i^\top b_i` (over the last dimension; a 1-D pair gives a 0-dim tensor)."""
    return (a * b).sum(-1)


def column(values: torch.Tensor) -> torch.Tensor:
    """Per-row scalars (shape ``[L]``, or 0-dim) shaped to multiply their rows (``[L, 1]``, or ``[1]``)."""
    return values.unsqueeze(-1)


def unpadded(rows: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """The real parts of the padded ``rows`` concatenated into one flat tensor (row ``i``'s first ``lengths[i]``
    entries, in order); with no padding, a view."""
    flat = rows.reshape(-1)
    if any(n != rows.shape[1] for n in lengths):
        flat = flat.index_select(0, _unpadded_index(tuple(lengths), rows.shape[1], rows.device))
    return flat


def split_rows(rows: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Each row's real part as a 1-D tensor (views of one flat copy when there is padding)."""
    return torch.split(unpadded(rows, lengths), list(lengths))


@lru_cache(maxsize=64)
def _unpadded_index(lengths: tuple[int, ...], width: int, device: torch.device) -> torch.Tensor:
    """Positions, in an ``L × width`` row-major padded matrix, of the entries within each row's length."""
    return torch.cat([torch.arange(n) + i * width for i, n in enumerate(lengths)]).to(device)
