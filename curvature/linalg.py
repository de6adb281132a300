"""Dense symmetric linear algebra shared by every curvature block.

One implementation of each routine: symmetrization, damped SPD inversion (Cholesky or
eigendecomposition, batched over factors of one size, with a float64 retry on failure), and
spectrum bounds of symmetric matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

InverseMethod = Literal["cholesky", "eigh"]


def symmetrize(matrix: torch.Tensor) -> torch.Tensor:
    r"""Return :math:`(M + M^\top)/2` (batched over leading dimensions)."""
    return (0.5 * (matrix + matrix.transpose(-1, -2))).contiguous()


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every element of every tensor is finite.

    One fused reduction per tensor (the sum is non-finite whenever an element is NaN or inf) and
    a single host synchronization; only when a sum is non-finite, which a finite tensor reaches
    only by overflow, is the exact elementwise test run.
    """
    if not tensors:
        return True
    sums = torch.stack([t.sum() if t.is_floating_point() else t.sum().double() for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def accumulate_gram(target: torch.Tensor, rows: torch.Tensor, with_ones: bool, alpha: float, beta: float) -> None:
    r"""In place: :math:`T \leftarrow \beta T + \alpha\, [X\ 1]^\top [X\ 1]` (or :math:`X^\top X` without ones).

    The homogeneous column of ones is never materialized: its block is the column sums of ``X``
    and the row count. With ``beta = 0`` the old content of ``target`` is ignored (NaN included).
    """
    d = rows.shape[1]
    if not with_ones:
        target.addmm_(rows.T, rows, beta=beta, alpha=alpha)
        return
    target[:d, :d].addmm_(rows.T, rows, beta=beta, alpha=alpha)
    col = rows.sum(0)
    edge = target[d, :d] * beta if beta else torch.zeros_like(col)
    edge.add_(col, alpha=alpha)
    target[:d, d] = edge
    target[d, :d] = edge
    target[d, d] = (target[d, d] * beta if beta else 0.0) + alpha * rows.shape[0]


def add_to_diagonal(matrix: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    r"""Return :math:`M + \lambda I` without modifying ``matrix``; ``value`` may be batched (shape ``[B]``)."""
    n = matrix.shape[-1]
    eye = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return matrix + value.reshape(*value.shape, 1, 1).to(matrix) * eye
    return matrix + value * eye


@dataclass
class InversionStats:
    """Counts of how damped inversions went: how many needed a float64 retry and how many failed."""

    calls: int = 0
    float64_retries: int = 0
    failures: int = 0
    failed_shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: failures recovered by the factor (previous inverse kept, or retried with more damping)
    recovered: int = 0


class InversionError(RuntimeError):
    """A damped factor could not be inverted even in float64 (it is not finite or not SPD)."""


def _inverse_once(matrices: torch.Tensor, method: InverseMethod) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert SPD matrices (only their lower triangles are read); returns (inverses, ok mask per entry)."""
    if method == "cholesky":
        chol, info = torch.linalg.cholesky_ex(matrices)
        ok = info == 0
        if not bool(ok.all()):  # keep cholesky_inverse away from the partial factors of failed entries
            chol = torch.where(ok.reshape(*ok.shape, 1, 1), chol,
                               torch.eye(matrices.shape[-1], dtype=chol.dtype, device=chol.device))
        inv = torch.cholesky_inverse(chol)  # exactly symmetric (LAPACK mirrors one triangle) ...
        inv = inv.mT if inv.mT.is_contiguous() else inv.contiguous()  # ... so its transpose is a free row-major view
    else:
        try:
            evals, evecs = torch.linalg.eigh(matrices)
        except torch.linalg.LinAlgError:  # eigh did not converge: report every entry as failed
            return torch.full_like(matrices, float("nan")), torch.zeros(matrices.shape[:-2], dtype=torch.bool,
                                                                        device=matrices.device)
        ok = (evals > 0).all(dim=-1)
        inv = symmetrize((evecs / evals.clamp_min(torch.finfo(evals.dtype).tiny).unsqueeze(-2)) @ evecs.mT)
    ok = ok & torch.isfinite(inv.sum(dim=(-2, -1)))  # one reduction: a NaN/inf anywhere makes the sum non-finite
    return inv, ok


def _damped(batch: torch.Tensor, damping: torch.Tensor | float) -> torch.Tensor:
    damped = batch.clone()
    diag = damped.diagonal(dim1=-2, dim2=-1)
    if isinstance(damping, torch.Tensor) and damping.dim() > 0:
        diag.add_(damping.to(damped).unsqueeze(-1))
    else:
        diag.add_(float(damping))
    return damped


def damped_inverse_entries(
    matrices: torch.Tensor,
    damping: torch.Tensor | float,
    method: InverseMethod = "cholesky",
    stats: InversionStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Like :func:`damped_inverse` on a batch ``[B, n, n]``, but never raises for a bad entry.

    Returns ``(inverses, ok)``: ``ok[i]`` is False when entry ``i`` could not be inverted even in
    float64 (it is not finite, or :math:`F + \lambda I` is not positive definite); such an entry's
    inverse is meaningless and must not be used. Every failed entry is counted in ``stats.failures``.
    A non-finite damping is a caller error and raises :class:`InversionError`.
    """
    if method not in ("cholesky", "eigh"):
        raise ValueError(f"method must be 'cholesky' or 'eigh', got {method!r}")
    if not (all_finite(damping) if isinstance(damping, torch.Tensor) else math.isfinite(float(damping))):
        if stats is not None:
            stats.failures += matrices.shape[0]
            stats.failed_shapes.append(tuple(matrices.shape))
        raise InversionError(f"the damping {damping!r} is not finite")
    if stats is not None:
        stats.calls += matrices.shape[0]
    finite = torch.isfinite(matrices.sum(dim=(-2, -1)))
    if not bool(finite.all()):  # exact per-entry test only when a sum is not finite
        finite = torch.isfinite(matrices).flatten(1).all(dim=1)
    safe = matrices if bool(finite.all()) else torch.where(
        finite.reshape(-1, 1, 1), matrices, torch.zeros((), dtype=matrices.dtype, device=matrices.device))
    inv, ok = _inverse_once(_damped(safe, damping), method)
    ok = ok & finite
    retry = (~ok) & finite
    if bool(retry.any()):
        bad = retry.nonzero().flatten()
        if stats is not None:
            stats.float64_retries += int(bad.numel())
        damping_bad = damping[bad].double() if isinstance(damping, torch.Tensor) and damping.dim() > 0 else damping
        # re-add the damping in float64: in float32 it may have been rounded away
        inv64, ok64 = _inverse_once(_damped(safe[bad].double(), damping_bad), method)
        inv = inv.clone()
        inv[bad] = inv64.to(inv.dtype)
        ok = ok.clone()
        ok[bad] = ok64
    n_failed = int((~ok).sum())
    if n_failed and stats is not None:
        stats.failures += n_failed
        stats.failed_shapes.append(tuple(matrices.shape))
    return inv, ok


def damped_inverse(
    matrices: torch.Tensor,
    damping: torch.Tensor | float,
    method: InverseMethod = "cholesky",
    stats: InversionStats | None = None,
) -> torch.Tensor:
    r"""Return :math:`(F + \lambda I)^{-1}` for a batch ``[B, n, n]`` (or one ``[n, n]``) of symmetric PSD ``F``.

    Only the lower triangle of ``F`` is read (both factorizations use it). The computation runs in
    the input dtype; entries whose factorization fails (not finite or not positive definite in that
    precision) are retried in float64, counted in ``stats``. If float64 fails too,
    :class:`InversionError` is raised: a silent wrong inverse is never returned.
    """
    single = matrices.dim() == 2
    batch = matrices.unsqueeze(0) if single else matrices
    inv, ok = damped_inverse_entries(batch, damping, method, stats)
    if not bool(ok.all()):
        raise InversionError(
            f"damped factor of size {batch.shape[-1]} is not finite or not positive definite even in "
            "float64; increase the damping"
        )
    return inv[0] if single else inv


def symmetric_eigenvalue_bounds(matrix: torch.Tensor) -> tuple[float, float]:
    """Smallest and largest eigenvalue of the symmetric part of ``matrix`` (computed in float64)."""
    evals = torch.linalg.eigvalsh(symmetrize(matrix.detach().double()))
    return float(evals[0]), float(evals[-1])
