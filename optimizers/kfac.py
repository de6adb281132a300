"""KFAC (Martens & Grosse 2015): Kronecker-factored Fisher blocks on Linear and Conv2d layers."""

from __future__ import annotations

from typing import Mapping

from torch import nn

from curvature.damping import DampingPolicy
from optimizers.driver import CurvatureOptimizer
from optimizers.recovery import Recovery
from optimizers.recipes import Recipe, default_blocks, kfac_block


class KFAC(CurvatureOptimizer):
    r"""KFAC: :math:`\Delta W = -\alpha (G + \lambda_G I)^{-1} M (A + \lambda_A I)^{-1}` per layer.

    Defaults follow the K-BFGS authors' KFAC baseline: lr 1, λ = 3 and the Monte-Carlo Fisher when the
    model's ``likelihood`` is given (``fisher=None`` means "mc" with a likelihood, "empirical" without
    one), EMA decay 0.9 for A and G, factors every
    step (``T_cov = 1``), inverses every 20 steps and at every step k ≤ 20, λ split as √λ/√λ
    (pass a :class:`~curvature.damping.FactoredPi` or :class:`~curvature.damping.AdaptiveLM` policy
    as ``damping`` for π-damping or Levenberg–Marquardt adaptation), EMA momentum 0.9.
    ``fisher="mc"`` with ``likelihood`` in {"bernoulli", "gaussian", "categorical"} builds G from
    targets sampled from the model's predictive distribution (an extra forward and a backward that
    computes pre-activation gradients only); ``fisher="empirical"`` uses the training loss. With the
    empirical Fisher the defaults are lr 0.1 and λ = 1 instead (``lr=None``, ``damping=None``): in the
    defaults study (README, "Defaults") lr 1, λ 3 with the empirical Fisher diverged on both
    autoencoders, and lr 0.1, λ 1 trained better than lr 0.1, λ 3.

    Args:
        model: the module to train; every ``layer_types`` layer gets a KFAC block.
        lr: learning rate α (per group in ``param_groups``; schedulers work); default 1 with the
            Monte-Carlo Fisher, 0.1 with the empirical Fisher.
        damping: λ, a number (split √λ/√λ) or a :class:`~curvature.damping.DampingPolicy`; default 3
            with the Monte-Carlo Fisher, 1 with the empirical Fisher.
        momentum: β of the EMA momentum :math:`m \leftarrow \beta m + (1-\beta)(\nabla + \tau W)`.
        weight_decay: τ (L2 term added to the gradient, weights and biases; per group).
        factor_decay: EMA decay of A and G.
        curvature_update_freq, inverse_update_freq: T_cov and T_inv in steps.
        inverse_warmup_steps: also refresh inverses at every step k ≤ this.
        fisher: "empirical" or "mc" (with ``likelihood`` "bernoulli", "gaussian" or "categorical");
            default "mc" when ``likelihood`` is given, else "empirical".
        kl_clip: KL-clipping constant c, or None.
        fallback: "sgd", "adam" or "error" for parameters of layers without a block.
        fallback_lr: learning rate of the fallback rule (default: 1e-3 for Adam, the group's lr for SGD).
        fallback_betas, fallback_eps: Adam fallback (β1, β2) (default (momentum, 0.999)) and ε.
        loss_reduction: "mean" or "sum" (how the loss reduces over the batch).
        lag_factors: theory mode: batch k's statistics are used from step k+1.
        inverse_method: "cholesky" or "eigh".
        layer_types: module types that get a KFAC block (default: Linear, Conv1d, Conv2d, Embedding,
            MultiheadAttention; normalization layers get a diagonal block, see :func:`default_blocks`).
        approx: "expand" or "reduce" for layers with a weight-sharing dimension (sequence positions,
            spatial locations, repeated calls); see :mod:`curvature.blocks`.
        blocks: overrides, a mapping from module types or layer names to recipes or None (fallback),
            applied on top of the defaults, e.g. ``{"head": None, nn.Embedding: diagonal_block()}``.
        exclude: layer names or glob patterns that get the fallback rule.
        seed: seed of the Monte-Carlo Fisher sampler.
        recovery, strict: see :class:`~optimizers.driver.CurvatureOptimizer`.
        param_groups: optional torch.optim-style groups ``[{"params": ..., "lr": ...}, ...]`` covering
            every trainable parameter; keys lr, momentum, weight_decay, damping, fallback_lr,
            fallback_betas, fallback_eps.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float | None = None,
        damping: float | DampingPolicy | None = None,
        *,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        factor_decay: float = 0.9,
        curvature_update_freq: int = 1,
        inverse_update_freq: int = 20,
        inverse_warmup_steps: int = 20,
        fisher: str | None = None,
        likelihood: str | None = None,
        kl_clip: float | None = None,
        fallback: str = "sgd",
        fallback_lr: float | None = None,
        fallback_betas: tuple[float, float] | None = None,
        fallback_eps: float = 1e-8,
        loss_reduction: str = "mean",
        lag_factors: bool = False,
        inverse_method: str = "cholesky",
        layer_types: tuple[type[nn.Module], ...] | None = None,
        approx: str = "expand",
        blocks: Mapping[type | str, Recipe | None] | None = None,
        exclude=(),
        seed: int = 0,
        param_groups=None,
        recovery: Recovery | bool | None = None,
        strict: bool = False,
        distributed=None,
        distribute: str = "replicate",
    ) -> None:
        if fisher is None:
            fisher = "mc" if likelihood is not None else "empirical"
        if lr is None:
            lr = 1.0 if fisher == "mc" else 0.1
        if damping is None:
            damping = 3.0 if fisher == "mc" else 1.0
        recipe = kfac_block(factor_decay, approx)
        super().__init__(
            model, lr, default_blocks(recipe, recipe, layer_types, blocks), damping=damping, exclude=exclude, momentum=momentum,
            weight_decay=weight_decay, curvature_update_freq=curvature_update_freq,
            inverse_update_freq=inverse_update_freq, inverse_warmup_steps=inverse_warmup_steps,
            fallback=fallback, loss_reduction=loss_reduction, lag_factors=lag_factors, fisher=fisher,
            likelihood=likelihood, kl_clip=kl_clip, inverse_method=inverse_method, seed=seed,
            fallback_lr=fallback_lr, fallback_betas=fallback_betas, fallback_eps=fallback_eps,
            param_groups=param_groups, recovery=recovery, strict=strict,
            distributed=distributed, distribute=distribute,
        )
