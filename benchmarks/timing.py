r"""Step timers and interleaved measurement for noisy, shared machines.

* :class:`CPUTimer`: ``time.perf_counter`` around the call.
* :class:`CUDATimer`: the device is synchronized before the call (so earlier queued work is not
  charged to it), CUDA events are recorded around it, and the end event is synchronized before the
  elapsed time is read: the measurement is the GPU time between the two events, including the
  host-side launch gaps of the step.
* :func:`run_interleaved`: the candidates take turns *one step at a time*; the order is rotated every
  round so that no candidate always follows the same one (cache state, clock boost). Each timed step
  is one :class:`Sample`. Python's garbage collector is paused around each timed call.

Pairing: a candidate's step and the baseline's step of the same round ran within a second or two
of each other, so their ratio cancels most of the load that other processes put on a shared machine;
the median over rounds then discards rounds hit by a burst. :func:`paired_ratios` builds those ratios
and :func:`summarize` reduces any list to median, quartiles, IQR, min and max.

Phases: a step of a method with periodic work (KFAC inverts every T_inv steps) belongs to a *phase*;
:func:`phase_weighted` combines per-phase medians with the phase frequencies into the amortized
per-step value :math:`\sum_p w_p\,\mathrm{median}_p`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import pathlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import torch


# ---------------------------------------------------------------------------------- timers
class Timer(Protocol):
    def time(self, fn: Callable[[], Any]) -> float:
        """Run ``fn`` once and return the seconds it took."""


class CPUTimer:
    """Wall-clock time of the call (``time.perf_counter``)."""

    name = "cpu:perf_counter"

    def time(self, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class ThreadTimer:
    """CPU time of the calling thread around the call (``time.thread_time``).

    With one torch thread (``--threads 1``) the whole CPU step, backward included (autograd runs CPU
    work on the calling thread), executes on this thread, so this clock excludes the time the
    thread waited for a core: on a machine shared with other jobs it is far less noisy than the
    wall clock, at the price of also excluding any genuine waiting (none on the CPU path).
    """

    name = "cpu:thread_time"

    def time(self, fn: Callable[[], Any]) -> float:
        start = time.thread_time()
        fn()
        return time.thread_time() - start


#: The CPU clock :func:`make_timer` uses: "wall" (:class:`CPUTimer`) or "thread" (:class:`ThreadTimer`).
CPU_CLOCK = "wall"


def set_cpu_clock(clock: str) -> None:
    """Choose the CPU clock of :func:`make_timer` ("wall" or "thread")."""
    global CPU_CLOCK
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    CPU_CLOCK = clock


@contextlib.contextmanager
def cpu_clock(clock: str):
    """Use ``clock`` as :func:`make_timer`'s CPU clock inside the ``with`` block; the previous one after."""
    previous = CPU_CLOCK
    set_cpu_clock(clock)
    try:
        yield
    finally:
        set_cpu_clock(previous)


def write_study(out: str | None, stem: str, rows: list[dict], table: str) -> None:
    """Print a study's ``table``; with a folder ``out``, also write ``stem.json`` (the rows) and ``stem.md`` there."""
    print(table)
    if out:
        folder = pathlib.Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(rows, indent=1))
        (folder / f"{stem}.md").write_text(table + "\n")


