r"""The inverse BFGS update, with the skip rules of the K-BFGS reference code.

Given an inverse-curvature approximation :math:`H \succ 0` and a secant pair :math:`(s, y)` with
:math:`s^\top y > 0`, the inverse BFGS update is

.. math::

    H^+ = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top, \qquad \rho = 1 / (s^\top y),

the unique symmetric matrix closest to :math:`H` (in a weighted norm) that satisfies the secant
equation :math:`H^+ y = s`. Expanded with :math:`u = Hy`:

.. math::

    H^+ = H - \rho (s u^\top + u s^\top) + (\rho^2 y^\top H y + \rho) s s^\top .

This single routine serves both Kronecker factors of K-BFGS (H_a from Hessian-action pairs and H_g
from damped pre-activation pairs). The result is symmetric by construction (no symmetrization pass,
see :func:`bfgs_inverse_update`), and an update is skipped, never applied half-way, when the pair is
degenerate. :func:`guarded_bfgs_inverse_update` reads everything its decision needs from the device
with one host synchronization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from curvature.linalg import all_finite, read_scalars, sums_finite, symmetrize
from curvature.rows import column, padded, row_dot, unpadded

#: Relative curvature threshold of the reference code: skip when sᵀy ≤ 1e-4·‖s‖²·‖g_ref‖.
DEFAULT_CURVATURE_THRESHOLD = 1e-4


@dataclass(frozen=True)
class PairCheck:
    """Why a secant pair is (not) usable: ``reason`` is None when the pair may be used."""

    reason: str | None
    sy: float

    @property
    def ok(self) -> bool:
        return self.reason is None


def pair_scalar_tensors(s: torch.Tensor, y: torch.Tensor, reference_norm: torch.Tensor | float | None,
                        extra: list[torch.Tensor] = ()) -> list[torch.Tensor]:
    """The 0-dim tensors a pair decision reads: ``[finite(s, y), sᵀy, sᵀs, (reference_norm), *extra]`` (the
    reference norm only when it is a tensor), in their own dtypes (:func:`~curvature.linalg.read_scalars`
    reads them exactly). No synchronization. This is :func:`pair_scalar_tensors_many` of one pair."""
    return pair_scalar_tensors_many([s], [y], [reference_norm])[0] + list(extra)


def pair_scalar_tensors_many(s: Sequence[torch.Tensor], y: Sequence[torch.Tensor],
                             reference_norms: Sequence[torch.Tensor | float | None]) -> list[list[torch.Tensor]]:
    """:func:`pair_scalar_tensors` of several pairs (of any sizes, one dtype and device), computed on the rows of
    one padded matrix per side: a few kernels for all of them. No synchronization."""
    if not s:
        return []
    return _guard_scalar_lists(_PairRows(list(s), list(y)), reference_norms)


def _guard_scalar_lists(rows: "_PairRows", reference_norms: Sequence[torch.Tensor | float | None],
                        *extra_rows: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per pair of ``rows``: ``[finite(s, y), sᵀy, sᵀs, (reference_norm), *extra]``, where ``extra`` are that pair's
    entries of ``extra_rows`` (one value per pair each)."""
    columns = zip(*(v.unbind() for v in rows.guard_scalars()), *(v.unbind() for v in extra_rows))
    return [[finite, sy, ss] + _reference_scalar(ref) + list(extra)
            for ref, (finite, sy, ss, *extra) in zip(reference_norms, columns)]


def pair_values(values: list[float], reference_norm: torch.Tensor | float | None) -> list:
    """:func:`pair_scalar_tensors` read on the host, with a Python (or absent) reference norm put in place."""
    values = list(values)
    if not isinstance(reference_norm, torch.Tensor):
        values.insert(3, None if reference_norm is None else float(reference_norm))
    return values


