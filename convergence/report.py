r"""Reporting for the convergence harness: a verdict table, a JSON report and PNG plots.

* :func:`format_table` / :func:`print_table` -- one row per check (id, assumption, verdict,
  statistic, bound or expected value, Holm-adjusted p-value), then the notes and the theory-mode
  violations.  ``rich`` is used for the terminal when it is installed, plain text otherwise.
* :func:`report_dict` / :func:`write_json` -- the machine-readable report (strict JSON: non-finite
  floats become strings, tensors and arrays lists).
* Plots (matplotlib, drawn on an Agg canvas without ``pyplot``, so no display and no global
  state is touched): :func:`plot_spectrum_bounds` (:math:`\kappa_{lo}`/:math:`\kappa_{hi}` of the
  applied operator and per-layer bounds over steps, with the theoretical bounds dashed),
  :func:`plot_gradient_norms` (:math:`\|\nabla f(x_k)\|^2`, the running mean :math:`G_N` with its
  confidence band, the theorem's rate :math:`N^{\max(\beta-1,-\beta)}` and the bound :math:`U_N`),
  :func:`plot_damping` (double-damping step 1 / step 2 activation and skip rates per layer over
  steps) and :func:`plot_hessian_density` (SLQ spectral density from
  :func:`convergence.spectrum.slq_density`).
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from convergence.results import CheckResult, Verdict, _jsonable

__all__ = [
    "REPORT_VERSION",
    "format_value",
    "table_rows",
    "format_table",
    "print_table",
    "summary_counts",
    "report_dict",
    "write_json",
    "damping_series",
    "plot_spectrum_bounds",
    "plot_gradient_norms",
    "plot_damping",
    "plot_hessian_density",
]

REPORT_VERSION = 1
_HEADER = ("check", "assumption", "verdict", "statistic", "bound / expected", "p (Holm)")


# ============================================================================================ table
def format_value(value: Any, width: int = 48) -> str:
    """A number with 4 significant digits, anything else as (truncated) text."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float, np.floating, np.integer)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == int(v) and abs(v) < 1e6:
            return str(int(v))
        return f"{v:.4g}"
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table_rows(results: Sequence[CheckResult]) -> list[tuple[str, ...]]:
    """The rows of the verdict table (without the header)."""
    rows = []
    for r in results:
        p = r.evidence.get("p_holm", r.evidence.get("p_value")) if isinstance(r.evidence, dict) else None
        expected = r.expected
        if r.verdict is Verdict.NOT_APPLICABLE:
            expected = f"n/a: {r.reason}"
        elif r.verdict is Verdict.ERROR:
            expected = f"error: {r.evidence.get('error', '')}"
        rows.append((
            r.check,
            format_value(r.assumption, 34),
            r.verdict.value,
            "-" if r.verdict in (Verdict.NOT_APPLICABLE, Verdict.ERROR) else format_value(r.statistic),
            format_value(expected, 72),
            "-" if p is None or r.verdict is Verdict.NOT_APPLICABLE else format_value(p),
        ))
    return rows


def summary_counts(results: Sequence[CheckResult]) -> dict[str, int]:
    """``{"PASS": n, "FAIL": n, "NOT_APPLICABLE": n, "INCONCLUSIVE": n, "ERROR": n}`` (NOT_APPLICABLE is
    counted on its own, never as a pass)."""
    counts = {v.value: 0 for v in Verdict}
    for r in results:
        counts[r.verdict.value] += 1
    return counts


def health_lines(results: Sequence[CheckResult]) -> list[str]:
    """The loud run-health banner (E0), printed before the table when the run is unhealthy."""
    out = []
    for r in results:
        if r.check == "E0" and r.verdict is Verdict.FAIL:
            out.append("!" * 78)
            out.append("RUN HEALTH FAIL (E0): " + "; ".join(r.notes))
            out.append("every other verdict below is about a run that did not train; fix the run first")
            out.append("!" * 78)
    return out


def _notes_lines(results: Sequence[CheckResult], max_notes: int) -> list[str]:
    lines = []
    for r in results:
        for note in r.notes[:max_notes]:
            lines.append(f"  {r.check}: {format_value(note, 160)}")
    return lines


