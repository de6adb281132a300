r"""Throughput and memory of one training step: our optimizers against Adam, peers and the FLOP floor.

Usage::

    python -m benchmarks.throughput --model transformer --batch 16 --seq-len 32 --warmup 25 --steps 10
    python -m benchmarks.throughput --model mnist --device cpu --steps 10 --warmup 3 --repeats 3 \
        [--sweep [--full]] [--memory] [--peers] [--profile kbfgs --profile kfac] --out results/throughput

What one *step* is: the whole training step, ``optimizer.step(closure)`` where the closure zeroes
the gradients, runs the model forward on a fixed random batch of the right shape (targets = inputs
for the autoencoders), the loss and backward. K-BFGS's second pass and KFAC's Monte-Carlo pass run
inside ``step`` and are included. Warm-up steps are excluded from the timings.

How it is measured (see :mod:`benchmarks.timing`):

* every method gets its own model (same initial weights) and optimizer, all alive at once;
* methods take turns one step at a time, the order rotating every round, ``--steps`` rounds per
  repeat and ``--repeats`` repeats; on CUDA each step is timed with CUDA events and synchronization;
* each step's time is divided by Adam's step of the same round ("× Adam"): the pairs run seconds
  apart, so the ratio cancels most of the load of other processes on a shared machine; medians and
  quartiles are reported, plus the range of the per-repeat medians;
* methods with periodic work (KFAC's inverses every ``T_inv`` steps, statistics every ``T_cov``)
  have *phases*: the step counter (``optimizer.steps``, which decides the phase) is set before a
  timed step so that every phase is timed in every repeat, and the amortized time is
  :math:`\sum_p w_p\,\mathrm{median}_p` with the phase frequencies :math:`w_p` (e.g. 1/20 and
  19/20). Steps inside the inverse warm-up (``k <= inverse_warmup_steps``) are never timed.
* K-BFGS(L)'s memory is filled to capacity before timing with pairs ``s = y = e_j`` (``--no-prefill``
  turns that off): they leave :math:`H_g` unchanged (BFGS with y = s keeps H0 = I) and make every
  timed step pay the steady-state cost of ``p`` stored pairs; the floor uses the pairs actually stored.

Columns: median ms/step [IQR]; × Adam median [q25–q75]; the analytic floor (:mod:`benchmarks.flops`)
in GFLOP and as a multiple of SGD-m's floor; the measured multiple of SGD-m (× Adam of the method
over × Adam of SGD-m); *gap* = measured (× SGD) / floor (× SGD), i.e. the time over what SGD-m's
achieved FLOP rate would predict from the floor; GFLOP/s = floor / median time.

Memory (``--memory``): optimizer-state bytes = the bytes of every tensor in
``optimizer.state_dict()``, recursively (including the ``secondorder`` entry), and the ratio to
Adam's. On CUDA also the peak of ``torch.cuda.max_memory_allocated`` during one step above what was
allocated before it; the CPU has no allocator statistics, so there the peak column shows the
state-bytes estimate and says so.

Peers (``--peers``): ASDL (``pip install asdfghjkl==0.1a5``, module ``asdl``; our ``peers`` extra)
KFAC (empirical Fisher, same T_cov/T_inv) and K-BFGS on the same model, batch and loss, driving
``torch.optim.SGD`` with the same EMA momentum; reported as our time over theirs. ASDL calls
``torch.cuda.nvtx.range`` unconditionally, which raises on CPU-only builds of torch; on such builds
the two ``nvtx`` module attributes of ASDL are replaced by a no-op context (annotations only, no
arithmetic changes). Without ASDL the peers are skipped with a message.

Matrix-free methods (``--methods adam,hf,sfn,lm``; not in the default list): Hessian-free, saddle-free
Newton and Levenberg–Marquardt report ``products_per_step`` (curvature-vector products, each about
a forward-mode pass plus a backward) and ``loss_evals_per_step`` (extra forward passes for the
reduction ratio, backtracking and line searches); their floor column is SGD's, a loose lower bound.

Not implemented: ``--compile`` and ``--cuda-graphs`` (the optimizers' data-dependent control flow,
Python-side skip rules and hook-based capture have not been made graph-safe; a stub would report
numbers that mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib
import json
import math
import platform
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from benchmarks.flops import LinearShape, MethodSpec, floor_ratio, linear_shapes, step_floor
from benchmarks.models import (
    AUTOENCODER_WIDTHS,
    Autoencoder,
    build_autoencoder,
    half_squared_error,
    likelihood_for,
    summed_bce_with_logits,
)
from benchmarks.timing import (
    Sample,
    make_timer,
    paired_ratios,
    phase_weighted,
    run_interleaved,
    select,
    summarize,
    synchronize,
)
from optimizers import (KBFGS, KBFGSL, KFAC, CurvatureOptimizer, HessianFree, LevenbergMarquardt, SaddleFreeNewton,
                        diagonal_block)
from optimizers.matrix_free import MatrixFreeOptimizer

BASELINE = "adam"
REFERENCE = "sgdm"
TINY_WIDTHS = (20, 12, 6, 12, 20)
DEFAULT_SWEEP_WIDTHS = (256, 1024)
DEFAULT_SWEEP_BATCHES = (128, 1024, 8192)
FULL_SWEEP_WIDTHS = (256, 512, 1024, 2048, 4096)
FULL_SWEEP_BATCHES = (128, 512, 2048, 8192)
SWEEP_METHODS = ("sgdm", "adam", "diagonal", "kfac", "kbfgs", "kbfgsl")

TABLE_COLUMNS = (
    "method", "label", "ms_median", "ms_q25", "ms_q75", "x_adam_median", "x_adam_q25", "x_adam_q75",
    "x_adam_repeat_min", "x_adam_repeat_max", "floor_gflop", "floor_x_sgd", "measured_x_sgd", "gap",
    "achieved_gflops", "timed_steps", "phases", "skipped_steps", "products_per_step", "loss_evals_per_step",
    "notes",
)
MEMORY_COLUMNS = ("method", "state_bytes", "state_x_adam", "peak_bytes", "peak_kind")
PEER_COLUMNS = ("ours", "theirs", "ours_ms", "theirs_ms", "theirs_x_adam", "ours_over_theirs", "status")
SWEEP_COLUMNS = ("width", "batch", "method", "ms_median", "x_adam_median", "x_adam_q25", "x_adam_q75",
                 "floor_x_sgd", "measured_x_sgd", "gap")


# ---------------------------------------------------------------------------------- workloads
def _bce(out: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Summed-over-pixels BCE with logits; ``reduction`` over the batch ('mean' or 'sum', for ASDL)."""
    loss = summed_bce_with_logits(out, target)
    return loss * out.shape[0] if reduction == "sum" else loss


