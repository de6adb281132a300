"""Optimizers composed from curvature blocks: a generic driver, KFAC, K-BFGS and K-BFGS(L)."""

from optimizers.driver import CurvatureOptimizer, StepInfo
from optimizers.kbfgs import KBFGS, KBFGSL
from optimizers.kfac import KFAC
from optimizers.recipes import Recipe, RecipeContext, diagonal_block, kbfgs_block, kbfgsl_block, kfac_block

__all__ = [
    "CurvatureOptimizer", "StepInfo", "KFAC", "KBFGS", "KBFGSL", "Recipe", "RecipeContext",
    "kfac_block", "kbfgs_block", "kbfgsl_block", "diagonal_block",
]
