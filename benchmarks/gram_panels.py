r"""How fast is :func:`curvature.linalg.gram` with ``k`` column panels against the full GEMM? (issue 14)

Every Kronecker factor statistic is a Gram matrix :math:`X^\top X` of ``n`` rows of width ``d``. A GEMM
computes all :math:`d^2` entries; the panel form multiplies only the upper triangle by blocks (block row
``i``: :math:`P_i^\top [P_i \cdots P_k]`) and mirrors the rest, :math:`(k+1)/(2k)` of the multiply-adds
for ``k`` equal panels, at the price of ``k`` smaller GEMMs and the mirror copies. This study times
``gram(X, k)`` for each ``k`` on a grid of ``(n, d)`` and reports the time relative to ``k = 1`` and the
count :func:`curvature.linalg.gram_panels` picks by default, so the thresholds there can be checked on
another machine.

Usage::

    python -m benchmarks.gram_panels --threads 1 --out runs/gram-panels

On the CPU the timer is the thread's CPU time (one torch thread); on CUDA, CUDA events.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from benchmarks.timing import cpu_clock, make_timer, summarize, synchronize, write_study
from curvature.linalg import gram, gram_panels


def time_gram(n: int, d: int, panels: int, dtype: torch.dtype, device: torch.device | str, repeats: int) -> list[float]:
    """Seconds per call of ``gram(X, panels)`` for a random ``n × d`` ``X`` (after two warm-up calls)."""
    X = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d), dtype=dtype).to(device)
    timer = make_timer(device)
    for _ in range(2):
        gram(X, panels)
    synchronize(device)
    return [timer.time(lambda: gram(X, panels)) for _ in range(repeats)]


def study(rows: Sequence[int], widths: Sequence[int], panel_counts: Sequence[int], dtype: torch.dtype,
          device: torch.device | str, repeats: int) -> list[dict]:
    """One row per ``(n, d)``: median ms per call for each panel count, and the default count."""
    out = []
    for n in rows:
        for d in widths:
            row = {"n": n, "d": d, "default": gram_panels(n, d, torch.device(device))}
            for k in panel_counts:
                row[f"ms_{k}"] = 1e3 * summarize(time_gram(n, d, k, dtype, device, repeats)).median
            out.append(row)
    return out


def format_table(rows: list[dict], panel_counts: Sequence[int]) -> str:
    head = "| n | d | full GEMM ms | " + " | ".join(f"k = {k} (× full)" for k in panel_counts if k != 1) + " | default k |"
    lines = [head, "|" + "---|" * (4 + sum(k != 1 for k in panel_counts))]
    for r in rows:
        full = r["ms_1"]
        ratios = " | ".join(f"{r[f'ms_{k}'] / full:.2f}" for k in panel_counts if k != 1)
        lines.append(f"| {r['n']} | {r['d']} | {full:.3f} | {ratios} | {r['default']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1000])
    parser.add_argument("--widths", type=int, nargs="+", default=[100, 192, 250, 320, 400, 500, 640, 785, 1000])
    parser.add_argument("--panels", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="thread", help="CPU clock")
    parser.add_argument("--out", default=None, help="folder for gram_panels.json and gram_panels.md")
    args = parser.parse_args(argv)
    if 1 not in args.panels:
        parser.error("--panels must include 1 (the full GEMM every ratio is taken against)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with cpu_clock(args.clock):
        rows = study(args.rows, args.widths, args.panels, getattr(torch, args.dtype), args.device, args.repeats)
    table = format_table(rows, args.panels)
    write_study(args.out, "gram_panels", rows, table)
    return rows


if __name__ == "__main__":
    main()
