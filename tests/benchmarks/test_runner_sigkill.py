"""The experiment runner killed with SIGKILL in the middle of an epoch resumes with ``--resume`` to the
same results as an uninterrupted run (separate processes; nothing of the killed process survives but
its files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.experiment.runner import TIMING_FIELDS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"dataset": "curves", "n_train": 200, "n_test": 100, "batch_size": 50, "epochs": 2,
          "widths": [784, 8, 4, 8, 784], "threads": 1, "optimizers": ["adam", "kfac"]}
TIMING = {*TIMING_FIELDS, "median_step_ms"}

# run in a child process: train, and SIGKILL the process itself at kfac's epoch 2, step 1
KILLER = """
import os, signal, sys
from benchmarks.autoencoder import main
import benchmarks.experiment.experiment as experiment
original = experiment.run_experiment
def run_experiment(*args, **kwargs):
    def on_step(name, tag, epoch, step):
        if name == "kfac" and epoch == 2 and step == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    kwargs["on_step"] = on_step
    return original(*args, **kwargs)
experiment.run_experiment = run_experiment
import benchmarks.autoencoder as cli
cli.run_experiment = run_experiment
sys.exit(main(sys.argv[1:]))
"""


def _cli(args: list[str], cwd: Path, script: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "benchmarks.autoencoder", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_results(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    common = ["--config", str(config), "--data-dir", str(tmp_path / "data"), "--no-progress"]
    full = _cli([*common, "--out", str(tmp_path / "full")], ROOT)
    assert full.returncode == 0, full.stderr[-2000:]

    killed = _cli([*common, "--out", str(tmp_path / "killed")], ROOT, KILLER)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    runs = tmp_path / "killed" / "runs"
    assert (runs / "adam" / "main" / "result.json").exists()  # finished before the kill
    assert not (runs / "kfac" / "main" / "result.json").exists()  # killed mid-run
    assert (runs / "kfac" / "main" / "checkpoint.pt").exists()  # epoch 1 checkpoint
    assert not (tmp_path / "killed" / "results.json").exists()

    resumed = _cli([*common, "--out", str(tmp_path / "killed"), "--resume"], ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want = _strip(json.loads((tmp_path / "full" / "results.json").read_text())["runs"])
    got = _strip(json.loads((tmp_path / "killed" / "results.json").read_text())["runs"])
    assert set(got) == {"kfac", "adam"}
    assert got == want
    assert want["kfac"]["epoch"] == [0, 1, 2]
