"""The deep-autoencoder experiments of Goldfarb, Ren & Bahamou (NeurIPS 2020) from the command line.

Usage (from the repository root)::

    python -m benchmarks.autoencoder --preset quick --out /tmp/quick
    python -m benchmarks.autoencoder --dataset curves --optimizers kbfgs,kfac,adam --epochs 20 \\
        --batch-size 1000 --device cpu --seed 9999 --out runs/curves [--data-dir DIR] \\
        [--preset quick|paper|tiny] [--config FILE.json] [--set kbfgs.lr=0.3 --set kfac.damping=3] \\
        [--grid [--grid-set adam.lr=1e-5:1e-2 --grid-set kbfgs.damping=0.1,0.3,1]] [--resume]
    python -m benchmarks.autoencoder --dataset mnist --data-dir ../shared/data/mnist \\
        --mnist-test-as-train --preset tiny --out /tmp/mnist-smoke

Data-parallel (one process per rank; gloo on CPU, NCCL with ``--device cuda``)::

    torchrun --nproc_per_node 2 -m benchmarks.autoencoder --preset tiny --optimizers kbfgs,kfac --out /tmp/ddp

Optimizers: kbfgs, kbfgsl, kfac, adam, rmsprop, sgdm (the default: all six), and the matrix-free
hf, sfn, lm (Hessian-free, saddle-free Newton, Levenberg–Marquardt; opt-in). ``--set`` and
``--grid-set`` may repeat; ``--list-settings`` prints every optimizer's settings and defaults.
Presets: ``tiny`` (CI: CURVES 2000/1000, 1 epoch, batch 500), ``quick`` (reduced CURVES, about
5 minutes on a 2-core CPU for all six optimizers), ``paper`` (full data, batch 1000, 100 epochs; the
default). See :mod:`benchmarks.experiment` for the conventions (warm starts outside the timed
budget, per-epoch shuffling with a seeded generator, L2-regularised losses over the whole sets,
CPU and wall-clock times) and the output files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks.experiment.config import PRESETS, build_config
from benchmarks.experiment.experiment import run_experiment
from benchmarks.experiment.parallel import setup_parallel
from benchmarks.experiment.settings import OPTIMIZERS, iter_settings_fields
from benchmarks.models import PAPER_SEED

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.autoencoder",
        description="Train the MNIST/FACES/CURVES autoencoders with K-BFGS, K-BFGS(L), KFAC, Adam, RMSprop "
                    "and SGD-m as in Goldfarb, Ren & Bahamou (2020), and compare them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # every experiment option defaults to None so that only explicit flags override preset/config
    p.add_argument("--dataset", choices=("curves", "mnist", "faces"), help="benchmark (default curves)")
    p.add_argument("--optimizers", help=f"comma-separated subset of {','.join(OPTIMIZERS)} "
                                        "(default: the paper's six; hf, sfn, lm are opt-in)")
    p.add_argument("--epochs", type=int, help="epoch budget (default 100, the authors' max_epoch)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="minibatch size N (default 1000)")
    p.add_argument("--device", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--seed", type=int, help=f"model/shuffling/sampling seed (default {PAPER_SEED})")
    p.add_argument("--out", default="results/autoencoder", help="output directory (default results/autoencoder)")
    p.add_argument("--data-dir", dest="data_dir",
                   help="MNIST IDX files / FACES newfaces_rot_single.mat / CURVES digs3pts_1.mat or generator cache")
    p.add_argument("--preset", choices=tuple(PRESETS), help="tiny (CI), quick (~5 min CPU) or paper (default)")
    p.add_argument("--config", help="JSON config file (keys of ExperimentConfig, 'settings', 'grid_values')")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="OPT.KEY=VALUE",
                   help="override one optimizer setting, e.g. kbfgs.lr=0.3 (repeatable)")
    p.add_argument("--grid", action="store_const", const=True, help="grid search, select by final train loss")
    p.add_argument("--grid-set", dest="grid_sets", action="append", default=[], metavar="OPT.KEY=VALUES",
                   help="grid values: 'a,b,c' or a 1-3-10 range 'lo:hi' (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoints")
    p.add_argument("--n-train", dest="n_train", type=int, help="training images (default: the whole split)")
    p.add_argument("--n-test", dest="n_test", type=int, help="test images (default: the whole split)")
    p.add_argument("--max-time", dest="max_time", type=float,
                   help="stop a run after this many seconds of training CPU time (the authors' max_cpu_time)")
    p.add_argument("--target", type=float, help="target train loss for time-to-target (default: the best first-order "
                   "method's final train loss; without one, the worst final x1.05)")
    p.add_argument("--divergence-factor", dest="divergence_factor", type=float,
                   help="stop a run as diverged above this multiple of its initial train loss "
                        "(default 1000; inf: never)")
    p.add_argument("--tau", type=float, help="L2 coefficient of the reported losses (default 1e-5)")
    p.add_argument("--widths", type=lambda s: [int(v) for v in s.split(",")],
                   help="custom layer widths, e.g. 784,64,8,64,784 (default: the paper's network)")
    p.add_argument("--curves-seed", dest="curves_seed", type=int, help="seed of the synthetic CURVES generator")
    p.add_argument("--mnist-test-as-train", dest="mnist_test_as_train", action="store_const", const=True,
                   help="MNIST smoke run from the 10k test split only (first n_train train, last n_test test)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                   help="do not write per-epoch checkpoints (no --resume possible)")
    p.add_argument("--list-settings", action="store_true", help="print every optimizer's settings and exit")
    return p


_CLI_KEYS = ("dataset", "optimizers", "epochs", "batch_size", "device", "seed", "data_dir", "grid", "n_train",
             "n_test", "max_time", "target", "divergence_factor", "tau", "widths", "curves_seed",
             "mnist_test_as_train", "threads")


def _list_settings() -> str:
    lines = []
    for name, cls in OPTIMIZERS.items():
        fields = ", ".join(f"{k}={v!r}" for k, v in iter_settings_fields(name))
        lines.append(f"{name:8s} ({cls.LABEL}; tuned: {', '.join(cls.TUNED)}): {fields}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_settings:
        print(_list_settings())
        return 0
    cli = {k: getattr(args, k) for k in _CLI_KEYS}
    try:
        cfg = build_config(preset=args.preset, config_file=args.config, cli=cli, sets=args.sets,
                           grid_sets=args.grid_sets)
        parallel = setup_parallel(cfg.device)  # torchrun --nproc_per_node N: data-parallel ranks
        run_experiment(cfg, args.out, resume=args.resume, progress=args.progress, checkpoint=args.checkpoint,
                       parallel=parallel)
    except ValueError as exc:  # configuration and dataset errors (DatasetError is a ValueError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
