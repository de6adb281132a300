"""pytest-benchmark suite: one training step of every method, per phase, with its FLOP floor.

Run (pyproject's addopts disable benchmarks, so enable them)::

    python -m pytest benchmarks/bench_throughput.py --benchmark-enable -p no:cacheprovider

The default size is tiny (the 20-12-6-12-20 autoencoder, batch 64) so the suite takes seconds; set
``SECONDORDER_BENCH_MODEL`` (tiny, mnist, faces), ``SECONDORDER_BENCH_BATCH`` and
``SECONDORDER_BENCH_DEVICE`` (cpu, cuda) for real sizes. Each benchmark is one method in one phase
(KFAC's inverse steps and plain steps are separate benchmarks; ``extra_info`` holds the phase weight
and the analytic floor), so ``--benchmark-compare`` tracks each kind of step on its own. On CUDA the
timed function synchronizes the device. For ratios to Adam measured interleaved on a shared machine,
use ``python -m benchmarks.throughput``; this suite times methods one after another.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.flops import step_floor
from benchmarks.throughput import OUR_METHODS, Workload, make_candidate
from benchmarks.timing import synchronize

MODEL = os.environ.get("SECONDORDER_BENCH_MODEL", "tiny")
BATCH = int(os.environ.get("SECONDORDER_BENCH_BATCH", "64"))
DEVICE = torch.device(os.environ.get("SECONDORDER_BENCH_DEVICE", "cpu"))
ROUNDS = int(os.environ.get("SECONDORDER_BENCH_ROUNDS", "10"))
WORKLOAD = Workload.autoencoder(MODEL, BATCH)

if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("SECONDORDER_BENCH_DEVICE=cuda but CUDA is not available", allow_module_level=True)


def _cases() -> list[tuple[str, str]]:
    cases = []
    for name in OUR_METHODS:
        cand = make_candidate(name, Workload.autoencoder("tiny", 4), torch.device("cpu"))
        cases += [(name, phase) for phase in sorted(cand.schedule.weights)]
    return cases


@pytest.mark.parametrize(("method", "phase"), _cases(), ids=lambda v: v)
def test_step(benchmark, method: str, phase: str) -> None:
    cand = make_candidate(method, WORKLOAD, DEVICE)
    for _ in range(2):
        cand.step()
    synchronize(DEVICE)

    def run() -> None:
        cand.step()
        synchronize(DEVICE)

    floor = step_floor(cand.floor_spec(), WORKLOAD.shapes(), WORKLOAD.batch)
    benchmark.group = f"{MODEL} batch {BATCH} {DEVICE}"
    benchmark.extra_info.update(method=method, phase=phase, phase_weight=cand.schedule.weights[phase],
                                floor_gflop=floor.total / 1e9, floor_components=floor.as_dict())
    benchmark.pedantic(run, setup=lambda: cand.prepare(phase), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    losses = [float(cand.closure().detach())]
    assert all(torch.isfinite(torch.tensor(losses)))
