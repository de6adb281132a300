r"""A diagonal-curvature optimizer: :math:`\Delta\tilde W = -\alpha\, M \oslash (v + \lambda)^{p}` per layer.

:math:`v` is the EMA (decay 0.9) of the exact empirical-Fisher diagonal
:math:`\frac1N\sum_i (\nabla_i)^{\circ 2}` (per-sample gradients from the captured rows), or of the
squared mini-batch gradient (``source="gradient"``); :math:`M` is the EMA momentum of the
L2-regularised gradient. The defaults (power 1, λ = 0.1, lr 0.1) were chosen by
``python -m benchmarks.defaults_study`` (README, "Defaults"): they were the best of the study's
candidates on every problem; power ½ (an Adam-like scale-free step) at lr 1e-2 trained far less in
the same number of steps.
"""

from __future__ import annotations

from torch import nn

from optimizers.driver import CurvatureOptimizer
from optimizers.recovery import Recovery
from optimizers.recipes import diagonal_block


class Diagonal(CurvatureOptimizer):
    """Diagonal curvature on Linear and Conv2d layers (see the module docstring for the update)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 0.1,
        *,
        power: float = 1.0,
        decay: float = 0.9,
        source: str = "empirical_fisher",
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        fallback: str = "sgd",
        loss_reduction: str = "mean",
        lag_factors: bool = False,
        layer_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
        seed: int = 0,
        recovery: Recovery | bool | None = None,
        strict: bool = False,
    ) -> None:
        recipe = diagonal_block(decay=decay, power=power, source=source)
        super().__init__(
            model, lr, {t: recipe for t in layer_types}, damping=damping, momentum=momentum,
            weight_decay=weight_decay, fallback=fallback, loss_reduction=loss_reduction,
            lag_factors=lag_factors, seed=seed,
            recovery=recovery, strict=strict,
        )
