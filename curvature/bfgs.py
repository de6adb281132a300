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

import torch

from curvature.linalg import all_finite, finite_flag, read_scalars, symmetrize

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
    """The 0-dim float64 tensors a pair decision reads: ``[finite(s, y), sᵀy, sᵀs, (reference_norm), *extra]``
    (the reference norm only when it is a tensor; float64 holds float32 values exactly). No synchronization."""
    parts = [finite_flag(s, y).double(), torch.dot(s, y).double(), torch.dot(s, s).double()]
    if isinstance(reference_norm, torch.Tensor):
        parts.append(reference_norm.detach().reshape(()).double())
    parts.extend(e.double() for e in extra)
    return parts


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

    The caller is responsible for :math:`s^\top y > 0` (see :func:`check_pair`); the formula is
    applied as written otherwise, which is what the property tests use to show that
    :math:`s^\top y \le 0` destroys positive definiteness.
    """
    rho = 1.0 / torch.dot(s, y)
    u = H @ y
    a = rho * (rho * torch.dot(y, u)) + rho  # not (ρ·ρ)·yᵀu: ρ² underflows to 0 once sᵀy > ~2^537 (float64)
    w = (0.5 * a) * s - rho * u
    # α/√2 and 1/(α√2) with α = √‖w‖∞ / √‖s‖∞. Largest entries, not 2-norms: a 2-norm squares the entries and
    # under- or overflows (float32: below ~1e-19 or above ~1e19) where s, w and the update are representable.
    # The square roots are taken before the division, so α does not underflow for w ≠ 0 (it is at least
    # √(smallest subnormal) / √(largest float)): α = 0 means w = 0 (for finite s), where the update is zero:
    # then ŝ = 0 and ŵ = w / √2 = 0 (1 stands in for α in the division), so p = q = 0 and H⁺ = H exactly (with
    # any α > 0, H + ppᵀ would round before − qqᵀ took it back). α is not finite only when s = 0 or s, w are
    # not finite, and then neither is the update.
    alpha = torch.linalg.vector_norm(w, ord=math.inf).sqrt() / torch.linalg.vector_norm(s, ord=math.inf).sqrt()
    s_hat = (alpha * math.sqrt(0.5)) * s
    w_hat = w / (torch.where(alpha > 0, alpha, torch.ones_like(alpha)) * math.sqrt(2.0))
    return symmetric_rank2_update(H, s_hat + w_hat, s_hat - w_hat)


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
    return torch.addcmul(H, p[:, None], p[None, :]).addcmul_(q[:, None], q[None, :], value=-1)


def bfgs_direct_update(B: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The direct (B-form) BFGS update :math:`B^+ = B - Bss^\top B/(s^\top Bs) + yy^\top/(s^\top y)`.

    The inverse of :func:`bfgs_inverse_update` (property P7); used by the eigenvalue-bound tools.
    """
    Bs = B @ s
    return symmetrize(B - torch.outer(Bs, Bs) / torch.dot(s, Bs) + torch.outer(y, y) / torch.dot(s, y))


def prepare_guarded_update(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor,
                           reference_norm: torch.Tensor | float | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The candidate :func:`bfgs_inverse_update` and the scalars its guard reads, without a synchronization."""
    updated = bfgs_inverse_update(H, s, y)
    return updated, pair_scalar_tensors(s, y, reference_norm, [finite_flag(updated)])


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