def _half_sse(out: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """½·SSE per sample; ``reduction`` over the batch ('mean' or 'sum', for ASDL)."""
    loss = half_squared_error(out, target)
    return loss * out.shape[0] if reduction == "sum" else loss


@dataclass(frozen=True)
class Workload:
    """A model and a fixed random batch: ``kind`` "autoencoder" (targets = inputs) or "linear"."""

    name: str
    widths: tuple[int, ...]
    batch: int
    kind: str = "autoencoder"
    likelihood: str = "bernoulli"

    def __post_init__(self) -> None:
        if self.kind not in ("autoencoder", "linear"):
            raise ValueError(f"kind must be 'autoencoder' or 'linear', got {self.kind!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {self.batch!r}")
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {self.likelihood!r}")

    @staticmethod
    def autoencoder(name: str, batch: int) -> "Workload":
        if name == "tiny":
            return Workload("tiny", TINY_WIDTHS, batch)
        if name not in AUTOENCODER_WIDTHS:
            raise ValueError(f"unknown autoencoder {name!r}; choose from tiny, {', '.join(AUTOENCODER_WIDTHS)}")
        return Workload(name, AUTOENCODER_WIDTHS[name], batch, likelihood=likelihood_for(name))

    @staticmethod
    def linear(width: int, batch: int) -> "Workload":
        return Workload(f"linear{width}", (width, width), batch, kind="linear", likelihood="gaussian")

    @property
    def loss_fn(self) -> Callable[..., torch.Tensor]:
        return _bce if self.likelihood == "bernoulli" else _half_sse

    def build_model(self, seed: int, device: torch.device) -> nn.Module:
        if self.kind == "autoencoder" and self.name in AUTOENCODER_WIDTHS:
            return build_autoencoder(self.name, seed=seed, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Autoencoder(self.widths, self.name) if self.kind == "autoencoder" else nn.Sequential(
                nn.Linear(self.widths[0], self.widths[1]))
        return model.to(device)

    def make_batch(self, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.rand(self.batch, self.widths[0], generator=gen)
        y = x if self.kind == "autoencoder" else torch.randn(self.batch, self.widths[-1], generator=gen)
        return x.to(device), y.to(device)

    def shapes(self) -> list[LinearShape]:
        return linear_shapes(self.build_model(0, torch.device("cpu")))


# ---------------------------------------------------------------------------------- methods
Builder = Callable[[nn.Module, Workload], Any]


@dataclass(frozen=True)
class Method:
    """A method of the table: how to build its optimizer and what its floor is."""

    name: str
    label: str
    spec: MethodSpec
    build: Builder
    peer_of: str | None = None


def _methods() -> dict[str, Method]:
    def sgdm(model, w):
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, dampening=0.9, weight_decay=1e-5)

    def adam(model, w):
        return torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.9), eps=1e-4, weight_decay=1e-5)

    def diagonal(model, w):
        return CurvatureOptimizer(model, 1e-4, {nn.Linear: diagonal_block()}, damping=1.0, momentum=0.9,
                                  weight_decay=1e-5)

    def kfac(model, w, **kw):
        return KFAC(model, lr=1e-3, damping=3.0, **kw)

    return {m.name: m for m in (
        Method("sgdm", "SGD-m", MethodSpec("sgdm"), sgdm),
        Method("adam", "Adam", MethodSpec("adam"), adam),
        Method("diagonal", "diagonal (EF)", MethodSpec("diagonal"), diagonal),
        Method("kfac", "KFAC 1/20", MethodSpec("kfac", 1, 20), kfac),
        Method("kfac-10-100", "KFAC 10/100", MethodSpec("kfac", 10, 100),
               lambda m, w: kfac(m, w, curvature_update_freq=10, inverse_update_freq=100)),
        Method("kfac-mc", "KFAC 1/20 MC", MethodSpec("kfac", 1, 20, fisher="mc"),
               lambda m, w: kfac(m, w, fisher="mc", likelihood=w.likelihood)),
        Method("kbfgs", "K-BFGS", MethodSpec("kbfgs"), lambda m, w: KBFGS(m, lr=1e-3, damping=0.3)),
        Method("kbfgsl", "K-BFGS(L) p=100", MethodSpec("kbfgsl", memory=100),
               lambda m, w: KBFGSL(m, lr=1e-3, damping=0.3)),
        # whole-model matrix-free methods: their floor column is SGD's (one forward + backward), a loose
        # lower bound; their cost is counted in products_per_step (curvature-vector products) and
        # loss_evals_per_step (extra forward passes)
        Method("hf", "Hessian-free (CG <= 10)", MethodSpec("sgdm"),
               lambda m, w: HessianFree(m, w.loss_fn, damping=1.0, max_cg_iters=10, weight_decay=1e-5)),
        Method("sfn", "saddle-free Newton k=10", MethodSpec("sgdm"),
               lambda m, w: SaddleFreeNewton(m, w.loss_fn, k=10, weight_decay=1e-5)),
        Method("lm", "Levenberg-Marquardt (CG <= 10)", MethodSpec("sgdm"),
               lambda m, w: LevenbergMarquardt(m, w.loss_fn, max_cg_iters=10, weight_decay=1e-5)),
        # peers: the optimizer is built by AsdlCandidate (ASDL gradient maker + torch.optim.SGD)
        Method("asdl-kfac", "ASDL KFAC 1/20", MethodSpec("kfac", 1, 20), lambda m, w: None, peer_of="kfac"),
        Method("asdl-kfac-10-100", "ASDL KFAC 10/100", MethodSpec("kfac", 10, 100), lambda m, w: None,
               peer_of="kfac-10-100"),
        Method("asdl-kbfgs", "ASDL K-BFGS", MethodSpec("kbfgs"), lambda m, w: None, peer_of="kbfgs"),
    )}


