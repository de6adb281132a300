"""The compile study's measurement harness (eager mode only: compiling takes tens of seconds)."""

from __future__ import annotations

import math

from benchmarks.compile_study import run_mode


def test_eager_mode_times_real_k_bfgs_steps():
    r = run_mode("curves", "kbfgs", "eager", steps=2, device="cpu", batch=32)
    assert r["skipped"] == 0 and r["reverted"] == 0
    assert 0 < r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and math.isfinite(r["warmup_s"])
