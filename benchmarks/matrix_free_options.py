r"""Measure the options of the matrix-free methods on an autoencoder: CG iterations, final loss, time.

Usage::

    python -m benchmarks.matrix_free_options --preset tiny --epochs 3 --variants hf,hf-martens,lm,lm-maxdiag

Each variant trains the preset's autoencoder (same initial weights, same minibatch sequence) for
``--epochs`` epochs and reports the mean number of CG iterations per step, the final training loss
(the experiment's evaluation, with the L2 term), the median wall time per step, the curvature
products and the rejected steps. Variants:

* ``hf`` / ``hf-martens`` -- :class:`~optimizers.HessianFree` with plain CG / Martens's diagonal
  preconditioner (the ``hf`` benchmark settings otherwise);
* ``lm`` / ``lm-maxdiag`` -- :class:`~optimizers.LevenbergMarquardt` with λI / maximum-diagonal
  damping λD_k (``diagonal_samples`` from the ``lm`` settings: 1 Monte-Carlo vector per example).

This is the measurement behind the defaults ``preconditioner=None`` and
``damping_matrix="identity"`` (README, "Matrix-free second-order methods").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.experiment.config import build_config
from benchmarks.experiment.datasets import DataBundle, load_data
from benchmarks.experiment.runner import build_model, evaluate
from benchmarks.experiment.settings import OPTIMIZERS, BuildContext
from benchmarks.models import likelihood_for, loss_for

__all__ = ["VARIANTS", "run_variant", "main"]

#: variant -> (optimizer, settings overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "hf": ("hf", {}),
    "hf-martens": ("hf", {"preconditioner": "martens"}),
    "lm": ("lm", {}),
    "lm-maxdiag": ("lm", {"damping_matrix": "max_diagonal"}),
}


def run_variant(cfg, data: DataBundle, variant: str, epochs: int) -> dict[str, Any]:
    """Train ``variant`` for ``epochs`` epochs of ``cfg``'s minibatches on ``data``; return the figures."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    name, overrides = VARIANTS[variant]
    settings = OPTIMIZERS[name](**overrides)
    loss_fn, likelihood = loss_for(cfg.dataset), likelihood_for(cfg.dataset)
    model = build_model(cfg)
    opt = settings.build(model, BuildContext(likelihood=likelihood, loss_fn=loss_fn, seed=cfg.seed))
    gen = torch.Generator().manual_seed(cfg.seed)
    train = data.train.to(cfg.device)
    n, batch = train.shape[0], cfg.batch_size
    cg: list[int] = []
    ms: list[float] = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(train.device)
        for j in range(n // batch):
            xb = train.index_select(0, perm[j * batch:(j + 1) * batch])

            def closure(xb: torch.Tensor = xb) -> torch.Tensor:
                opt.zero_grad()
                loss = loss_fn(model(xb), xb)
                loss.backward()
                return loss

            t0 = time.perf_counter()
            opt.step(closure)
            ms.append(1e3 * (time.perf_counter() - t0))
            cg.append(int(opt.last_step.details.get("cg_iterations", 0)))
    final, _ = evaluate(model, train, batch, loss_fn, likelihood, cfg.tau)
    return {"variant": variant, "steps": len(cg), "mean_cg_iterations": sum(cg) / max(len(cg), 1),
            "cg_iterations": cg, "final_train_loss": float(final), "ms_per_step_median": statistics.median(ms),
            "products": int(opt.counters["products"]), "rejected_steps": int(opt.counters["rejected_steps"])}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.matrix_free_options", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=("tiny", "quick"), help="experiment preset (default tiny)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per variant (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = build_config(preset=args.preset)
    data = load_data(cfg)
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        print(json.dumps(run_variant(cfg, data, variant, args.epochs)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