METHODS: dict[str, Method] = _methods()
#: matrix-free methods: selectable with --methods, not in the default list (their cost varies with CG/Lanczos)
MATRIX_FREE_METHODS = ("hf", "sfn", "lm")
#: the default table (the block-based methods and the first-order baselines)
OUR_METHODS = tuple(n for n, m in METHODS.items() if m.peer_of is None and n not in MATRIX_FREE_METHODS)
PEER_METHODS = tuple(n for n, m in METHODS.items() if m.peer_of is not None)


# ---------------------------------------------------------------------------------- phases
@dataclass(frozen=True)
class Schedule:
    """Which phase step ``k`` is in: ``labels[k % period]`` for ``k >= first_periodic``."""

    period: int = 1
    labels: tuple[str, ...] = ("steady",)
    first_periodic: int = 0

    def __post_init__(self) -> None:
        if self.period < 1 or len(self.labels) != self.period:
            raise ValueError(f"need one label per offset of the period {self.period}, got {len(self.labels)}")

    @property
    def periodic(self) -> bool:
        return len(set(self.labels)) > 1

    @property
    def weights(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for label in self.labels:
            out[label] = out.get(label, 0.0) + 1.0 / self.period
        return out

    def next_step(self, current: int, label: str) -> int:
        """The smallest step ``k >= max(current, first_periodic)`` of phase ``label``."""
        if label not in self.labels:
            raise ValueError(f"unknown phase {label!r}; phases are {sorted(set(self.labels))}")
        k = max(current, self.first_periodic)
        while self.labels[k % self.period] != label:
            k += 1
        return k


def periodic_schedule(t_cov: int, t_inv: int, first_periodic: int) -> Schedule:
    """Phases of statistics every ``t_cov`` and inverses every ``t_inv`` steps."""
    period = math.lcm(t_cov, t_inv)
    if period == 1:
        return Schedule(first_periodic=first_periodic)

    def label(k: int) -> str:
        stats, inverse = k % t_cov == 0, k % t_inv == 0
        return {(True, True): "inverse+stats", (True, False): "stats", (False, True): "inverse"}.get((stats, inverse), "plain")

    return Schedule(period, tuple(label(k) for k in range(period)), first_periodic)


def schedule_of(optimizer: Any) -> Schedule:
    """The phase schedule of a :class:`CurvatureOptimizer` (a single phase for anything else)."""
    if isinstance(optimizer, CurvatureOptimizer):
        return periodic_schedule(optimizer.curvature_update_freq, optimizer.inverse_update_freq,
                                 optimizer.inverse_warmup_steps + 1)
    return Schedule()


def plan_phases(schedule: Schedule, rounds: int) -> list[str]:
    """``rounds`` phase labels: each phase at least once, about ``w_p·rounds`` times, spread evenly."""
    weights = schedule.weights
    if rounds < len(weights):
        raise ValueError(f"--steps must be at least {len(weights)} to time every phase {sorted(weights)}")
    main = max(weights, key=lambda p: weights[p])
    counts = {p: max(1, round(w * rounds)) for p, w in weights.items() if p != main}
    counts[main] = rounds - sum(counts.values())
    if counts[main] < 1:
        raise ValueError(f"--steps {rounds} is too small for the phases {sorted(weights)}")
    slots = sorted((((j + 0.5) / c), p) for p, c in counts.items() for j in range(c))
    return [p for _, p in slots]


# ---------------------------------------------------------------------------------- candidates
def prefill_lbfgs(optimizer: Any) -> int:
    """Fill every K-BFGS(L) memory with pairs ``s = y = e_j`` (they leave H = H0); returns the pairs added."""
    added = 0
    for block in getattr(optimizer, "blocks", {}).values():
        lbfgs = getattr(getattr(block, "g_factor", None), "lbfgs", None)
        if lbfgs is None:
            continue
        j = 0
        while lbfgs.size < lbfgs.memory:
            e = torch.zeros(lbfgs.dim, dtype=lbfgs.S.dtype, device=lbfgs.S.device)
            e[j % lbfgs.dim] = 1.0
            lbfgs.append(e, e)
            j += 1
            added += 1
    return added


def lbfgs_pairs(optimizer: Any) -> int | None:
    """The fewest pairs stored in any K-BFGS(L) layer (None when there is none)."""
    sizes = [b.g_factor.lbfgs.size for b in getattr(optimizer, "blocks", {}).values()
             if hasattr(getattr(b, "g_factor", None), "lbfgs")]
    return min(sizes) if sizes else None


class OptimizerCandidate:
    """One method on its own model: a ``torch.optim.Optimizer`` stepped with a closure."""

    def __init__(self, method: Method, workload: Workload, device: torch.device, seed: int = 0,
                 prefill: bool = True) -> None:
        self.method, self.workload, self.device = method, workload, device
        self.model = workload.build_model(seed, device)
        self.optimizer = method.build(self.model, workload)
        self.x, self.y = workload.make_batch(seed, device)
        self.loss_fn = workload.loss_fn
        self.schedule = schedule_of(self.optimizer)
        self.prefilled = prefill_lbfgs(self.optimizer) if prefill else 0
        self.closure = self._make_closure()
        self._counts = self._counters()

    def _make_closure(self) -> Callable[[], torch.Tensor]:
        model, opt, x, y, loss_fn = self.model, self.optimizer, self.x, self.y, self.loss_fn

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        return closure

    # --- the Candidate protocol of benchmarks.timing
    def plan(self, rounds: int) -> list[str]:
        return plan_phases(self.schedule, rounds)

    def prepare(self, phase: str) -> None:
        if self.schedule.periodic:
            self.optimizer.steps = self.schedule.next_step(self.optimizer.steps, phase)

    def step(self) -> Any:
        if isinstance(self.optimizer, MatrixFreeOptimizer):  # products need the batch targets
            return self.optimizer.step(self.closure, targets=self.y)
        return self.optimizer.step(self.closure)

    def _counters(self) -> dict[str, int]:
        opt = self.optimizer
        if isinstance(opt, MatrixFreeOptimizer):
            return {"skipped": int(opt.counters["skipped_steps"]), "products": int(opt.counters["products"]),
                    "loss_evals": int(opt.counters["loss_evals"])}
        if not isinstance(opt, CurvatureOptimizer):
            return {}
        return {"skipped": int(opt.counters["skipped_steps"]), "reverted": int(opt.counters["reverted_steps"]),
                "inverses": int(opt.inversion_stats.calls)}

    def after_step(self) -> dict[str, Any]:
        now = self._counters()
        delta = {k: now[k] - self._counts.get(k, 0) for k in now}
        self._counts = now
        return delta

    def floor_spec(self) -> MethodSpec:
        spec = self.method.spec
        if spec.kind == "kbfgsl":
            pairs = lbfgs_pairs(self.optimizer)
            return MethodSpec("kbfgsl", memory=int(pairs or 0))
        return spec

    def state_bytes(self) -> int:
        return state_dict_bytes(self.optimizer.state_dict())

    def notes(self) -> list[str]:
        out = []
        if isinstance(self.optimizer, MatrixFreeOptimizer):
            out.append("floor = SGD's (forward + backward), a loose lower bound")
        spec = self.floor_spec()
        if spec.kind == "kbfgsl":
            out.append(f"p={spec.memory}" + (" (prefilled)" if self.prefilled else ""))
        return out


class PeerUnavailable(RuntimeError):
    """The peer library is not installed or cannot run here."""


def import_asdl() -> types.ModuleType:
    """Import ASDL (pip package ``asdfghjkl``, module ``asdl``) or raise :class:`PeerUnavailable`."""
    try:
        asdl = importlib.import_module("asdl")
    except Exception as exc:  # ImportError, or an incompatibility raised while importing
        raise PeerUnavailable(f"ASDL is not installed ({type(exc).__name__}: {exc}); "
                              "pip install --no-deps asdfghjkl==0.1a5 (the 'peers' extra) to compare") from exc
    for name in ("KfacGradientMaker", "KronBfgsGradientMaker", "PreconditioningConfig", "FISHER_EMP"):
        if not hasattr(asdl, name):
            raise PeerUnavailable(f"the installed 'asdl' module has no {name}: not ASDL 0.1a5")
    return asdl


def _nvtx_usable() -> bool:
    try:
        with torch.cuda.nvtx.range("probe"):
            pass
        return True
    except Exception:
        return False


def _shim_asdl_nvtx() -> bool:
    """On torch builds without NVTX, make ASDL's ``nvtx.range`` a no-op context; returns True if shimmed."""
    if _nvtx_usable():
        return False
    shim = types.SimpleNamespace(range=lambda *args, **kwargs: contextlib.nullcontext())
    for module_name in ("asdl.operations.operation", "asdl.precondition.natural_gradient"):
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        if hasattr(module, "nvtx"):
            module.nvtx = shim
    return True


class AsdlCandidate(OptimizerCandidate):
    """An ASDL gradient maker (KFAC or K-BFGS) preconditioning the gradient of ``torch.optim.SGD``."""

    def __init__(self, method: Method, workload: Workload, device: torch.device, seed: int = 0,
                 prefill: bool = True) -> None:
        asdl = import_asdl()
        self.shimmed = _shim_asdl_nvtx()
        self.method, self.workload, self.device = method, workload, device
        self.model = workload.build_model(seed, device)
        self.x, self.y = workload.make_batch(seed, device)
        self.loss_fn = workload.loss_fn
        spec = method.spec
        t_cov, t_inv = spec.curvature_update_freq, spec.inverse_update_freq
        if spec.kind == "kfac":
            config = asdl.PreconditioningConfig(data_size=workload.batch, damping=3.0, ema_decay=0.1,
                                                preconditioner_upd_interval=t_inv, curvature_upd_interval=t_cov)
            self.maker = asdl.KfacGradientMaker(self.model, config, fisher_type=asdl.FISHER_EMP)
            self.schedule = periodic_schedule(t_cov, t_inv, 0)
        elif spec.kind == "kbfgs":
            config = asdl.PreconditioningConfig(data_size=workload.batch, damping=0.3, ema_decay=0.1)
            self.maker = asdl.KronBfgsGradientMaker(self.model, config)
            self.schedule = Schedule()
        else:
            raise ValueError(f"no ASDL peer for {spec.kind!r}")
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, dampening=0.9,
                                         weight_decay=1e-5)
        self.prefilled = 0
        self._counts = {}

    def prepare(self, phase: str) -> None:
        if self.schedule.periodic:
            self.maker.state["step"] = self.schedule.next_step(self.maker.state["step"], phase)

    def step(self) -> Any:
        self.optimizer.zero_grad(set_to_none=True)
        dummy = self.maker.setup_model_call(self.model, self.x)
        self.maker.setup_loss_call(self.loss_fn, dummy, self.y)
        _, loss = self.maker.forward_and_backward()
        self.optimizer.step()
        return loss

    def floor_spec(self) -> MethodSpec:
        return self.method.spec

    def state_bytes(self) -> int:
        raise NotImplementedError("ASDL keeps its curvature on the modules, outside any state_dict")

    def notes(self) -> list[str]:
        return ["nvtx shim"] if self.shimmed else []


