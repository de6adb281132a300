"""K-BFGS and K-BFGS(L) (Goldfarb, Ren & Bahamou, NeurIPS 2020).

Per layer :math:`\\tilde W \\leftarrow \\tilde W - \\alpha H_g M H_a` with

* :math:`H_a`: Hessian-action BFGS on :math:`A + \\lambda_A I` (:math:`A` the EMA of
  :math:`\\bar a\\bar a^\\top`, decay 0.9), initialized by one inversion and never re-inverted;
* :math:`H_g`: BFGS (K-BFGS) or L-BFGS with ``memory`` pairs and :math:`H_0 = I` (K-BFGS(L)) on
  the pairs :math:`s_g = \\bar h(w_{k+1}) - \\bar h(w_k)`, :math:`y_g = \\bar g(w_{k+1}) - \\bar g(w_k)`
  from a second pass on the same batch, EMA-averaged (0.9) and double-damped (μ1 = 0.2, μ2 = √λ).

Defaults: lr 0.3, λ = 0.3 (the authors' values, also the best of the defaults study's candidates,
README "Defaults"), λ_A = μ2 = √λ, momentum 0.9 (EMA form), weight decay 1e-5, H_g starts at I. The H updates
of step k happen after the direction p_k is formed, as in the authors' code; with
``lag_factors=True`` the A statistics of batch k are also folded in only after the step.

Layers with a weight-sharing dimension (sequence positions, spatial locations, repeated calls)
follow ``approx``: with "expand" (default) A is KFC's (Ω = (1/N)ΣΣ_t āāᵀ) and h̄, ḡ, ā̄ are means over
all rows (samples *and* positions; for Conv2d our reading of Ren, Bahamou & Goldfarb, arXiv
2102.06737); with "reduce" A is built from the per-sequence mean inputs and h̄, ḡ, ā̄ are means over
sequences of the position-mean h and ā and of the position-sum gradient (see README, Architectures).
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from optimizers.driver import CurvatureOptimizer
from optimizers.recovery import Recovery
from optimizers.recipes import Recipe, default_blocks, kbfgs_block, kfac_block


class KBFGS(CurvatureOptimizer):
    """K-BFGS: dense BFGS H_g. ``step(closure)`` is required (a second pass on the same batch).

    The closure zeroes the gradients, runs forward and backward on the batch and returns the loss;
    it is called a second time at the new parameters. For gradient accumulation the closure runs all
    micro-batches (``(loss_j / k).backward()`` each) and returns the total.

    Args:
        model: the module to train; every ``layer_types`` layer gets a K-BFGS block.
        lr: learning rate α (per group in ``param_groups``; schedulers work).
        damping: λ (> 0); λ_A and μ2 default to √λ, fixed when the optimizer is built.
        momentum: β of the EMA momentum.
        weight_decay: τ (L2 term added to the gradient; per group).
        a_decay: EMA decay of A (the Hessian-action matrix of H_a).
        pair_decay: EMA decay of the (s, y) pairs of H_g (default 0.9, or 0 with ``full_batch``).
        mu1, mu2: double-damping constants (μ2 default √λ).
        lambda_a: λ_A (default √λ).
        damping_variant: "interpolate" (authors' code) or "lm".
        memory: only for :class:`KBFGSL` (here an error).
        fallback: "sgd", "adam" or "error" for parameters of layers without a block.
        fallback_lr, fallback_betas, fallback_eps: settings of the fallback rule.
        loss_reduction: "mean" or "sum".
        lag_factors: theory mode (A of batch k used from step k+1).
        layer_types: module types that get a K-BFGS block (default: Linear, Conv1d, Conv2d,
            MultiheadAttention); embeddings get a KFAC block with a diagonal A (K-BFGS needs a dense
            A), normalization layers a diagonal block (see :func:`default_blocks`).
        approx: "expand" or "reduce" (A and the means h̄, ḡ, ā̄; see :mod:`curvature.blocks`).
        blocks: overrides (module types or layer names to recipes or None) on top of the defaults.
        exclude: layer names or glob patterns that get the fallback rule.
        seed: seed of the optimizer's generator.
        param_groups: optional torch.optim-style groups covering every trainable parameter.
        full_batch: declare that every step sees the whole training set: ``pair_decay`` then defaults
            to 0 (the authors' code turns the pair EMA off in that case; README "Full-batch training").
        recovery, strict: see :class:`~optimizers.driver.CurvatureOptimizer`.
    """

    _memory: int | None = None

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.3,
        damping: float = 0.3,
        *,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        a_decay: float = 0.9,
        pair_decay: float | None = None,
        mu1: float = 0.2,
        mu2: float | None = None,
        lambda_a: float | None = None,
        damping_variant: str = "interpolate",
        memory: int | None = None,
        fallback: str = "sgd",
        fallback_lr: float | None = None,
        fallback_betas: tuple[float, float] | None = None,
        fallback_eps: float = 1e-8,
        loss_reduction: str = "mean",
        lag_factors: bool = False,
        layer_types: tuple[type[nn.Module], ...] | None = None,
        approx: str = "expand",
        blocks: Mapping[type | str, Recipe | None] | None = None,
        exclude=(),
        seed: int = 0,
        param_groups=None,
        full_batch: bool = False,
        recovery: Recovery | bool | None = None,
        strict: bool = False,
        distributed=None,
        distribute: str = "replicate",
    ) -> None:
        if memory is not None and self._memory is None:
            raise ValueError(
                f"KBFGS has a dense H_g and takes no memory (got memory={memory!r}); for limited memory use "
                "KBFGSL(model, memory=...)"
            )
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
            raise ValueError(f"damping (lambda) must be a number > 0, got {damping!r}")
        if pair_decay is None:  # the authors' code: EMA 0.9 of the pairs, none when the batch is the data set
            pair_decay = 0.0 if full_batch else 0.9
        memory = self._memory if memory is None else memory
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory < 1):
            raise ValueError(f"memory must be an integer >= 1, got {memory!r}")
        recipe = kbfgs_block(a_decay=a_decay, pair_decay=pair_decay, mu1=mu1, mu2=mu2, lambda_a=lambda_a,
                             variant=damping_variant, memory=memory, approx=approx)
        super().__init__(
            model, lr, default_blocks(recipe, kfac_block(a_decay), layer_types, blocks), damping=float(damping),
            exclude=exclude, momentum=momentum,
            weight_decay=weight_decay, curvature_update_freq=1, inverse_update_freq=1, fallback=fallback,
            loss_reduction=loss_reduction, lag_factors=lag_factors, require_closure=True, seed=seed,
            fallback_lr=fallback_lr, fallback_betas=fallback_betas, fallback_eps=fallback_eps,
            param_groups=param_groups, recovery=recovery, strict=strict,
            distributed=distributed, distribute=distribute,
        )


class KBFGSL(KBFGS):
    """K-BFGS(L): H_g in limited memory (default ``memory=100`` pairs, compact form, H0 = I).

    Same arguments as :class:`KBFGS`, with ``memory`` the number of (s, y) pairs kept for H_g.
    """

    _memory = 100


KBFGSL.__doc__ = (KBFGSL.__doc__ or "") + "\n" + KBFGS.__doc__[KBFGS.__doc__.index("    Args:"):].replace(
    "memory: only for :class:`KBFGSL` (here an error).", "memory: number of (s, y) pairs kept for H_g (default 100).")
