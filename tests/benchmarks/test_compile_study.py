"""The compile study's measurement harness (eager mode only: compiling takes tens of seconds)."""

from __future__ import annotations

import math

from benchmarks import timing
from benchmarks.compile_study import run_mode
from curvature.blocks import KroneckerBlock


def test_eager_mode_times_real_k_bfgs_steps_and_leaves_no_global_setting():
    clock, prepare = timing.CPU_CLOCK, KroneckerBlock.prepare_after_step
    r = run_mode("curves", "kbfgs", "eager", steps=2, device="cpu", batch=32, clock="thread")
    assert r["skipped"] == 0 and r["reverted"] == 0
    assert 0 < r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and math.isfinite(r["warmup_s"])
    assert timing.CPU_CLOCK == clock and KroneckerBlock.prepare_after_step is prepare