def make_candidate(name: str, workload: Workload, device: torch.device, seed: int = 0,
                   prefill: bool = True) -> OptimizerCandidate:
    method = METHODS[name]
    cls = AsdlCandidate if method.peer_of is not None else OptimizerCandidate
    return cls(method, workload, device, seed, prefill)


# ---------------------------------------------------------------------------------- memory
def state_dict_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) state dict: dicts, lists and tuples are walked."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_dict_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_dict_bytes(v) for v in obj)
    return 0


def step_peak_bytes(candidate: OptimizerCandidate) -> int | None:
    """CUDA: peak allocated during one step above what was allocated before it; None on the CPU."""
    if candidate.device.type != "cuda":
        return None
    synchronize(candidate.device)
    torch.cuda.reset_peak_memory_stats(candidate.device)
    before = torch.cuda.memory_allocated(candidate.device)
    candidate.step()
    synchronize(candidate.device)
    return int(torch.cuda.max_memory_allocated(candidate.device) - before)


# ---------------------------------------------------------------------------------- the suite
@dataclass
class SuiteResult:
    workload: Workload
    rows: list[dict[str, Any]]
    samples: list[Sample]
    floors: dict[str, dict[str, float]]
    memory: list[dict[str, Any]] = field(default_factory=list)
    peers: list[dict[str, Any]] = field(default_factory=list)
    skipped_peers: list[str] = field(default_factory=list)
    steps: int = 0


