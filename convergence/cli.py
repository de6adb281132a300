r"""``python -m convergence check``: train with the monitor on, run the checks E1-E8, report.

Usage::

    python -m convergence check --optimizer {kbfgs,kbfgsl,kfac,diagonal}
        --problem {least-squares,logistic,softmax,mlp,mnist} --steps N --batch-size B
        [--lr LR] [--damping LAMBDA] [--beta BETA] [--device {cpu,cuda}] [--seed S] --out DIR
        [--data-dir DIR] [--mnist-examples N] [--theory-mode | --no-theory-mode]
        [--checks E1,E2,...] [--checkpoints C] [--rate-seeds S] [--unbiased-batches R]
        [--variance-batches R] [--descent-batches R] [--alpha A] [--no-progress]

What it does:

1. builds the problem (float64; ``mnist`` is softmax regression on the first ``--mnist-examples``
   images of the real MNIST *test* split, loaded with :func:`benchmarks.data.mnist.load_mnist`
   from ``--data-dir``, default ``../shared/data/mnist`` next to the checkout) and the optimizer;
   in theory mode (the default) with ``momentum=0, weight_decay=0, lag_factors=True`` and an
   i.i.d. with-replacement sampler (:func:`convergence.monitor.iid_loader`), otherwise with the
   optimizer's defaults and a shuffling ``DataLoader`` -- the report then lists the theory-mode
   violations (:func:`convergence.monitor.theory_mode_violations`);
2. trains ``--steps`` steps with :class:`~convergence.monitor.TrainingMonitor` attached (a tqdm
   progress bar), with :math:`\alpha_k = \text{lr}\,(k+1)^{-\beta}`; records
   :math:`\|\nabla f(x_k)\|^2` (full batch), and freezes snapshots (model, optimizer, RNG) at
   ``--checkpoints`` steps spread over the run;
3. runs the selected checks at the snapshots (E2, E3, E5, E6 and E7d per snapshot; E1 on the
   snapshot iterates; E4, E7a-c on the monitor's records; E8 over ``--rate-seeds`` independent
   runs), applies Holm–Bonferroni at family-wise ``--alpha`` (default 0.01) across the
   statistical results (:func:`convergence.multiple.holm_adjust`);
4. prints the verdict table and writes ``report.json`` and the PNGs ``spectrum_bounds.png``,
   ``gradient_norms.png``, ``damping.png`` and ``hessian_density.png`` into ``--out``.

Exit status: **0 when the run completed, whatever the verdicts** (a FAIL is a finding about the
optimizer or the data pipeline, not an error of the tool; read ``report.json``'s ``summary``
or the table to act on it); 1 on a runtime error (missing data, a check that raised -- the
report is still written when possible, with that check INCONCLUSIVE and the error in its
evidence); 2 on invalid arguments (argparse).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from convergence.results import CheckResult, Verdict

__all__ = ["CHECKS", "OPTIMIZERS", "PROBLEMS", "build_parser", "parse_args", "build_problem", "build_optimizer",
           "make_loader", "run", "main"]

CHECKS = ("E1", "E2", "E3", "E4", "E5", "E6", "E7", "E8")
OPTIMIZERS = ("kbfgs", "kbfgsl", "kfac", "diagonal")
PROBLEMS = ("least-squares", "logistic", "softmax", "mlp", "mnist")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"


class CLIError(RuntimeError):
    """An error the CLI reports as ``error: ...`` with exit status 1."""


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
                    "and PNG plots into --out. Exit status 0 whenever the run completes (FAIL verdicts "
                    "included), 1 on runtime errors, 2 on invalid arguments.",
    )
    p.add_argument("--optimizer", required=True, choices=OPTIMIZERS)
    p.add_argument("--problem", required=True, choices=PROBLEMS)
    p.add_argument("--steps", type=_positive_int, default=60, help="training steps (default 60)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="minibatch size m (default 16)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="base learning rate; alpha_k = lr (k+1)^-beta (default: 0.1 for kfac/diagonal, 0.2 for K-BFGS)")
    p.add_argument("--damping", type=_positive_float, default=None,
                   help="damping lambda (default: 0.3 for K-BFGS, 1.0 for kfac, 1e-3 for diagonal)")
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
    p.add_argument("--checks", type=_checks, default=CHECKS, help="comma-separated subset of E1..E8 (default all)")
    p.add_argument("--checkpoints", type=_positive_int, default=3, help="snapshot steps for E1-E3, E5-E7 (default 3)")
    p.add_argument("--rate-seeds", type=_positive_int, default=8, help="independent runs for E8 (default 8)")
    p.add_argument("--unbiased-batches", type=_positive_int, default=500, help="R of E2 (default 500)")
    p.add_argument("--variance-batches", type=_positive_int, default=200, help="R per batch size of E3 (default 200)")
    p.add_argument("--descent-batches", type=_positive_int, default=64, help="R of E6 (default 64)")
    p.add_argument("--alpha", type=_probability, default=0.01, help="family-wise level of Holm-Bonferroni (default 0.01)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    if "E8" in args.checks and args.rate_seeds < 2:
        check.error("E8 needs --rate-seeds >= 2 (the protocol asks for >= 8)")
    if "E8" in args.checks and args.steps < 4:
        check.error("E8 needs --steps >= 4 to fit a tail slope")
    if args.unbiased_batches < 3 and "E2" in args.checks:
        check.error("--unbiased-batches must be >= 3")
    if args.variance_batches < 2 and "E3" in args.checks:
        check.error("--variance-batches must be >= 2")
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


DEFAULT_LR = {"kbfgs": 0.2, "kbfgsl": 0.2, "kfac": 0.1, "diagonal": 0.1}
DEFAULT_DAMPING = {"kbfgs": 0.3, "kbfgsl": 0.3, "kfac": 1.0, "diagonal": 1e-3}


def build_optimizer(name: str, model: nn.Module, *, lr: float, damping: float, theory_mode: bool, seed: int = 0):
    """The optimizer; in theory mode with :func:`convergence.monitor.theory_mode_kwargs`."""
    from convergence.monitor import theory_mode_kwargs
    from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer, diagonal_block

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


def _forever(loader):
    while True:
        yield from loader


# ========================================================================================= training
@dataclass
class Trace:
    """What a training run leaves for the checks."""

    grad_steps: list[int] = field(default_factory=list)  # 1-based N
    grad_norm_sq: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # alpha_k at grad_steps
    snapshots: dict[int, Any] = field(default_factory=dict)  # 0-based k -> RunSnapshot before step k
    iterates: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> x_k
    after: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> x_{k+1}
    batches: dict[int, Any] = field(default_factory=dict)  # k -> the batch of step k
    sigma_points: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> x_k for sigma history


def _flat(model: nn.Module) -> torch.Tensor:
    from convergence.checks.variance import flat_parameters

    return flat_parameters(model)


def _gradient_steps(steps: int, budget: int = 400) -> list[int]:
    """0-based steps at which the full gradient is measured: all, or a geometric grid of ``budget``."""
    if steps <= budget:
        return list(range(steps))
    grid = np.unique(np.round(np.geomspace(1, steps, budget)).astype(int)) - 1
    return sorted(set(grid.tolist()) | {0, steps - 1})


def _snapshot_steps(steps: int, count: int) -> list[int]:
    if count == 1:
        return [steps - 1]
    return sorted({int(round(i * (steps - 1) / (count - 1))) for i in range(count)})


def train(problem, optimizer, loader, *, steps: int, lr: float, beta: float, snapshot_steps: Sequence[int] = (),
          sigma_steps: Sequence[int] = (), progress: bool = False, desc: str = "train") -> Trace:
    """Run ``steps`` steps of ``optimizer`` on batches of ``loader`` with alpha_k = lr (k+1)^-beta."""
    from convergence.checks import RunSnapshot
    from convergence.checks.variance import full_gradient

    model, loss_fn = problem.model, problem.loss_fn
    x_all, y_all = problem.full_batch
    trace = Trace()
    grad_steps = set(_gradient_steps(steps))
    snap = set(snapshot_steps)
    make = problem.make_closure(optimizer)
    batches = _forever(loader)
    iterator = range(steps)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(iterator, desc=desc, unit="step", leave=False, file=sys.stderr)
        iterator = bar
    for k in iterator:
        alpha_k = lr * (k + 1) ** (-beta)
        for group in optimizer.param_groups:
            group["lr"] = alpha_k
        if k in grad_steps:
            f, g = full_gradient(model, loss_fn, x_all, y_all)
            trace.grad_steps.append(k + 1)
            trace.grad_norm_sq.append(float(g.double().pow(2).sum()))
            trace.losses.append(f)
            trace.lrs.append(alpha_k)
            if bar is not None:
                bar.set_postfix(loss=f"{f:.4g}", refresh=False)
        if k in snap:
            trace.snapshots[k] = RunSnapshot(model, optimizer)
            trace.iterates[k] = _flat(model)
        if k in sigma_steps:
            trace.sigma_points[k] = _flat(model)
        batch = next(batches)
        optimizer.step(make(batch))
        if k in snap:
            trace.after[k] = _flat(model)
            trace.batches[k] = batch
    if bar is not None:
        bar.close()
    return trace


# =========================================================================================== checks
@dataclass
class Context:
    args: argparse.Namespace
    problem: Any
    optimizer: Any
    monitor: Any
    trace: Trace
    lr: float
    damping: float
    results: list[CheckResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lipschitz_hat: float | None = None  # L_hat (E1)
    lipschitz_h: float | None = None  # L_H (E1)
    sigma_history: list[tuple[int, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _tag(results: CheckResult | list[CheckResult], step: int | None) -> list[CheckResult]:
    items = results if isinstance(results, list) else [results]
    if step is None:
        return items
    return [replace(r, check=f"{r.check}@{step}") for r in items]


def _guard(ctx: Context, check: str, fn: Callable[[], list[CheckResult]]) -> None:
    try:
        ctx.results.extend(fn())
    except CLIError:
        raise
    except Exception as exc:  # noqa: BLE001 - a crashing check is reported, the others still run
        ctx.errors.append(f"{check}: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        ctx.results.append(CheckResult(check, "check raised an exception", math.nan, "-", 1.0, Verdict.INCONCLUSIVE,
                                       {"error": f"{type(exc).__name__}: {exc}"},
                                       [f"the check raised {type(exc).__name__}: {exc}"]))


def _restore(ctx: Context, k: int) -> None:
    ctx.trace.snapshots[k].restore()


def _sigma_history(ctx: Context) -> list[tuple[int, float]]:
    from convergence.checks.variance import gradient_noise, loaded_parameters

    if not ctx.sigma_history:
        p = ctx.problem
        x, y = p.full_batch
        for k, theta in sorted(ctx.trace.sigma_points.items()):
            with loaded_parameters(p.model, theta):
                ctx.sigma_history.append((k, gradient_noise(p.model, p.loss_fn, x, y).sigma1_sq))
    return ctx.sigma_history


def _lipschitz_for_bounds(ctx: Context) -> tuple[float | None, bool]:
    """(L, is_upper): the problem's declared global bound if known, else max(L_hat, L_H) (doubled later)."""
    if ctx.problem.lipschitz is not None:
        return float(ctx.problem.lipschitz), True
    vals = [v for v in (ctx.lipschitz_hat, ctx.lipschitz_h) if v is not None and math.isfinite(v)]
    return (max(vals), False) if vals else (None, False)


