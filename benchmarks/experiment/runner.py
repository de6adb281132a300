r"""One training run (one optimizer, one setting) with the measurement conventions of the authors' code.

Protocol (spec §7, ``training_function.train_model``):

* **Model**: the paper's autoencoder for the dataset (or ``widths``), initialised with the
  experiment seed (default 9999) — the same initial weights for every optimizer.
* **Warm start** (K-BFGS/K-BFGS(L): A; KFAC: A and G; RMSprop: second moment) by one pass over
  all *full* minibatches of the training set, in storage order, at the initial weights, only when
  the batch size is smaller than the training set (as the authors). It is timed separately and
  **not** counted in the training time. It does not draw from the shuffling generator, so every
  optimizer sees the same minibatch sequence (the authors' warm start consumed one epoch of their
  shuffler instead; with all batches full its statistics are the same).
* **Minibatches**: every epoch draws one permutation of the training set with
  ``torch.randperm(n_train, generator=g)``, ``g = torch.Generator().manual_seed(seed)`` (CPU), and
  takes ``n_train // N`` consecutive slices of N; the remainder is dropped.
* **Step**: ``loss = opt.step(closure)`` (K-BFGS calls the closure again at the new point).
* **Timing**: per epoch, the wall-clock time (``time.perf_counter``) and the process CPU time
  (``time.process_time``, summed over all threads of the process, as the authors measure) from
  the start of the epoch's batch loop to its end — evaluation, checkpointing and the warm start
  are excluded. Per step, the wall time of ``opt.step`` alone, with ``torch.cuda.synchronize``
  before and after on CUDA. Curves store cumulative times.
* **Evaluation** after every epoch (and at epoch 0, before training): the L2-regularised loss
  :math:`\frac1B\sum_b L(\text{batch}_b) + \frac12\tau\lVert\theta\rVert^2` over the whole training
  set and over the test set in consecutive batches of N (remainder dropped; N capped at the set
  size), under ``torch.no_grad``; and the reconstruction error (mean squared error of
  sigmoid(z) for the Bernoulli datasets, of z for FACES; the authors' "accuracy" field).
* **Stopping**: after ``epochs`` epochs, when the cumulative training CPU time reaches
  ``max_time``, or "diverged": the training loss or the weights stop being finite (the authors'
  only rule), the training loss exceeds ``divergence_factor`` (default 1000) × the initial one, or
  every step of an epoch was skipped or reverted by the optimizer (it cannot make progress).
* **Checkpoint** after every epoch; ``resume=True`` continues from it (bit-identical curves,
  timing aside) or reuses a finished ``result.json``.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.experiment.checkpoint import CHECKPOINT, RESULT, load_checkpoint, read_json, save_checkpoint, write_json
from benchmarks.experiment.config import ExperimentConfig, fingerprint
from benchmarks.experiment.parallel import Parallel
from benchmarks.experiment.datasets import DataBundle
from benchmarks.experiment.settings import BuildContext, OptimizerSettings
from benchmarks.models import Autoencoder, build_autoencoder, likelihood_for, loss_for

__all__ = ["CURVE_FIELDS", "TIMING_FIELDS", "RunRecord", "build_model", "evaluate", "train_run"]

#: Per-epoch curves of a run (index 0 = before training).
CURVE_FIELDS = ("epoch", "train_loss", "test_loss", "train_error", "test_error", "wall_time", "cpu_time",
                "epoch_wall", "epoch_cpu", "steps", "skipped_steps", "reverted_steps")
#: Fields that depend on the machine's speed (excluded when comparing runs for equality).
TIMING_FIELDS = ("wall_time", "cpu_time", "epoch_wall", "epoch_cpu", "step_times_ms", "warm_start_wall",
                 "warm_start_cpu")


@dataclass
class RunRecord:
    """Everything measured in one run. Curves are lists indexed by epoch (0 = initial point)."""

    optimizer: str
    tag: str
    settings: dict[str, Any]
    fingerprint: dict[str, Any]
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_error: list[float] = field(default_factory=list)
    test_error: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    cpu_time: list[float] = field(default_factory=list)
    epoch_wall: list[float] = field(default_factory=list)
    epoch_cpu: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    reverted_steps: list[int] = field(default_factory=list)
    step_times_ms: list[list[float]] = field(default_factory=list)  # per epoch (epoch 0: empty)
    batch_losses: list[float] = field(default_factory=list)  # every step's minibatch loss (data loss)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    warm_start_batches: int = 0
    warm_start_wall: float = 0.0
    warm_start_cpu: float = 0.0
    stop_reason: str = "running"  # then "epochs", "max_time", "diverged" or "failed"
    error: str | None = None  # the message of a numerical failure (stop_reason "failed")

    # -- views -----------------------------------------------------------------------------
    @property
    def epochs_done(self) -> int:
        return self.epoch[-1] if self.epoch else 0

    @property
    def final_train_loss(self) -> float:
        return self.train_loss[-1] if self.train_loss else math.nan

    @property
    def diverged(self) -> bool:
        """Diverged (non-finite loss or weights) or failed (a numerical error in the optimizer)."""
        return self.stop_reason in ("diverged", "failed")

    def all_step_times(self) -> list[float]:
        return [t for epoch in self.step_times_ms for t in epoch]

    def median_step_ms(self) -> float:
        times = self.all_step_times()
        return statistics.median(times) if times else math.nan

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["final_train_loss"] = self.final_train_loss
        d["median_step_ms"] = self.median_step_ms()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunRecord":
        names = {f.name for f in fields(cls)}
        rec = cls(**{k: v for k, v in d.items() if k in names})
        # JSON stores non-finite losses as null
        for name in ("train_loss", "test_loss", "train_error", "test_error"):
            setattr(rec, name, [math.nan if v is None else float(v) for v in getattr(rec, name)])
        rec.batch_losses = [math.nan if v is None else float(v) for v in rec.batch_losses]
        return rec

    def curve_rows(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self.epoch)):
            row = {name: getattr(self, name)[i] for name in CURVE_FIELDS}
            times = self.step_times_ms[i] if i < len(self.step_times_ms) else []
            row["median_step_ms"] = statistics.median(times) if times else math.nan
            yield row


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """The run's model on ``cfg.device``: the paper's autoencoder, or ``cfg.widths`` (same seed)."""
    if cfg.widths is None:
        return build_autoencoder(cfg.dataset, seed=cfg.seed, device=cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Autoencoder(cfg.widths, name=f"{cfg.dataset}-custom")
    return model.to(cfg.device)


def _reconstruction(out: torch.Tensor, likelihood: str) -> torch.Tensor:
    return out if likelihood == "gaussian" else torch.sigmoid(out)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, batch_size: int, loss_fn, likelihood: str,
             tau: float) -> tuple[float, float]:
    """(L2-regularised mean loss, reconstruction MSE) over consecutive full batches of ``x``."""
    n = min(batch_size, x.shape[0])
    batches = x.shape[0] // n
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    err_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    for b in range(batches):
        xb = x[b * n:(b + 1) * n]
        out = model(xb)
        loss_sum += loss_fn(out, xb).double()
        err_sum += (_reconstruction(out, likelihood) - xb).pow(2).mean().double()
    l2 = sum(p.detach().double().pow(2).sum() for p in model.parameters())
    loss = loss_sum / batches + 0.5 * tau * l2
    return float(loss), float(err_sum / batches)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _counters(opt: torch.optim.Optimizer) -> tuple[int, int, dict[str, int]]:
    counters = getattr(opt, "counters", None)
    if not counters:
        return 0, 0, {}
    return int(counters.get("skipped_steps", 0)), int(counters.get("reverted_steps", 0)), dict(
        counters.get("skip_reasons", {}))


def _finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _divergence(rec: RunRecord, cfg: ExperimentConfig, broken: bool, finite_params: bool) -> str | None:
    """Why the run counts as diverged after its last epoch, or None."""
    loss, initial = rec.train_loss[-1], rec.train_loss[0]
    if broken or not finite_params:
        return "non-finite weights"
    if not math.isfinite(loss):
        return "non-finite training loss"
    if cfg.divergence_factor is not None and math.isfinite(initial) and loss > cfg.divergence_factor * abs(initial):
        return f"training loss {loss:.4g} > {cfg.divergence_factor:g} x the initial {initial:.4g}"
    applied = (rec.steps[-1] - rec.steps[-2]) - (rec.skipped_steps[-1] - rec.skipped_steps[-2]) - (
        rec.reverted_steps[-1] - rec.reverted_steps[-2])
    if rec.steps[-1] > rec.steps[-2] and applied <= 0:
        return f"every step of epoch {rec.epoch[-1]} was skipped or reverted"
    return None


def _finished(rec: RunRecord, cfg: ExperimentConfig) -> bool:
    if rec.diverged or rec.epochs_done >= cfg.epochs:
        return True
    return cfg.max_time is not None and bool(rec.cpu_time) and rec.cpu_time[-1] >= cfg.max_time


def _stop_reason(rec: RunRecord, cfg: ExperimentConfig) -> str:
    if rec.diverged:
        return rec.stop_reason
    if rec.epochs_done >= cfg.epochs:
        return "epochs"
    return "max_time"


def train_run(
    cfg: ExperimentConfig,
    data: DataBundle,
    name: str,
    settings: OptimizerSettings,
    run_dir: Path,
    *,
    tag: str = "main",
    resume: bool = False,
    progress: bool = True,
    checkpoint: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    parallel: Parallel | None = None,
) -> RunRecord:
    """Train one optimizer with ``settings``; checkpoint into ``run_dir``; return its record.

    ``on_step(epoch, step)`` is called after every step (tests use it to interrupt a run).
    ``parallel``: data-parallel ranks (:mod:`benchmarks.experiment.parallel`); rank 0 alone writes.
    """
    par = parallel if parallel is not None else Parallel()
    checkpoint = checkpoint and par.is_main
    progress = progress and par.is_main
    device = torch.device(cfg.device)
    run_dir = Path(run_dir)
    fp = fingerprint(cfg, name, settings)
    ckpt_path, result_path = run_dir / CHECKPOINT, run_dir / RESULT

    if resume and result_path.exists():
        done = RunRecord.from_dict(read_json(result_path))
        if done.fingerprint != fp:
            raise ValueError(f"--resume: {result_path} was produced with a different configuration "
                             f"({_diff(done.fingerprint, fp)}); use a fresh --out")
        if done.epochs_done > cfg.epochs:
            raise ValueError(f"--resume: {result_path} already has {done.epochs_done} epochs, more than "
                             f"--epochs {cfg.epochs}; use a fresh --out or a larger --epochs")
        if _finished(done, cfg):
            return done
    if not resume and run_dir.exists() and par.is_main:
        shutil.rmtree(run_dir)

    loss_fn = loss_for(cfg.dataset)
    likelihood = likelihood_for(cfg.dataset)
    ctx = BuildContext(likelihood=likelihood, loss_fn=loss_fn, seed=cfg.seed)
    model = build_model(cfg)
    net = par.wrap(model)  # DistributedDataParallel with several ranks; curvature optimizers unwrap it
    opt = settings.build(net, ctx)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_train, batch = data.train.shape[0], cfg.batch_size
    n_batches = n_train // batch

    rec: RunRecord
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, "cpu")
        if state["fingerprint"] != fp:
            raise ValueError(f"--resume: {ckpt_path} was written with a different configuration "
                             f"({_diff(state['fingerprint'], fp)}); use a fresh --out")
        if state["record"]["epoch"][-1] > cfg.epochs:
            raise ValueError(f"--resume: {ckpt_path} is at epoch {state['record']['epoch'][-1]}, beyond "
                             f"--epochs {cfg.epochs}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        rec = RunRecord.from_dict(state["record"])
    else:
        rec = RunRecord(optimizer=name, tag=tag, settings=settings.as_dict(), fingerprint=fp)
        if settings.warm_starts and batch < n_train:
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            lo, hi = par.shard(batch)
            warm_batches = (data.train[i * batch:(i + 1) * batch][lo:hi] for i in range(n_batches))
            rec.warm_start_batches = settings.run_warm_start(opt, net, ctx, warm_batches)
            _sync(device)
            rec.warm_start_wall, rec.warm_start_cpu = time.perf_counter() - w0, time.process_time() - c0
        _append_epoch(rec, model, opt, data, cfg, loss_fn, likelihood, epoch=0, wall=0.0, cpu=0.0, times=[])
        if not math.isfinite(rec.train_loss[-1]):
            rec.stop_reason = "diverged"
        if checkpoint:
            _save(ckpt_path, model, opt, gen, rec, device)

    bar = tqdm(total=cfg.epochs * n_batches, initial=rec.epochs_done * n_batches, unit="step",
               desc=f"{name}" + ("" if tag == "main" else f" {tag}"), disable=not progress, leave=False,
               dynamic_ncols=True)
    is_curvature = hasattr(opt, "counters")
    try:
        while not _finished(rec, cfg):
            epoch = rec.epochs_done + 1
            times: list[float] = []
            broken = False
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            perm = torch.randperm(n_train, generator=gen).to(device)
            lo, hi = par.shard(batch)
            weight = par.loss_weight(batch)
            for j in range(n_batches):
                xb = data.train.index_select(0, perm[j * batch:(j + 1) * batch][lo:hi])

                def closure(xb: torch.Tensor = xb) -> torch.Tensor:
                    opt.zero_grad(set_to_none=False)
                    loss = loss_fn(net(xb), xb)
                    if weight != 1.0:
                        loss = loss * weight
                    loss.backward()
                    return loss

                _sync(device)
                t0 = time.perf_counter()
                loss = opt.step(closure)
                _sync(device)
                times.append(1e3 * (time.perf_counter() - t0))
                value = math.nan if loss is None else float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
                value = par.mean(value)  # the global minibatch's loss (after the timed step)
                rec.batch_losses.append(value)
                bar.update(1)
                if on_step is not None:
                    on_step(epoch, j)
                if not math.isfinite(value) and not is_curvature and not _finite_params(model):
                    broken = True  # a first-order step with a non-finite gradient poisons the weights
                    break
            _sync(device)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            _append_epoch(rec, model, opt, data, cfg, loss_fn, likelihood, epoch=epoch, wall=wall, cpu=cpu,
                          times=times)
            why = _divergence(rec, cfg, broken, _finite_params(model))
            if why is not None:
                rec.stop_reason, rec.error = "diverged", why
            bar.set_postfix(train=f"{rec.train_loss[-1]:.4g}", refresh=False)
            if checkpoint:
                _save(ckpt_path, model, opt, gen, rec, device)
    except RuntimeError as exc:  # numerical failures inside the optimizer (e.g. a failed factorisation)
        rec.stop_reason, rec.error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        bar.close()
    rec.stop_reason = _stop_reason(rec, cfg)
    if par.is_main:
        write_json(result_path, rec.to_dict())
    return rec


def _append_epoch(rec: RunRecord, model, opt, data: DataBundle, cfg: ExperimentConfig, loss_fn, likelihood: str,
                  *, epoch: int, wall: float, cpu: float, times: list[float]) -> None:
    train_loss, train_err = evaluate(model, data.train, cfg.batch_size, loss_fn, likelihood, cfg.tau)
    test_loss, test_err = evaluate(model, data.test, cfg.batch_size, loss_fn, likelihood, cfg.tau)
    skipped, reverted, reasons = _counters(opt)
    rec.epoch.append(epoch)
    rec.train_loss.append(train_loss)
    rec.test_loss.append(test_loss)
    rec.train_error.append(train_err)
    rec.test_error.append(test_err)
    rec.epoch_wall.append(wall)
    rec.epoch_cpu.append(cpu)
    rec.wall_time.append((rec.wall_time[-1] if rec.wall_time else 0.0) + wall)
    rec.cpu_time.append((rec.cpu_time[-1] if rec.cpu_time else 0.0) + cpu)
    rec.steps.append((rec.steps[-1] if rec.steps else 0) + len(times))
    rec.skipped_steps.append(skipped)
    rec.reverted_steps.append(reverted)
    rec.skip_reasons = reasons
    rec.step_times_ms.append(times)


def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, rec: RunRecord,
          device: torch.device) -> None:
    save_checkpoint(path, {
        "fingerprint": rec.fingerprint,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "record": rec.to_dict(),
    })


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = []
    for k in keys:
        if isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            sub = sorted(s for s in set(old[k]) | set(new[k]) if old[k].get(s) != new[k].get(s))
            parts += [f"{k}.{s}: {old[k].get(s)!r} -> {new[k].get(s)!r}" for s in sub]
        else:
            parts.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    return "; ".join(parts) or "unknown difference"