def _fmt_phases(schedule: Schedule) -> str:
    return ";".join(f"{p}:{w:.3g}" for p, w in sorted(schedule.weights.items(), key=lambda kv: -kv[1]))


def summarize_candidate(name: str, cand: OptimizerCandidate, samples: Sequence[Sample]) -> dict[str, Any]:
    """Amortized ms/step and × Adam of one candidate (see the module docstring)."""
    weights = cand.schedule.weights
    times = {p: [s.seconds for s in select(samples, name, phase=p)] for p in weights}
    ms = phase_weighted(times, weights).scaled(1000.0)
    pairs = paired_ratios(samples, name, BASELINE)
    ratio = phase_weighted({p: [r for s, r in pairs if s.phase == p] for p in weights}, weights)
    per_repeat = []
    for rep in sorted({s.repeat for s, _ in pairs}):
        by_phase = {p: [r for s, r in pairs if s.phase == p and s.repeat == rep] for p in weights}
        per_repeat.append(phase_weighted(by_phase, weights).median)
    mine = select(samples, name)
    skipped = sum(s.extra.get("skipped", 0) + s.extra.get("reverted", 0) for s in mine)
    counted = [s for s in mine if "products" in s.extra]
    products = sum(s.extra["products"] for s in counted) / len(counted) if counted else None
    loss_evals = sum(s.extra["loss_evals"] for s in counted) / len(counted) if counted else None
    return {
        "method": name, "label": cand.method.label,
        "ms_median": ms.median, "ms_q25": ms.q25, "ms_q75": ms.q75,
        "x_adam_median": ratio.median, "x_adam_q25": ratio.q25, "x_adam_q75": ratio.q75,
        "x_adam_repeat_min": min(per_repeat), "x_adam_repeat_max": max(per_repeat),
        "timed_steps": len(mine), "phases": _fmt_phases(cand.schedule), "skipped_steps": skipped,
        "products_per_step": products, "loss_evals_per_step": loss_evals,
        "notes": " ".join(cand.notes()),
    }


def add_floor_columns(rows: list[dict[str, Any]], floors: dict[str, float], shapes: list[LinearShape],
                      batch: int, specs: dict[str, MethodSpec]) -> None:
    """Fill floor_gflop, floor_x_sgd, measured_x_sgd, gap and achieved_gflops in place."""
    ref = next((r for r in rows if r["method"] == REFERENCE), None)
    for row in rows:
        spec = specs[row["method"]]
        row["floor_gflop"] = floors[row["method"]] / 1e9
        row["floor_x_sgd"] = floor_ratio(spec, shapes, batch)
        if ref is not None and ref["x_adam_median"] > 0:
            row["measured_x_sgd"] = row["x_adam_median"] / ref["x_adam_median"]
            row["gap"] = row["measured_x_sgd"] / row["floor_x_sgd"]
        else:
            row["measured_x_sgd"] = row["gap"] = None
        row["achieved_gflops"] = floors[row["method"]] / (row["ms_median"] / 1000.0) / 1e9 if row["ms_median"] > 0 else None


