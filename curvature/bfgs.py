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
from damped pre-activation pairs). The result is symmetrized after every update (the asdl fix for
drift from rounding), and an update is skipped, never applied half-way, when the pair is degenerate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curvature.linalg import all_finite, symmetrize

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
    augmented activation for H_a).
    """
    if not all_finite(s, y):
        return PairCheck("non-finite pair", float("nan"))
    sy = float(torch.dot(s, y))
    if not sy > 0.0:
        return PairCheck("s^T y <= 0", sy)
    if reference_norm is not None:
        ss = float(torch.dot(s, s))
        if sy <= threshold * ss * float(reference_norm):
            return PairCheck("s^T y below the relative curvature threshold", sy)
    return PairCheck(None, sy)


def bfgs_inverse_update(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Return the inverse BFGS update :math:`H^+` of ``H`` with the pair ``(s, y)`` (symmetrized).

    The caller is responsible for :math:`s^\top y > 0` (see :func:`check_pair`); the formula is
    applied as written otherwise, which is what the property tests use to show that
    :math:`s^\top y \le 0` destroys positive definiteness.
    """
    rho = 1.0 / torch.dot(s, y)
    u = H @ y
    yHy = torch.dot(y, u)
    # rank-2 form: H⁺ = H + [s u] C [s u]ᵀ with C = [[ρ²yᵀHy + ρ, −ρ], [−ρ, 0]] (one BLAS pass)
    U = torch.stack([s, u], dim=1)
    C = torch.stack([torch.stack([rho * rho * yHy + rho, -rho]), torch.stack([-rho, torch.zeros_like(rho)])])
    return symmetrize(torch.addmm(H, U, (U @ C).T))


def bfgs_direct_update(B: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The direct (B-form) BFGS update :math:`B^+ = B - Bss^\top B/(s^\top Bs) + yy^\top/(s^\top y)`.

    The inverse of :func:`bfgs_inverse_update` (property P7); used by the eigenvalue-bound tools.
    """
    Bs = B @ s
    return symmetrize(B - torch.outer(Bs, Bs) / torch.dot(s, Bs) + torch.outer(y, y) / torch.dot(s, y))


def guarded_bfgs_inverse_update(
    H: torch.Tensor,
    s: torch.Tensor,
    y: torch.Tensor,
    reference_norm: torch.Tensor | float | None = None,
    threshold: float = DEFAULT_CURVATURE_THRESHOLD,
) -> tuple[torch.Tensor, str | None]:
    """Apply :func:`bfgs_inverse_update` unless a skip rule fires; returns ``(H_new, skip_reason)``.

    On a skip the input ``H`` is returned unchanged (the same tensor object).
    """
    check = check_pair(s, y, reference_norm, threshold)
    if not check.ok:
        return H, check.reason
    updated = bfgs_inverse_update(H, s, y)
    if not all_finite(updated):
        return H, "non-finite update"
    return updated, None