def _pair_scalars(s: torch.Tensor, y: torch.Tensor, reference_norm: torch.Tensor | float | None) -> list:
    """``[finite(s, y), sᵀy, sᵀs, reference_norm]`` read from the device in one synchronization."""
    return pair_values(read_scalars(pair_scalar_tensors(s, y, reference_norm)), reference_norm)


def pair_reason(s: torch.Tensor, y: torch.Tensor, values: list, threshold: float) -> str | None:
    """The skip rule of :func:`check_pair` applied to :func:`_pair_scalars`' values."""
    finite, sy, ss, reference = values[:4]
    if not finite and not all_finite(s, y):  # the fused flag is conservative: confirm exactly
        return "non-finite pair"
    if not sy > 0.0:
        return "s^T y <= 0"
    if reference is not None and sy <= threshold * ss * reference:
        return "s^T y below the relative curvature threshold"
    return None


def check_pair(
    s: torch.Tensor,
    y: torch.Tensor,
    reference_norm: torch.Tensor | float | None = None,
    threshold: float = DEFAULT_CURVATURE_THRESHOLD,
) -> PairCheck:
    r"""Apply the skip rules of the reference code to a pair.

    Skip when the pair is not finite, when :math:`s^\top y \le 0`, or when
    :math:`s^\top y \le \text{threshold}\cdot\|s\|^2\|g_\text{ref}\|` (only if ``reference_norm``
    is given; the reference code passes the mean pre-activation gradient for H_g and the mean
    augmented activation for H_a). One host synchronization.
    """
    values = _pair_scalars(s, y, reference_norm)
    reason = pair_reason(s, y, values, threshold)
    if reason == "non-finite pair":
        return PairCheck(reason, float("nan"))
    return PairCheck(reason, values[1])


