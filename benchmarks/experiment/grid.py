"""Grid search over the tuned knobs, selected by final training loss (the authors' ``tuning_criterion``).

For optimizer ``name`` the grid is the Cartesian product of ``cfg.grid_for(name)`` (by default lr
and λ for K-BFGS/K-BFGS(L)/KFAC, lr and ε for Adam/RMSprop, lr for SGD-m, on 1-3-10 log grids).
Every point is a full run with the experiment's epoch/time budget; the selected run is the one with
the lowest *final* L2-regularised training loss. Diverged runs and runs whose final loss is not
finite are never selected; when every run diverged, none is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from benchmarks.experiment.config import ExperimentConfig
from benchmarks.experiment.settings import OptimizerSettings

__all__ = ["grid_points", "run_tag", "select_best"]


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_tag(values: dict[str, Any]) -> str:
    """A directory-safe name for one grid point, e.g. ``lr=0.3,damping=1``."""
    if not values:
        return "main"
    return ",".join(f"{k}={_fmt(v)}" for k, v in values.items()).replace("/", "_")


def grid_points(cfg: ExperimentConfig, name: str) -> list[tuple[str, dict[str, Any], OptimizerSettings]]:
    """(tag, grid values, settings) for every point of the grid of ``name``, in row-major order."""
    base = cfg.settings[name]
    grid = cfg.grid_for(name)
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        out.append((run_tag(values), values, base.with_values(**values)))
    return out


def select_best(final_losses: Sequence[float], diverged: Sequence[bool] | None = None) -> int | None:
    """Index of the lowest finite final loss among non-diverged runs (first on ties), or None."""
    best, best_loss = None, math.inf
    for i, loss in enumerate(final_losses):
        if diverged is not None and diverged[i]:
            continue
        if loss is not None and math.isfinite(loss) and loss < best_loss:
            best, best_loss = i, loss
    return best
