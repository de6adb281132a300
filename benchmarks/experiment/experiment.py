"""Run a whole experiment: every optimizer (every grid point in grid mode), then write the outputs.

Layout of the output directory::

    OUT/results.json                 config, environment, data, target, summary, every run's record
    OUT/curves.csv                   every curve of every run (``selected`` marks the reported runs)
    OUT/train_loss_vs_epoch.png      training loss (log) vs epochs, one line per optimizer
    OUT/train_loss_vs_wall_time.png  ... vs cumulative training wall-clock time
    OUT/train_loss_vs_cpu_time.png   ... vs cumulative training CPU time (the paper's x-axis)
    OUT/test_loss_vs_epoch.png       test loss vs epochs
    OUT/runs/<optimizer>/<run>/      checkpoint.pt (after every epoch) and result.json (when done)

``<run>`` is ``main`` for a plain run, or the grid point (``lr=0.3,damping=1``) in grid mode.
"""

from __future__ import annotations

import datetime
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.experiment.checkpoint import write_json
from benchmarks.experiment.parallel import Parallel
from benchmarks.experiment.config import ExperimentConfig, config_summary
from benchmarks.experiment.datasets import DataBundle, check_widths, load_data
from benchmarks.experiment.grid import grid_points, select_best
from benchmarks.experiment.report import (default_target, format_table, label, summary_rows, write_curves_csv,
                                          write_plots)
from benchmarks.experiment.runner import RunRecord, train_run

__all__ = ["ExperimentResult", "run_experiment"]

RESULTS_JSON = "results.json"
CURVES_CSV = "curves.csv"


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` produced (also written under ``out``)."""

    config: ExperimentConfig
    out: Path
    data: dict[str, Any]
    records: dict[str, RunRecord]  # the reported run per optimizer
    runs: dict[str, list[RunRecord]]  # every run per optimizer (one unless grid mode)
    selected: dict[str, int | None]  # index into runs[name] of the grid's choice (None: all diverged)
    target: float | None
    rows: list[dict[str, Any]]
    table: str
    plots: list[Path] = field(default_factory=list)

    @property
    def results_path(self) -> Path:
        return self.out / RESULTS_JSON

    @property
    def csv_path(self) -> Path:
        return self.out / CURVES_CSV


def _environment(cfg: ExperimentConfig) -> dict[str, Any]:
    device = torch.device(cfg.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": cfg.device,
        "device_name": name,
        "torch_threads": torch.get_num_threads(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_device(cfg: ExperimentConfig) -> None:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    checkpoint: bool = True,
    print_fn: Callable[[str], None] | None = print,
    on_step: Callable[[str, str, int, int], None] | None = None,
    data: DataBundle | None = None,
    parallel: Parallel | None = None,
) -> ExperimentResult:
    """Train every optimizer of ``cfg`` and write ``results.json``, ``curves.csv`` and the plots.

    ``on_step(optimizer, run, epoch, step)`` is called after every step. ``data`` skips loading.
    ``parallel``: data-parallel ranks (torchrun); only rank 0 prints and writes.
    """
    out = Path(out)
    par = parallel if parallel is not None else Parallel()
    say = (print_fn if par.is_main else None) or (lambda _msg: None)
    _check_device(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, say, resume=resume, progress=progress, checkpoint=checkpoint, on_step=on_step,
                    data=data, par=par)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ExperimentConfig, out: Path, say: Callable[[str], None], *, resume: bool, progress: bool,
         checkpoint: bool, on_step, data: DataBundle | None, par: Parallel) -> ExperimentResult:
    out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else load_data(cfg)
    check_widths(cfg, data)
    info = data.describe()
    say(f"{cfg.dataset}: {info['n_train']} train / {info['n_test']} test images ({info['source']}), "
        f"batch {cfg.batch_size}, {cfg.epochs} epochs, device {cfg.device}, seed {cfg.seed}"
        + (", grid search" if cfg.grid else "") + (", resuming" if resume else ""))

    runs: dict[str, list[RunRecord]] = {}
    selected: dict[str, int | None] = {}
    for name in cfg.optimizers:
        points = grid_points(cfg, name) if cfg.grid else [("main", {}, cfg.settings[name])]
        runs[name] = []
        for tag, _values, settings in points:
            step_cb = None if on_step is None else (lambda e, j, _n=name, _t=tag: on_step(_n, _t, e, j))
            rec = train_run(cfg, data, name, settings, out / "runs" / name / tag, tag=tag, resume=resume,
                            progress=progress, checkpoint=checkpoint, on_step=step_cb, parallel=par)
            runs[name].append(rec)
            say(f"  {label(name):10s} {tag if cfg.grid else settings.short():28s} "
                f"final train {rec.final_train_loss:.6g} after {rec.epochs_done} epochs ({rec.stop_reason}"
                + (f": {rec.error}" if rec.error else "") + ")")
        selected[name] = select_best([r.final_train_loss for r in runs[name]], [r.diverged for r in runs[name]])
    records = {n: runs[n][selected[n] if selected[n] is not None else 0] for n in cfg.optimizers}
    if cfg.target is not None:
        target, target_rule = cfg.target, "given (--target)"
    else:
        target, target_rule = default_target({n: r for n, r in records.items() if not r.diverged})
    rows = summary_rows(records, target)
    table = format_table(rows)

    if not par.is_main:  # rank 0 writes the outputs
        return ExperimentResult(cfg, out, info, records, runs, selected, target, rows, table, [])
    plots = write_plots(out, records, title=f"{cfg.dataset.upper()} autoencoder", target=target)
    write_curves_csv(out / CURVES_CSV, [(r, r is records[n]) for n in cfg.optimizers for r in runs[n]])
    payload = {
        "schema": 1,
        "config": config_summary(cfg),
        "environment": {**_environment(cfg), "world_size": par.world_size},
        "data": info,
        "target": target,
        "target_rule": target_rule,
        "summary": rows,
        "runs": {n: records[n].to_dict() for n in cfg.optimizers},
    }
    if cfg.grid:
        payload["grid"] = {
            n: {"keys": list(cfg.grid_for(n)), "selected": None if selected[n] is None else runs[n][selected[n]].tag,
                "criterion": "final train loss", "runs": [r.to_dict() for r in runs[n]]}
            for n in cfg.optimizers
        }
    write_json(out / RESULTS_JSON, payload)

    target_txt = "none" if target is None else f"{target:.6g}"
    say(f"\nSummary ({cfg.dataset}, target train loss {target_txt} = {target_rule}; "
        "times exclude warm start and evaluation):")
    say(table)
    say(f"\nresults: {out / RESULTS_JSON}\ncurves:  {out / CURVES_CSV}")
    say("plots:   " + "\n         ".join(str(p) for p in plots))
    return ExperimentResult(cfg, out, info, records, runs, selected, target, rows, table, plots)
