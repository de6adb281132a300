"""Optimizers composed from curvature blocks (a generic driver, KFAC, K-BFGS, K-BFGS(L), a diagonal method)
and the whole-model matrix-free methods (Hessian-free, saddle-free Newton, Levenberg–Marquardt)."""

from optimizers.diagonal import Diagonal
from optimizers.driver import CurvatureOptimizer, StepInfo
from optimizers.hessian_free import HessianFree
from optimizers.kbfgs import KBFGS, KBFGSL
from optimizers.kfac import KFAC
from optimizers.levenberg_marquardt import LevenbergMarquardt
from optimizers.saddle_free import SaddleFreeNewton
from optimizers.recipes import Recipe, RecipeContext, diagonal_block, kbfgs_block, kbfgsl_block, kfac_block

__all__ = [
    "CurvatureOptimizer", "StepInfo", "KFAC", "Diagonal", "KBFGS", "KBFGSL", "Recipe", "RecipeContext",
    "kfac_block", "kbfgs_block", "kbfgsl_block", "diagonal_block",
    "HessianFree", "SaddleFreeNewton", "LevenbergMarquardt",
]
