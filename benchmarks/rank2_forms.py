r"""Which form of the BFGS rank-2 update is fastest and still exactly symmetric? (issue 14)

:func:`curvature.bfgs.bfgs_inverse_update` ends with :math:`H^+ = H + pp^\top - qq^\top`, a
memory-bound ``d × d`` update. The forms compared (same math, different kernels):

* ``library`` — :func:`curvature.bfgs.symmetric_rank2_update`: two ``addcmul`` passes.
* ``four_pass`` — the library's form before issue 14's session 6: ``outer(p, p)``, ``outer(q, q)``,
  their difference, the sum with ``H`` (four full passes, two ``d × d`` temporaries).
* ``addr`` — ``addr(H, p, p)`` then ``addr_(q, q, alpha=-1)``: two passes (BLAS ``ger``-like kernels).
* ``addmm`` — ``addmm(H, [p q], [p  -q]^T)``: one GEMM with inner dimension 2.

Exact symmetry of a fused form depends on whether the kernel computes element ``(i, j)`` and ``(j, i)``
by the same instruction sequence (a fused multiply-add in a vectorized body and a separate multiply and
add in a remainder loop round differently). The check runs every size in ``--sizes`` with several random
symmetric ``H`` and counts the sizes where ``H^+ != (H^+)^T`` for at least one draw.

Usage::

    python -m benchmarks.rank2_forms --threads 1 --dtype float64 --dtype float32 --out runs/rank2

On the CPU the timer is the thread's CPU time (one torch thread); on CUDA, CUDA events.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from benchmarks.timing import cpu_clock, make_timer, summarize, synchronize, write_study
from curvature.bfgs import symmetric_rank2_update

Rank2Form = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _four_pass(H: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    out = torch.outer(p, p)
    out.sub_(torch.outer(q, q))
    return out.add_(H)


def _addr(H: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.addr(H, p, p).addr_(q, q, alpha=-1)


def _addmm(H: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.addmm(H, torch.stack([p, q], 1), torch.stack([p, -q], 0))


#: The candidate forms of H + ppᵀ − qqᵀ, by name.
FORMS: dict[str, Rank2Form] = {"library": symmetric_rank2_update, "four_pass": _four_pass, "addr": _addr, "addmm": _addmm}

DEFAULT_SIZES = tuple(range(1, 70)) + (127, 128, 129, 255, 256, 257, 400, 401, 784, 785, 1000, 1001)


def random_problem(n: int, dtype: torch.dtype, device: torch.device | str,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A symmetric positive definite ``H = AAᵀ/n + I`` (formed symmetric) and two vectors ``p, q``."""
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    h = a @ a.T / n + torch.eye(n, dtype=torch.float64)
    h = torch.triu(h) + torch.triu(h, 1).T  # exactly symmetric in float64, and after the cast
    p = torch.randn(n, dtype=torch.float64, generator=generator)
    q = 0.7 * torch.randn(n, dtype=torch.float64, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) for t in (h, p, q))


def asymmetric_sizes(form: Rank2Form, sizes: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                     draws: int = 3, seed: int = 0) -> list[int]:
    """The sizes at which ``form`` returned a matrix that is not exactly symmetric for some draw."""
    generator = torch.Generator().manual_seed(seed)
    bad = []
    for n in sizes:
        for _ in range(draws):
            out = form(*random_problem(n, dtype, device, generator))
            if not torch.equal(out, out.T):
                bad.append(n)
                break
    return bad


def max_relative_error(form: Rank2Form, n: int, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> float:
    """``max |form − exact| / max |exact|`` against the float64 four-pass result (the math, not the rounding)."""
    h, p, q = random_problem(n, dtype, device, torch.Generator().manual_seed(seed))
    exact = _four_pass(h.double(), p.double(), q.double())
    return float((form(h, p, q).double() - exact).abs().max() / exact.abs().max())


def time_form(form: Rank2Form, n: int, dtype: torch.dtype, device: torch.device | str, repeats: int) -> list[float]:
    """Seconds per call of ``form`` at size ``n`` (``repeats`` calls after two warm-up calls)."""
    h, p, q = random_problem(n, dtype, device, torch.Generator().manual_seed(1))
    timer = make_timer(device)
    for _ in range(2):
        form(h, p, q)
    synchronize(device)
    return [timer.time(lambda: form(h, p, q)) for _ in range(repeats)]


def study(dtypes: Sequence[torch.dtype], device: torch.device | str, sizes: Sequence[int],
          timed_sizes: Sequence[int], repeats: int) -> list[dict]:
    """One row per (form, dtype): asymmetric sizes, relative error at the largest timed size, ms per call."""
    rows = []
    for dtype in dtypes:
        for name, form in FORMS.items():
            row = {"form": name, "dtype": str(dtype).removeprefix("torch."),
                   "asymmetric_sizes": asymmetric_sizes(form, sizes, dtype, device), "sizes_checked": len(sizes),
                   "relative_error": max_relative_error(form, max(timed_sizes), dtype, device)}
            for n in timed_sizes:
                row[f"ms_{n}"] = 1e3 * summarize(time_form(form, n, dtype, device, repeats)).median
            rows.append(row)
    return rows


def format_table(rows: list[dict], timed_sizes: Sequence[int]) -> str:
    head = "| form | dtype | sizes not bit-symmetric | rel. error | " + " | ".join(f"ms at {n}" for n in timed_sizes) + " |"
    lines = [head, "|" + "---|" * (4 + len(timed_sizes))]
    for r in rows:
        bad = r["asymmetric_sizes"]
        shown = "none" if not bad else f"{len(bad)} of {r['sizes_checked']} (first: {', '.join(map(str, bad[:5]))})"
        times = " | ".join(f"{r[f'ms_{n}']:.3f}" for n in timed_sizes)
        lines.append(f"| {r['form']} | {r['dtype']} | {shown} | {r['relative_error']:.1e} | {times} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", action="append", choices=["float32", "float64"], help="repeatable (default float64)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="sizes checked for symmetry")
    parser.add_argument("--timed-sizes", type=int, nargs="+", default=[200, 400, 785, 1000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="thread", help="CPU clock")
    parser.add_argument("--out", default=None, help="folder for rank2_forms.json and rank2_forms.md")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with cpu_clock(args.clock):
        dtypes = [getattr(torch, d) for d in (args.dtype or ["float64"])]
        rows = study(dtypes, args.device, args.sizes, args.timed_sizes, args.repeats)
    table = format_table(rows, args.timed_sizes)
    write_study(args.out, "rank2_forms", rows, table)
    return rows


if __name__ == "__main__":
    main()
