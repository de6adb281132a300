r"""Data-parallel step time and communication volume at several world sizes (gloo on CPU, NCCL on GPUs).

For each world size W, W processes are started (``torch.multiprocessing``, a ``file://``
rendezvous); each wraps the autoencoder in ``DistributedDataParallel`` and trains each method on
its shard of a fixed global batch (``batch / W`` rows). Per method: ``warmup`` untimed steps, then
``steps`` timed steps; the step time of a step is the slowest rank's (the ranks wait for each other
in the collectives anyway), and the median over steps is reported. Bytes per step are the
optimizer's own collectives from its :class:`~optimizers.communicator.CommStats` (the payload per
call, on each rank) plus DDP's gradient all-reduce (the gradient bytes); beside them, the analytic
volume of KAISA's scheme for the same model (:mod:`optimizers.comm_volume`, COMM-OPT, inverses every
step) in the same unit. On one shared CPU the processes compete for the same cores, so W = 2 is not
expected to be faster there; the numbers say what the communication costs.

Usage::

    python -m benchmarks.throughput --no-main --world-sizes 1,2 --model tiny --batch 256 --out runs/dist
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optimizers.comm_volume import kaisa_bytes_per_step

DIST_METHODS = ("kfac", "kbfgs", "kbfgsl")
DIST_COLUMNS = ("world_size", "method", "distribute", "ms_median", "ms_q25", "ms_q75", "optimizer_bytes_per_step",
                "optimizer_calls_per_step", "gradient_bytes_per_step", "kaisa_bytes_per_step")


def _build(method: str, net, distribute: str):
    from optimizers import KBFGS, KBFGSL, KFAC

    if method == "kfac":  # factors and inverses every step: the expensive end of KFAC
        return KFAC(net, lr=0.1, damping=1.0, inverse_update_freq=1, distribute=distribute)
    if method == "kbfgs":
        return KBFGS(net, lr=0.1, damping=0.3, distribute=distribute)
    if method == "kbfgsl":
        return KBFGSL(net, lr=0.1, damping=0.3, memory=20, distribute=distribute)
    raise ValueError(f"unknown method {method!r}; choose from {DIST_METHODS}")


def _worker(rank: int, world: int, init: str, out: str, widths: tuple[int, ...], batch: int, methods: list[str],
            modes: list[str], steps: int, warmup: int, device: str, threads: int | None) -> None:
    from torch import nn

    from benchmarks.models import Autoencoder, summed_bce_with_logits

    if threads:
        torch.set_num_threads(threads)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    dev = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(dev)
    results: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    x_global = torch.rand(batch, widths[0], generator=g).to(dev)
    base, extra = divmod(batch, world)
    lo = rank * base + min(rank, extra)
    x = x_global[lo:lo + base + (1 if rank < extra else 0)]
    for method in methods:
        for mode in modes:
            torch.manual_seed(0)
            model = Autoencoder(widths).to(dev)
            net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if backend == "nccl" else None)
            opt = _build(method, net, mode)

            def closure():
                opt.zero_grad()
                loss = summed_bce_with_logits(net(x), x)
                loss.backward()
                return loss

            times, nbytes, calls = [], [], []
            for k in range(warmup + steps):
                if backend == "nccl":
                    torch.cuda.synchronize(dev)
                dist.barrier()
                t0 = time.perf_counter()
                opt.step(closure)
                if backend == "nccl":
                    torch.cuda.synchronize(dev)
                elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's step
                if k >= warmup:
                    times.append(1e3 * float(elapsed))
                    st = opt.data_parallel.comm.stats
                    nbytes.append(st.step_bytes)
                    calls.append(st.step_calls)
            grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) if world > 1 else 0
            layers = [(s.adapter.a_dim, s.adapter.g_dim) for s in opt.slots.values()]
            kaisa = kaisa_bytes_per_step(layers, world, dtype_bytes=4)["total"]
            q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
            results.append({"world_size": world, "method": method, "distribute": mode,
                            "ms_median": statistics.median(times), "ms_q25": q[0], "ms_q75": q[2],
                            "optimizer_bytes_per_step": statistics.mean(nbytes),
                            "optimizer_calls_per_step": statistics.mean(calls),
                            "gradient_bytes_per_step": grad_bytes, "kaisa_bytes_per_step": kaisa})
    if rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    dist.destroy_process_group()


def run_world_sizes(widths: tuple[int, ...], batch: int, world_sizes: list[int], *, methods=DIST_METHODS,
                    modes=("replicate", "layerwise"), steps: int = 5, warmup: int = 2, device: str = "cpu",
                    threads: int | None = 1) -> list[dict[str, Any]]:
    """Rows of :data:`DIST_COLUMNS` for every world size, method and distribute mode."""
    rows: list[dict[str, Any]] = []
    for world in world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            init = f"file://{Path(tmp) / 'init'}"
            mp.start_processes(_worker, args=(world, init, tmp, tuple(widths), batch, list(methods), list(modes),
                                              steps, warmup, device, threads),
                               nprocs=world, join=True, start_method="spawn")
            rows += torch.load(Path(tmp) / "results.pt", weights_only=False)
    return rows


def format_rows(rows: list[dict[str, Any]], title: str) -> str:
    head = ("W", "method", "distribute", "ms/step [IQR]", "optimizer B/step (calls)", "+ DDP grad B/step",
            "KAISA B/step")
    body = [(str(r["world_size"]), r["method"], r["distribute"],
             f"{r['ms_median']:.1f} [{r['ms_q25']:.1f}-{r['ms_q75']:.1f}]",
             f"{r['optimizer_bytes_per_step']:.0f} ({r['optimizer_calls_per_step']:.0f})",
             f"{r['gradient_bytes_per_step']:.0f}", f"{r['kaisa_bytes_per_step']:.0f}") for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)
