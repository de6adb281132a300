"""benchmarks.gram_panels: every panel count is timed against the full GEMM, the table says which count
the library picks, and the command refuses a grid without the full GEMM."""

from __future__ import annotations

import json

import pytest

from benchmarks import gram_panels, timing


def test_main_times_each_panel_count_and_writes_the_table(tmp_path):
    before = timing.CPU_CLOCK
    rows = gram_panels.main(["--rows", "512", "--widths", "8", "200", "--panels", "1", "3", "--repeats", "2",
                             "--clock", "thread", "--out", str(tmp_path)])
    assert timing.CPU_CLOCK == before
    assert [(r["n"], r["d"], r["default"]) for r in rows] == [(512, 8, 1), (512, 200, 3)]
    assert all(r["ms_1"] > 0 and r["ms_3"] > 0 for r in rows)
    assert json.loads((tmp_path / "gram_panels.json").read_text()) == rows
    table = (tmp_path / "gram_panels.md").read_text().splitlines()
    assert table[0] == "| n | d | full GEMM ms | k = 3 (× full) | default k |"
    assert len(table) == 4 and table[3].startswith("| 512 | 200 | ") and table[3].endswith(" | 3 |")


def test_a_grid_without_the_full_gemm_is_refused(capsys):
    with pytest.raises(SystemExit):
        gram_panels.main(["--panels", "2", "3"])
    assert "--panels must include 1" in capsys.readouterr().err
