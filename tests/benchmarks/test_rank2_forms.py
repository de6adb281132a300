"""benchmarks.rank2_forms: the symmetry check can fail, the library's form passes it, the report is written."""

from __future__ import annotations

import json

import torch

from benchmarks import rank2_forms, timing


def _skewed(H: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A planted asymmetric form: H + p qᵀ."""
    return H + torch.outer(p, q)


def test_the_symmetry_check_flags_a_planted_asymmetric_form(device):
    assert rank2_forms.asymmetric_sizes(_skewed, [1, 2, 3], torch.float64, device) == [2, 3]  # n = 1 is symmetric


def test_the_library_and_four_pass_forms_are_symmetric_and_exact_to_rounding(device):
    for name in ("library", "four_pass"):
        form = rank2_forms.FORMS[name]
        assert rank2_forms.asymmetric_sizes(form, [1, 7, 9, 17, 33], torch.float32, device) == []
        assert rank2_forms.max_relative_error(form, 40, torch.float32, device) < 4 * torch.finfo(torch.float32).eps
    # the reference of max_relative_error is float64: a float64 form is exact to its own rounding
    assert rank2_forms.max_relative_error(rank2_forms.FORMS["addr"], 40, torch.float64, device) < 1e-15


def test_every_form_computes_the_same_math(device):
    generator = torch.Generator().manual_seed(3)
    H, p, q = rank2_forms.random_problem(6, torch.float64, device, generator)
    assert torch.equal(H, H.T)
    expected = H + torch.outer(p, p) - torch.outer(q, q)
    for name, form in rank2_forms.FORMS.items():
        torch.testing.assert_close(form(H, p, q), expected, rtol=1e-14, atol=1e-14, msg=name)


def test_main_writes_the_table_and_restores_the_clock(tmp_path):
    before = timing.CPU_CLOCK
    rows = rank2_forms.main(["--sizes", "1", "9", "--timed-sizes", "8", "--repeats", "2", "--dtype", "float32",
                             "--clock", "thread", "--out", str(tmp_path)])
    assert timing.CPU_CLOCK == before
    assert [r["form"] for r in rows] == list(rank2_forms.FORMS)
    assert all(r["dtype"] == "float32" and r["sizes_checked"] == 2 and r["ms_8"] > 0 for r in rows)
    assert json.loads((tmp_path / "rank2_forms.json").read_text()) == rows
    table = (tmp_path / "rank2_forms.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| library | float32 | none |" in table