class CUDATimer:
    """GPU time between CUDA events recorded around the call, with synchronization on both sides."""

    name = "cuda:events"

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDATimer needs a CUDA device, got {self.device}")
        if not torch.cuda.is_available():
            raise RuntimeError("CUDATimer: CUDA is not available")

    def time(self, fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize(self.device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(self.device)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


def make_timer(device: torch.device | str) -> Timer:
    """:class:`CUDATimer` on a CUDA device, :class:`CPUTimer` otherwise."""
    if torch.device(device).type == "cuda":
        return CUDATimer(device)
    return ThreadTimer() if CPU_CLOCK == "thread" else CPUTimer()


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Summary:
    """Median, quartiles (linear interpolation), IQR, extremes and count of a list of values."""

    median: float
    q25: float
    q75: float
    min: float
    max: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    def scaled(self, factor: float) -> "Summary":
        return Summary(self.median * factor, self.q25 * factor, self.q75 * factor,
                       self.min * factor, self.max * factor, self.n)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "iqr": self.iqr}


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile with linear interpolation between order statistics."""
    if not values:
        raise ValueError("quantile of an empty list")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    data = sorted(values)
    pos = q * (len(data) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> Summary:
    data = [float(v) for v in values]
    if not data:
        raise ValueError("cannot summarize an empty list")
    return Summary(statistics.median(data), quantile(data, 0.25), quantile(data, 0.75), min(data), max(data), len(data))


# ---------------------------------------------------------------------------------- interleaving
@dataclass(frozen=True)
class Sample:
    """One timed step: candidate ``name``, ``repeat`` and ``round`` indices, ``phase``, ``seconds``."""

    name: str
    repeat: int
    round: int
    phase: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class Candidate(Protocol):
    """What :func:`run_interleaved` times.

    ``plan(rounds)`` returns the phase of each of the next ``rounds`` timed steps;
    ``prepare(phase)`` (untimed) arranges for the next step to be of that phase; ``step()`` is the
    timed training step; ``after_step()`` (untimed) returns extra facts about the step just taken.
    """

    def plan(self, rounds: int) -> list[str]: ...

    def prepare(self, phase: str) -> None: ...

    def step(self) -> Any: ...

    def after_step(self) -> dict[str, Any]: ...


def rotated(names: Sequence[str], k: int) -> list[str]:
    """``names`` rotated left by ``k`` (the order of round ``k``)."""
    if not names:
        return []
    k %= len(names)
    return list(names[k:]) + list(names[:k])


def run_interleaved(candidates: Mapping[str, Candidate], *, repeats: int, rounds: int, timer: Timer,
                    on_round: Callable[[int, int], None] | None = None) -> list[Sample]:
    """Time ``rounds`` steps of every candidate per repeat, one step each in turn, rotating the order.

    Returns every :class:`Sample` in the order they were taken.
    """
    if repeats < 1 or rounds < 1:
        raise ValueError(f"repeats and rounds must be >= 1, got {repeats}, {rounds}")
    names = list(candidates)
    samples: list[Sample] = []
    for r in range(repeats):
        plans = {name: candidates[name].plan(rounds) for name in names}
        for name, plan in plans.items():
            if len(plan) != rounds:
                raise ValueError(f"candidate {name!r} planned {len(plan)} steps for {rounds} rounds")
        gc.collect()
        for i in range(rounds):
            for name in rotated(names, r * rounds + i):
                cand = candidates[name]
                phase = plans[name][i]
                cand.prepare(phase)
                enabled = gc.isenabled()
                gc.disable()
                try:
                    seconds = timer.time(cand.step)
                finally:
                    if enabled:
                        gc.enable()
                samples.append(Sample(name, r, i, phase, seconds, cand.after_step()))
            if on_round is not None:
                on_round(r, i)
    return samples


def select(samples: Iterable[Sample], name: str, repeat: int | None = None, phase: str | None = None) -> list[Sample]:
    return [s for s in samples if s.name == name and (repeat is None or s.repeat == repeat)
            and (phase is None or s.phase == phase)]


def paired_ratios(samples: Sequence[Sample], name: str, baseline: str) -> list[tuple[Sample, float]]:
    """``(sample, seconds / baseline's seconds in the same repeat and round)`` for every step of ``name``."""
    base = {(s.repeat, s.round): s.seconds for s in samples if s.name == baseline}
    out = []
    for s in samples:
        if s.name == name and (s.repeat, s.round) in base and base[(s.repeat, s.round)] > 0:
            out.append((s, s.seconds / base[(s.repeat, s.round)]))
    return out


def phase_weighted(values_by_phase: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> Summary:
    r"""Amortized summary :math:`\sum_p w_p\,\mathrm{stat}_p` for each statistic (median, quartiles, extremes).

    Every phase with a positive weight must have at least one value; weights must sum to 1.
    """
    total = sum(weights.values())
    if not math.isclose(total, 1.0, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"phase weights must sum to 1, got {total}")
    parts = []
    for phase, w in weights.items():
        if w <= 0:
            continue
        values = values_by_phase.get(phase) or []
        if not values:
            raise ValueError(f"no values for phase {phase!r} (weight {w})")
        parts.append((w, summarize(values)))
    n = sum(s.n for _, s in parts)
    return Summary(sum(w * s.median for w, s in parts), sum(w * s.q25 for w, s in parts),
                   sum(w * s.q75 for w, s in parts), sum(w * s.min for w, s in parts),
                   sum(w * s.max for w, s in parts), n)
