r"""Hessian-vector and GGN-vector products for the convergence harness.

The implementation lives in the core, :mod:`curvature.products` (the optimizers use it too, and
the harness imports the core, never the reverse); this module re-exports it under its historical
name so ``from convergence.hessian import HessianOperator`` keeps working.
"""

from __future__ import annotations

from curvature.products import (
    CurvatureOperator,
    FunctionalLoss,
    GGNOperator,
    HessianOperator,
    MatvecOperator,
    ProductCounter,
    as_matvec,
    ggn_vector_product,
    hvp_double_backprop,
    hvp_forward_over_reverse,
    make_functional,
)

__all__ = [
    "FunctionalLoss",
    "make_functional",
    "hvp_forward_over_reverse",
    "hvp_double_backprop",
    "ggn_vector_product",
    "CurvatureOperator",
    "MatvecOperator",
    "HessianOperator",
    "GGNOperator",
    "as_matvec",
    "ProductCounter",
]
