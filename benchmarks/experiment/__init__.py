"""The autoencoder experiments of Goldfarb, Ren & Bahamou (2020): configuration, runs, grids, outputs.

Modules: :mod:`~benchmarks.experiment.settings` (per-optimizer hyperparameters and builders),
:mod:`~benchmarks.experiment.config` (presets, config files, overrides, grids),
:mod:`~benchmarks.experiment.datasets`, :mod:`~benchmarks.experiment.runner` (one run, with
checkpoints), :mod:`~benchmarks.experiment.grid`, :mod:`~benchmarks.experiment.report` and
:mod:`~benchmarks.experiment.experiment` (the whole experiment). The command line is
``python -m benchmarks.autoencoder``.
"""

from benchmarks.experiment.config import DEFAULT_GRIDS, PRESETS, ExperimentConfig, build_config, log_grid
from benchmarks.experiment.experiment import ExperimentResult, run_experiment
from benchmarks.experiment.runner import RunRecord, train_run
from benchmarks.experiment.settings import OPTIMIZERS, make_settings

__all__ = [
    "DEFAULT_GRIDS",
    "OPTIMIZERS",
    "PRESETS",
    "ExperimentConfig",
    "ExperimentResult",
    "RunRecord",
    "build_config",
    "log_grid",
    "make_settings",
    "run_experiment",
    "train_run",
]
