"""Block recipes: small factories that build a curvature block for one layer.

A recipe is called as ``recipe(name, adapter, ctx)`` and returns a :class:`~curvature.blocks.CurvatureBlock`.
``ctx`` carries the layer's dtype and device and the optimizer's damping λ, from which the
K-BFGS recipes derive their defaults λ_A = μ2 = √λ. Compose an optimizer by mapping module types
or layer names to recipes::

    CurvatureOptimizer(model, lr=0.1, damping=0.3,
                       blocks={nn.Linear: kbfgsl_block(memory=50), nn.Conv2d: kfac_block(),
                               "head": diagonal_block()})
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from curvature.adapters import LayerAdapter
from curvature.blocks import CurvatureBlock, DiagonalBlock, KroneckerBlock
from curvature.factors import BFGSFactor, EMACovarianceFactor, HessianActionFactor, LBFGSFactor
from curvature.pair_damping import DoubleDamping


@dataclass(frozen=True)
class RecipeContext:
    """What a recipe may use besides the layer: dtype, device and the optimizer's damping λ."""

    dtype: torch.dtype
    device: torch.device
    damping: float


Recipe = Callable[[str, LayerAdapter, RecipeContext], CurvatureBlock]


def kfac_block(decay: float = 0.9) -> Recipe:
    """KFAC: EMA covariance factors A and G with damped inverses (damping split by the policy)."""

    def build(name: str, adapter: LayerAdapter, ctx: RecipeContext) -> CurvatureBlock:
        kw = {"dtype": ctx.dtype, "device": ctx.device}
        return KroneckerBlock(name, adapter, EMACovarianceFactor(adapter.a_dim, decay, **kw),
                              EMACovarianceFactor(adapter.g_dim, decay, **kw), kind="kfac")

    return build


def _double_damping(ctx: RecipeContext, mu1: float, mu2: float | None, variant: str) -> DoubleDamping:
    return DoubleDamping(mu1=mu1, mu2=math.sqrt(ctx.damping) if mu2 is None else mu2, variant=variant)


def kbfgs_block(
    *,
    a_decay: float = 0.9,
    pair_decay: float = 0.9,
    mu1: float = 0.2,
    mu2: float | None = None,
    lambda_a: float | None = None,
    variant: Literal["interpolate", "lm"] = "interpolate",
    memory: int | None = None,
    g_init_scale: float = 1.0,
) -> Recipe:
    """K-BFGS (``memory=None``: dense BFGS H_g) or K-BFGS(L) (``memory=p``: compact L-BFGS H_g).

    H_a is the Hessian-action BFGS factor with λ_A (default √λ); H_g uses double damping with
    μ1 (default 0.2) and μ2 (default √λ), step 2 ``variant`` "interpolate" (authors' code) or "lm".
    """

    def build(name: str, adapter: LayerAdapter, ctx: RecipeContext) -> CurvatureBlock:
        kw = {"dtype": ctx.dtype, "device": ctx.device}
        lam_a = math.sqrt(ctx.damping) if lambda_a is None else lambda_a
        dd = _double_damping(ctx, mu1, mu2, variant)
        a = HessianActionFactor(adapter.a_dim, lam_a, a_decay, **kw)
        if memory is None:
            g = BFGSFactor(adapter.g_dim, dd, pair_decay, init_scale=g_init_scale, **kw)
            kind = "kbfgs"
        else:
            g = LBFGSFactor(adapter.g_dim, dd, pair_decay, memory=memory, gamma=g_init_scale, **kw)
            kind = "kbfgsl"
        return KroneckerBlock(name, adapter, a, g, kind=kind)

    return build


def kbfgsl_block(memory: int = 100, **kwargs) -> Recipe:
    """K-BFGS(L): :func:`kbfgs_block` with a limited memory of ``memory`` pairs for H_g."""
    return kbfgs_block(memory=memory, **kwargs)


def diagonal_block(decay: float = 0.9, power: float = 1.0, source: str = "empirical_fisher") -> Recipe:
    """Diagonal curvature (EMA of the empirical-Fisher diagonal or of squared gradients), damped by λ."""

    def build(name: str, adapter: LayerAdapter, ctx: RecipeContext) -> CurvatureBlock:
        return DiagonalBlock(name, adapter, decay, power, source, dtype=ctx.dtype, device=ctx.device)

    return build
