r"""``python -m convergence check``: train with the monitor on, run E0 and the checks E1-E8, report.

Usage::

    python -m convergence check --problem {least-squares,logistic,softmax,mlp,mnist | MODULE:FUNCTION}
        [--optimizer {kbfgs,kbfgsl,kfac,diagonal,hf,sfn,lm}] [--steps N] [--batch-size B]
        [--lr LR] [--damping LAMBDA] [--beta BETA] [--device {cpu,cuda}] [--seed S] --out DIR
        [--data-dir DIR] [--mnist-examples N] [--theory-mode | --no-theory-mode]
        [--checks E1,E2,...] [--checkpoints C] [--rate-seeds S] [--descent-batches R] [--alpha A]
        [--max-skip-fraction F] [--plateau | --no-plateau] [--no-progress] [--no-plots]

What it does:

1. builds the problem -- a built-in one (float64; ``mnist`` is softmax regression on the first
   ``--mnist-examples`` images of the real MNIST *test* split, from ``--data-dir``, default
   ``../shared/data/mnist`` next to the checkout), or the user's own through ``MODULE:FUNCTION``: a
   function returning a :class:`convergence.problems.Problem` or a dict with ``model``, ``loss_fn``,
   ``data`` (a data set or a ``DataLoader``) and optionally ``make_optimizer``, ``make_closure``,
   ``lipschitz``, ``batch_size`` -- and the optimizer (``--optimizer``, unless the entry point gives
   ``make_optimizer``); in theory mode (the default) with ``momentum=0, weight_decay=0,
   lag_factors=True`` and an i.i.d. with-replacement sampler, otherwise with the optimizer's defaults
   and a shuffling ``DataLoader`` -- the report then lists the theory-mode violations. The
   matrix-free optimizers ``hf`` (Hessian-free), ``sfn`` (saddle-free Newton) and ``lm``
   (Levenberg-Marquardt) take the problem's loss, get their batch targets through the closures
   (:mod:`convergence.whole_model`) and in theory mode run without CG warm start (``hf``) and without
   momentum or uphill acceptance (``lm``); E4 checks the dense operator their step solved with for
   ``hf``/``lm`` (NOT_APPLICABLE for ``sfn``: its ``|H|^-1`` is not a quasi-Newton H_k), E5 is
   NOT_APPLICABLE for all three (the operator is built from the step's own batch);
2. trains and checks with :func:`convergence.harness.run_harness` (see there: the gradient tap for
   E2, the recorded batches for E3, the applied-operator probes for E4, every check under its own
   guard, E0 run health first, Holm-Bonferroni at family-wise ``--alpha``);
3. prints the verdict table (a loud banner first when E0 FAILs) and writes ``report.json`` and the
   PNGs ``spectrum_bounds.png``, ``gradient_norms.png``, ``damping.png`` (curvature optimizers) and
   ``hessian_density.png`` into ``--out``.

Exit status:

* **0** -- every selected check ran and none FAILed (PASS, NOT_APPLICABLE or INCONCLUSIVE);
* **1** -- at least one check FAILed, E0 (run health) included; the report is complete;
* **2** -- the run could not be made (invalid arguments, missing data, a bad entry point) or a check
  raised (its row is ERROR, the others still ran; the report is written when possible).
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from convergence.harness import CHECKS  # E1..E8 (E0 always runs)

__all__ = ["CHECKS", "OPTIMIZERS", "MATRIX_FREE", "PROBLEMS", "build_parser", "parse_args", "build_problem", "build_optimizer",
           "make_loader", "run", "main"]

OPTIMIZERS = ("kbfgs", "kbfgsl", "kfac", "diagonal", "hf", "sfn", "lm")
#: the whole-model matrix-free optimizers (convergence.whole_model)
MATRIX_FREE = ("hf", "sfn", "lm")
PROBLEMS = ("least-squares", "logistic", "softmax", "mlp", "mnist")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"


class CLIError(RuntimeError):
    """An error the CLI reports as ``error: ...`` with exit status 2 (the run could not be made)."""


# ========================================================================================= arguments
def _argument(convert, accept, expected: str):
    """An argparse ``type``: ``convert`` the text, then require ``accept(value)``; errors say what was expected."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _argument(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _argument(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _argument(float, lambda v: v > 0 and math.isfinite(v), "a positive finite number")
