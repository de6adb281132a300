"""Report: the verdict table, strict JSON, and valid PNG plots (also for empty inputs)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch

from convergence.report import (
    damping_series,
    format_table,
    format_value,
    plot_damping,
    plot_gradient_norms,
    plot_hessian_density,
    plot_spectrum_bounds,
    print_table,
    report_dict,
    summary_counts,
    write_json,
)
from convergence.results import CheckResult, Verdict
from convergence.spectrum import slq_density

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results():
    return [
        CheckResult("E1", "AS.1 L-smooth gradient", 1.25, "|dg| <= 1.05 max|H| |dx|", 1.0, Verdict.PASS,
                    {"L_hat": 1.25, "curve": np.array([1.0, math.nan])}, ["lower bounds only"]),
        CheckResult("E2@0", "AS.2a unbiased gradient", 7.5, 3.6, 0.99, Verdict.FAIL,
                    {"p_value": 1e-12, "p_holm": 5e-12, "t": np.float64(7.5), "inf": math.inf}, ["bias found"]),
        CheckResult("E8", "rate", math.nan, "slope <= -0.15", 0.99, Verdict.INCONCLUSIVE,
                    {"tensor": torch.tensor([1.0, 2.0])}, []),
    ]


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def test_format_value():
    assert format_value(3) == "3"
    assert format_value(0.000123456) == "0.0001235"
    assert format_value(math.nan) == "nan" and format_value(-math.inf) == "-inf"
    assert format_value("x" * 100, 10) == "x" * 9 + "…"


def test_table_lists_every_check_and_the_violations():
    text = format_table(_results(), theory_mode=False, violations=["momentum=0.9 > 0: ..."], title="run")
    lines = text.splitlines()
    assert lines[0] == "run"
    assert lines[1].split()[:3] == ["check", "assumption", "verdict"]
    for check, verdict, stat in (("E1", "PASS", "1.25"), ("E2@0", "FAIL", "7.5"), ("E8", "INCONCLUSIVE", "nan")):
        row = next(l for l in lines if l.startswith(check + " "))
        assert verdict in row and stat in row
    assert "5e-12" in text  # Holm-adjusted p-value column
    assert "summary: PASS 1, FAIL 1, NOT_APPLICABLE 0, INCONCLUSIVE 1, ERROR 0" in text
    assert "theory mode: off" in text and "momentum=0.9" in text
    assert "E2@0: bias found" in text
    assert "theory-mode violations: none" in format_table(_results(), theory_mode=True)
    assert summary_counts(_results()) == {"PASS": 1, "FAIL": 1, "NOT_APPLICABLE": 0, "INCONCLUSIVE": 1, "ERROR": 0}


def test_print_table_plain_text(capsys):
    print_table(_results(), theory_mode=True, use_rich=False)
    out = capsys.readouterr().out
    assert "E2@0" in out and "FAIL" in out


def test_json_is_strict_and_structured(tmp_path):
    path = write_json(tmp_path / "sub" / "report.json", _results(), meta={"steps": 3, "x": math.nan},
                      theory_mode=True, violations=[], plots=["a.png"], extra={"arr": np.arange(3)})

    def reject(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    data = json.loads(path.read_text(), parse_constant=reject)
    assert data["version"] == 1
    assert data["summary"] == {"PASS": 1, "FAIL": 1, "NOT_APPLICABLE": 0, "INCONCLUSIVE": 1, "ERROR": 0}
    assert data["theory_mode"] == {"enabled": True, "violations": []}
    assert data["meta"] == {"steps": 3, "x": "nan"}
    assert data["plots"] == ["a.png"] and data["extra"]["arr"] == [0, 1, 2]
    checks = {c["check"]: c for c in data["checks"]}
    assert set(checks) == {"E1", "E2@0", "E8"}
    for c in checks.values():
        assert set(c) == {"check", "assumption", "statistic", "expected", "confidence", "verdict", "evidence", "notes"}
    assert checks["E1"]["evidence"]["curve"] == [1.0, "nan"]
    assert checks["E2@0"]["evidence"]["inf"] == "inf" and checks["E8"]["statistic"] == "nan"
    assert checks["E8"]["evidence"]["tensor"] == [1.0, 2.0]
    assert report_dict([])["summary"] == {"PASS": 0, "FAIL": 0, "NOT_APPLICABLE": 0, "INCONCLUSIVE": 0, "ERROR": 0}


def _record(step, pairs):
    layers = {}
    for name, (s1, s2, ok) in pairs.items():
        pair = SimpleNamespace(step1_active=s1, step2_active=s2, incorporated=ok)
        layers[name] = SimpleNamespace(a=SimpleNamespace(kind="hessian_action", pair=pair),
                                       g=SimpleNamespace(kind="lbfgs", pair=pair))
    return SimpleNamespace(step=step, layers=layers)


def test_damping_series_rates():
    records = [_record(k, {"fc": (k % 2 == 0, k % 4 == 0, k != 3)}) for k in range(8)]
    series = damping_series(records, window=4)
    assert list(series) == ["fc/g"]  # Hessian-action pairs are not double-damped
    s = series["fc/g"]
    assert s["step"] == list(range(8)) and s["pairs"] == 8
    assert s["step1"][3] == pytest.approx(0.5) and s["step1"][0] == pytest.approx(1.0)
    assert s["step2"][7] == pytest.approx(0.25)
    assert s["skipped"][3] == pytest.approx(0.25) and s["skipped"][7] == pytest.approx(0.0)
    assert s["total"] == {"step1": 0.5, "step2": 0.25, "skipped": 0.125}


def test_plots_are_valid_pngs(tmp_path):
    series = {"step": [0, 1, 2, 3], "kappa_lo": [0.1, 0.2, 0.2, 0.3], "kappa_hi": [2.0, 3.0, 3.0, 3.5],
              "layers": {"fc": {"lmin": [0.1, 0.2, 0.2, 0.3], "lmax": [2.0, 3.0, 3.0, 3.5]}}}
    theory = {"step": [0, 1, 2, 3], "kappa_lo_th": [0.05, None, 0.1, 0.1], "kappa_hi_th": [5.0, None, 6.0, 6.0]}
    _assert_png(plot_spectrum_bounds(tmp_path / "spectrum.png", series, theory=theory))
    steps = np.arange(1, 51)
    g = np.vstack([steps ** -0.5, 1.2 * steps ** -0.5])
    mean = g.mean(0).cumsum() / steps
    _assert_png(plot_gradient_norms(tmp_path / "grad.png", steps, g, beta=0.6,
                                    running_mean={"mean": mean, "ci_low": 0.9 * mean, "ci_high": 1.1 * mean},
                                    bound=10 * mean))
    records = [_record(k, {"a": (True, False, True), "b": (False, True, k > 2)}) for k in range(10)]
    _assert_png(plot_damping(tmp_path / "damping.png", damping_series(records)))
    diag = torch.linspace(-1.0, 3.0, 30, dtype=torch.float64)
    slq = slq_density(lambda v: diag * v, 30, 10, 2, seed=0)
    _assert_png(plot_hessian_density(tmp_path / "density.png", slq, lambda_min=-1.0, lambda_max=3.0))


def test_plots_of_empty_inputs_are_still_pngs(tmp_path):
    _assert_png(plot_spectrum_bounds(tmp_path / "s.png", {"step": []}))
    _assert_png(plot_gradient_norms(tmp_path / "g.png", [], np.zeros((1, 0)), beta=0.0))
    _assert_png(plot_damping(tmp_path / "d.png", {}))