def _run_e1(ctx: Context) -> list[CheckResult]:
    from convergence.checks.smoothness import check_smoothness

    p, tr = ctx.problem, ctx.trace
    pts, steps, pairs = [], [], []
    for k in sorted(tr.iterates):
        pairs.append((len(pts), len(pts) + 1))
        pts.extend([tr.iterates[k], tr.after[k]])
        steps.extend([k, k + 1])
    x, y = p.full_batch
    res = check_smoothness(p.model, p.loss_fn, x, y, pts, centers=[i for i, _ in pairs], steps=steps,
                           iterate_pairs=pairs, seed=ctx.args.seed)
    ctx.lipschitz_hat = float(res.evidence["L_hat"])
    ctx.lipschitz_h = float(res.evidence["L_H"])
    if p.lipschitz is not None:
        res.evidence["declared_L"] = float(p.lipschitz)
        if res.evidence["L_hat"] > p.lipschitz * (1 + 1e-6):
            res.notes.append(f"L_hat = {res.evidence['L_hat']:.4g} exceeds the problem's analytic L = {p.lipschitz:.4g}")
    return [res]


def _ensure_lipschitz(ctx: Context) -> None:
    """E6/E7/E8 need L_hat; compute E1's estimates (without reporting E1) when E1 was not requested."""
    if ctx.lipschitz_hat is None:
        _run_e1(ctx)