def run_suite(workload: Workload, methods: Sequence[str], device: torch.device, *, steps: int, warmup: int,
              repeats: int, seed: int = 0, prefill: bool = True, memory: bool = False,
              peers: bool = False, log: Callable[[str], None] = print) -> SuiteResult:
    """Time ``methods`` (Adam and SGD-m are always added) and, optionally, peers; see the module docstring."""
    names = list(dict.fromkeys([BASELINE, REFERENCE, *methods]))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    skipped_peers: list[str] = []
    if peers:
        try:
            import_asdl()
            names += [p for p in PEER_METHODS if METHODS[p].peer_of in names and p not in names]
        except PeerUnavailable as exc:
            skipped_peers.append(str(exc))
            log(f"peers skipped: {exc}")
    names = [n for n in names if METHODS[n].peer_of is None or peers]
    candidates: dict[str, OptimizerCandidate] = {}
    for name in names:
        try:
            candidates[name] = make_candidate(name, workload, device, seed, prefill)
        except PeerUnavailable as exc:
            skipped_peers.append(f"{name}: {exc}")
            log(f"peer {name} skipped: {exc}")
    need = max(len(c.schedule.weights) for c in candidates.values())
    if steps < need:
        slowest = [n for n, c in candidates.items() if len(c.schedule.weights) == need]
        log(f"steps raised from {steps} to {need} so that every phase of {', '.join(slowest)} is timed in every repeat")
        steps = need
    log(f"[{workload.name} B={workload.batch} {device}] warm-up: {warmup} step(s) x {len(candidates)} methods")
    for _ in range(warmup):
        for cand in candidates.values():
            cand.step()
    synchronize(device)
    for cand in candidates.values():
        cand.after_step()  # reset the counters: warm-up skips are not reported
    timer = make_timer(device)
    start = time.perf_counter()

    def progress(rep: int, rnd: int) -> None:
        if rnd == steps - 1:
            log(f"  repeat {rep + 1}/{repeats} done ({time.perf_counter() - start:.0f} s)")

    samples = run_interleaved(candidates, repeats=repeats, rounds=steps, timer=timer, on_round=progress)
    shapes = workload.shapes()
    specs = {n: c.floor_spec() for n, c in candidates.items()}
    floors = {n: step_floor(specs[n], shapes, workload.batch).total for n in candidates}
    rows = [summarize_candidate(n, c, samples) for n, c in candidates.items()]
    add_floor_columns(rows, floors, shapes, workload.batch, specs)
    result = SuiteResult(workload, [r for r in rows if METHODS[r["method"]].peer_of is None], samples,
                         {n: step_floor(specs[n], shapes, workload.batch).as_dict() for n in candidates},
                         skipped_peers=skipped_peers, steps=steps)
    by_name = {r["method"]: r for r in rows}
    for name in candidates:
        method = METHODS[name]
        if method.peer_of is not None and method.peer_of in by_name:
            ours, theirs = by_name[method.peer_of], by_name[name]
            result.peers.append({
                "ours": method.peer_of, "theirs": name, "ours_ms": ours["ms_median"], "theirs_ms": theirs["ms_median"],
                "theirs_x_adam": theirs["x_adam_median"],
                "ours_over_theirs": ours["x_adam_median"] / theirs["x_adam_median"],
                "status": "ok" + (f" ({theirs['notes']})" if theirs["notes"] else ""),
            })
    if memory:
        result.memory = measure_memory({n: c for n, c in candidates.items() if METHODS[n].peer_of is None})
    return result


def measure_memory(candidates: dict[str, OptimizerCandidate]) -> list[dict[str, Any]]:
    """Optimizer-state bytes (and the CUDA step peak) of each candidate, with the ratio to Adam's."""
    rows = []
    for name, cand in candidates.items():
        peak = step_peak_bytes(cand)
        state = cand.state_bytes()
        rows.append({"method": name, "state_bytes": state, "peak_bytes": peak if peak is not None else state,
                     "peak_kind": "cuda max_memory_allocated during one step, above the resident memory"
                     if peak is not None else "cpu: no allocator statistics; estimate = optimizer-state bytes"})
    adam = next((r["state_bytes"] for r in rows if r["method"] == BASELINE), None)
    for row in rows:
        row["state_x_adam"] = row["state_bytes"] / adam if adam else None
    return rows


