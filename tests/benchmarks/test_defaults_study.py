"""The class defaults train untuned on the defaults study's two cheapest problems (a verdict that fails
when a default diverges or barely trains), and the study's table is well formed."""

from __future__ import annotations

import math

import pytest

from benchmarks.defaults_study import PROBLEMS, _format_row, run_one


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["teacher", "moons"])
@pytest.mark.parametrize("optimizer", ["kfac", "kbfgs", "diagonal"])
def test_class_defaults_train_untuned(problem, optimizer):
    row = run_one(PROBLEMS[problem], optimizer, "defaults", warm=False)
    assert not row["diverged"] and math.isfinite(row["final"])
    assert row["ratio"] < 0.25, row  # measured 0.007-0.09 (README, "Defaults")
    assert row["skipped"] == 0 and row["reverted"] == 0
    if problem == "moons":
        assert row["accuracy"] > 0.95
    assert _format_row(row).startswith(problem)
