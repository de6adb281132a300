r"""The operator a block *applies*, measured through ``block.precondition`` itself (E4).

A block's ``to_dense()`` (and its factors' ``to_dense()``) describe the operator the block claims
to apply; the step uses ``block.precondition``. The two can disagree (a factor whose ``apply`` path
differs from its stored matrix), so E4 probes the applied map :math:`P: M \mapsto` ``precondition(M)``
directly, on the tensors' device and in their dtype:

* **agreement**: for :math:`q` Rademacher probe matrices :math:`V_i`,
  :math:`\max_i\|P(V_i) - D(V_i)\|_F/\|D(V_i)\|_F \le \tau` where :math:`D` is the map of ``to_dense``
  (:class:`~convergence.monitor.OperatorSnapshot`), :math:`\tau = 10\sqrt{\varepsilon}` of the block's
  dtype (about 1.5e-7 in float64, 3.5e-3 in float32; rounding of two different evaluation orders is
  far below it, a wrong operator is O(1));
* **spectrum of the applied map**: exactly on small layers (``dim <= exact_max_dim``: the map is
  materialized column by column from the :math:`\operatorname{vec}_c` basis, then ``eigvalsh`` of its
  symmetric part and the relative asymmetry :math:`\|A - A^\top\|_F/\|A\|_F`), otherwise by Lanczos
  on the map (:func:`convergence.spectrum.lanczos`, torch, on the device): Ritz values lie inside the
  spectrum of a symmetric map, so a negative Ritz value proves indefiniteness.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from curvature.blocks import vec_c

__all__ = ["applied_dense", "probe_applied_operator", "agreement_tolerance"]


def agreement_tolerance(dtype: torch.dtype) -> float:
    r""":math:`\tau = 10\sqrt{\varepsilon}` of ``dtype`` for ``precondition`` vs ``to_dense``."""
    return 10.0 * math.sqrt(float(torch.finfo(dtype).eps))


def _unvec_c(v: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return v.reshape(shape[1], shape[0]).T


def applied_dense(block, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    r"""The matrix :math:`A` with :math:`A\operatorname{vec}_c(M) = \operatorname{vec}_c(\text{precondition}(M))`."""
    shape = tuple(block.shape)
    dim = shape[0] * shape[1]
    eye = torch.eye(dim, dtype=dtype, device=device)
    cols = [vec_c(block.precondition(_unvec_c(eye[:, j], shape).contiguous())) for j in range(dim)]
    return torch.stack(cols, 1)


def _block_dtype_device(block) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of what the block applies, read off a factor or the diagonal scale when it has
    them (never ``block.to_dense()`` of a Kronecker block: that is a ``d_a d_g x d_a d_g`` matrix)."""
    for name in ("a_factor", "g_factor"):
        factor = getattr(block, name, None)
        if factor is not None:
            try:
                dense = factor.to_dense()
                return dense.dtype, dense.device
            except Exception:  # noqa: BLE001 - fall through to the block
                pass
    scale = getattr(block, "scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.dtype, scale.device
    try:
        dense = block.to_dense()
        return dense.dtype, dense.device
    except Exception:  # noqa: BLE001 - a block without to_dense: float64 on CPU
        return torch.float64, torch.device("cpu")


def probe_applied_operator(block, *, probes: int = 4, generator: torch.Generator | None = None,
                           exact_max_dim: int = 256, lanczos_steps: int = 40) -> dict[str, Any]:
    """Probe ``block.precondition`` (see the module docstring). Pure: the block is only read.

    Returns ``{"mismatch", "tolerance", "lmin", "lmax", "asymmetry", "method", "dim", "finite"}``
    (``mismatch`` NaN when the block has no ``to_dense``; ``asymmetry`` NaN for Lanczos).
    """
    from convergence.monitor import OperatorSnapshot

    dtype, device = _block_dtype_device(block)
    shape = tuple(block.shape)
    dim = shape[0] * shape[1]
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"dim": dim, "tolerance": agreement_tolerance(dtype), "dtype": str(dtype).replace("torch.", "")}
    try:
        reference = OperatorSnapshot.from_block(block)
    except Exception:  # noqa: BLE001
        reference = None
    worst = 0.0
    for _ in range(max(probes, 0)):
        v = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype=dtype, device=device)
        applied = block.precondition(v)
        if reference is None:
            worst = math.nan
            break
        ref = reference.apply(v)
        num = float(torch.linalg.matrix_norm(applied.to(torch.float64) - ref))
        den = float(torch.linalg.matrix_norm(ref))
        worst = max(worst, num / den if den > 0 else (0.0 if num == 0 else math.inf))
    out["mismatch"] = worst
    if dim <= exact_max_dim:
        a = applied_dense(block, dtype, device).to(torch.float64)
        finite = bool(torch.isfinite(a).all())
        out["finite"] = finite
        out["method"] = "exact"
        if not finite:
            out.update(lmin=math.nan, lmax=math.nan, asymmetry=math.nan)
            return out
        norm = float(torch.linalg.matrix_norm(a))
        out["asymmetry"] = float(torch.linalg.matrix_norm(a - a.T)) / norm if norm > 0 else 0.0
        eig = torch.linalg.eigvalsh(0.5 * (a + a.T))
        out["lmin"], out["lmax"] = float(eig[0]), float(eig[-1])
        return out
    from convergence.spectrum import lanczos

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return vec_c(block.precondition(_unvec_c(v.to(dtype), shape).contiguous())).to(v.dtype)

    v0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    # the device is read once, at the end (no host round trip per application of the block)
    res = lanczos(matvec, dim, min(lanczos_steps, dim), v0=v0, dtype=torch.float64, device=device, check_every=None)
    ritz = torch.linalg.eigvalsh(res.tridiagonal())
    lo, hi, finite = torch.stack([ritz[0], ritz[-1], torch.isfinite(ritz).all().to(ritz.dtype)]).cpu().tolist()
    out.update(method="lanczos", asymmetry=math.nan, lmin=lo, lmax=hi, finite=bool(finite))
    return out