def run_sweep(methods: Sequence[str], device: torch.device, *, widths: Sequence[int], batches: Sequence[int],
              steps: int, warmup: int, repeats: int, seed: int = 0, prefill: bool = True,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One ``Linear(width, width)`` layer with ½·SSE against random targets, over a grid of widths and batches."""
    rows = []
    for width in widths:
        for batch in batches:
            result = run_suite(Workload.linear(width, batch), methods, device, steps=steps, warmup=warmup,
                               repeats=repeats, seed=seed, prefill=prefill, log=log)
            for row in result.rows:
                rows.append({"width": width, "batch": batch, **{k: row.get(k) for k in SWEEP_COLUMNS if k in row}})
            del result
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------- output
def _f(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def format_table(rows: Sequence[dict[str, Any]], title: str) -> str:
    header = ("method", "ms/step [IQR]", "x Adam [q25-q75]", "repeats", "floor GFLOP", "floor (x SGD)",
              "meas. (x SGD)", "gap", "GFLOP/s", "notes")
    lines = [header]
    for r in rows:
        notes = r.get("notes") or ""
        if r.get("products_per_step") is not None:
            notes = (f"{r['products_per_step']:.1f} products + {r['loss_evals_per_step']:.1f} forwards per step; "
                     + notes).strip()
        if r.get("skipped_steps"):
            notes = (notes + f" SKIPPED/REVERTED STEPS: {r['skipped_steps']}").strip()
        lines.append((
            r["label"],
            f"{_f(r['ms_median'], '.1f')} [{_f(r['ms_q25'], '.1f')}-{_f(r['ms_q75'], '.1f')}]",
            f"{_f(r['x_adam_median'])} [{_f(r['x_adam_q25'])}-{_f(r['x_adam_q75'])}]",
            f"{_f(r['x_adam_repeat_min'])}-{_f(r['x_adam_repeat_max'])}",
            _f(r.get("floor_gflop"), ".3g"), _f(r.get("floor_x_sgd")), _f(r.get("measured_x_sgd")), _f(r.get("gap")),
            _f(r.get("achieved_gflops"), ".1f"), notes,
        ))
    return _render(title, lines) + TABLE_NOTES


TABLE_NOTES = """
  ms/step: median over the timed steps [quartiles], amortized over phases (sum of w_p * median_p);
  x Adam: median of the per-round ratios to Adam's step of the same round [quartiles]; repeats: range
  of the per-repeat medians; floor: analytic FLOPs per step (benchmarks/flops.py); meas. (x SGD) =
  x Adam / SGD-m's x Adam; gap = meas. (x SGD) / floor (x SGD); GFLOP/s = floor / median time."""


def _render(title: str, lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    out = [title]
    for j, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_memory(rows: Sequence[dict[str, Any]]) -> str:
    lines = [("method", "state MB", "x Adam", "peak MB", "peak is")]
    for r in rows:
        lines.append((r["method"], _f(r["state_bytes"] / 2**20), _f(r["state_x_adam"]),
                      _f(r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None else None), r["peak_kind"]))
    return _render("Optimizer state (bytes of every tensor in optimizer.state_dict(), recursively)", lines)


def format_peers(rows: Sequence[dict[str, Any]], skipped: Sequence[str]) -> str:
    lines = [("ours", "theirs", "ours ms", "theirs ms", "theirs x Adam", "ours / theirs", "status")]
    for r in rows:
        lines.append((r["ours"], r["theirs"], _f(r["ours_ms"], ".1f"), _f(r["theirs_ms"], ".1f"),
                      _f(r["theirs_x_adam"]), _f(r["ours_over_theirs"]), r["status"]))
    text = _render("Peers (same model, batch and loss; interleaved with the suite)", lines) if rows else "Peers: none run"
    return text + "".join(f"\n  skipped: {s}" for s in skipped)


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    lines = [("width", "batch", "method", "ms/step", "x Adam [q25-q75]", "floor (x SGD)", "meas. (x SGD)", "gap")]
    for r in rows:
        lines.append((str(r["width"]), str(r["batch"]), r["method"], _f(r["ms_median"], ".2f"),
                      f"{_f(r['x_adam_median'])} [{_f(r['x_adam_q25'])}-{_f(r['x_adam_q75'])}]",
                      _f(r["floor_x_sgd"]), _f(r["measured_x_sgd"]), _f(r["gap"])))
    return _render("Scaling sweep: one Linear(width, width), 1/2 SSE, random targets", lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in columns})


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "processor": platform.processor(), "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ---------------------------------------------------------------------------------- CLI
def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("mnist", "curves", "faces", "tiny", "transformer"), default="mnist",
                   help="autoencoder (tiny = 20-12-6-12-20, for tests), or the decoder-only transformer "
                        "(--batch sequences of --seq-len tokens; AdamW, KFAC, K-BFGS, K-BFGS(L))")
    p.add_argument("--seq-len", type=_positive, default=32, help="transformer: tokens per sequence")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--batch", type=_positive, default=1000)
    p.add_argument("--steps", type=_positive, default=10, help="timed steps (rounds) per method per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method before timing")
    p.add_argument("--repeats", type=_positive, default=3)
    p.add_argument("--methods", default=",".join(OUR_METHODS),
                   help=f"comma-separated subset of {','.join(OUR_METHODS + MATRIX_FREE_METHODS)} (default "
                        f"{','.join(OUR_METHODS)}; adam and sgdm always run)")
    p.add_argument("--no-main", action="store_true", help="skip the main table (run only --sweep/--profile)")
    p.add_argument("--sweep", action="store_true", help="also run the single-Linear scaling sweep")
    p.add_argument("--full", action="store_true", help="the whole sweep grid (widths 256..4096, batches 128..8192)")
    p.add_argument("--sweep-widths", type=_csv_ints, default=None)
    p.add_argument("--sweep-batches", type=_csv_ints, default=None)
    p.add_argument("--sweep-steps", type=_positive, default=4)
    p.add_argument("--sweep-repeats", type=_positive, default=1)
    p.add_argument("--memory", action="store_true", help="optimizer-state bytes (and CUDA step peaks)")
    p.add_argument("--peers", action="store_true", help="ASDL KFAC and K-BFGS in the same run, if installed")
    p.add_argument("--profile", action="append", default=[], metavar="METHOD",
                   help="torch.profiler breakdown of one step of METHOD (repeatable)")
    p.add_argument("--profile-steps", type=_positive, default=1, help="profiled steps per phase")
    p.add_argument("--no-prefill", action="store_true", help="do not prefill the K-BFGS(L) memory")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-sizes", dest="world_sizes", type=_csv_ints, default=None,
                   help="also time data-parallel KFAC/K-BFGS/K-BFGS(L) at these world sizes, e.g. 1,2 "
                        "(gloo on CPU, NCCL with --device cuda; benchmarks.throughput_dist)")
    p.add_argument("--out", type=Path, default=Path("results/throughput"))
    return p


# ---------------------------------------------------------------------------------- transformer
TRANSFORMER_METHODS = ("adamw", "kfac", "kbfgs", "kbfgsl")


class _TransformerCandidate:
    """One method on its own copy of the decoder-only transformer and the same token batch."""

    def __init__(self, name: str, seq: torch.Tensor, seed: int, device: torch.device) -> None:
        from benchmarks.transformer import TinyDecoder

        torch.manual_seed(seed)
        self.model = TinyDecoder(TRANSFORMER_VOCAB, dim=TRANSFORMER_DIM, heads=4, layers=2,
                                 max_len=seq.shape[1]).to(device)
        self.seq = seq
        builders = {
            "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
            "kfac": lambda m: KFAC(m, lr=0.1, damping=0.3),
            "kbfgs": lambda m: KBFGS(m, lr=0.1, damping=0.3),
            "kbfgsl": lambda m: KBFGSL(m, lr=0.1, damping=0.3, memory=10),
        }
        self.optimizer = builders[name](self.model)

    def plan(self, rounds: int) -> list[str]:
        return ["steady"] * rounds

    def prepare(self, phase: str) -> None:
        pass

    def step(self) -> Any:
        from benchmarks.transformer import next_token_loss

        def closure():
            self.optimizer.zero_grad()
            loss = next_token_loss(self.model, self.seq)
            loss.backward()
            return loss
        return self.optimizer.step(closure)

    def after_step(self) -> dict[str, Any]:
        return {}


TRANSFORMER_VOCAB, TRANSFORMER_DIM = 32, 64


