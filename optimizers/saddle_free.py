r"""Saddle-free Newton (Dauphin et al. 2014) on a Krylov subspace of the whole model's Hessian.

One step at :math:`\theta` with gradient :math:`g` (L2 included) and damping :math:`\lambda`:

1. ``k`` Lanczos steps of the Hessian :math:`H + \tau I` (products of :mod:`curvature.products`,
   reverse over reverse), started from :math:`g` (:func:`curvature.krylov.saddle_free_operator`);
2. the Krylov :math:`|H|^{-1}`: every Ritz value :math:`\theta_i` is replaced by
   :math:`\max(|\theta_i|, \mu) + \lambda` with the floor :math:`\mu =` ``eigenvalue_floor``
   :math:`\cdot\max_i|\theta_i|` (relative, so the floor is scale-free: within the subspace the
   modelled curvature ratio is at most :math:`1/` ``eigenvalue_floor``); the part of :math:`g`
   outside the Krylov space (none in exact arithmetic when starting from :math:`g`) takes a damped
   gradient step of size :math:`1/(\max_i\max(|\theta_i|,\mu) + \lambda)`;
3. as in the paper's Algorithm 1, the damping is chosen by the loss: the step
   :math:`\Delta_c = -\alpha\,|H|_{\lambda_c}^{-1} g` is evaluated on the batch for
   :math:`\lambda_c \in \lambda\cdot` ``damping_grid`` (no further products: only the Ritz weights
   change) and the best decrease is taken, :math:`\lambda \leftarrow \lambda_c`; if none decreases
   the objective the step is rejected and :math:`\lambda \leftarrow \lambda\cdot\max(` ``damping_grid`` :math:`)`.

Why it escapes saddles: along an eigenvector of :math:`H` with eigenvalue :math:`\theta<0` the
Newton step :math:`-g_i/\theta` points *toward* the critical point, the saddle-free step
:math:`-g_i/|\theta|` points away from it (downhill), with the Newton step's length.

Defaults: ``k = 20`` Lanczos vectors, ``eigenvalue_floor = 1e-3``, initial λ = 1e-2 (these three
are ours; Dauphin et al. choose k per problem and search λ over a range), ``damping_grid =
(0.1, 1, 10)``. Cost per step: one closure, ``k`` Hessian-vector products (each ≈ a backward
through the gradient's graph), ``len(damping_grid)`` forward passes. ``|H|^{-1}`` is not a
quasi-Newton inverse Hessian (it is not a secant or curvature approximation of :math:`H`), so the
convergence harness's preconditioner checks do not apply to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from curvature.damping import DampingPolicy, Tikhonov
from curvature.krylov import saddle_free_operator
from optimizers.matrix_free import LossFn, MatrixFreeOptimizer, StepContext, check_float, check_int

__all__ = ["SaddleFreeNewton"]


class SaddleFreeNewton(MatrixFreeOptimizer):
    r"""Saddle-free Newton: :math:`\Delta\theta = -\alpha|H|_k^{-1}g` on a ``k``-dimensional Krylov space.

    Args:
        model, loss_fn, weight_decay, targets_are_inputs: see :class:`~optimizers.matrix_free.MatrixFreeOptimizer`.
        lr: step scale α.
        damping: initial λ (a number) or a policy holding it; λ is re-chosen every step from
            ``damping * damping_grid`` by the loss (pass ``damping_grid=(1.0,)`` to keep it fixed).
        k: number of Lanczos vectors (Hessian-vector products per step).
        eigenvalue_floor: μ relative to the largest |Ritz value| (0 disables the floor).
        damping_grid: multipliers of λ tried at every step.
        min_damping, max_damping: λ is kept in this range.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        lr: float = 1.0,
        damping: float | DampingPolicy = 1e-2,
        *,
        k: int = 20,
        eigenvalue_floor: float = 1e-3,
        damping_grid: tuple[float, ...] = (0.1, 1.0, 10.0),
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        weight_decay: float = 0.0,
        targets_are_inputs: bool = False,
    ) -> None:
        self.k = check_int("k", k, 1)
        self.eigenvalue_floor = check_float("eigenvalue_floor", eigenvalue_floor, 0.0, 1.0, hi_open=False)
        grid = tuple(damping_grid)
        if not grid:
            raise ValueError("damping_grid must hold at least one multiplier")
        for value in grid:
            check_float("damping_grid entries", value, 0.0, lo_open=True)
        self.damping_grid = grid
        self.min_damping = check_float("min_damping", min_damping, 0.0, lo_open=True)
        self.max_damping = check_float("max_damping", max_damping, self.min_damping, lo_open=True)
        if not isinstance(damping, DampingPolicy):
            damping = Tikhonov(check_float("damping", damping, 0.0, lo_open=True))
        super().__init__(model, loss_fn, lr=lr, damping=damping, weight_decay=weight_decay,
                         targets_are_inputs=targets_are_inputs)

    def _propose(self, ctx: StepContext) -> torch.Tensor | None:
        info = ctx.info
        lam = float(self.damping.damping)
        if not bool(ctx.grad.any()):
            info.details["reason"] = "zero gradient"
            return None
        hessian = ctx.counted(ctx.functional.prepared_product("hessian"))
        k = min(self.k, ctx.theta.numel())
        sfo, lanczos = saddle_free_operator(hessian, ctx.grad, k, floor=0.0, damping=lam)
        top = float(sfo.ritz_values.abs().max())
        sfo = dataclasses.replace(sfo, floor=self.eigenvalue_floor * top)
        info.details.update(lanczos_steps=lanczos.num_steps, ritz_min=float(sfo.ritz_values.min()),
                            ritz_max=float(sfo.ritz_values.max()), floor=sfo.floor)
        best = None
        for mult in self.damping_grid:
            lam_c = min(max(lam * mult, self.min_damping), self.max_damping)
            try:
                direction = -dataclasses.replace(sfo, damping=lam_c).solve(ctx.grad)
            except RuntimeError:
                continue
            if not bool(torch.isfinite(direction).all()):
                continue
            f = ctx.objective(ctx.theta + ctx.lr * direction)
            if f == f and (best is None or f < best[0]):
                best = (f, lam_c, direction)
        if best is None or not best[0] < ctx.loss:
            self.damping.damping = min(max(lam * max(self.damping_grid), self.min_damping), self.max_damping)
            info.details["reason"] = "no damping candidate decreased the objective"
            return None
        f, lam_c, direction = best
        self.damping.damping = lam_c
        info.details["chosen_damping"] = lam_c
        sfo_c = dataclasses.replace(sfo, damping=lam_c)
        step = ctx.lr * direction
        model_change = float(torch.dot(ctx.grad, step)) + 0.5 * float(torch.dot(step, sfo_c.matvec(step)))
        info.reduction_ratio = (f - ctx.loss) / model_change if model_change < 0 else float("-inf")
        info.step_scale, info.loss_after = ctx.lr, f
        return ctx.theta + step

    def _extra_state(self) -> dict[str, Any]:
        return {}