_beta = _argument(float, lambda v: 0.0 <= v <= 1.0, "beta must be in [0, 1] (alpha_k = lr (k+1)^-beta)")
_probability = _argument(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
_fraction = _argument(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def _problem(text: str) -> str:
    if text in PROBLEMS or (":" in text and all(text.partition(":")[::2])):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(PROBLEMS)}, or MODULE:FUNCTION)")


def _checks(text: str) -> tuple[str, ...]:
    items = [t.strip().upper() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("--checks needs at least one of " + ",".join(CHECKS))
    unknown = [t for t in items if t not in CHECKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown check(s) {', '.join(unknown)}; choose from {','.join(CHECKS)}")
    return tuple(c for c in CHECKS if c in items)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convergence",
        description="Empirical checks of the stochastic quasi-Newton convergence assumptions on a training run.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser(
        "check",
        help="train with the monitor on, run the checks E1-E8 and write the report",
        description="Train with the monitor on, run the checks, print the verdict table and write report.json "
                    "and PNG plots into --out. Exit status 0 when every selected check ran and none FAILed, "
                    "1 when a check (E0 run health included) FAILed, 2 when the run could not be made "
                    "(invalid arguments, missing data, a bad entry point) or a check raised (ERROR row).",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="the optimizer (required unless a --problem entry point returns make_optimizer)")
    p.add_argument("--problem", required=True, type=_problem,
                   help=f"one of {', '.join(PROBLEMS)}, or MODULE:FUNCTION, a Python entry point returning a "
                        "convergence.problems.Problem or a dict with model, loss_fn, data [, make_optimizer, "
                        "make_closure, lipschitz, batch_size]")
    p.add_argument("--steps", type=_positive_int, default=60, help="training steps (default 60)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="minibatch size m (default: an entry point's batch_size, else 16)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="base learning rate; alpha_k = lr (k+1)^-beta (default: 0.2 for K-BFGS, 0.1 for kfac, 0.05 "
                        "for diagonal, 1 for hf, sfn, lm; an entry point's own optimizer keeps its lr)")
    p.add_argument("--damping", type=_positive_float, default=None,
                   help="damping lambda (default: 0.3 for K-BFGS, 1.0 for kfac, diagonal and hf, 0.01 for sfn, "
                        "0.001 for lm; for hf/sfn/lm the initial value of the adaptive damping)")
    p.add_argument("--beta", type=_beta, default=0.0, help="step-size decay exponent in [0, 1] (default 0: constant)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train and check (default cpu)")
    p.add_argument("--seed", type=_nonnegative_int, default=0,
                   help="seed of the problem (data, initialization) and of the samplers (default 0)")
    p.add_argument("--out", required=True, type=Path, help="output directory for report.json and the PNGs")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"MNIST directory (IDX files of the test split; default {DEFAULT_MNIST_DIR})")
    p.add_argument("--mnist-examples", type=_positive_int, default=2000,
                   help="number of MNIST test images defining f (default 2000)")
    p.add_argument("--theory-mode", action=argparse.BooleanOptionalAction, default=True,
                   help="momentum 0, weight decay 0, lagged factors, i.i.d. with-replacement sampling (default on)")
    p.add_argument("--checks", type=_checks, default=CHECKS, help="comma-separated subset of E1..E8 (default all; "
                   "E0, run health, always runs)")
    p.add_argument("--checkpoints", type=_positive_int, default=3, help="snapshot steps for E1, E3, E5-E7 (default 3)")
    p.add_argument("--probe-every", type=_positive_int, default=None,
                   help="steps between E4's probes of the applied operator (default max(1, steps // 10))")
    p.add_argument("--rate-seeds", type=_positive_int, default=8, help="independent runs for E8 (default 8)")
    p.add_argument("--descent-batches", type=_positive_int, default=64, help="R of E6 and E5c (default 64)")
    p.add_argument("--alpha", type=_probability, default=0.01, help="family-wise level of Holm-Bonferroni (default 0.01)")
    p.add_argument("--max-skip-fraction", type=_fraction, default=0.1,
                   help="E0 fails when more than this fraction of steps is skipped or reverted (default 0.1)")
    p.add_argument("--plateau", action=argparse.BooleanOptionalAction, default=True,
                   help="E8p: compare the constant-step noise floor at batch sizes m and 4m (default on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="write report.json only (no PNGs)")
    parser.set_defaults(check_parser=p)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-validate the arguments (``parser.error`` exits with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check = args.check_parser
    del args.check_parser
    if args.device == "cuda" and not torch.cuda.is_available():
        check.error("--device cuda was requested but no CUDA device is available")
    if args.data_dir is not None and args.problem != "mnist":
        check.error("--data-dir only applies to --problem mnist")
    if args.optimizer is None and ":" not in args.problem:
        check.error(f"--problem {args.problem} needs --optimizer ({', '.join(OPTIMIZERS)})")
    if "E8" in args.checks and args.rate_seeds < 2:
        check.error("E8 needs --rate-seeds >= 2 (the protocol asks for >= 8)")
    if "E8" in args.checks and args.steps < 4:
        check.error("E8 needs --steps >= 4 to fit a tail slope")
    if args.descent_batches < 2 and ("E6" in args.checks or "E5" in args.checks):
        check.error("--descent-batches must be >= 2")
    return args


# ========================================================================================= building
def _mnist_problem(data_dir: Path, examples: int, seed: int, device: torch.device):
    from convergence.problems import Problem, mean_cross_entropy

    try:
        from benchmarks.data.mnist import load_mnist
    except ImportError:  # the benchmarks package lives beside the installed packages, at the repo root
        if (REPO_ROOT / "benchmarks").is_dir() and str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        from benchmarks.data.mnist import load_mnist
    from benchmarks.data.errors import DatasetError

    try:
        images, labels = load_mnist(data_dir, "test")
    except DatasetError as exc:
        raise CLIError(f"{exc} (pass --data-dir DIR with the MNIST test split: t10k-images-idx3-ubyte.gz and "
                       "t10k-labels-idx1-ubyte.gz)") from None
    if examples > images.shape[0]:
        raise CLIError(f"--mnist-examples {examples} exceeds the {images.shape[0]} images of the test split")
    x = images[:examples].to(dtype=torch.float64)
    y = labels[:examples]
    gen = torch.Generator().manual_seed(seed + 7919)
    model = nn.Linear(x.shape[1], 10, dtype=torch.float64)
    bound = 1.0 / math.sqrt(x.shape[1])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.empty(p.shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen))
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    lipschitz = float(torch.linalg.eigvalsh(xb.T @ xb / x.shape[0])[-1]) / 2.0  # softmax: S_i <= I/2
    model = model.to(device)
    dataset = TensorDataset(x.to(device), y.to(device))
    return Problem("mnist_softmax", model, mean_cross_entropy, dataset, lipschitz)


def build_problem(name: str, *, seed: int = 0, device: torch.device | str = "cpu", data_dir: Path | None = None,
                  mnist_examples: int = 2000):
    """The :class:`convergence.problems.Problem` for a CLI problem name (float64)."""
    from convergence import problems

    device = torch.device(device)
    if name == "least-squares":
        return problems.least_squares(n=256, d=5, seed=seed, device=device)
    if name == "logistic":
        return problems.logistic_regression(n=256, d=5, seed=seed, device=device)
    if name == "softmax":
        return problems.softmax_regression(n=256, d=5, classes=3, seed=seed, device=device)
    if name == "mlp":
        return problems.tanh_mlp(n=256, d=4, hidden=6, outputs=2, seed=seed, device=device)
    if name == "mnist":
        return _mnist_problem(data_dir or DEFAULT_MNIST_DIR, mnist_examples, seed, device)
    raise ValueError(f"unknown problem {name!r}; choose from {PROBLEMS}")


DEFAULT_LR = {"kbfgs": 0.2, "kbfgsl": 0.2, "kfac": 0.1, "diagonal": 0.05, "hf": 1.0, "sfn": 1.0, "lm": 1.0}
#: diagonal: damping 1e-3 (the old default) lets 1/(v + 1e-3) reach ~1e3 on rarely-excited weights and the
#: run diverged (loss 0.49 -> 5,803 on mlp); with 1.0 the operator is bounded by 1 and the run trains.
#: hf, sfn, lm: the optimizers' own initial damping (HF: Martens's adaptive lambda from 1; LM: Marquardt's 1e-3).
DEFAULT_DAMPING = {"kbfgs": 0.3, "kbfgsl": 0.3, "kfac": 1.0, "diagonal": 1.0, "hf": 1.0, "sfn": 1e-2, "lm": 1e-3}


def build_optimizer(name: str, model: nn.Module, *, lr: float, damping: float, theory_mode: bool, seed: int = 0,
                    loss_fn=None):
    """The optimizer; in theory mode with :func:`convergence.monitor.theory_mode_kwargs` (for the matrix-free
    ones: no CG warm start for ``hf``, no momentum or uphill acceptance for ``lm``). ``loss_fn`` is needed by
    ``hf``, ``sfn`` and ``lm`` (their curvature products)."""
    from convergence.monitor import theory_mode_kwargs
    from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer, diagonal_block

    if name in MATRIX_FREE:
        from optimizers import HessianFree, LevenbergMarquardt, SaddleFreeNewton

        if loss_fn is None:
            raise ValueError(f"--optimizer {name} needs the problem's loss_fn")
        if name == "hf":
            return HessianFree(model, loss_fn, lr=lr, damping=damping, **({"cg_decay": 0.0} if theory_mode else {}))
        if name == "sfn":
            return SaddleFreeNewton(model, loss_fn, lr=lr, damping=damping)
        return LevenbergMarquardt(model, loss_fn, lr=lr, damping=damping,
                                  **({"momentum": False, "uphill": False} if theory_mode else {}))
    extra = theory_mode_kwargs() if theory_mode else {}
    if name == "kbfgs":
        return KBFGS(model, lr=lr, damping=damping, seed=seed, **extra)
    if name == "kbfgsl":
        return KBFGSL(model, lr=lr, damping=damping, seed=seed, **extra)
    if name == "kfac":
        return KFAC(model, lr=lr, damping=damping, seed=seed, **extra)
    if name == "diagonal":
        kw = {"momentum": 0.9, "weight_decay": 1e-5, "lag_factors": False}
        kw.update(extra)
        return CurvatureOptimizer(model, lr, {nn.Linear: diagonal_block()}, damping=damping, seed=seed, **kw)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def make_loader(dataset, batch_size: int, theory_mode: bool, seed: int, num_batches: int) -> DataLoader:
    """The training loader: i.i.d. with replacement in theory mode, shuffled epochs otherwise."""
    from convergence.monitor import iid_loader

    gen = torch.Generator().manual_seed(int(seed))
    if batch_size > len(dataset):
        raise CLIError(f"--batch-size {batch_size} exceeds the {len(dataset)} examples of the problem")
    if theory_mode:
        return iid_loader(dataset, batch_size, gen, num_samples=batch_size * max(1, num_batches))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False)


# ============================================================================================ driver
def _source(args: argparse.Namespace):
    """The harness :class:`~convergence.harness.Source` for the parsed arguments."""
    from convergence.api import entry_point_fields, load_entry_point, make_source
    from convergence.harness import Source

    device = torch.device(args.device)
    if ":" in args.problem:
        fields = entry_point_fields(load_entry_point(args.problem)())
        make_opt = fields.get("make_optimizer")
        args.lr_used = args.lr  # None: the optimizer's own lr
        if make_opt is None:
            if args.optimizer is None:
                raise CLIError(f"--problem {args.problem} returns no make_optimizer: pass --optimizer")
            lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
            damping = args.damping if args.damping is not None else DEFAULT_DAMPING[args.optimizer]
            args.damping_used, args.lr_used = damping, lr

            def make_opt(model, lr=lr, damping=damping, loss_fn=fields["loss_fn"]):
                return build_optimizer(args.optimizer, model, lr=lr, damping=damping, theory_mode=args.theory_mode,
                                       seed=args.seed, loss_fn=loss_fn)
        batch = args.batch_size or fields.get("batch_size") or 16
        return make_source(fields["model"], fields["loss_fn"], fields["data"], make_opt, batch_size=batch,
                           lipschitz=fields.get("lipschitz"), device=device, make_closure=fields.get("make_closure"),
                           make_loader=fields.get("make_loader"), name=fields.get("name", args.problem))
    if args.optimizer is None:
        raise CLIError(f"--problem {args.problem} needs --optimizer ({', '.join(OPTIMIZERS)})")
    problem = build_problem(args.problem, seed=args.seed, device=device, data_dir=args.data_dir,
                            mnist_examples=args.mnist_examples)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    damping = args.damping if args.damping is not None else DEFAULT_DAMPING[args.optimizer]
    args.damping_used, args.lr_used = damping, lr
    args.batch_size = args.batch_size or 16
    if args.batch_size > len(problem.dataset):
        raise CLIError(f"--batch-size {args.batch_size} exceeds the {len(problem.dataset)} examples of the problem")

    def make_opt(model):
        return build_optimizer(args.optimizer, model, lr=lr, damping=damping, theory_mode=args.theory_mode,
                               seed=args.seed, loss_fn=problem.loss_fn)

    def loader(seed: int, batch_size: int, num_batches: int):
        return make_loader(problem.dataset, batch_size, args.theory_mode, seed, num_batches)

    return Source(problem, make_opt, args.batch_size, make_loader=loader, theory_mode=args.theory_mode,
                  name=args.problem)


def run(args: argparse.Namespace, *, stdout=None) -> int:
    """Run the ``check`` command for parsed ``args``; returns the exit status (0 / 1 / 2)."""
    from convergence.harness import HarnessConfig, run_harness
    from convergence.report import write_json

    stdout = stdout if stdout is not None else sys.stdout
    torch.manual_seed(args.seed)
    source = _source(args)
    config = HarnessConfig(steps=args.steps, checks=args.checks, lr=args.lr_used, beta=args.beta, seed=args.seed,
                           checkpoints=args.checkpoints, rate_seeds=args.rate_seeds,
                           descent_batches=args.descent_batches, alpha=args.alpha,
                           max_skip_fraction=args.max_skip_fraction, plateau=args.plateau,
                           probe_every=args.probe_every or 0, progress=not args.no_progress)
    report = run_harness(source, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else _plots(report, source, out, args.seed)
    meta = dict(report.meta)
    meta.update({"command": "check", "optimizer": args.optimizer, "problem": args.problem,
                 "damping": getattr(args, "damping_used", None), "device": str(args.device),
                 "exit_status": report.exit_status})
    write_json(out / "report.json", report.results, meta=meta, theory_mode=report.theory_mode,
               violations=report.violations, plots=[p.name for p in plots],
               extra={"gradient_norm_sq": {"steps": report.trace.grad_steps, "main_run": report.trace.grad_norm_sq,
                                           "alpha": report.trace.lrs},
                      "monitor": None if report.monitor is None else {
                          "records": len(report.monitor.records), "spectrum": report.monitor.spectrum_series()},
                      "whole_model": None if report.whole_model is None else report.whole_model.to_json()})
    name = args.optimizer or meta.get("optimizer")
    damping = getattr(args, "damping_used", None)
    title = (f"{name} on {args.problem}: {args.steps} steps, batch {source.batch_size}, lr {meta['lr']:g}"
             + (f", damping {damping:g}" if damping is not None else "") + f", beta {args.beta:g}, seed {args.seed}")
    from convergence.report import print_table

    print_table(report.results, theory_mode=report.theory_mode, violations=report.violations, title=title, file=stdout)
    print(f"report: {out / 'report.json'}; plots: {', '.join(p.name for p in plots)}", file=stdout)
    status = report.exit_status
    print(f"exit status {status}: " + {0: "every check ran, none FAILed", 1: "a check FAILed (see above)",
                                       2: "a check raised an error"}[status], file=stdout)
    if report.errors:
        print("errors: " + "; ".join(report.errors), file=sys.stderr)
    return status


def _plots(report, source, out: Path, seed: int) -> list[Path]:
    from convergence.checks.variance import loaded_parameters
    from convergence.report import (damping_series, plot_damping, plot_gradient_norms, plot_hessian_density,
                                    plot_spectrum_bounds)

    plots: list[Path] = []
    trace, monitor = report.trace, report.monitor
    try:
        if monitor is not None:
            plots.append(plot_spectrum_bounds(out / "spectrum_bounds.png", monitor.spectrum_series(),
                                              theory=report.extra.get("e4_series")))
        rate = next((r for r in report.results if r.check == "E8"), None)
        rows = report.extra.get("rate_rows", [trace.grad_norm_sq])
        finite = all(np.all(np.isfinite(r)) for r in rows)
        if finite:
            plots.append(plot_gradient_norms(
                out / "gradient_norms.png", trace.grad_steps, np.array(rows), beta=report.meta["beta"],
                running_mean=rate.evidence.get("G_N") if rate is not None and "G_N" in rate.evidence
                else _single_running_mean(trace),
                bound=(rate.evidence.get("bound", {}).get("U_N_curve") if rate is not None else None)))
        if monitor is not None:
            plots.append(plot_damping(out / "damping.png", damping_series(monitor.records)))
        final = report.extra.get("final_state")
        if final is not None and bool(torch.isfinite(final).all()):
            with loaded_parameters(source.problem.model, final):
                slq, extremes = _hessian_spectrum(source.problem, seed)
            plots.append(plot_hessian_density(out / "hessian_density.png", slq, lambda_min=extremes[0],
                                              lambda_max=extremes[1]))
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; the report stands without them
        report.errors.append(f"plots: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
    return plots


def _single_running_mean(trace) -> dict[str, list[float]]:
    from convergence.checks.rate import running_average

    mean = running_average(trace.grad_steps, np.array(trace.grad_norm_sq)).tolist()
    return {"mean": mean, "ci_low": mean, "ci_high": mean}


def _hessian_spectrum(problem, seed: int):
    """SLQ density of the full-batch Hessian, and its extreme eigenvalues (both ends for small models;
    only lambda_max otherwise: ARPACK's smallest-algebraic mode stalls on singular Hessians)."""
    from convergence.hessian import HessianOperator
    from convergence.sharpness import sharpness
    from convergence.spectrum import extreme_eigenvalues, slq_density

    x, y = problem.full_batch
    op = HessianOperator(problem.model, problem.loss_fn, x, y)
    slq = slq_density(op, op.n, min(op.n, 40), 2, seed=seed)
    if op.n <= 400:
        eig = extreme_eigenvalues(op, op.n, dense_threshold=400)
        return slq, (eig.lambda_min, eig.lambda_max)
    return slq, (None, sharpness(op, op.n, tol=1e-6, seed=seed))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m convergence``; returns the exit status (0 / 1 / 2, see the module docstring)."""
    from convergence.harness import HarnessError

    args = parse_args(argv)
    try:
        return run(args)
    except (CLIError, HarnessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
