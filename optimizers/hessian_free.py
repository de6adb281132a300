r"""Hessian-free optimization (Martens 2010) on the whole model.

One step at :math:`\theta` with gradient :math:`g` (L2 included) and damping :math:`\lambda`:

1. truncated CG (:func:`curvature.krylov.truncated_cg`) on the damped Gauss–Newton system
   :math:`(G + \tau I + \lambda I)\,p = -g`, with :math:`Gv = J^\top H_\ell J v` from
   :mod:`curvature.products` (``curvature="hessian"`` uses :math:`H` instead), started from
   :math:`\zeta p_{k-1}` (the previous step's last CG iterate), stopped by the relative-progress
   rule or ``max_cg_iters``;
2. CG-iteration backtracking: of the iterates saved at :math:`\lceil1.3^j\rceil`, walk back from the
   last while the objective on the batch keeps decreasing and take the best;
3. the reduction ratio :math:`\rho = (F(\theta+p) - F(\theta)) / (q(p) - q(0))` with the *undamped*
   model :math:`q(p) - q(0) = g^\top p + \tfrac12 p^\top(G + \tau I)p` (one more product), and the
   Levenberg–Marquardt rule: :math:`\lambda \leftarrow \tfrac23\lambda` if :math:`\rho > \tfrac34`,
   :math:`\lambda \leftarrow \tfrac32\lambda` if :math:`\rho < \tfrac14`;
4. the step scale: :math:`\alpha = ` ``lr``, shrunk by 0.8 until the Armijo condition
   :math:`F(\theta+\alpha p) \le F(\theta) + c\,\alpha\,g^\top p` holds (:math:`c = 10^{-2}`, Martens
   & Sutskever 2012); if no :math:`\alpha` passes within ``max_line_search`` tries the step is
   rejected (parameters unchanged, counted in ``rejected_steps``).

Paper defaults (Martens 2010, "Deep learning via Hessian-free optimization", ICML): ζ = 0.95,
ε = 5·10⁻⁴ and k = max(10, 0.1 i) in the progress rule, iterates saved at ⌈1.3^j⌉, at most 250 CG
iterations, the 2/3 and 3/2 damping factors at ρ thresholds 3/4 and 1/4; the Armijo line search
with c = 10⁻² and shrink factor 0.8 is Martens & Sutskever (2012, "Training deep and recurrent
networks with Hessian-free optimization"). The initial λ = 1 is ours (the paper tunes it).

**Martens's diagonal CG preconditioner** (2010, §4.7; ``preconditioner="martens"``):
:math:`M = [\operatorname{diag}(\frac1N\sum_i g_i\odot g_i) + \lambda I]^{\alpha}` with
:math:`\alpha = 0.75` and :math:`g_i` the per-example gradients of the mini-batch
(:func:`curvature.per_example.squared_gradient_diagonal`, ``vmap`` of ``grad``). Martens writes the
sum :math:`\sum_i` over the per-example terms of his objective; for our batch-*mean* loss the
commensurate scale (the empirical-Fisher diagonal next to :math:`G + \lambda I`) is the mean, which
is what we use. It costs one vectorized per-example backward pass per step (no curvature
product). ``preconditioner=None`` (the default) runs plain CG: on the tiny CURVES autoencoder
(12 steps, CG capped at 20) both took 18.6 CG iterations per step and reached train loss 138.1,
and the preconditioned steps took 3-5× longer (the per-example pass; README, measured with
``python -m benchmarks.matrix_free_options``).

Cost per step: one closure (forward + backward), ``cg_iterations`` GGN products (+1 with a warm
start, +1 for ρ; each ≈ a forward-mode pass and a backward through the model), one forward per
backtracking or line-search evaluation (see ``opt.last_step``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curvature.damping import AdaptiveLM, DampingPolicy
from curvature.krylov import truncated_cg
from curvature.per_example import squared_gradient_diagonal
from optimizers.matrix_free import LossFn, MatrixFreeOptimizer, StepContext, check_float, check_int

__all__ = ["HessianFree"]


class HessianFree(MatrixFreeOptimizer):
    r"""Hessian-free optimization: truncated CG on :math:`(G + \lambda I)p = -g` with Martens's tricks.

    Args:
        model, loss_fn, weight_decay, targets_are_inputs: see :class:`~optimizers.matrix_free.MatrixFreeOptimizer`.
        lr: initial step scale of the line search (1: the CG step itself).
        damping: initial λ (a number: the LM rule with factor 2/3 at ρ thresholds 1/4, 3/4) or any
            :class:`~curvature.damping.DampingPolicy` (a fixed one disables the adaptation).
        curvature: ``"ggn"`` (default, positive semi-definite for convex losses) or ``"hessian"``.
        max_cg_iters: CG iteration cap (Martens: 250).
        cg_decay: ζ, warm start of CG from ζ times the previous solution (0 disables).
        progress_eps: ε of the relative-progress stop (None: run to ``max_cg_iters``/``cg_tol``).
        cg_tol: relative residual tolerance of CG (0: not used).
        backtrack: CG-iteration backtracking on/off.
        line_search: Armijo line search on the step scale on/off (off: the scale is ``lr``).
        armijo_c, line_search_shrink, max_line_search: c, the shrink factor and the number of tries.
        preconditioner: ``None`` (plain CG) or ``"martens"`` (the diagonal preconditioner above).
        preconditioner_exponent: α of Martens's preconditioner (0.75), in (0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        lr: float = 1.0,
        damping: float | DampingPolicy = 1.0,
        *,
        curvature: str = "ggn",
        max_cg_iters: int = 250,
        cg_decay: float = 0.95,
        progress_eps: float | None = 5e-4,
        cg_tol: float = 0.0,
        backtrack: bool = True,
        line_search: bool = True,
        armijo_c: float = 1e-2,
        line_search_shrink: float = 0.8,
        max_line_search: int = 20,
        weight_decay: float = 0.0,
        targets_are_inputs: bool = False,
        preconditioner: str | None = None,
        preconditioner_exponent: float = 0.75,
    ) -> None:
        if preconditioner not in (None, "martens"):
            raise ValueError(f"preconditioner must be None or 'martens', got {preconditioner!r}")
        self.preconditioner = preconditioner
        self.preconditioner_exponent = check_float("preconditioner_exponent", preconditioner_exponent, 0.0, 1.0,
                                                   lo_open=True, hi_open=False)
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        self.max_cg_iters = check_int("max_cg_iters", max_cg_iters, 1)
        self.cg_decay = check_float("cg_decay", cg_decay, 0.0, 1.0, hi_open=False)
        if progress_eps is not None:
            check_float("progress_eps", progress_eps, 0.0, lo_open=True)
        self.progress_eps = progress_eps
        self.cg_tol = check_float("cg_tol", cg_tol, 0.0)
        self.armijo_c = check_float("armijo_c", armijo_c, 0.0, 1.0, lo_open=True)
        self.line_search_shrink = check_float("line_search_shrink", line_search_shrink, 0.0, 1.0, lo_open=True)
        self.max_line_search = check_int("max_line_search", max_line_search, 1)
        self.curvature, self.backtrack, self.line_search = curvature, bool(backtrack), bool(line_search)
        if not isinstance(damping, DampingPolicy):
            damping = AdaptiveLM(check_float("damping", damping, 0.0, lo_open=True), factor=2.0 / 3.0, use_pi=False)
        super().__init__(model, loss_fn, lr=lr, damping=damping, weight_decay=weight_decay,
                         targets_are_inputs=targets_are_inputs)

    def martens_preconditioner(self, functional, damping: float) -> torch.Tensor:
        r"""The diagonal of :math:`M = [\operatorname{diag}(\frac1N\sum_i g_i\odot g_i) + \lambda I]^\alpha`
        on ``functional``'s batch and point (length ``n``)."""
        return (squared_gradient_diagonal(functional) + damping) ** self.preconditioner_exponent

    def _curvature_product(self, ctx: StepContext):
        r"""``v -> Cv`` at the step's point and batch: the GGN (``curvature="ggn"``) or the Hessian."""
        return ctx.functional.prepared_product(self.curvature)

    def _propose(self, ctx: StepContext) -> torch.Tensor | None:
        info, lam = ctx.info, float(self.damping.damping)
        raw = self._curvature_product(ctx)
        ctx.expose(raw, lam)
        curvature = ctx.counted(raw)

        def damped(v: torch.Tensor) -> torch.Tensor:
            return curvature(v) + lam * v

        previous = self._get_vector("cg_solution")
        x0 = self.cg_decay * previous if previous is not None and self.cg_decay > 0 else None
        precondition = None
        if self.preconditioner == "martens":
            m_inv = self.martens_preconditioner(ctx.functional, lam).reciprocal()
            info.cg_preconditioner = m_inv
            info.details["per_example_gradients"] = int(ctx.functional.inputs.shape[0])

            def precondition(r: torch.Tensor) -> torch.Tensor:
                return r * m_inv

        result = truncated_cg(damped, -ctx.grad, x0=x0, max_iters=self.max_cg_iters, tol=self.cg_tol,
                              progress_eps=self.progress_eps, save_gamma=1.3 if self.backtrack else None,
                              preconditioner=precondition)
        info.details.update(cg_iterations=result.iterations, cg_stop=result.stop_reason, cg_warm_start=x0 is not None)
        if not bool(torch.isfinite(result.x).all()):
            info.details["reason"] = "non-finite CG solution"
            self.damping.observe_reduction_ratio(float("-inf"))
            return None
        self._set_vector("cg_solution", result.x)

        # CG-iteration backtracking: from the last saved iterate back while F keeps decreasing
        candidates = result.saved if self.backtrack else result.saved[-1:]
        best_i, best_p = candidates[-1]
        best_f = ctx.objective(ctx.theta + best_p)
        for i, p in reversed(candidates[:-1]):
            f = ctx.objective(ctx.theta + p)
            if not f < best_f:
                break
            best_i, best_p, best_f = i, p, f
        info.details["backtracked_to"] = best_i

        model_change = float(torch.dot(ctx.grad, best_p)) + 0.5 * float(torch.dot(best_p, curvature(best_p)))
        rho = (best_f - ctx.loss) / model_change if model_change < 0 else float("-inf")
        if best_f != best_f:  # NaN objective at the trial point
            rho = float("-inf")
        info.reduction_ratio = rho
        self.damping.observe_reduction_ratio(rho)

        slope = float(torch.dot(ctx.grad, best_p))
        alpha = ctx.lr
        f_alpha = best_f if alpha == 1.0 else ctx.objective(ctx.theta + alpha * best_p)
        if self.line_search:
            tries = 1
            while not (f_alpha <= ctx.loss + self.armijo_c * alpha * slope) and tries < self.max_line_search:
                alpha *= self.line_search_shrink
                f_alpha = ctx.objective(ctx.theta + alpha * best_p)
                tries += 1
            if not (f_alpha <= ctx.loss + self.armijo_c * alpha * slope):
                info.details["reason"] = "no Armijo step found"
                return None
        elif not f_alpha == f_alpha or f_alpha == float("inf"):
            info.details["reason"] = "non-finite objective at the new point"
            return None
        info.step_scale, info.loss_after = alpha, f_alpha
        return ctx.theta + alpha * best_p

    def _extra_state(self) -> dict[str, Any]:
        return {}
