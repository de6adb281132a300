"""benchmarks.lbfgs_apply: the library's compact L-BFGS product and the kernel floor's compute the same math."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import lbfgs_apply, timing
from benchmarks.kernel_floor import _lbfgs_apply


def test_the_plan_and_the_library_compute_the_same_product_as_the_dense_matrix(device):
    lbfgs = lbfgs_apply.full_memory(7, 5, torch.float64, device, torch.Generator().manual_seed(0))
    V = torch.randn(4, 7, dtype=torch.float64, device=device).T
    out = torch.empty(7, 4, dtype=torch.float64, device=device)
    _lbfgs_apply(lbfgs_apply.plan_memory(lbfgs), V, out)
    dense = lbfgs.to_dense()
    torch.testing.assert_close(out, dense @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lbfgs.apply(V), dense @ V, rtol=1e-12, atol=1e-12)


def test_the_study_reports_a_difference_when_the_plan_reads_another_memory(monkeypatch):
    """The reported difference can fail: a plan memory with D scaled by 2 is another matrix."""
    honest = lbfgs_apply.study([(6, 3)], 4, torch.float64, "cpu", repeats=1)
    assert honest[0]["relative_difference"] < 1e-12
    real = lbfgs_apply.plan_memory
    monkeypatch.setattr(lbfgs_apply, "plan_memory", lambda lb: real(lb) | {"D": 2 * real(lb)["D"]})
    planted = lbfgs_apply.study([(6, 3)], 4, torch.float64, "cpu", repeats=1)
    assert planted[0]["relative_difference"] > 1e-3


def test_layer_shapes_are_the_autoencoders_gradients():
    shapes = lbfgs_apply.layer_shapes("curves")
    assert len(shapes) == 12 and shapes[0] == (400, 785) and shapes[5] == (6, 26) and shapes[-1] == (784, 401)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        lbfgs_apply.layer_shapes("nope")


def test_the_plan_needs_h0_the_identity():
    lbfgs = lbfgs_apply.CompactLBFGS(3, 2, gamma=0.5)
    with pytest.raises(ValueError, match=r"H0 = I \(gamma 1\), got gamma 0\.5"):
        lbfgs_apply.plan_memory(lbfgs)


def test_main_writes_the_table_and_restores_the_clock(tmp_path, monkeypatch):
    monkeypatch.setattr(lbfgs_apply, "layer_shapes", lambda model: [(5, 4), (3, 6)])
    before = timing.CPU_CLOCK
    rows = lbfgs_apply.main(["--memory", "3", "--repeats", "2", "--dtype", "float64", "--clock", "thread",
                             "--out", str(tmp_path)])
    assert timing.CPU_CLOCK == before
    assert [(r["d_out"], r["width"], r["memory"]) for r in rows] == [(5, 4, 3), (3, 6, 3)]
    assert all(r["library_ms"] > 0 and r["plan_ms"] > 0 and r["relative_difference"] < 1e-12 for r in rows)
    assert json.loads((tmp_path / "lbfgs_apply.json").read_text()) == rows
    table = (tmp_path / "lbfgs_apply.md").read_text()
    assert table.count("\n") == 3 + len(rows) and "| 5 × 4 |" in table and "| all layers |" in table


def test_main_rejects_an_empty_memory():
    with pytest.raises(SystemExit):
        lbfgs_apply.main(["--memory", "0"])