def run_transformer(device: torch.device, *, batch: int, seq_len: int, steps: int, warmup: int, repeats: int,
                    seed: int, methods: Sequence[str] = TRANSFORMER_METHODS) -> list[dict[str, Any]]:
    """Step time of each method on a decoder-only transformer (2 pre-LN blocks, width 64, 4 heads,
    vocabulary 32, token batch ``[batch, seq_len]``), interleaved with AdamW in the same run.

    ``warmup`` untimed steps first (KFAC inverts at every step k <= 20, so use warmup > 20 to time
    the steady state). Rows: median ms, the median of the per-round ratios to AdamW, and the mean ms
    over consecutive steps (KFAC's inverse every 20 steps is amortized in the mean, not in medians).
    """
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, TRANSFORMER_VOCAB, (batch, seq_len + 1), generator=gen).to(device)
    names = ["adamw"] + [m for m in methods if m != "adamw"]
    cands = {n: _TransformerCandidate(n, seq, seed, device) for n in names}
    for cand in cands.values():
        for _ in range(warmup):
            cand.step()
    synchronize(device)
    samples = run_interleaved(cands, repeats=repeats, rounds=steps, timer=make_timer(device))
    base = {(s.repeat, s.round): s.seconds for s in samples if s.name == "adamw"}
    rows = []
    for n in names:
        mine = [s for s in samples if s.name == n]
        ratio = summarize([s.seconds / base[(s.repeat, s.round)] for s in mine])
        ms = summarize([1e3 * s.seconds for s in mine])
        rows.append({"method": n, "ms_median": ms.median, "ms_mean": sum(1e3 * s.seconds for s in mine) / len(mine),
                     "x_adamw_median": ratio.median, "x_adamw_q25": ratio.q25, "x_adamw_q75": ratio.q75,
                     "timed_steps": len(mine)})
    return rows


def format_transformer(rows: Sequence[dict[str, Any]], title: str) -> str:
    lines = [title, f"{'method':8s} {'ms median':>10s} {'ms mean':>9s} {'x AdamW [q25-q75]':>22s}"]
    for r in rows:
        lines.append(f"{r['method']:8s} {r['ms_median']:10.2f} {r['ms_mean']:9.2f} "
                     f"{r['x_adamw_median']:8.2f} [{r['x_adamw_q25']:.2f}-{r['x_adamw_q75']:.2f}]")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    if args.warmup < 0:
        print("--warmup must be >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "transformer":
        rows = run_transformer(device, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                               warmup=args.warmup, repeats=args.repeats, seed=args.seed)
        text = format_transformer(rows, f"decoder transformer, batch {args.batch} x {args.seq_len} tokens, {device}: "
                                        f"{args.repeats} repeats x {args.steps} interleaved steps (after {args.warmup} warm-up)")
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out / "transformer.csv", rows, tuple(rows[0]))
        (args.out / "transformer.txt").write_text(text + "\n")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in OUR_METHODS + MATRIX_FREE_METHODS] + [
        m for m in args.profile if m not in OUR_METHODS]
    if bad:
        print(f"unknown method(s) {bad}; choose from {', '.join(OUR_METHODS + MATRIX_FREE_METHODS)}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    workload = Workload.autoencoder(args.model, args.batch)
    report: dict[str, Any] = {
        "meta": {"command": " ".join([sys.executable, "-m", "benchmarks.throughput", *(argv if argv is not None else sys.argv[1:])]),
                 "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": args.model, "widths": list(workload.widths),
                 "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                 "timer": type(make_timer(device)).__name__, "prefill_lbfgs": not args.no_prefill,
                 "environment": environment(device), "columns": list(TABLE_COLUMNS)},
    }
    texts = []
    if not args.no_main:
        res = run_suite(workload, methods, device, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                        seed=args.seed, prefill=not args.no_prefill, memory=args.memory, peers=args.peers)
        texts.append(format_table(res.rows, f"{args.model} autoencoder, batch {args.batch}, {device}: "
                                            f"{args.repeats} repeats x {res.steps} interleaved steps "
                                            f"(after {args.warmup} warm-up)"))
        report["meta"]["steps_effective"] = res.steps
        report.update(rows=res.rows, floors=res.floors,
                      samples=[{"method": s.name, "repeat": s.repeat, "round": s.round, "phase": s.phase,
                                "seconds": s.seconds, **s.extra} for s in res.samples])
        write_csv(out / "throughput.csv", res.rows, TABLE_COLUMNS)
        if args.memory:
            texts.append(format_memory(res.memory))
            report["memory"] = res.memory
            write_csv(out / "memory.csv", res.memory, MEMORY_COLUMNS)
        if args.peers:
            texts.append(format_peers(res.peers, res.skipped_peers))
            report["peers"] = res.peers
            report["peers_skipped"] = res.skipped_peers
            write_csv(out / "peers.csv", res.peers, PEER_COLUMNS)
    if args.sweep:
        widths = args.sweep_widths or (FULL_SWEEP_WIDTHS if args.full else DEFAULT_SWEEP_WIDTHS)
        batches = args.sweep_batches or (FULL_SWEEP_BATCHES if args.full else DEFAULT_SWEEP_BATCHES)
        sweep_methods = [m for m in SWEEP_METHODS if m in methods or m in (BASELINE, REFERENCE)]
        rows = run_sweep(sweep_methods, device, widths=widths, batches=batches, steps=args.sweep_steps,
                         warmup=max(1, min(args.warmup, 2)), repeats=args.sweep_repeats, seed=args.seed,
                         prefill=not args.no_prefill)
        texts.append(format_sweep(rows))
        report["sweep"] = rows
        write_csv(out / "sweep.csv", rows, SWEEP_COLUMNS)
    if args.world_sizes:
        from benchmarks.throughput_dist import DIST_COLUMNS, format_rows, run_world_sizes

        rows = run_world_sizes(workload.widths, args.batch, args.world_sizes, steps=args.steps,
                               warmup=max(args.warmup, 1), device=args.device, threads=args.threads)
        texts.append(format_rows(rows, f"data-parallel {args.model} autoencoder, global batch {args.batch}, "
                                       f"{args.device}: median of {args.steps} steps (slowest rank)"))
        report["distributed"] = rows
        write_csv(out / "distributed.csv", rows, DIST_COLUMNS)
    if args.profile:
        from benchmarks.profile_step import profile_method, write_report

        report["profiles"] = {}
        for name in args.profile:
            prof = profile_method(name, workload, device, steps=args.profile_steps, warmup=max(args.warmup, 1),
                                  seed=args.seed, prefill=not args.no_prefill)
            write_report(prof, out)
            texts.append(prof.text())
            report["profiles"][name] = prof.as_dict()
    text = "\n\n".join(texts)
    print(text)
    (out / "table.txt").write_text(text + "\n")
    (out / "throughput.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
