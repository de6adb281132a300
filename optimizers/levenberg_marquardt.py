r"""Levenberg–Marquardt for neural networks with the generalized Gauss–Newton matrix.

After Pooladzandi & Zhou (2022, "Improving Levenberg–Marquardt Algorithm for Neural Networks",
arXiv:2212.08769): Gauss–Newton for regression, the generalized Gauss–Newton
:math:`G = J^\top H_\ell J` for any other convex loss (classification), sped up by adaptive
momentum, a line search on the step scale and uphill step acceptance. One step at
:math:`\theta` with gradient :math:`g` (L2 included), damping :math:`\lambda`:

1. the LM direction :math:`p = -(G + \tau I + \lambda I)^{-1} g` by CG (:func:`curvature.krylov.truncated_cg`
   to ``cg_tol`` or ``max_cg_iters``; matrix-free, products from :mod:`curvature.products`);
2. optional **adaptive momentum** (``momentum=True``): the step is the minimizer of the damped
   model :math:`m(\delta) = g^\top\delta + \tfrac12\delta^\top(G+\tau I+\lambda I)\delta` over
   :math:`\delta = a\,p + b\,\delta_{k-1}` (the LM direction and the previous accepted step), a
   2×2 solve that costs two more products; the momentum coefficient :math:`b` is thereby chosen
   by the curvature at every step, as in the conjugate-gradient combination the paper builds on.
   (This is our formulation of the paper's constrained problem, stated here so it can be checked.);
3. trial :math:`\theta' = \theta + \alpha\delta` with :math:`\alpha =` ``lr``. **Acceptance rule**:
   accept if :math:`F(\theta') < F(\theta)`, or -- uphill acceptance (Transtrum & Sethna 2012,
   adopted by the paper) -- if a previous accepted step :math:`\delta_{k-1}` exists and

   .. math:: (1 - \cos\beta_k)^{b}\,F(\theta') \le F(\theta),\qquad
             \cos\beta_k = \frac{\delta^\top\delta_{k-1}}{\|\delta\|\,\|\delta_{k-1}\|},\quad b = 2,

   i.e. a step that keeps the previous direction (:math:`\cos\beta` near 1) may go uphill a
   little, one that turns back (:math:`\cos\beta \le 0`) must go down by the factor
   :math:`(1-\cos\beta)^b \ge 1`;
4. **line search on the step scale** when the trial is not accepted: :math:`\alpha \leftarrow
   \alpha/2` up to ``max_line_search`` times, accepting the first :math:`F(\theta+\alpha\delta) <
   F(\theta)`; if none, the step is rejected (parameters unchanged, ``rejected_steps``);
5. the **LM damping schedule** (:class:`~curvature.damping.DelayedGratification`): with
   :math:`\rho = (F(\theta+\delta) - F(\theta))/(q(\delta) - q(0))` at the full step and the
   undamped model :math:`q`, :math:`\lambda \leftarrow \lambda/3` if :math:`\rho > 0` and
   :math:`\lambda \leftarrow 2\lambda` otherwise (Transtrum & Sethna's "delayed gratification",
   down 3 / up 2).

**Maximum-diagonal damping** (``damping_matrix="max_diagonal"``): the damping term is
:math:`\lambda D_k` instead of :math:`\lambda I`, with :math:`D_k = \max(D_{k-1},
\operatorname{diag}(J_k^\top J_k))` elementwise -- the largest diagonal of the Gauss–Newton matrix
seen so far (Marquardt's scaling in the form Transtrum & Sethna 2012 recommend, which the LM paper
adopts; the seeds hold only the paper's abstract, so the rule is stated here from those sources).
:math:`\operatorname{diag}(J^\top J) = \frac1N\sum_i\sum_o (J_i)_{oj}^2` is the Gauss–Newton
diagonal of the per-example output Jacobians (:func:`curvature.per_example.gauss_newton_diagonal`):
**exact** (``diagonal_samples=None``, one ``jacrev`` per example, for few outputs) or a
**Monte-Carlo** estimate with ``diagonal_samples`` Rademacher vectors per example (unbiased;
``seed`` and the step number fix the draws, so a resumed run draws the same). It is the GGN
diagonal exactly for the half squared error summed over outputs; for other losses it leaves out the
output-space Hessian (a scaling of λ, which the schedule adapts). A relative floor
:math:`D_k \ge 10^{-6}\max_j D_{k,j}` keeps every coordinate damped. The diagonal costs one
vectorized per-example pass per step, not counted as products.

Defaults: λ₀ = 1e-3 (Marquardt's customary start), ``damping_matrix="identity"`` (on the tiny
CURVES autoencoder max-diagonal damping reached a lower loss per step -- 139.4 vs 163.5 after 12
steps, no rejected step -- but each step cost 3.0-3.6× more, leaving it ≈ 1% ahead at equal wall
time: README, ``python -m benchmarks.matrix_free_options``; the per-example Jacobians also need a
model that treats examples independently, so it is not the default), down 3 / up 2, momentum off, uphill
acceptance off (``uphill=True``, b = 2, turns it on: on our small regression tests it let the loss
oscillate between two levels near the minimum instead of converging, because with
:math:`\cos\beta \approx 1` the rule admits large increases), ``lr`` 1
(the full Gauss–Newton step), CG to a relative residual of 1e-10 or 200 iterations. Near a
zero-residual minimum λ → 0 geometrically and the step becomes the Gauss–Newton step, which
converges superlinearly (quadratically in the limit); with non-zero residuals Gauss–Newton is
linear with a rate set by the residual curvature.

Cost per step: one closure, the CG iterations in GGN products (+1 for ρ, +2 with momentum), one
forward per trial (1 + line-search tries).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from curvature.damping import DampingPolicy, DelayedGratification
from curvature.krylov import truncated_cg
from curvature.per_example import gauss_newton_diagonal
from optimizers.matrix_free import LossFn, MatrixFreeOptimizer, StepContext, check_float, check_int

__all__ = ["LevenbergMarquardt", "uphill_accepts"]


def uphill_accepts(f_new: float, f_old: float, step: torch.Tensor, previous: torch.Tensor, power: float) -> bool:
    r"""Transtrum & Sethna's uphill rule: :math:`(1 - \cos\beta)^b f_{new} \le f_{old}`.

    :math:`\cos\beta` is the cosine between ``step`` and the ``previous`` accepted step; a
    non-finite ``f_new`` or a zero vector is never accepted.
    """
    norms = float(step.norm()) * float(previous.norm())
    if not (math.isfinite(f_new) and norms > 0):
        return False
    cos_beta = float(step @ previous) / norms
    return (1.0 - cos_beta) ** power * f_new <= f_old


class LevenbergMarquardt(MatrixFreeOptimizer):
    r"""Levenberg–Marquardt with the GGN, adaptive momentum, step-scale line search and uphill acceptance.

    Args:
        model, loss_fn, weight_decay, targets_are_inputs: see :class:`~optimizers.matrix_free.MatrixFreeOptimizer`.
        lr: step scale α of the trial step.
        damping: initial λ (a number: :class:`~curvature.damping.DelayedGratification` with down 3,
            up 2) or any policy that observes reduction ratios.
        momentum: adaptive momentum on/off.
        uphill: uphill acceptance on/off; ``uphill_power`` is b.
        max_line_search: halvings of α tried after a failed trial (0: no line search).
        max_cg_iters, cg_tol: CG limits for the LM system.
        damping_matrix: ``"identity"`` (λI) or ``"max_diagonal"`` (λD_k, see the module docstring).
        diagonal_samples: None (exact diag(JᵀJ)) or the number of Monte-Carlo vectors per example.
        diagonal_floor: the relative floor of D_k.
        seed: seeds the Monte-Carlo vectors (with the step number).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        lr: float = 1.0,
        damping: float | DampingPolicy = 1e-3,
        *,
        momentum: bool = False,
        uphill: bool = False,
        uphill_power: float = 2.0,
        max_line_search: int = 5,
        max_cg_iters: int = 200,
        cg_tol: float = 1e-10,
        weight_decay: float = 0.0,
        targets_are_inputs: bool = False,
        damping_matrix: str = "identity",
        diagonal_samples: int | None = None,
        diagonal_floor: float = 1e-6,
        seed: int = 0,
    ) -> None:
        if damping_matrix not in ("identity", "max_diagonal"):
            raise ValueError(f"damping_matrix must be 'identity' or 'max_diagonal', got {damping_matrix!r}")
        if diagonal_samples is not None:
            check_int("diagonal_samples", diagonal_samples, 1)
        self.damping_matrix, self.diagonal_samples = damping_matrix, diagonal_samples
        self.diagonal_floor = check_float("diagonal_floor", diagonal_floor, 0.0, 1.0)
        self.seed = check_int("seed", seed, 0)
        self.momentum, self.uphill = bool(momentum), bool(uphill)
        self.uphill_power = check_float("uphill_power", uphill_power, 0.0, lo_open=True)
        self.max_line_search = check_int("max_line_search", max_line_search, 0)
        self.max_cg_iters = check_int("max_cg_iters", max_cg_iters, 1)
        self.cg_tol = check_float("cg_tol", cg_tol, 0.0)
        if not isinstance(damping, DampingPolicy):
            damping = DelayedGratification(check_float("damping", damping, 0.0, lo_open=True))
        super().__init__(model, loss_fn, lr=lr, damping=damping, weight_decay=weight_decay,
                         targets_are_inputs=targets_are_inputs)

    def _propose(self, ctx: StepContext) -> torch.Tensor | None:
        info, lam = ctx.info, float(self.damping.damping)
        raw = ctx.functional.prepared_product("ggn")
        scale: float | torch.Tensor = 1.0
        if self.damping_matrix == "max_diagonal":
            running = self._max_diagonal(ctx)
            if running is None:
                self.damping.observe_reduction_ratio(float("-inf"))
                info.details["reason"] = "non-finite Gauss-Newton diagonal"
                return None
            top = float(running.max())
            scale = torch.clamp(running, min=self.diagonal_floor * top) if top > 0 else torch.ones_like(running)
            result = self._solve_and_accept(ctx, raw, lam, scale)
            self._set_vector("max_diagonal", running)  # committed once the step completed (accepted or rejected)
            return result
        return self._solve_and_accept(ctx, raw, lam, scale)

    def _solve_and_accept(self, ctx: StepContext, raw, lam: float, scale: float | torch.Tensor) -> torch.Tensor | None:
        info = ctx.info
        ctx.expose(raw, lam * scale)
        ggn = ctx.counted(raw)

        def damped(v: torch.Tensor) -> torch.Tensor:
            return ggn(v) + lam * scale * v

        result = truncated_cg(damped, -ctx.grad, max_iters=self.max_cg_iters, tol=self.cg_tol,
                              progress_eps=None, save_gamma=None)
        info.details.update(cg_iterations=result.iterations, cg_stop=result.stop_reason)
        delta = result.x
        previous = self._get_vector("previous_step")
        if self.momentum and previous is not None and bool(previous.any()):
            a_p, a_prev = damped(delta), damped(previous)
            m = torch.stack([torch.stack([delta @ a_p, delta @ a_prev]), torch.stack([previous @ a_p, previous @ a_prev])])
            rhs = -torch.stack([ctx.grad @ delta, ctx.grad @ previous])
            try:
                coeff = torch.linalg.solve(m, rhs)
            except RuntimeError:
                coeff = None
            if coeff is not None and bool(torch.isfinite(coeff).all()):
                delta = coeff[0] * delta + coeff[1] * previous
                info.details["momentum"] = float(coeff[1])
        if not bool(torch.isfinite(delta).all()):
            self.damping.observe_reduction_ratio(float("-inf"))
            info.details["reason"] = "non-finite LM direction"
            return None

        alpha = ctx.lr
        f_trial = ctx.objective(ctx.theta + alpha * delta)
        f_full = f_trial if alpha == 1.0 else ctx.objective(ctx.theta + delta)
        model_change = float(ctx.grad @ delta) + 0.5 * float(delta @ (ggn(delta)))
        rho = (f_full - ctx.loss) / model_change if model_change < 0 and math.isfinite(f_full) else float("-inf")
        info.reduction_ratio = rho
        self.damping.observe_reduction_ratio(rho)

        accepted = math.isfinite(f_trial) and f_trial < ctx.loss
        if not accepted and self.uphill and previous is not None:
            if uphill_accepts(f_trial, ctx.loss, delta, previous, self.uphill_power):
                accepted = True
                info.details["uphill"] = True
        tries = 0
        while not accepted and tries < self.max_line_search:
            alpha *= 0.5
            tries += 1
            f_trial = ctx.objective(ctx.theta + alpha * delta)
            accepted = math.isfinite(f_trial) and f_trial < ctx.loss
        info.details["line_search_tries"] = tries
        if not accepted:
            info.details["reason"] = "no acceptable step scale"
            return None
        self._set_vector("previous_step", alpha * delta)
        info.step_scale, info.loss_after = alpha, f_trial
        return ctx.theta + alpha * delta

    def _max_diagonal(self, ctx: StepContext) -> torch.Tensor | None:
        r""":math:`D_k = \max(D_{k-1}, \operatorname{diag}(J_k^\top J_k))` (not floored; None if not finite).
        The caller stores it as ``state[p]["max_diagonal"]`` once the step completed."""
        gen = None
        if self.diagonal_samples is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps)
        diag = gauss_newton_diagonal(ctx.functional, samples=self.diagonal_samples, generator=gen)
        if not bool(torch.isfinite(diag).all()):
            return None
        previous = self._get_vector("max_diagonal")
        running = diag if previous is None else torch.maximum(previous, diag)
        ctx.info.details["max_diagonal_min"] = float(running.min())
        ctx.info.details["max_diagonal_max"] = float(running.max())
        return running

    def _extra_state(self) -> dict[str, Any]:
        return {}