def bfgs_inverse_update(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Return the inverse BFGS update :math:`H^+` of ``H`` with the pair ``(s, y)``, exactly symmetric.

    With :math:`u = Hy`, :math:`a = \rho^2 y^\top H y + \rho` and :math:`w = \tfrac a2 s - \rho u`,
    :math:`H^+ = H + s w^\top + w s^\top`. Rescaled to equal largest entries, :math:`\hat s = \alpha s`,
    :math:`\hat w = w/\alpha` (:math:`\alpha = \sqrt{\|w\|_\infty}/\sqrt{\|s\|_\infty}`, so no
    cancellation beyond a factor 2 of :math:`\|s\|_\infty\|w\|_\infty`, the largest entry of
    :math:`s w^\top`), and with :math:`p = (\hat s + \hat w)/\sqrt2`, :math:`q = (\hat s - \hat w)/\sqrt2`:

    .. math:: H^+ = H + p p^\top - q q^\top .

    :func:`symmetric_rank2_update` forms it in two elementwise passes with :math:`H^+_{ij} = H^+_{ji}` bit
    for bit when ``H`` is symmetric: no symmetrization pass (a transposed read of the matrix) is needed.
    This is :func:`bfgs_inverse_updates` with one pair.

    The caller is responsible for :math:`s^\top y > 0` (see :func:`check_pair`); the formula is
    applied as written otherwise, which is what the property tests use to show that
    :math:`s^\top y \le 0` destroys positive definiteness.
    """
    return bfgs_inverse_updates([H], [s], [y])[0]


def bfgs_inverse_updates(H: Sequence[torch.Tensor], s: Sequence[torch.Tensor], y: Sequence[torch.Tensor]
                         ) -> list[torch.Tensor]:
    """:func:`bfgs_inverse_update` of several matrices (of any sizes, one dtype and device) at once."""
    if not H:
        return []
    return _rank2_updates(_PairRows(list(s), list(y)), H)


@dataclass
class _PairRows:
    """Pairs of several sizes as the rows of zero-padded matrices ``S, Y`` (:mod:`curvature.rows`), with
    the inner products ``sy`` that every user of the rows needs."""

    s: list[torch.Tensor]
    y: list[torch.Tensor]

    def __post_init__(self) -> None:
        self.dims = [v.shape[0] for v in self.s]
        self.S, self.Y = padded(self.s), padded(self.y)
        self.sy = row_dot(self.S, self.Y)

    def guard_scalars(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: whether it is finite (:func:`~curvature.linalg.finite_flag` of ``s`` and ``y``, row by
        row: conservative, a row sum that overflows also reads False), :math:`s^\\top y` and :math:`s^\\top s`."""
        return sums_finite(self.S.sum(1) + self.Y.sum(1)), self.sy, row_dot(self.S, self.S)

    def split(self, rows: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Each pair's part of the padded ``rows`` as a column and as a row (views of one flat tensor)."""
        flat = unpadded(rows, self.dims)
        return torch.split(flat.view(-1, 1), self.dims), torch.split(flat.view(1, -1), self.dims, dim=1)


def _rank2_updates(rows: _PairRows, H: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`bfgs_inverse_update` of ``H[i]`` with pair ``i`` of ``rows``: the vector part batched over the pairs,
    the rank-2 update of each matrix on its own."""
    S, Y = rows.S, rows.Y
    U = padded([h @ v for h, v in zip(H, rows.y)])
    rho = 1.0 / rows.sy
    a = rho * (rho * row_dot(Y, U)) + rho  # not (ρ·ρ)·yᵀu: ρ² underflows to 0 once sᵀy > ~2^537 (float64)
    W = column(0.5 * a) * S - column(rho) * U
    # α/√2 and 1/(α√2) with α = √‖w‖∞ / √‖s‖∞. Largest entries, not 2-norms: a 2-norm squares the entries and
    # under- or overflows (float32: below ~1e-19 or above ~1e19) where s, w and the update are representable.
    # The square roots are taken before the division, so α does not underflow for w ≠ 0 (it is at least
    # √(smallest subnormal) / √(largest float)): α = 0 means w = 0 (for finite s), where the update is zero:
    # then ŝ = 0 and ŵ = w / √2 = 0 (1 stands in for α in the division), so p = q = 0 and H⁺ = H exactly (with
    # any α > 0, H + ppᵀ would round before − qqᵀ took it back). α is not finite only when s = 0 or s, w are
    # not finite, and then neither is the update.
    alpha = W.abs().amax(1).sqrt() / S.abs().amax(1).sqrt()
    S_hat = column(alpha * math.sqrt(0.5)) * S
    W_hat = W / column(torch.where(alpha > 0, alpha, 1.0) * math.sqrt(2.0))
    (p_col, p_row), (q_col, q_row) = rows.split(S_hat + W_hat), rows.split(S_hat - W_hat)
    return [_rank2(h, *pq) for h, *pq in zip(H, p_col, p_row, q_col, q_row)]


def symmetric_rank2_update(H: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""Return :math:`H + pp^\top - qq^\top` in a new tensor, exactly symmetric when ``H`` is.

    Two elementwise passes, ``addcmul(H, p[:, None], p[None, :])`` then ``addcmul_(q[:, None], q[None, :],
    value=-1)``: element :math:`(i, j)` is :math:`(h_{ij} + p_i p_j) - q_i q_j` by the same scalar expression
    as :math:`(j, i)` with the two factors of each product swapped, and a product (rounded, or exact inside
    a fused multiply-add) does not depend on the order of its factors, so :math:`H^+_{ij} = H^+_{ji}` bit for
    bit. This needs every element of one call to be computed by the same instruction sequence, which
    ``tests/curvature/test_bfgs.py`` checks at every size 1-70 and at sizes around the vector widths, on
    each device. The four-pass form (``outer(p, p)``, ``outer(q, q)``, their difference, the sum with ``H``)
    is symmetric for the same reason and 1.4-2.4× slower at d = 785-1000 (one CPU thread); ``addr`` and a
    rank-2 ``addmm`` are as fast but not bit-symmetric (``python -m benchmarks.rank2_forms``, README).
    """
    return _rank2(H, p.unsqueeze(1), p.unsqueeze(0), q.unsqueeze(1), q.unsqueeze(0))


def _rank2(H: torch.Tensor, p_col: torch.Tensor, p_row: torch.Tensor, q_col: torch.Tensor, q_row: torch.Tensor
           ) -> torch.Tensor:
    """:func:`symmetric_rank2_update` from ``p`` and ``q`` given as columns and rows."""
    return torch.addcmul(H, p_col, p_row).addcmul_(q_col, q_row, value=-1)


def bfgs_direct_update(B: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The direct (B-form) BFGS update :math:`B^+ = B - Bss^\top B/(s^\top Bs) + yy^\top/(s^\top y)`.

    The inverse of :func:`bfgs_inverse_update` (property P7); used by the eigenvalue-bound tools.
    """
    Bs = B @ s
    return symmetrize(B - torch.outer(Bs, Bs) / torch.dot(s, Bs) + torch.outer(y, y) / torch.dot(s, y))


def prepare_guarded_update(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor,
                           reference_norm: torch.Tensor | float | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The candidate :func:`bfgs_inverse_update` and the scalars its guard reads, without a synchronization
    (:func:`prepare_guarded_updates` of one update)."""
    return prepare_guarded_updates([H], [s], [y], [reference_norm])[0]


def prepare_guarded_updates(H: Sequence[torch.Tensor], s: Sequence[torch.Tensor], y: Sequence[torch.Tensor],
                            reference_norms: Sequence[torch.Tensor | float | None]
                            ) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """For each update (of any sizes, one dtype and device): the candidate :func:`bfgs_inverse_update` and the
    scalars its guard reads, those of :func:`pair_scalar_tensors` followed by the candidate's finiteness, which
    :func:`finish_guarded_update` decides from. The vector part is batched over the updates (:func:`bfgs_inverse_updates`);
    no synchronization."""
    if not H:
        return []
    rows = _PairRows(list(s), list(y))
    updated = _rank2_updates(rows, H)
    finite_update = sums_finite(torch.stack([u.sum() for u in updated]))  # finite_flag of each candidate
    return list(zip(updated, _guard_scalar_lists(rows, reference_norms, finite_update)))


def _reference_scalar(reference_norm: torch.Tensor | float | None) -> list[torch.Tensor]:
    return [reference_norm.detach().reshape(())] if isinstance(reference_norm, torch.Tensor) else []


def finish_guarded_update(H: torch.Tensor, updated: torch.Tensor, s: torch.Tensor, y: torch.Tensor, values: list[float],
                          reference_norm: torch.Tensor | float | None = None,
                          threshold: float = DEFAULT_CURVATURE_THRESHOLD) -> tuple[torch.Tensor, str | None]:
    """The guard's decision from :func:`prepare_guarded_update`'s scalars read on the host (``values``)."""
    values = pair_values(values, reference_norm)
    reason = pair_reason(s, y, values, threshold)
    if reason is not None:
        return H, reason
    if not values[4] and not all_finite(updated):
        return H, "non-finite update"
    return updated, None


def guarded_bfgs_inverse_update(
    H: torch.Tensor,
    s: torch.Tensor,
    y: torch.Tensor,
    reference_norm: torch.Tensor | float | None = None,
    threshold: float = DEFAULT_CURVATURE_THRESHOLD,
) -> tuple[torch.Tensor, str | None]:
    """Apply :func:`bfgs_inverse_update` unless a skip rule fires; returns ``(H_new, skip_reason)``.

    On a skip the input ``H`` is returned unchanged (the same tensor object). The candidate update
    is computed first and the pair's scalars and its finiteness are read together: one host
    synchronization per call (more only to confirm a non-finite flag).
    """
    updated, scalars = prepare_guarded_update(H, s, y, reference_norm)
    return finish_guarded_update(H, updated, s, y, read_scalars(scalars), reference_norm, threshold)
