"""The README's example runs as printed and trains without skipped steps."""

from __future__ import annotations

import runpy
from pathlib import Path


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "kbfgsl-expand[A: HessianActionFactor, G: LBFGSFactor]" in out and "kfac-expand[" in out
    loss = float(out.split("loss ")[1].split(",")[0])
    assert loss < 2.25  # from ln(10) ≈ 2.30 on random labels after 50 steps
    assert "skipped steps 0" in out
