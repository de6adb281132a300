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


def finite_flag(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-dim boolean tensor, on the tensors' device, that is False when some element is not finite.

    No host synchronization: one fused reduction per tensor (the sum is non-finite whenever an
    element is NaN or inf), the sums added up (0-dim operands: the usual dtype promotion; no stack,
    no casts) and one finiteness test of the total. It is conservative: a finite tensor whose sum overflows also reads False, so a False must be confirmed with :func:`all_finite` (which runs
    the exact elementwise test only then). Non-floating tensors count as finite.
    """
    total = None
    for t in tensors:
        if t.is_floating_point():
            part = (t.detach() if t.requires_grad else t).sum()
            total = part if total is None else total + part
    if total is None:
        device = tensors[0].device if tensors else None
        return torch.ones((), dtype=torch.bool, device=device)
    return sums_finite(total)


def sums_finite(sums: torch.Tensor) -> torch.Tensor:
    """Elementwise, whether the sums (of :func:`finite_flag`, or of several tensors at once: one per row, one per
    matrix) are finite: ``inf - inf`` and ``NaN - NaN`` are NaN, so two kernels instead of ``isfinite``'s four."""
    return (sums - sums).eq(0)


def read_scalars(scalars: list[torch.Tensor]) -> list[float]:
    """The values of 0-dim tensors on the host, as Python floats: one read (``tolist``) per device among them.

    The tensors are stacked per dtype (a stack of mixed dtypes casts every element on its own), each
    stack cast to float64 once (exact for bool, every floating dtype and integers up to 2**53), and
    the stacks concatenated for the one read."""
    if not scalars:
        return []
    devices = {t.device for t in scalars}
    if len(devices) == 1:
        return _read_one_device(scalars)
    out: list[float] = [0.0] * len(scalars)
    for device in devices:
        index = [i for i, t in enumerate(scalars) if t.device == device]
        for i, v in zip(index, _read_one_device([scalars[i] for i in index])):
            out[i] = v
    return out


def _read_one_device(scalars: list[torch.Tensor]) -> list[float]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(scalars):
        groups.setdefault(t.dtype, []).append(i)
    if len(groups) == 1:
        return torch.stack(scalars).double().tolist()
    order = [i for index in groups.values() for i in index]
    values = torch.cat([torch.stack([scalars[i] for i in index]).double() for index in groups.values()]).tolist()
    out: list[float] = [0.0] * len(scalars)
    for i, v in zip(order, values):
        out[i] = v
    return out


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every element of every tensor is finite.

    One fused reduction (:func:`finite_flag`) and a single host synchronization; only when it reads
    False, which a finite set of tensors reaches only by overflow, is the exact elementwise test run.
    """
    if not tensors:
        return True
    if bool(finite_flag(*tensors)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def gram_panels(n: int, d: int, device: torch.device) -> int:
    """How many column panels :func:`gram` splits an ``n × d`` matrix into by default (1: one full GEMM).

    Measured on this project's 2-core CPU, one thread (``python -m benchmarks.gram_panels``): the panel
    form pays once the GEMM dominates the mirror copies, i.e. for many rows and wide matrices: 4 panels
    for ``n ≥ 512, d ≥ 320`` (0.71–0.81 of the full GEMM's time) or ``n ≥ 256, d ≥ 640`` (0.79–0.86),
    3 for ``n ≥ 512, 192 ≤ d < 320`` (0.86–0.99); 5 to 8 panels gained little more at ``d ≤ 1000``. On
    other devices the full GEMM is kept (not measured there).
    """
    if device.type != "cpu" or n < 256 or d < 192:
        return 1
    if n >= 512:
        return 4 if d >= 320 else 3
    return 4 if d >= 640 else 1


def gram(rows: torch.Tensor, panels: int | None = None) -> torch.Tensor:
    r""":math:`X^\top X` for the rows :math:`X` (``n × d``), with about half the multiply-adds of a GEMM.

    With the columns split into ``k`` panels :math:`X = [P_1 \cdots P_k]` (``panels``; default
    :func:`gram_panels`), block row :math:`i` of the upper triangle is one GEMM
    :math:`P_i^\top [P_i \cdots P_k]`, each diagonal block is made symmetric from its upper triangle
    and the blocks below the diagonal are copied from their mirrors: :math:`\sum_i w_i (d - a_i)\, n`
    multiply-adds instead of :math:`d^2 n` (``k`` equal panels: :math:`(k+1)/(2k)`, 62.5% at ``k = 4``),
    the saving that BLAS ``syrk`` would give, which torch does not expose. The result is then exactly
    symmetric. ``panels = 1`` is the plain ``XᵀX`` GEMM.
    """
    n, d = rows.shape
    k = gram_panels(n, d, rows.device) if panels is None else panels
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"panels must be an integer >= 1, got {panels!r}")
    k = min(k, d)
    if k == 1:
        return torch.mm(rows.T, rows)
    out = rows.new_empty(d, d)
    edges = [d * i // k for i in range(k + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        out[a:b, a:] = torch.mm(rows[:, a:b].T, rows[:, a:])
        diagonal = out[a:b, a:b]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        out[b:, a:b] = out[a:b, b:].T
    return out


def accumulate_gram(target: torch.Tensor, rows: torch.Tensor, with_ones: bool, alpha: float, beta: float) -> None:
    r"""In place: :math:`T \leftarrow \beta T + \alpha\, [X\ 1]^\top [X\ 1]` (or :math:`X^\top X` without ones).

    The homogeneous column of ones is never materialized: its block is the column sums of ``X``
    and the row count. With ``beta = 0`` the old content of ``target`` is ignored (NaN included).
    ``X^\top X`` is :func:`gram` (panels on the CPU for large ``X``).
    """
    n, d = rows.shape
    if not with_ones:
        if gram_panels(n, d, rows.device) == 1:
            target.addmm_(rows.T, rows, beta=beta, alpha=alpha)
        elif beta:
            target.mul_(beta).add_(gram(rows), alpha=alpha)
        else:
            target.copy_(gram(rows).mul_(alpha))
        return
    # the X^T X block formed contiguously, then folded into the strided d x d view: a GEMM whose
    # output has row stride d + 1 runs markedly slower here (MNIST widths: 31 -> 19 ms at d = 784)
    block = gram(rows)
    view = target[:d, :d]
    if beta:
        view.mul_(beta).add_(block, alpha=alpha)
    else:
        view.copy_(block.mul_(alpha))
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
    """Invert SPD matrices (only their lower triangles are read); returns (inverses, ok mask per entry).

    No host synchronization: failed entries are masked on the device.
    """
    if method == "cholesky":
        chol, info = torch.linalg.cholesky_ex(matrices)
        ok = info == 0
        # keep cholesky_inverse away from the partial factors of failed entries (on the device: no sync)
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


def _damped(batch: torch.Tensor, damping: torch.Tensor | float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``batch + damping·I`` as a new tensor; entries where ``keep`` is False are zeroed first."""
    if keep is None:
        damped = batch.clone()
    else:
        damped = torch.where(keep.reshape(-1, 1, 1), batch, torch.zeros((), dtype=batch.dtype, device=batch.device))
    diag = damped.diagonal(dim1=-2, dim2=-1)
    if isinstance(damping, torch.Tensor) and damping.dim() > 0:
        diag.add_(damping.to(damped).unsqueeze(-1))
    else:
        diag.add_(float(damping))
    return damped


@dataclass
class PendingInverses:
    """A batched damped inversion launched on the device, not yet checked on the host.

    ``finite[i]`` is False when entry ``i`` of the input was not finite (it was inverted as zero),
    ``ok[i]`` when entry ``i`` was inverted successfully (in the input dtype). :func:`finish_inverses`
    reads ``ok`` (the one host synchronization) and retries the failed finite entries in float64.
    """

    inverses: torch.Tensor
    ok: torch.Tensor
    finite: torch.Tensor
    matrices: torch.Tensor
    damping: torch.Tensor | float
    method: InverseMethod


def launch_inverses(matrices: torch.Tensor, damping: torch.Tensor | float,
                    method: InverseMethod = "cholesky") -> PendingInverses:
    """Start :func:`damped_inverse_entries` on ``[B, n, n]`` without any host synchronization.

    The damping must already be known to be finite (the caller checks its Python numbers).
    """
    if method not in ("cholesky", "eigh"):
        raise ValueError(f"method must be 'cholesky' or 'eigh', got {method!r}")
    # the exact per-entry test (not the sum, which could overflow on a finite matrix); one pass
    finite = torch.isfinite(matrices).flatten(1).all(dim=1)
    inv, ok = _inverse_once(_damped(matrices, damping, finite), method)
    return PendingInverses(inv, ok & finite, finite, matrices, damping, method)


def finish_inverses(pending: PendingInverses, ok_host: list[bool],
                    stats: InversionStats | None = None) -> tuple[torch.Tensor, list[bool]]:
    """Complete a :class:`PendingInverses` given its ``ok`` mask read on the host (``ok_host``).

    Entries that failed on finite input are retried in float64 (more synchronizations, only on this
    rare path). Returns ``(inverses, ok)`` with ``ok`` a list of bools; every failure is counted.
    """
    inv = pending.inverses
    ok = list(ok_host)
    if stats is not None:
        stats.calls += len(ok)
    if not all(ok):
        finite = pending.finite.tolist()
        bad = [i for i, (good, fin) in enumerate(zip(ok, finite)) if not good and fin]
        if bad:
            if stats is not None:
                stats.float64_retries += len(bad)
            index = torch.tensor(bad, device=inv.device)
            damping = pending.damping
            damping_bad = damping[index].double() if isinstance(damping, torch.Tensor) and damping.dim() > 0 else damping
            # re-add the damping in float64: in float32 it may have been rounded away
            inv64, ok64 = _inverse_once(_damped(pending.matrices[index].double(), damping_bad), pending.method)
            inv = inv.clone()
            inv[index] = inv64.to(inv.dtype)
            for i, good in zip(bad, ok64.tolist()):
                ok[i] = bool(good)
        n_failed = ok.count(False)
        if n_failed and stats is not None:
            stats.failures += n_failed
            stats.failed_shapes.append(tuple(pending.matrices.shape))
    return inv, ok


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
    A non-finite damping is a caller error and raises :class:`InversionError`. One host
    synchronization when every entry succeeds (:func:`launch_inverses`, :func:`finish_inverses`).
    """
    if method not in ("cholesky", "eigh"):
        raise ValueError(f"method must be 'cholesky' or 'eigh', got {method!r}")
    if not (all_finite(damping) if isinstance(damping, torch.Tensor) else math.isfinite(float(damping))):
        if stats is not None:
            stats.failures += matrices.shape[0]
            stats.failed_shapes.append(tuple(matrices.shape))
        raise InversionError(f"the damping {damping!r} is not finite")
    pending = launch_inverses(matrices, damping, method)
    inv, ok = finish_inverses(pending, pending.ok.tolist(), stats)
    return inv, torch.tensor(ok, dtype=torch.bool, device=matrices.device)


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
