"""Defaults study: do the optimizers' class defaults work without tuning on small problems?

Four problems, each small enough for a shared 2-core CPU (one thread, float32, seed 0):

* ``teacher``: regression on a random tanh teacher (10 → 4, noise 0.05), MLP 10-32-32-4 (ReLU),
  1,200 samples, batch 100, half squared error, 200 steps;
* ``moons``: two interleaved half-circles (noise 0.1), MLP 2-32-32-2 (tanh), 1,000 points,
  batch 100, cross-entropy, 300 steps (the final accuracy is reported too);
* ``mnist``: an autoencoder 784-128-32-128-784 (ReLU, linear code) on the first 2,000 images of
  the MNIST *test* split (``../shared/data/mnist`` or ``$SECONDORDER_MNIST_DIR``), batch 200,
  summed BCE-with-logits, 100 steps;
* ``curves``: the paper's CURVES autoencoder on the data of the ``tiny`` preset (2,000 regenerated
  CURVES training images), batch 500, summed BCE-with-logits, 40 steps.

For each optimizer the study runs its class defaults (``defaults``) and the alternatives in
:data:`CANDIDATES`, cold (no warm start); the defaults also with the authors' one-pass warm start
(``defaults+warm``). Reported: the loss over the whole training set at the end, its ratio to the
loss at the start, the skipped/reverted steps, and whether the run diverged (a non-finite final
loss or parameter). ``python -m benchmarks.defaults_study`` prints the table; ``--json FILE``
writes it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer, diagonal_block

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Problem:
    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: Loss
    batch: int
    steps: int
    likelihood: str
    accuracy: bool = False


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()


def _half_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def _mlp(widths: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def teacher() -> Problem:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 4, generator=g)
    x = torch.randn(1200, 10, generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(1200, 4, generator=g)
    torch.manual_seed(0)
    return Problem("teacher", _mlp([10, 32, 32, 4], nn.ReLU), x, y, _half_mse, 100, 200, "gaussian")


def two_moons(n: int = 1000, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half-circles (the usual 'two moons' construction), labels 0/1, shuffled."""
    g = torch.Generator().manual_seed(2)
    half = n // 2
    t = torch.rand(n, generator=g) * math.pi
    upper = torch.stack([torch.cos(t[:half]), torch.sin(t[:half])], 1)
    lower = torch.stack([1 - torch.cos(t[half:]), 0.5 - torch.sin(t[half:])], 1)
    x = torch.cat([upper, lower]) + noise * torch.randn(n, 2, generator=g)
    y = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(n - half, dtype=torch.long)])
    perm = torch.randperm(n, generator=g)
    return x[perm], y[perm]


def moons() -> Problem:
    x, y = two_moons()
    torch.manual_seed(0)
    return Problem("moons", _mlp([2, 32, 32, 2], nn.Tanh), x, y, nn.functional.cross_entropy, 100, 300,
                   "categorical", accuracy=True)


def mnist() -> Problem | None:
    import os
    from pathlib import Path

    from benchmarks.data.mnist import load_mnist

    root = Path(__file__).resolve().parents[1]
    env = os.environ.get("SECONDORDER_MNIST_DIR")
    candidates = ([Path(env)] if env else []) + [root.parent / "shared" / "data" / "mnist", root / "shared" / "data" / "mnist"]
    path = next((c for c in candidates if (c / "t10k-images-idx3-ubyte.gz").exists()), None)
    if path is None:
        print("mnist: the MNIST test split was not found (../shared/data/mnist or $SECONDORDER_MNIST_DIR); skipped")
        return None
    images, _ = load_mnist(path, split="test")
    x = images[:2000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 32), nn.Linear(32, 128), nn.ReLU(),
                          nn.Linear(128, 784))
    return Problem("mnist", model, x, x, _bce, 200, 100, "bernoulli")


def curves() -> Problem:
    from benchmarks.experiment.config import PRESETS
    from benchmarks.experiment.datasets import default_cache_dir
    from benchmarks.data import load_curves
    from benchmarks.models import build_autoencoder

    tiny = PRESETS["tiny"]
    x = load_curves(default_cache_dir(), "train", 0, tiny["n_train"], tiny["n_test"])
    return Problem("curves", build_autoencoder("curves", seed=9999), x, x, _bce, tiny["batch_size"], 40, "bernoulli")


PROBLEMS: dict[str, Callable[[], Problem | None]] = {"teacher": teacher, "moons": moons, "mnist": mnist, "curves": curves}


def _diagonal(model: nn.Module, **kw: Any) -> CurvatureOptimizer:
    from optimizers import Diagonal

    return Diagonal(model, **kw)


