"""``python -m convergence check`` end to end, in process: arguments, report.json, PNGs, exit status."""

from __future__ import annotations

import json
import runpy
import sys

import matplotlib.image
import pytest
import torch

from convergence import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("spectrum_bounds.png", "gradient_norms.png", "damping.png", "hessian_density.png")
SMALL = ["--descent-batches", "16", "--checkpoints", "2", "--no-progress"]




def _load(path):
    def reject(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def _assert_pngs(out):
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert matplotlib.image.imread(str(out / name)).ndim == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "--optimizer", "adam", "--problem", "mlp", "--out", "x"], "invalid choice: 'adam'"),
        (["check", "--problem", "mlp", "--out", "x"], "needs --optimizer"),
        (["check", "--optimizer", "kfac", "--problem", "mlp", "--max-skip-fraction", "1.5", "--out", "x"], "[0, 1)"),
        (["check", "--optimizer", "kfac", "--problem", "cifar", "--out", "x"], "invalid choice: 'cifar'"),
        (["check", "--optimizer", "kfac", "--problem", "mlp", "--steps", "0", "--out", "x"], "positive integer"),
        (["check", "--optimizer", "kfac", "--problem", "mlp", "--lr", "-1", "--out", "x"], "positive finite"),
        (["check", "--optimizer", "kfac", "--problem", "mlp", "--checks", "E1,E9", "--out", "x"], "unknown check(s) E9"),
        (["check", "--optimizer", "kfac", "--problem", "mlp", "--beta", "2", "--out", "x"], "beta must be in [0, 1]"),
        (["check", "--optimizer", "kfac", "--problem", "mlp", "--data-dir", "d", "--out", "x"], "only applies to"),
        (["check", "--optimizer", "kfac", "--problem", "mlp", "--rate-seeds", "1", "--out", "x"], "rate-seeds >= 2"),
        (["check", "--optimizer", "kfac", "--problem", "mlp"], "--out"),
        ([], "command"),
    ],
)
def test_invalid_arguments_exit_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["check", "--optimizer", "kfac", "--problem", "mlp", "--device", "cuda", "--out", "x"])
    assert info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_module_entry_point_prints_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["convergence", "check", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("convergence", run_name="__main__")
    assert info.value.code == 0
    assert "--theory-mode" in capsys.readouterr().out


def test_tiny_run_end_to_end(tmp_path, device, capsys):
    out = tmp_path / "run"
    rc = cli.main(["check", "--optimizer", "kbfgsl", "--problem", "least-squares", "--steps", "20",
                   "--batch-size", "16", "--lr", "0.2", "--device", device.type, "--seed", "1", "--rate-seeds", "3",
                   "--alpha", "1e-6", "--out", str(out), *SMALL])
    text = capsys.readouterr().out
    data = _load(out / "report.json")
    assert set(data) >= {"version", "meta", "theory_mode", "summary", "checks", "plots"}
    assert data["theory_mode"] == {"enabled": True, "violations": []}
    assert data["meta"]["optimizer"] == "kbfgsl" and data["meta"]["checkpoints"] == [0, 19]
    ids = [c["check"] for c in data["checks"]]
    assert ids[0] == "E0"
    for expected in ("E1", "E2", "E3@0", "E3@19", "E4", "E4.apply", "E5a@0", "E5b@19", "E5c@0", "E6@0", "E6.form@19",
                     "E7a", "E7b", "E7c", "E7d@19", "E8", "E8p"):
        assert expected in ids
        assert expected in text
    for c in data["checks"]:
        assert c["verdict"] in ("PASS", "FAIL", "NOT_APPLICABLE", "INCONCLUSIVE")
        assert {"statistic", "expected", "evidence", "notes"} <= set(c)
        if c["verdict"] == "NOT_APPLICABLE":
            assert c["evidence"]["not_applicable"] and c["notes"][0] == c["evidence"]["not_applicable"]
    counts = data["summary"]
    assert sum(counts.values()) == len(ids)
    assert counts == {v: sum(c["verdict"] == v for c in data["checks"]) for v in counts}
    assert f"NOT_APPLICABLE {counts['NOT_APPLICABLE']}" in text
    # constant lr 0.2 is far above kappa_lo/(L kappa_hi^2): a definite E7a FAIL, so exit status 1
    e7a = next(c for c in data["checks"] if c["check"] == "E7a")
    assert e7a["verdict"] == "FAIL" and rc == 1 and data["meta"]["exit_status"] == 1
    assert "exit status 1" in text
    # the constant step makes the schedule and rate rules not applicable (they used to PASS)
    assert next(c for c in data["checks"] if c["check"] == "E7b")["verdict"] == "NOT_APPLICABLE"
    assert next(c for c in data["checks"] if c["check"] == "E8")["verdict"] == "NOT_APPLICABLE"
    e4 = next(c for c in data["checks"] if c["check"] == "E4")
    assert "inequalities violated" in e4["expected"] and "kappa_lo=" in e4["expected"]
    assert e4["evidence"]["checked"] > 0
    e1 = next(c for c in data["checks"] if c["check"] == "E1")
    assert e1["evidence"]["L_H"] == pytest.approx(data["meta"]["lipschitz_declared"], rel=1e-6)
    assert data["plots"] == list(PLOTS)
    _assert_pngs(out)


def test_no_theory_mode_reports_the_violations(tmp_path, capsys):
    out = tmp_path / "free"
    rc = cli.main(["check", "--optimizer", "kfac", "--problem", "softmax", "--steps", "8", "--batch-size", "10",
                   "--no-theory-mode", "--checks", "E3,E4", "--out", str(out), *SMALL])
    text = capsys.readouterr().out
    assert rc in (0, 1)
    data = _load(out / "report.json")
    violations = data["theory_mode"]["violations"]
    assert data["theory_mode"]["enabled"] is False
    assert any(v.startswith("momentum=0.9") for v in violations)
    assert any(v.startswith("lag_factors=False") for v in violations)
    assert any("RandomSampler(replacement=False)" in v for v in violations)
    assert "theory mode: off" in text and "lag_factors=False" in text
    assert [c["check"] for c in data["checks"]] == ["E0", "E3@0", "E3@7", "E4", "E4.apply"]
    _assert_pngs(out)


def test_a_check_that_raises_is_an_error_of_that_check_only(tmp_path, monkeypatch, capsys):
    import convergence.checks.stepsize as stepsize

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(stepsize, "check_eos_corollary", broken)
    out = tmp_path / "broken"
    rc = cli.main(["check", "--optimizer", "kbfgsl", "--problem", "logistic", "--steps", "6", "--lr", "0.5",
                   "--checks", "E7", "--out", str(out), "--no-plots", *SMALL])
    assert rc == 2
    assert "E7d@5: RuntimeError: boom" in capsys.readouterr().err
    data = _load(out / "report.json")
    by_id = {c["check"]: c for c in data["checks"]}
    assert by_id["E7d@5"]["verdict"] == "ERROR" and "boom" in by_id["E7d@5"]["evidence"]["error"]
    assert by_id["E7a"]["verdict"] == "FAIL"  # the definite E7a FAIL survives the crash of E7d
    assert data["summary"]["ERROR"] == 1


def test_bad_entry_point_is_status_2(tmp_path, capsys):
    rc = cli.main(["check", "--problem", "no_such_module_xyz:make", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "cannot import 'no_such_module_xyz'" in capsys.readouterr().err


def test_missing_mnist_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["check", "--optimizer", "kfac", "--problem", "mnist", "--data-dir", str(tmp_path / "none"),
                   "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error: MNIST test split not found" in err and "--data-dir" in err


def test_mnist_test_split_run(mnist_path, tmp_path, capsys):
    out = tmp_path / "mnist"
    # 12 steps (E2 needs >= 10), E4's probes of the 7850-dim applied operator at steps 0, 4, 8
    rc = cli.main(["check", "--optimizer", "kbfgsl", "--problem", "mnist", "--data-dir", str(mnist_path),
                   "--mnist-examples", "500", "--steps", "12", "--batch-size", "32", "--checks", "E1,E2,E4,E7",
                   "--probe-every", "4", "--out", str(out), *SMALL])
    capsys.readouterr()
    data = _load(out / "report.json")
    assert rc == data["meta"]["exit_status"] and rc in (0, 1)
    assert data["meta"]["num_examples"] == 500 and data["meta"]["num_parameters"] == 785 * 10
    ids = [c["check"] for c in data["checks"]]
    assert ids[:3] == ["E0", "E1", "E2"] and "E4" in ids and "E7d@11" in ids
    e1 = next(c for c in data["checks"] if c["check"] == "E1")
    assert e1["verdict"] == "PASS"  # softmax regression is smooth
    assert e1["evidence"]["L_H"] <= data["meta"]["lipschitz_declared"] * (1 + 1e-9)
    e4 = next(c for c in data["checks"] if c["check"] == "E4")
    assert e4["verdict"] == "PASS"
    apply = next(c for c in data["checks"] if c["check"] == "E4.apply")
    assert apply["verdict"] == "PASS"
    assert apply["evidence"]["probed_steps"] == [0, 4, 8], apply["evidence"].keys()
    _assert_pngs(out)
