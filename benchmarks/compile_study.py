r"""Does ``torch.compile`` of the block math make a K-BFGS step faster? (issue 14, item 3)

The candidate math of K-BFGS's second pass (``KroneckerBlock.prepare_after_step``: the pair EMA,
double damping's Powell candidates, the guarded BFGS candidate and the Hessian-action candidate of
every layer, all small device ops that a compiler could fuse) is the part of the step made of many
tiny kernels; the rest is GEMMs that the compiler hands to the same BLAS. This script times whole
steps with that method compiled (``torch.compile(..., dynamic=False)``, one graph per layer shape)
and without, each mode in its own process (dynamo's caches are global), alternating
``--rounds`` times, and prints the median step and its interquartile range per mode plus the
compile (warm-up) time. The library keeps no compile path unless this shows a gain (README).

Usage::

    python -m benchmarks.compile_study --model curves --method kbfgs --steps 15 --rounds 2 --device cpu

On the CPU the default clock is the thread's CPU time (one torch thread), as ``--clock thread`` in
:mod:`benchmarks.throughput`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from benchmarks import timing
from benchmarks.timing import make_timer, set_cpu_clock, summarize


def run_mode(model_name: str, method: str, mode: str, steps: int, device: str, batch: int,
             clock: str = "thread") -> dict[str, float]:
    """Time ``steps`` K-BFGS steps after a 3-step warm-up in this process; ``mode`` is eager or compiled."""
    import torch._dynamo

    from curvature.blocks import KroneckerBlock

    torch.set_num_threads(1)
    eager_prepare, clock_before = KroneckerBlock.prepare_after_step, timing.CPU_CLOCK
    try:
        if mode == "compiled":  # patched for this call only (the CLI runs each mode in its own process)
            torch._dynamo.config.recompile_limit = 64  # one graph per layer shape
            KroneckerBlock.prepare_after_step = torch.compile(eager_prepare, dynamic=False)
        return _time_steps(model_name, method, steps, device, batch, clock)
    finally:
        KroneckerBlock.prepare_after_step = eager_prepare
        set_cpu_clock(clock_before)


def _time_steps(model_name: str, method: str, steps: int, device: str, batch: int, clock: str) -> dict[str, float]:
    from benchmarks.models import build_autoencoder, loss_for
    from optimizers import KBFGS, KBFGSL

    torch.manual_seed(0)
    model = build_autoencoder(model_name).to(device)
    x = torch.rand(batch, model.linear_layers[0].in_features, device=device)
    loss_fn = loss_for(model_name)
    opt = (KBFGS if method == "kbfgs" else KBFGSL)(model)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), x)
        loss.backward()
        return loss

    start = time.perf_counter()
    for _ in range(3):
        opt.step(closure)
    warmup = time.perf_counter() - start
    set_cpu_clock(clock)
    timer = make_timer(device)
    times = [timer.time(lambda: opt.step(closure)) for _ in range(steps)]
    s = summarize(times)
    return {"median_ms": 1e3 * s.median, "q1_ms": 1e3 * s.q25, "q3_ms": 1e3 * s.q75, "warmup_s": warmup,
            "skipped": opt.counters["skipped_steps"], "reverted": opt.counters["reverted_steps"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="curves", choices=["curves", "mnist", "faces"])
    p.add_argument("--method", default="kbfgs", choices=["kbfgs", "kbfgsl"])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--clock", default="thread", choices=["thread", "wall"], help="CPU clock (benchmarks.timing)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.model, args.method, args.child, args.steps, args.device, args.batch, args.clock)))
        return 0
    results: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            cmd = [sys.executable, "-m", "benchmarks.compile_study", "--child", mode, "--model", args.model,
                   "--method", args.method, "--steps", str(args.steps), "--device", args.device,
                   "--batch", str(args.batch), "--clock", args.clock]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.setdefault(mode, []).append(json.loads(out))
    print(f"{args.method} on {args.model}, batch {args.batch}, {args.device}, {args.steps} steps per run, "
          f"{args.rounds} alternating runs per mode")
    for mode, runs in results.items():
        for r in runs:
            print(f"  {mode:9s} step {r['median_ms']:7.1f} ms [{r['q1_ms']:.1f}-{r['q3_ms']:.1f}]  "
                  f"warm-up {r['warmup_s']:6.1f} s  skipped {r['skipped']:.0f} reverted {r['reverted']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