#: optimizer name -> (constructor, {setting label: keyword arguments}); "defaults" = no arguments.
CANDIDATES: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, dict[str, Any]]]] = {
    "kfac": (KFAC, {
        "defaults": {},
        "lr 0.1 λ 1 empirical": {"lr": 0.1, "damping": 1.0, "fisher": "empirical"},
        "lr 1 λ 3 empirical": {"lr": 1.0, "damping": 3.0, "fisher": "empirical"},
        "defaults, no likelihood": {"fisher": None},
        "lr 1 λ 3 mc": {"lr": 1.0, "damping": 3.0, "fisher": "mc", "likelihood": None},
        "lr 0.3 λ 1 mc": {"lr": 0.3, "damping": 1.0, "fisher": "mc", "likelihood": None},
        "lr 0.1 λ 3 empirical": {"lr": 0.1, "damping": 3.0, "fisher": "empirical"},
        "lr 0.3 λ 3 empirical": {"lr": 0.3, "damping": 3.0, "fisher": "empirical"},
    }),
    "kbfgs": (KBFGS, {
        "defaults": {},
        "lr 0.1 λ 0.3": {"lr": 0.1, "damping": 0.3},
        "lr 0.3 λ 1": {"lr": 0.3, "damping": 1.0},
    }),
    "kbfgsl": (KBFGSL, {
        "defaults": {},
        "lr 0.1 λ 0.3": {"lr": 0.1, "damping": 0.3},
        "lr 0.3 λ 1": {"lr": 0.3, "damping": 1.0},
    }),
    "diagonal": (_diagonal, {
        "defaults": {},
        "power 1 lr 0.1 λ 1e-3": {"lr": 0.1, "damping": 1e-3, "power": 1.0},
        "power 1 lr 0.3 λ 0.1": {"lr": 0.3, "damping": 0.1, "power": 1.0},
        "power 0.5 lr 0.01 λ 1e-4": {"lr": 0.01, "damping": 1e-4, "power": 0.5},
    }),
}


def _full_loss(problem: Problem) -> float:
    with torch.no_grad():
        return float(problem.loss(problem.model(problem.x), problem.y))


def _accuracy(problem: Problem) -> float:
    with torch.no_grad():
        return float((problem.model(problem.x).argmax(1) == problem.y).float().mean())


def run_one(make_problem: Callable[[], Problem | None], opt_name: str, label: str, warm: bool) -> dict[str, Any] | None:
    problem = make_problem()
    if problem is None:
        return None
    cls, settings = CANDIDATES[opt_name]
    kwargs = dict(settings[label])
    if kwargs.get("fisher") == "mc" and "likelihood" in kwargs:
        kwargs["likelihood"] = problem.likelihood
    if opt_name == "kfac" and not kwargs:
        kwargs = {"likelihood": problem.likelihood}  # the caller names the model's distribution
    kwargs = {k: v for k, v in kwargs.items() if not (k == "fisher" and v is None)}
    model = problem.model
    opt = cls(model, **kwargs)
    n = problem.x.shape[0]
    batches = [(problem.x[i : i + problem.batch], problem.y[i : i + problem.batch])
               for i in range(0, n - problem.batch + 1, problem.batch)]
    if warm:
        if isinstance(opt, KFAC) and opt.fisher == "empirical":
            opt.warm_start(batches, problem.loss)
        else:
            opt.warm_start(batches if isinstance(opt, KFAC) else (xb for xb, _ in batches))
    start = _full_loss(problem)
    t0 = time.process_time()
    for k in range(problem.steps):
        xb, yb = batches[k % len(batches)]

        def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
            opt.zero_grad()
            loss = problem.loss(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    cpu = time.process_time() - t0
    final = _full_loss(problem)
    finite = math.isfinite(final) and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    counters = getattr(opt, "counters", {})
    row = {"problem": problem.name, "optimizer": opt_name, "setting": label + ("+warm" if warm else ""),
           "start": start, "final": final, "ratio": final / start if finite else math.inf,
           "diverged": not finite, "skipped": int(counters.get("skipped_steps", 0)),
           "reverted": int(counters.get("reverted_steps", 0)), "cpu_s": cpu}
    if problem.accuracy:
        row["accuracy"] = _accuracy(problem) if finite else float("nan")
    return row


def study(problems: list[str], optimizers: list[str], warm_defaults: bool = True) -> list[dict[str, Any]]:
    rows = []
    for p in problems:
        for o in optimizers:
            labels = list(CANDIDATES[o][1])
            runs = [(lab, False) for lab in labels] + ([("defaults", True)] if warm_defaults else [])
            for label, warm in runs:
                row = run_one(PROBLEMS[p], o, label, warm)
                if row is not None:
                    rows.append(row)
                    print(_format_row(row), flush=True)
    return rows


HEADER = f"{'problem':8} {'optimizer':9} {'setting':28} {'start':>9} {'final':>9} {'ratio':>7} {'acc':>5} {'skip':>4} {'rev':>4} {'cpu s':>6}"


def _format_row(r: dict[str, Any]) -> str:
    acc = f"{r['accuracy']:.3f}" if "accuracy" in r else ""
    final = "DIVERGED" if r["diverged"] else f"{r['final']:.4g}"
    return (f"{r['problem']:8} {r['optimizer']:9} {r['setting']:28} {r['start']:9.4g} {final:>9} {r['ratio']:7.3f} "
            f"{acc:>5} {r['skipped']:4d} {r['reverted']:4d} {r['cpu_s']:6.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated subset of " + ",".join(PROBLEMS))
    p.add_argument("--optimizers", default=",".join(CANDIDATES), help="comma-separated subset of " + ",".join(CANDIDATES))
    p.add_argument("--no-warm", action="store_true", help="skip the warm-started runs of the defaults")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    problems = [s for s in args.problems.split(",") if s]
    optimizers = [s for s in args.optimizers.split(",") if s]
    for name in problems:
        if name not in PROBLEMS:
            p.error(f"unknown problem {name!r}")
    for name in optimizers:
        if name not in CANDIDATES:
            p.error(f"unknown optimizer {name!r}")
    print(HEADER, flush=True)
    rows = study(problems, optimizers, warm_defaults=not args.no_warm)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
