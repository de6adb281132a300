r"""K-BFGS(L)'s compact L-BFGS product, the library's against the kernel floor's, layer by layer (issue 14).

The preconditioning of a K-BFGS(L) layer multiplies its gradient (``d_out × (d_in + 1)``) by
:math:`H_g` in compact form, :meth:`curvature.lbfgs.CompactLBFGS.apply`: four thin GEMMs, :math:`(Y^\top
Y)X` and two triangular solves. The kernel floor (:mod:`benchmarks.kernel_floor`) runs the same math as
bare kernels on preallocated outputs (``_lbfgs_apply``). This study builds a full memory of ``memory``
pairs for every linear layer of a model, hands the *same* memory to both, checks that they compute the
same product, and times each (the median of ``--repeats`` calls, one torch thread).

Usage::

    python -m benchmarks.lbfgs_apply --model curves --threads 1 --out runs/lbfgs-apply

On the CPU the timer is the thread's CPU time; on CUDA, CUDA events.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from benchmarks.kernel_floor import _lbfgs_apply
from benchmarks.models import AUTOENCODER_WIDTHS
from benchmarks.timing import cpu_clock, make_timer, summarize, synchronize, write_study
from curvature.lbfgs import CompactLBFGS


def full_memory(dim: int, memory: int, dtype: torch.dtype, device: torch.device | str,
                generator: torch.Generator) -> CompactLBFGS:
    """A :class:`CompactLBFGS` holding ``memory`` pairs with ``y = s + 0.1·noise`` (so ``sᵀy > 0``), H0 = I."""
    lbfgs = CompactLBFGS(dim, memory, dtype=dtype, device=device)
    for _ in range(memory):
        s = torch.randn(dim, generator=generator, dtype=torch.float64)
        y = s + 0.1 * torch.randn(dim, generator=generator, dtype=torch.float64)
        lbfgs.append(s.to(device), y.to(device))
    return lbfgs


def plan_memory(lbfgs: CompactLBFGS) -> dict[str, torch.Tensor]:
    """The tensors the kernel floor's ``_lbfgs_apply`` reads, taken from the library's memory (γ must be 1)."""
    if lbfgs.gamma != 1.0:
        raise ValueError(f"the kernel floor's plan assumes H0 = I (gamma 1), got gamma {lbfgs.gamma}")
    return {"S": lbfgs.S, "Y": lbfgs.Y, "R": lbfgs.R, "D": torch.diagonal(lbfgs.SY).clone(), "YY": lbfgs.YY}


def layer_shapes(model: str) -> list[tuple[int, int]]:
    """``(d_out, d_in + 1)`` of every linear layer of an autoencoder of :mod:`benchmarks.models`."""
    if model not in AUTOENCODER_WIDTHS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(AUTOENCODER_WIDTHS)}")
    widths = AUTOENCODER_WIDTHS[model]
    return [(d_out, d_in + 1) for d_in, d_out in zip(widths[:-1], widths[1:])]


def study(shapes: Sequence[tuple[int, int]], memory: int, dtype: torch.dtype, device: torch.device | str,
          repeats: int, seed: int = 0) -> list[dict]:
    """One row per layer: its shape, the relative difference of the two products, and ms per call of each."""
    generator = torch.Generator().manual_seed(seed)
    timer = make_timer(device)
    rows = []
    for d, n in shapes:
        lbfgs = full_memory(d, memory, dtype, device, generator)
        mem = plan_memory(lbfgs)
        # the gradient as the block hands it over: the transpose of a (d_in + 1) × d_out product
        V = torch.randn(n, d, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype).T
        out = torch.empty(d, n, dtype=dtype, device=device)
        library = lbfgs.apply(V)
        _lbfgs_apply(mem, V, out)
        difference = float((library - out).abs().max() / out.abs().max())
        times = {}
        for name, call in (("library", lambda: lbfgs.apply(V)), ("plan", lambda: _lbfgs_apply(mem, V, out))):
            for _ in range(2):
                call()
            synchronize(device)
            times[name] = 1e3 * summarize([timer.time(call) for _ in range(repeats)]).median
        rows.append({"d_out": d, "width": n, "memory": memory, "relative_difference": difference,
                     "library_ms": times["library"], "plan_ms": times["plan"]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| layer (d_out × width) | library ms | kernel plan ms | library / plan | rel. difference |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['d_out']} × {r['width']} | {r['library_ms']:.3f} | {r['plan_ms']:.3f} | "
                     f"{r['library_ms'] / r['plan_ms']:.2f} | {r['relative_difference']:.1e} |")
    library, plan = sum(r["library_ms"] for r in rows), sum(r["plan_ms"] for r in rows)
    lines.append(f"| all layers | {library:.3f} | {plan:.3f} | {library / plan:.2f} | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="curves", choices=sorted(AUTOENCODER_WIDTHS))
    parser.add_argument("--memory", type=int, default=100, help="pairs in each layer's memory (K-BFGS(L)'s p)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="thread", help="CPU clock")
    parser.add_argument("--out", default=None, help="folder for lbfgs_apply.json and lbfgs_apply.md")
    args = parser.parse_args(argv)
    if args.memory < 1 or args.repeats < 1:
        parser.error("--memory and --repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with cpu_clock(args.clock):
        rows = study(layer_shapes(args.model), args.memory, getattr(torch, args.dtype), args.device, args.repeats)
    write_study(args.out, "lbfgs_apply", rows, format_table(rows))
    return rows


if __name__ == "__main__":
    main()
