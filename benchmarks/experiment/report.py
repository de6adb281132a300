"""Outputs of an experiment: ``results.json``, ``curves.csv``, PNG plots and the summary table.

Summary (one row per optimizer; in grid mode its selected run):

* final training and test loss (L2-regularised, as the authors report them);
* time to target: the first epoch whose training loss is ≤ the target, and the cumulative training
  wall-clock and CPU time at that epoch. The target is ``--target`` or, by default, the *best*
  first-order baseline's (Adam, RMSprop, SGD-m) final training loss: the column then answers "when
  does each method reach what the best first-order method reaches in the whole budget?" (a method
  that never gets there shows none). Without a non-diverged first-order run in the experiment the
  default falls back to the worst final training loss × 1.05, and ``results.json`` names the rule;
* median wall-clock milliseconds per ``opt.step`` and its ratio to Adam's;
* skipped steps (non-finite loss/gradient) + reverted steps (non-finite at the new point), as
  counted by the curvature optimizers (first-order baselines never skip).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks.experiment.runner import CURVE_FIELDS, RunRecord
from benchmarks.experiment.settings import OPTIMIZERS

__all__ = ["BEST_FIRST_ORDER_RULE", "SUMMARY_COLUMNS", "WORST_FINAL_RULE", "default_target", "format_table", "summary_rows", "time_to_target", "write_curves_csv",
           "write_plots"]

SUMMARY_COLUMNS = ("optimizer", "settings", "epochs", "final_train", "final_test", "epochs_to_target",
                   "wall_s_to_target", "cpu_s_to_target", "train_wall_s", "ms_per_step", "x_adam", "skipped",
                   "stop")


def label(name: str) -> str:
    return OPTIMIZERS[name].LABEL if name in OPTIMIZERS else name


#: How :func:`default_target` chose the goal (recorded in ``results.json`` as ``target_rule``).
BEST_FIRST_ORDER_RULE = "best first-order final train loss"
WORST_FINAL_RULE = "worst final train loss x 1.05 (no first-order run)"


def _first_order(name: str) -> bool:
    return name in OPTIMIZERS and OPTIMIZERS[name].FIRST_ORDER


def default_target(records: Mapping[str, RunRecord], factor: float = 1.05) -> tuple[float | None, str]:
    """The default time-to-target goal and the rule that chose it.

    The smallest finite final training loss of the first-order baselines among ``records``; when there
    is none, the largest finite final training loss of any run × ``factor``; ``(None, rule)`` when no
    run has a finite final loss. ``records`` should hold the non-diverged runs only.
    """
    first = [r.final_train_loss for n, r in records.items() if _first_order(n) and math.isfinite(r.final_train_loss)]
    if first:
        return min(first), BEST_FIRST_ORDER_RULE
    finals = [r.final_train_loss for r in records.values() if math.isfinite(r.final_train_loss)]
    return (max(finals) * factor if finals else None), WORST_FINAL_RULE


def time_to_target(rec: RunRecord, target: float | None) -> tuple[int | None, float | None, float | None]:
    """(epoch, cumulative wall s, cumulative CPU s) of the first epoch with train loss ≤ target."""
    if target is None:
        return None, None, None
    for i, loss in enumerate(rec.train_loss):
        if math.isfinite(loss) and loss <= target:
            return rec.epoch[i], rec.wall_time[i], rec.cpu_time[i]
    return None, None, None


def summary_rows(records: Mapping[str, RunRecord], target: float | None) -> list[dict[str, Any]]:
    adam = records.get("adam")
    adam_ms = adam.median_step_ms() if adam is not None else math.nan
    rows = []
    for name, rec in records.items():
        ep, wall, cpu = time_to_target(rec, target)
        ms = rec.median_step_ms()
        tuned = OPTIMIZERS[name].TUNED if name in OPTIMIZERS else ()
        rows.append({
            "optimizer": label(name),
            "settings": " ".join(f"{k}={rec.settings[k]:g}" for k in tuned if k in rec.settings),
            "epochs": rec.epochs_done,
            "final_train": rec.final_train_loss,
            "final_test": rec.test_loss[-1] if rec.test_loss else math.nan,
            "epochs_to_target": ep,
            "wall_s_to_target": wall,
            "cpu_s_to_target": cpu,
            "train_wall_s": rec.wall_time[-1] if rec.wall_time else math.nan,
            "ms_per_step": ms,
            "x_adam": ms / adam_ms if math.isfinite(adam_ms) and adam_ms > 0 else math.nan,
            "skipped": (rec.skipped_steps[-1] if rec.skipped_steps else 0) + (
                rec.reverted_steps[-1] if rec.reverted_steps else 0),
            "stop": rec.stop_reason,
        })
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-" if math.isnan(value) else str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
    cells = [list(columns)] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def write_curves_csv(path: Path, runs: Sequence[tuple[RunRecord, bool]]) -> None:
    """Every curve of every run: one row per (optimizer, run, epoch); ``selected`` marks the reported runs."""
    header = ["optimizer", "run", "selected", *CURVE_FIELDS, "median_step_ms"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for rec, selected in runs:
            for row in rec.curve_rows():
                values = [rec.optimizer, rec.tag, int(selected)] + [row[c] for c in (*CURVE_FIELDS, "median_step_ms")]
                writer.writerow(["" if isinstance(v, float) and math.isnan(v) else
                                 (repr(v) if isinstance(v, float) else v) for v in values])


_PLOTS = (
    ("train_loss_vs_epoch.png", "epoch", "train_loss", "epoch", "training loss"),
    ("train_loss_vs_wall_time.png", "wall_time", "train_loss", "training wall-clock time (s)", "training loss"),
    ("train_loss_vs_cpu_time.png", "cpu_time", "train_loss", "training CPU time (s, process_time)", "training loss"),
    ("test_loss_vs_epoch.png", "epoch", "test_loss", "epoch", "test loss"),
)


def write_plots(out_dir: Path, records: Mapping[str, RunRecord], *, title: str,
                target: float | None = None) -> list[Path]:
    """Loss curves (log y), one line per optimizer; returns the PNG paths.

    A diverged run is labelled "(diverged)" and the y axis stops at twice the largest initial loss, so
    one blown-up run does not flatten every other curve (its last points leave the plot upwards).
    """
    paths = []
    for filename, xkey, ykey, xlabel, ylabel in _PLOTS:
        fig = Figure(figsize=(6.4, 4.4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        starts = []
        for name, rec in records.items():
            xs = getattr(rec, xkey)
            ys = [y if math.isfinite(y) and y > 0 else math.nan for y in getattr(rec, ykey)]
            if ys and math.isfinite(ys[0]):
                starts.append(ys[0])
            tag = " (diverged)" if rec.diverged else ""
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=f"{label(name)}{tag}")
        if target is not None and ykey == "train_loss" and target > 0:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.4g}")
        ax.set_yscale("log")
        if starts and any(r.diverged for r in records.values()):
            ax.set_ylim(top=2 * max(starts))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        paths.append(path)
    return paths