def _run_e2(ctx: Context, k: int) -> list[CheckResult]:
    from convergence.checks.unbiasedness import check_unbiasedness

    a, p = ctx.args, ctx.problem
    _restore(ctx, k)
    loader = make_loader(p.dataset, a.batch_size, a.theory_mode, seed=10_000 + 97 * k + a.seed,
                         num_batches=a.unbiased_batches)
    x, y = p.full_batch
    res = check_unbiasedness(p.model, p.loss_fn, x, y, loader, num_batches=a.unbiased_batches, alpha=a.alpha,
                             seed=a.seed + k)
    return _tag(res, k)


def _run_e3(ctx: Context, k: int) -> list[CheckResult]:
    from convergence.checks.variance import check_variance

    a, p = ctx.args, ctx.problem
    _restore(ctx, k)
    x, y = p.full_batch
    n = x.shape[0]
    cap = min(512, n if a.theory_mode else n // 2)
    sizes = tuple(2**j for j in range(0, 12) if 2**j <= cap)
    res = check_variance(p.model, p.loss_fn, x, y, batch_sizes=sizes, num_batches=a.variance_batches,
                         replacement=a.theory_mode, alpha=a.alpha, seed=a.seed + k,
                         sigma_history=[(s, v) for s, v in _sigma_history(ctx)])
    if not a.theory_mode:
        res.notes.append("no theory mode: V(m) predicted for uniform subsets (finite-population correction)")
    return _tag(res, k)


def _run_e4(ctx: Context) -> list[CheckResult]:
    from convergence.checks.preconditioner import check_preconditioner

    res = check_preconditioner(ctx.monitor)
    ctx.extra["e4_series"] = res.evidence.get("series")
    return [res]


def _run_e5(ctx: Context, k: int) -> list[CheckResult]:
    from convergence.checks.independence import check_batch_swap, check_data_flow

    a, p = ctx.args, ctx.problem
    _restore(ctx, k)
    make = p.make_closure(ctx.optimizer)
    alt_loader = make_loader(p.dataset, a.batch_size, a.theory_mode, seed=20_000 + 97 * k + a.seed, num_batches=4)
    alt = list(_take(alt_loader, 4))
    out = _tag(check_batch_swap(p.model, ctx.optimizer, make, ctx.trace.batches[k], alt[0], seed=a.seed + k), k)
    _restore(ctx, k)
    out += _tag(check_data_flow(p.model, ctx.optimizer, make, [ctx.trace.batches[k]] + alt[1:]), k)
    return out


def _take(loader, count: int) -> list[Any]:
    out = []
    for batch in _forever(loader):
        out.append(batch)
        if len(out) >= count:
            return out
    return out


def _run_e6(ctx: Context, k: int) -> list[CheckResult]:
    from convergence.checks.descent import check_expected_descent

    a, p = ctx.args, ctx.problem
    _ensure_lipschitz(ctx)
    lipschitz, is_upper = _lipschitz_for_bounds(ctx)
    _restore(ctx, k)
    loader = make_loader(p.dataset, a.batch_size, a.theory_mode, seed=30_000 + 97 * k + a.seed,
                         num_batches=a.descent_batches)
    batches = _take(loader, a.descent_batches)
    make = p.make_closure(ctx.optimizer)
    lr_k = ctx.lr * (k + 1) ** (-a.beta)
    res = check_expected_descent(p.model, p.loss_fn, p.full_batch, ctx.optimizer, batches, lipschitz=lipschitz,
                                 lipschitz_is_upper=is_upper, make_closure=make, alpha=a.alpha, lr=lr_k)
    return _tag(res, k)


def _run_e7(ctx: Context) -> list[CheckResult]:
    from convergence.checks.stepsize import check_eos_corollary, check_step_size_conditions

    a, p = ctx.args, ctx.problem
    _ensure_lipschitz(ctx)
    # both L_hat and L_H are lower bounds on L, so their max keeps E7a's FAIL definite
    l_hat = max(v for v in (ctx.lipschitz_hat, ctx.lipschitz_h) if v is not None and math.isfinite(v))
    out = check_step_size_conditions(ctx.monitor, l_hat, expected_batch_size=a.batch_size, step_offset=1,
                                     allow_constant=a.beta == 0.0)
    k = max(ctx.trace.snapshots)
    _restore(ctx, k)
    method = "dense" if p.num_parameters <= 400 else "lanczos"
    lr_k = ctx.lr * (k + 1) ** (-a.beta)
    out += _tag(check_eos_corollary(p.model, p.loss_fn, p.full_batch, ctx.optimizer, ctx.trace.batches[k], l_hat,
                                    make_closure=p.make_closure(ctx.optimizer), lr=lr_k, method=method), k)
    return out


def _run_e8(ctx: Context) -> list[CheckResult]:
    from convergence.checks.rate import check_rate

    a = ctx.args
    _ensure_lipschitz(ctx)
    rows = [ctx.trace.grad_norm_sq]
    f_initial = [ctx.trace.losses[0]]
    iterator = range(1, a.rate_seeds)
    if not a.no_progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="E8 seeds", unit="run", leave=False, file=sys.stderr)
    for s in iterator:
        problem = build_problem(a.problem, seed=a.seed, device=a.device, data_dir=a.data_dir,
                                mnist_examples=a.mnist_examples)
        opt = build_optimizer(a.optimizer, problem.model, lr=ctx.lr, damping=ctx.damping, theory_mode=a.theory_mode,
                              seed=a.seed)
        loader = make_loader(problem.dataset, a.batch_size, a.theory_mode, seed=a.seed * 1000 + s, num_batches=a.steps)
        tr = train(problem, opt, loader, steps=a.steps, lr=ctx.lr, beta=a.beta)
        rows.append(tr.grad_norm_sq)
        f_initial.append(tr.losses[0])
    lipschitz, is_upper = _lipschitz_for_bounds(ctx)
    kappa = ctx.monitor.kappa_observed()
    sigma2 = max(v for _, v in _sigma_history(ctx))
    kappa_ok = all(math.isfinite(v) for v in kappa) and kappa[0] > 0
    res = check_rate(np.array(rows), ctx.trace.grad_steps, beta=a.beta, step_sizes=ctx.trace.lrs,
                     f_initial=f_initial, f_low=0.0, lipschitz=lipschitz, lipschitz_is_upper=is_upper, sigma2=sigma2,
                     kappa=kappa if kappa_ok else None, batch_size=a.batch_size, alpha=a.alpha, seed=a.seed)
    if not kappa_ok:
        res.notes.append(f"observed kappa {kappa} is not positive and finite: the general bound was not evaluated")
    ctx.extra["rate_rows"] = rows
    return [res]


