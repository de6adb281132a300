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
from typing import Callable, Literal, Mapping

import torch
from torch import nn

from curvature.adapters import LayerAdapter, UnsupportedLayerError
from curvature.blocks import CurvatureBlock, DiagonalBlock, KroneckerBlock, check_approx
from curvature.factors import BFGSFactor, EMACovarianceFactor, HessianActionFactor, LBFGSFactor, OneHotCountFactor
from curvature.pair_damping import DoubleDamping


@dataclass(frozen=True)
class RecipeContext:
    """What a recipe may use besides the layer: dtype, device and the optimizer's damping λ."""

    dtype: torch.dtype
    device: torch.device
    damping: float


Recipe = Callable[[str, LayerAdapter, RecipeContext], CurvatureBlock]


def kfac_block(decay: float = 0.9, approx: str = "expand") -> Recipe:
    """KFAC: EMA covariance factors A and G with damped inverses (damping split by the policy).

    ``approx``: "expand" or "reduce" for layers with a weight-sharing dimension (see
    :mod:`curvature.blocks`). An embedding (one-hot input) gets a diagonal A of token frequencies
    (:class:`~curvature.factors.OneHotCountFactor`) and is always expand.
    """
    check_approx(approx)

    def build(name: str, adapter: LayerAdapter, ctx: RecipeContext) -> CurvatureBlock:
        kw = {"dtype": ctx.dtype, "device": ctx.device}
        if getattr(adapter, "one_hot_input", False):
            return KroneckerBlock(name, adapter, OneHotCountFactor(adapter.a_dim, decay, **kw),
                                  EMACovarianceFactor(adapter.g_dim, decay, **kw), kind="kfac")
        return KroneckerBlock(name, adapter, EMACovarianceFactor(adapter.a_dim, decay, **kw),
                              EMACovarianceFactor(adapter.g_dim, decay, **kw), kind="kfac", approx=approx)

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
    approx: str = "expand",
) -> Recipe:
    """K-BFGS (``memory=None``: dense BFGS H_g) or K-BFGS(L) (``memory=p``: compact L-BFGS H_g).

    H_a is the Hessian-action BFGS factor with λ_A (default √λ); H_g uses double damping with
    μ1 (default 0.2) and μ2 (default √λ), step 2 ``variant`` "interpolate" (authors' code) or "lm".
    ``approx`` ("expand"/"reduce") sets A and the means h̄, ḡ, ā̄ (see :mod:`curvature.blocks`).
    Layers with one-hot inputs (embeddings) have no dense A to run BFGS on: the recipe raises
    :class:`~curvature.adapters.UnsupportedLayerError` (the optimizers give them :func:`kfac_block`).
    """
    check_approx(approx)

    def build(name: str, adapter: LayerAdapter, ctx: RecipeContext) -> CurvatureBlock:
        if getattr(adapter, "one_hot_input", False):
            raise UnsupportedLayerError(f"layer {name!r}: K-BFGS needs a dense A; embeddings take kfac_block()")
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
        return KroneckerBlock(name, adapter, a, g, kind=kind, approx=approx)

    return build


def kbfgsl_block(memory: int = 100, **kwargs) -> Recipe:
    """K-BFGS(L): :func:`kbfgs_block` with a limited memory of ``memory`` pairs for H_g."""
    return kbfgs_block(memory=memory, **kwargs)


def diagonal_block(decay: float = 0.9, power: float = 1.0, source: str = "empirical_fisher") -> Recipe:
    """Diagonal curvature (EMA of the empirical-Fisher diagonal or of squared gradients), damped by λ."""

    def build(name: str, adapter: LayerAdapter, ctx: RecipeContext) -> CurvatureBlock:
        return DiagonalBlock(name, adapter, decay, power, source, dtype=ctx.dtype, device=ctx.device)

    return build


#: The module types the ready-made optimizers precondition with their own recipe by default.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)
#: Normalization layers: their affine parameters get a diagonal block by default.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def default_blocks(recipe: Recipe, embedding_recipe: Recipe, layer_types: tuple[type[nn.Module], ...] | None = None,
                   overrides: Mapping[type | str, Recipe | None] | None = None) -> dict[type | str, Recipe | None]:
    """The ``blocks`` mapping of a ready-made optimizer: ``recipe`` for ``layer_types`` (default
    :data:`DEFAULT_LAYER_TYPES`), ``embedding_recipe`` for ``nn.Embedding``, a diagonal block on the
    gradient (RMSprop-like, power 1/2) for normalization layers, then ``overrides`` (names or types
    mapped to recipes, or to None for the fallback rule), which win.

    With an explicit ``layer_types`` only those types get ``recipe`` (no embedding/norm defaults).
    """
    if layer_types is None:
        out: dict[type | str, Recipe | None] = {t: recipe for t in DEFAULT_LAYER_TYPES}
        out[nn.Embedding] = embedding_recipe
        out.update({t: diagonal_block(power=0.5, source="gradient") for t in NORM_TYPES})
    else:
        out = {t: recipe for t in layer_types}
    if overrides is not None:
        if not isinstance(overrides, Mapping):
            raise TypeError("blocks must be a mapping from module types or layer names to recipes (or None)")
        # overrides first: the driver matches types in order, so an override type wins over a default
        out = {**dict(overrides), **{k: v for k, v in out.items() if k not in overrides}}
    return out
