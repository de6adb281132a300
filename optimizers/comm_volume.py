r"""Analytic communication volume of KAISA's distributed KFAC, to compare with what we measure.

KAISA (Pauloski et al., SC'21; kfac-pytorch) per training step, for layers with factor sizes
:math:`d_a, d_g` and :math:`W` ranks, counted as the payload handed to each collective (the unit of
:class:`~optimizers.communicator.CommStats`):

* gradients: one all-reduce of :math:`\sum_\ell d_g d_a` (data parallelism itself);
* factors: one all-reduce of :math:`\sum_\ell (d_a^2 + d_g^2)` every ``factor_update_freq`` steps
  (:math:`\sum_\ell (d_a(d_a+1) + d_g(d_g+1))/2` with symmetry-aware packing);
* second-order results, by the gradient-worker fraction :math:`f` (:math:`1/W \le f \le 1`):
  for :math:`f > 1/W` (COMM-OPT at :math:`f = 1`) the inverses -- eigendecompositions,
  :math:`d^2 + d` per factor -- are broadcast every ``inverse_update_freq`` steps; for
  :math:`f < 1` (MEM-OPT at :math:`f = 1/W`) the preconditioned gradients,
  :math:`\sum_\ell d_g d_a`, are broadcast every step.
"""

from __future__ import annotations

from typing import Iterable


def kaisa_bytes_per_step(
    layers: Iterable[tuple[int, int]],
    world_size: int,
    *,
    grad_worker_fraction: float = 1.0,
    factor_update_freq: int = 1,
    inverse_update_freq: int = 1,
    dtype_bytes: int = 4,
    symmetry_aware: bool = False,
    eigen: bool = True,
) -> dict[str, float]:
    """Payload bytes per step of KAISA's scheme, by part (``gradients``, ``factors``, ``inverses``,
    ``preconditioned_gradients``) and ``total``.

    Args:
        layers: ``(a_dim, g_dim)`` of each preconditioned layer.
        world_size: W.
        grad_worker_fraction: KAISA's f in [1/W, 1].
        factor_update_freq, inverse_update_freq: KAISA's update intervals.
        dtype_bytes: bytes per element (4 for float32).
        symmetry_aware: factors sent as upper triangles.
        eigen: second-order results as eigendecompositions (d² + d) instead of inverses (d²).
    """
    layers = list(layers)
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if not (1.0 / world_size - 1e-12 <= grad_worker_fraction <= 1.0):
        raise ValueError(f"grad_worker_fraction must be in [1/W, 1], got {grad_worker_fraction}")
    if world_size == 1:
        return {"gradients": 0.0, "factors": 0.0, "inverses": 0.0, "preconditioned_gradients": 0.0, "total": 0.0}
    grads = sum(a * g for a, g in layers)
    if symmetry_aware:
        factors = sum(a * (a + 1) / 2 + g * (g + 1) / 2 for a, g in layers)
    else:
        factors = sum(a * a + g * g for a, g in layers)
    inverse_size = sum((a * a + a + g * g + g) if eigen else (a * a + g * g) for a, g in layers)
    inverses = inverse_size / inverse_update_freq if grad_worker_fraction * world_size > 1 + 1e-9 else 0.0
    precond = float(grads) if grad_worker_fraction < 1.0 - 1e-12 else 0.0
    out = {
        "gradients": grads * dtype_bytes,
        "factors": factors / factor_update_freq * dtype_bytes,
        "inverses": inverses * dtype_bytes,
        "preconditioned_gradients": precond * dtype_bytes,
    }
    out["total"] = sum(out.values())
    return out