# ============================================================================================ driver
def run(args: argparse.Namespace, *, stdout=None) -> int:
    """Run the ``check`` command for parsed ``args``; returns the exit status."""
    from convergence.monitor import TrainingMonitor, theory_mode_violations
    from convergence.multiple import holm_adjust
    from convergence.report import (damping_series, plot_damping, plot_gradient_norms, plot_hessian_density,
                                    plot_spectrum_bounds, print_table, write_json)

    stdout = stdout if stdout is not None else sys.stdout
    started = time.time()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    args.device = device
    problem = build_problem(args.problem, seed=args.seed, device=device, data_dir=args.data_dir,
                            mnist_examples=args.mnist_examples)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    damping = args.damping if args.damping is not None else DEFAULT_DAMPING[args.optimizer]
    optimizer = build_optimizer(args.optimizer, problem.model, lr=lr, damping=damping, theory_mode=args.theory_mode,
                                seed=args.seed)
    loader = make_loader(problem.dataset, args.batch_size, args.theory_mode, seed=args.seed * 1000, num_batches=args.steps)
    violations = theory_mode_violations(optimizer, loader)
    snaps = _snapshot_steps(args.steps, min(args.checkpoints, args.steps))
    sigma_steps = sorted(set(snaps) | set(_snapshot_steps(args.steps, min(6, args.steps))))
    monitor = TrainingMonitor(optimizer, keep_pairs=False)
    try:
        trace = train(problem, optimizer, loader, steps=args.steps, lr=lr, beta=args.beta, snapshot_steps=snaps,
                      sigma_steps=sigma_steps, progress=not args.no_progress)
    finally:
        monitor.detach()
    final_state = _flat(problem.model)
    final_loss = float(problem.loss())
    ctx = Context(args, problem, optimizer, monitor, trace, lr, damping)

    selected = set(args.checks)
    if "E1" in selected:
        _guard(ctx, "E1", lambda: _run_e1(ctx))
    for k in snaps:
        if "E2" in selected:
            _guard(ctx, f"E2@{k}", lambda k=k: _run_e2(ctx, k))
        if "E3" in selected:
            _guard(ctx, f"E3@{k}", lambda k=k: _run_e3(ctx, k))
    if "E4" in selected:
        _guard(ctx, "E4", lambda: _run_e4(ctx))
    for k in snaps:
        if "E5" in selected:
            _guard(ctx, f"E5@{k}", lambda k=k: _run_e5(ctx, k))
        if "E6" in selected:
            _guard(ctx, f"E6@{k}", lambda k=k: _run_e6(ctx, k))
    if "E7" in selected:
        _guard(ctx, "E7", lambda: _run_e7(ctx))
    if "E8" in selected:
        _guard(ctx, "E8", lambda: _run_e8(ctx))
    results = holm_adjust(ctx.results, alpha=args.alpha)

    # ------------------------------------------------------------------------------------ outputs
    from convergence.checks.variance import loaded_parameters

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    try:
        series = monitor.spectrum_series()
        plots.append(plot_spectrum_bounds(out / "spectrum_bounds.png", series, theory=ctx.extra.get("e4_series")))
        rate = next((r for r in results if r.check == "E8"), None)
        rows = ctx.extra.get("rate_rows", [trace.grad_norm_sq])
        plots.append(plot_gradient_norms(
            out / "gradient_norms.png", trace.grad_steps, np.array(rows), beta=args.beta,
            running_mean=rate.evidence.get("G_N") if rate is not None else _single_running_mean(trace),
            bound=(rate.evidence.get("bound", {}).get("U_N_curve") if rate is not None else None)))
        plots.append(plot_damping(out / "damping.png", damping_series(monitor.records)))
        with loaded_parameters(problem.model, final_state):
            slq, extremes = _hessian_spectrum(problem, args.seed)
        plots.append(plot_hessian_density(out / "hessian_density.png", slq, lambda_min=extremes[0],
                                          lambda_max=extremes[1]))
    except Exception as exc:  # noqa: BLE001
        ctx.errors.append(f"plots: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)

    meta = {
        "command": "check", "optimizer": args.optimizer, "problem": args.problem, "steps": args.steps,
        "batch_size": args.batch_size, "lr": lr, "damping": damping, "beta": args.beta, "device": str(device),
        "seed": args.seed, "checks": list(args.checks), "checkpoints": snaps, "alpha_family": args.alpha,
        "rate_seeds": args.rate_seeds if "E8" in selected else None, "num_parameters": problem.num_parameters,
        "num_examples": len(problem.dataset), "optimizer_description": optimizer.describe(),
        "lipschitz_declared": problem.lipschitz, "L_hat": ctx.lipschitz_hat, "L_H": ctx.lipschitz_h,
        "kappa_observed": list(monitor.kappa_observed()), "final_loss": final_loss,
        "sigma1_sq_history": ctx.sigma_history, "errors": ctx.errors, "seconds": time.time() - started,
        "exit_status_policy": "0 when the run completes, whatever the verdicts; 1 on runtime errors; 2 on bad arguments",
    }
    extra = {"gradient_norm_sq": {"steps": trace.grad_steps, "main_run": trace.grad_norm_sq, "alpha": trace.lrs},
             "monitor": {"records": len(monitor.records), "skipped_steps": optimizer.skipped_steps,
                         "spectrum": monitor.spectrum_series()}}
    write_json(out / "report.json", results, meta=meta, theory_mode=args.theory_mode, violations=violations,
               plots=[p.name for p in plots], extra=extra)
    title = (f"{args.optimizer} on {args.problem}: {args.steps} steps, batch {args.batch_size}, lr {lr:g}, "
             f"damping {damping:g}, beta {args.beta:g}, seed {args.seed}")
    print_table(results, theory_mode=args.theory_mode, violations=violations, title=title, file=stdout)
    print(f"report: {out / 'report.json'}; plots: {', '.join(p.name for p in plots)}", file=stdout)
    if ctx.errors:
        print("errors: " + "; ".join(ctx.errors), file=sys.stderr)
        return 1
    return 0


def _single_running_mean(trace: Trace) -> dict[str, list[float]]:
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
    """Entry point of ``python -m convergence``; returns the exit status (argparse errors exit with 2)."""
    args = parse_args(argv)
    try:
        return run(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