def format_table(
    results: Sequence[CheckResult],
    *,
    theory_mode: bool | None = None,
    violations: Sequence[str] = (),
    title: str | None = None,
    max_notes: int = 3,
) -> str:
    """The verdict table as plain text (fixed-width columns), followed by notes and violations."""
    rows = [_HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = []
    if title:
        lines.append(title)
    lines.extend(health_lines(results))
    sep = "  "
    lines.append(sep.join(h.ljust(w) for h, w in zip(_HEADER, widths)).rstrip())
    lines.append(sep.join("-" * w for w in widths))
    for row in rows[1:]:
        lines.append(sep.join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    counts = summary_counts(results)
    lines.append("")
    lines.append("summary: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    notes = _notes_lines(results, max_notes)
    if notes:
        lines.append("notes:")
        lines.extend(notes)
    lines.extend(_violation_lines(theory_mode, violations))
    return "\n".join(lines)


def _violation_lines(theory_mode: bool | None, violations: Sequence[str]) -> list[str]:
    lines = []
    if theory_mode is not None:
        lines.append(f"theory mode: {'on' if theory_mode else 'off'}")
    if violations:
        lines.append("theory-mode violations (the run is outside the theorem's setting):")
        lines.extend(f"  - {v}" for v in violations)
    elif theory_mode is not None:
        lines.append("theory-mode violations: none")
    return lines


def print_table(
    results: Sequence[CheckResult],
    *,
    theory_mode: bool | None = None,
    violations: Sequence[str] = (),
    title: str | None = None,
    file: TextIO | None = None,
    use_rich: bool | None = None,
) -> None:
    """Print the table: with ``rich`` when it is installed and ``use_rich`` is not False, else plain text."""
    file = file if file is not None else sys.stdout
    rich_console = None
    if use_rich is not False:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            Console = None  # noqa: N806
        if Console is not None:
            rich_console = Console(file=file)
    if rich_console is None:
        print(format_table(results, theory_mode=theory_mode, violations=violations, title=title), file=file)
        return
    table = Table(title=title)
    for h in _HEADER:
        table.add_column(h)
    colour = {"PASS": "green", "FAIL": "bold red", "INCONCLUSIVE": "yellow", "NOT_APPLICABLE": "cyan",
              "ERROR": "bold magenta"}
    for line in health_lines(results):
        rich_console.print(line, markup=False, style="bold red")
    for row in table_rows(results):
        cells = list(row)
        cells[2] = f"[{colour[cells[2]]}]{cells[2]}[/]"
        table.add_row(*cells)
    rich_console.print(table)
    counts = summary_counts(results)
    rich_console.print("summary: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for line in _notes_lines(results, 3) + _violation_lines(theory_mode, violations):
        rich_console.print(line, markup=False)


# ============================================================================================= JSON
def report_dict(
    results: Sequence[CheckResult],
    *,
    meta: Mapping[str, Any] | None = None,
    theory_mode: bool | None = None,
    violations: Sequence[str] = (),
    plots: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict: version, meta, theory mode, summary, checks, plots, extra."""
    data = {
        "version": REPORT_VERSION,
        "meta": dict(meta or {}),
        "theory_mode": {"enabled": theory_mode, "violations": list(violations)},
        "summary": summary_counts(results),
        "checks": [r.to_json() for r in results],
        "plots": list(plots),
    }
    if extra:
        data["extra"] = dict(extra)
    return _jsonable(data)


def write_json(path: str | Path, results: Sequence[CheckResult], **kwargs: Any) -> Path:
    """Write :func:`report_dict` to ``path`` (strict JSON, indented); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = report_dict(results, **kwargs)
    text = json.dumps(data, indent=2, allow_nan=False, default=_fallback)
    path.write_text(text + "\n")
    return path


def _fallback(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ============================================================================================ plots
def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.write_bytes(buf.getvalue())
    return path


def _finite_positive(values: Iterable[Any]) -> np.ndarray:
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    arr[~(arr > 0)] = np.nan
    return arr


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_spectrum_bounds(
    path: str | Path,
    series: Mapping[str, Any],
    *,
    theory: Mapping[str, Sequence[Any]] | None = None,
    title: str = "spectrum of the applied preconditioner",
) -> Path:
    r"""Plot :math:`\lambda_{\min}`, :math:`\lambda_{\max}` of :math:`H_k` over steps (log scale).

    ``series`` is :meth:`convergence.monitor.TrainingMonitor.spectrum_series` (``step``,
    ``kappa_lo``, ``kappa_hi``, per-layer ``lmin``/``lmax``); ``theory`` has ``step``,
    ``kappa_lo_th``, ``kappa_hi_th`` (E4's evidence ``series``), drawn dashed where known.
    """
    fig = _figure()
    ax = fig.add_subplot()
    steps = np.asarray(series.get("step", []), dtype=np.float64)
    if steps.size == 0:
        _empty(ax, "no recorded steps")
        return _save(fig, path)
    for name, layer in (series.get("layers") or {}).items():
        lo, hi = _finite_positive(layer.get("lmin", [])), _finite_positive(layer.get("lmax", []))
        if lo.size == steps.size:
            ax.fill_between(steps, lo, hi, alpha=0.12, step="mid")
            ax.plot(steps, hi, lw=0.8, alpha=0.7, label=f"{name}")
            ax.plot(steps, lo, lw=0.8, alpha=0.7, color=ax.lines[-1].get_color())
    ax.plot(steps, _finite_positive(series.get("kappa_hi", [])), color="black", lw=1.8, label=r"$\lambda_{\max}(H_k)$")
    ax.plot(steps, _finite_positive(series.get("kappa_lo", [])), color="black", lw=1.8, ls="-.", label=r"$\lambda_{\min}(H_k)$")
    if theory:
        t_steps = np.asarray(theory.get("step", []), dtype=np.float64)
        for key, label in (("kappa_hi_th", r"$\kappa_{hi}^{th}$"), ("kappa_lo_th", r"$\kappa_{lo}^{th}$")):
            vals = _finite_positive(theory.get(key, []))
            if vals.size == t_steps.size and np.isfinite(vals).any():
                ax.plot(t_steps, vals, color="crimson", ls="--", lw=1.4, label=label)
    if np.isfinite(_finite_positive(series.get("kappa_hi", []))).any():
        ax.set_yscale("log")
    ax.set_xlabel("step k")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_gradient_norms(
    path: str | Path,
    steps: Sequence[int],
    grad_norm_sq: np.ndarray | Sequence[Sequence[float]],
    *,
    beta: float,
    running_mean: Mapping[str, Sequence[float]] | None = None,
    bound: Sequence[float] | None = None,
    tail_start: float = 0.1,
    title: str = r"gradient-norm decay",
) -> Path:
    r"""Plot :math:`\|\nabla f(x_k)\|^2` per seed, :math:`G_N` (mean and CI band), the theorem's rate and :math:`U_N`.

    ``running_mean`` is E8's evidence ``G_N`` (``mean``, ``ci_low``, ``ci_high``); the reference
    rate :math:`c\,N^{\max(\beta-1,-\beta)}` is anchored at :math:`G_N` where the tail starts;
    ``bound`` is the :math:`U_N` curve (bounds the :math:`\alpha`-weighted mean :math:`W_N`).
    """
    fig = _figure()
    ax = fig.add_subplot()
    s = np.asarray(steps, dtype=np.float64)
    g = np.atleast_2d(np.asarray(grad_norm_sq, dtype=np.float64))
    if s.size == 0 or g.size == 0:
        _empty(ax, "no gradient norms recorded")
        return _save(fig, path)
    for row in g:
        ax.plot(s, np.where(row > 0, row, np.nan), color="tab:blue", alpha=0.25, lw=0.7)
    ax.plot([], [], color="tab:blue", alpha=0.5, label=r"$\|\nabla f(x_k)\|^2$ (per seed)")
    if running_mean is not None and len(running_mean.get("mean", [])) == s.size:
        mean = np.asarray(running_mean["mean"], dtype=np.float64)
        ax.plot(s, mean, color="black", lw=1.8, label=r"$G_N$ (mean over seeds)")
        lo = np.asarray(running_mean.get("ci_low", mean), dtype=np.float64)
        hi = np.asarray(running_mean.get("ci_high", mean), dtype=np.float64)
        if np.isfinite(lo).all() and np.isfinite(hi).all():
            ax.fill_between(s, np.maximum(lo, mean * 1e-3), hi, color="black", alpha=0.12, label="CI")
        exponent = max(beta - 1.0, -beta)
        start = int(np.searchsorted(s, max(s[0], tail_start * s[-1])))
        start = min(start, s.size - 1)
        if mean[start] > 0:
            ref = mean[start] * (s / s[start]) ** exponent
            ax.plot(s, ref, color="crimson", ls="--", lw=1.4, label=rf"theorem rate $N^{{{exponent:.2g}}}$")
    if bound is not None and len(bound) == s.size:
        ax.plot(s, np.asarray(bound, dtype=np.float64), color="darkorange", ls=":", lw=1.6, label=r"bound $U_N$ on $W_N$")
    ax.set_xscale("log")
    if np.nanmax(np.where(g > 0, g, np.nan), initial=0.0) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step N")
    ax.set_ylabel("squared gradient norm")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def damping_series(records: Sequence[Any], window: int | None = None) -> dict[str, dict[str, list[float]]]:
    """Per layer and secant factor: trailing-window rates of DD step 1, DD step 2 and skipped pairs.

    ``records`` are :class:`convergence.monitor.StepRecord`\\ s (read by attribute: ``step``,
    ``layers[name].a/.g.pair`` with ``step1_active``, ``step2_active``, ``incorporated``).
    Keys are ``"layer/side"``; values ``{"step", "step1", "step2", "skipped", "pairs"}`` where
    rates are over the last ``window`` pairs (default: a tenth of the pairs, 5 to 50).
    """
    events: dict[str, list[tuple[int, bool, bool, bool]]] = {}
    for rec in records:
        for name, layer in getattr(rec, "layers", {}).items():
            for side in ("a", "g"):
                factor = getattr(layer, side, None)
                pair = getattr(factor, "pair", None) if factor is not None else None
                if pair is None or getattr(factor, "kind", None) not in ("bfgs", "lbfgs"):
                    continue
                events.setdefault(f"{name}/{side}", []).append(
                    (int(rec.step), bool(pair.step1_active), bool(pair.step2_active), not bool(pair.incorporated)))
    out: dict[str, dict[str, list[float]]] = {}
    for key, ev in events.items():
        w = window or max(5, min(50, len(ev) // 10 or 1))
        arr = np.array([[e[1], e[2], e[3]] for e in ev], dtype=np.float64)
        csum = np.cumsum(np.vstack([np.zeros((1, 3)), arr]), axis=0)
        idx = np.arange(1, len(ev) + 1)
        lo = np.maximum(idx - w, 0)
        rates = (csum[idx] - csum[lo]) / (idx - lo)[:, None]
        out[key] = {"step": [e[0] for e in ev], "step1": rates[:, 0].tolist(), "step2": rates[:, 1].tolist(),
                    "skipped": rates[:, 2].tolist(), "pairs": len(ev),
                    "total": {"step1": float(arr[:, 0].mean()), "step2": float(arr[:, 1].mean()),
                              "skipped": float(arr[:, 2].mean())}}
    return out


def plot_damping(path: str | Path, series: Mapping[str, Mapping[str, Any]], *, title: str = "double-damping activation") -> Path:
    """Plot :func:`damping_series`: one panel per factor with the step 1 / step 2 / skip rates."""
    keys = list(series)
    fig = _figure(7.0, max(2.2, 1.9 * max(1, len(keys))))
    if not keys:
        _empty(fig.add_subplot(), "no secant pairs recorded (no BFGS / L-BFGS factor in this optimizer)")
        return _save(fig, path)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        s = series[key]
        ax.plot(s["step"], s["step1"], label="DD step 1 (Powell on H)")
        ax.plot(s["step"], s["step2"], label="DD step 2")
        ax.plot(s["step"], s["skipped"], label="skipped", color="crimson")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("rate")
        ax.set_title(key, fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=7)
    axes[-1].set_xlabel("step k")
    fig.suptitle(title)
    return _save(fig, path)


def plot_hessian_density(
    path: str | Path,
    slq: Any,
    *,
    lambda_min: float | None = None,
    lambda_max: float | None = None,
    num_points: int = 2000,
    title: str = "Hessian spectral density (SLQ)",
) -> Path:
    """Plot the Gaussian-smoothed SLQ density of a :class:`convergence.spectrum.SLQResult` (log scale),
    with the extreme eigenvalues from Lanczos as vertical lines when given."""
    fig = _figure()
    ax = fig.add_subplot()
    grid = slq.grid(num_points)
    density = slq.density(grid)
    ax.semilogy(grid, np.maximum(density, 1e-12), color="tab:blue")
    for value, label in ((lambda_min, r"$\lambda_{\min}$"), (lambda_max, r"$\lambda_{\max}$")):
        if value is not None and math.isfinite(value):
            ax.axvline(value, color="crimson", ls="--", lw=1.0, label=label)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    if lambda_min is not None or lambda_max is not None:
        ax.legend(fontsize=7)
    return _save(fig, path)
