"""Planted violations through the CLI path (``convergence.cli.main``): each must make its check FAIL with exit
status 1, while the honest twin PASSes; and every check's NOT_APPLICABLE case, with its reason.

The problems are the entry points of ``planted_problems.py`` (``--problem planted_problems:NAME``); runs are
tiny (least squares, 256 examples, a few dozen steps, one check family each).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convergence import cli

HERE = Path(__file__).resolve().parent
FAST = ["--no-progress", "--no-plots", "--checkpoints", "1", "--descent-batches", "24", "--rate-seeds", "3", "--no-plateau"]


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def _run(tmp_path, capsys, *argv: str) -> tuple[int, dict, str]:
    out = tmp_path / "run"
    rc = cli.main(["check", *argv, "--out", str(out), *FAST])
    text = capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    return rc, {c["check"]: c for c in data["checks"]}, text


def _verdicts(checks: dict, prefix: str) -> list[str]:
    return [c["verdict"] for k, c in checks.items() if k == prefix or k.startswith(prefix + "@")]


# ============================================================================================ E0
def test_e0_diverging_run_fails_loudly_and_first(tmp_path, capsys):
    # the CLI's old diagonal defaults (lr 0.1, damping 1e-3) on the MLP: the loss explodes
    rc, checks, text = _run(tmp_path, capsys, "--optimizer", "diagonal", "--problem", "mlp", "--lr", "0.1",
                            "--damping", "1e-3", "--steps", "60", "--checks", "E7")
    assert rc == 1
    assert list(checks)[0] == "E0" and checks["E0"]["verdict"] == "FAIL"
    assert "RUN HEALTH FAIL (E0)" in "\n".join(text.splitlines()[:3])
    assert any("worse than the initial" in n or "diverged" in n or "non-finite" in n for n in checks["E0"]["notes"])


def test_e0_fixed_diagonal_defaults_train(tmp_path, capsys):
    rc, checks, text = _run(tmp_path, capsys, "--optimizer", "diagonal", "--problem", "mlp", "--steps", "60",
                            "--checks", "E7")
    assert checks["E0"]["verdict"] == "PASS" and checks["E0"]["evidence"]["f_final"] < checks["E0"]["evidence"]["f_initial"]
    assert "RUN HEALTH" not in text


# ============================================================================================ E1
def test_e1_wrong_gradient_fails(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:wrong_gradient", "--steps", "6",
                         "--checks", "E1")
    assert rc == 1 and checks["E1"]["verdict"] == "FAIL"


# ============================================================================================ E2
def test_e2_biased_closure_fails(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:biased_closure", "--steps", "30",
                         "--checks", "E2")
    assert rc == 1 and checks["E2"]["verdict"] == "FAIL"
    assert checks["E2"]["evidence"]["relative_bias"] > 0.1


def test_e2_too_few_steps_is_not_applicable(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:honest", "--steps", "5", "--checks", "E2")
    assert rc == 0 and checks["E2"]["verdict"] == "NOT_APPLICABLE"
    assert "steps" in checks["E2"]["evidence"]["not_applicable"]


# ============================================================================================ E3
def test_e3_repeated_example_batches_fail(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:repeated_batches", "--steps", "24",
                         "--checks", "E3")
    assert rc == 1 and _verdicts(checks, "E3") == ["FAIL"]
    rows = next(c for k, c in checks.items() if k.startswith("E3"))["evidence"]["per_batch_size"]
    assert max(r["ratio"] for r in rows) > 4  # V_hat(m) ~ sigma^2, not sigma^2/m


def test_e3_identical_examples_are_not_applicable(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:identical_examples", "--steps", "8",
                         "--checks", "E3")
    assert _verdicts(checks, "E3") == ["NOT_APPLICABLE"]
    assert "sigma_1^2 = 0" in next(c for k, c in checks.items() if k.startswith("E3"))["evidence"]["not_applicable"]


# ============================================================================================ E4
def test_e4_indefinite_only_when_applied_fails(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:indefinite_when_applied", "--steps", "6",
                         "--checks", "E4")
    assert rc == 1
    assert checks["E4.apply"]["verdict"] == "FAIL" and checks["E4.apply"]["evidence"]["worst"] > 0.1
    assert checks["E4"]["verdict"] == "FAIL"
    assert any("applied operator positive definite" in v["rule"] for v in checks["E4"]["evidence"]["violations"])


def test_e4_without_a_preconditioner_is_not_applicable(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:adam", "--steps", "6", "--checks", "E4,E5,E7")
    for check in ("E4", "E4.apply", "E7a"):
        assert checks[check]["verdict"] == "NOT_APPLICABLE", check
    for prefix in ("E5a", "E5b", "E5c"):
        assert set(_verdicts(checks, prefix)) == {"NOT_APPLICABLE"}, prefix
    assert "no curvature blocks" in checks["E4"]["evidence"]["not_applicable"]


# ============================================================================================ E5
def test_e5_current_batch_preconditioner_fails_and_its_bias_is_sized(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:current_batch_preconditioner",
                         "--steps", "6", "--checks", "E5")
    assert rc == 1
    assert _verdicts(checks, "E5a") == ["FAIL"] and _verdicts(checks, "E5b") == ["FAIL"]
    e5c = next(c for k, c in checks.items() if k.startswith("E5c"))
    assert e5c["verdict"] in ("PASS", "FAIL") and e5c["evidence"]["relative_bias"] >= 0


def test_e5c_sizes_a_detectable_bias_of_a_current_batch_only_preconditioner(tmp_path, capsys):
    """Factors from the current batch alone (factor_decay 0, small damping): E[H g] - E[H] grad f is ~0.7 of
    |E[H] grad f|, and its bootstrap lower bound is above 0 with R = 24 batches (FAST's --descent-batches)."""
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:current_batch_only_preconditioner",
                         "--steps", "3", "--checks", "E5")
    e5c = next(c for k, c in checks.items() if k.startswith("E5c"))
    assert rc == 1 and e5c["verdict"] == "FAIL", e5c["notes"]
    assert e5c["evidence"]["R"] == 24
    assert e5c["evidence"]["bias_norm_sq_ci"][0] > 0 and e5c["evidence"]["relative_bias"] > 0.3


def test_e5c_is_not_applicable_when_e5a_passes(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:honest", "--steps", "6", "--checks", "E5")
    assert rc == 0 and _verdicts(checks, "E5a") == ["PASS"] and _verdicts(checks, "E5c") == ["NOT_APPLICABLE"]


# ============================================================================================ E6
def test_e6_rising_loss_fails(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:ascent_closure", "--steps", "4",
                         "--checks", "E6")
    assert rc == 1
    e6 = next(c for k, c in checks.items() if k.startswith("E6@"))
    assert e6["verdict"] == "FAIL" and e6["evidence"]["delta_mean"] > 0 > e6["evidence"]["rhs_l0"]


def test_e6_with_a_nonnegative_right_hand_side_is_not_applicable(tmp_path, capsys):
    """K-BFGS(L) on the MLP at the CLI's lr 0.2, near its noise floor at step 39: the L0 right-hand side is >= 0,
    so the lemma promises no descent there (it used to print PASS)."""
    rc, checks, _ = _run(tmp_path, capsys, "--optimizer", "kbfgsl", "--problem", "mlp", "--steps", "40",
                         "--checks", "E6")
    e6 = checks["E6@39"]
    assert e6["verdict"] == "NOT_APPLICABLE" and e6["evidence"]["rhs_l0"] >= 0
    assert "promises no descent" in e6["evidence"]["not_applicable"]


def test_e6_form_without_a_preconditioner_is_not_applicable(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:adam", "--steps", "6", "--checks", "E6")
    form = next(c for k, c in checks.items() if k.startswith("E6.form"))
    assert form["verdict"] == "NOT_APPLICABLE" and "no curvature blocks" in form["evidence"]["not_applicable"]


def test_e6_form_momentum_fails(tmp_path, capsys):
    """Heavy-ball momentum left on: the displacement read off the parameters is not -alpha H_k g_k."""
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:momentum_step", "--steps", "6",
                         "--checks", "E6")
    form = next(c for k, c in checks.items() if k.startswith("E6.form"))
    assert rc == 1 and form["verdict"] == "FAIL", form["notes"]
    assert any("momentum" in n for n in form["notes"])


# ============================================================================================ E7
def test_e7_too_large_step_fails_and_constant_step_schedule_is_not_applicable(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--optimizer", "kbfgsl", "--problem", "least-squares", "--lr", "0.5",
                         "--steps", "6", "--checks", "E7")
    assert rc == 1 and checks["E7a"]["verdict"] == "FAIL" and checks["E7a"]["statistic"] > 1
    assert checks["E7b"]["verdict"] == "NOT_APPLICABLE" and "constant step" in checks["E7b"]["evidence"]["not_applicable"]


def test_e7c_ragged_batches_fail_and_one_step_is_not_applicable(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:ragged_batches", "--steps", "6",
                         "--checks", "E7")
    assert rc == 1 and checks["E7c"]["verdict"] == "FAIL" and checks["E7c"]["evidence"]["batch_sizes"] == [8, 16]
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:honest", "--steps", "1", "--checks", "E7")
    assert checks["E7c"]["verdict"] == "NOT_APPLICABLE" and "fewer than 2 steps" in checks["E7c"]["evidence"]["not_applicable"]


def test_e7b_schedule_outside_the_theorem_fails(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--optimizer", "kbfgsl", "--problem", "least-squares", "--lr", "0.01",
                         "--beta", "0.3", "--steps", "6", "--checks", "E7")
    assert rc == 1 and checks["E7b"]["verdict"] == "FAIL"


def test_e7d_declared_lipschitz_below_the_curvature_fails(tmp_path, capsys):
    """The problem declares L = 0.7 (true 1) and lr sits inside kappa_lo/(L kappa_hi^2) for it: the step-size
    condition holds, yet alpha lambda_max(P H) > kappa_lo/kappa_hi. (The old E7d used E1's L_H, the exact local
    curvature at the same point, so the condition failed and the corollary passed vacuously.)"""
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:understated_lipschitz", "--steps", "20",
                         "--checks", "E7")
    e7d = next(c for k, c in checks.items() if k.startswith("E7d@"))
    ev = e7d["evidence"]
    assert rc == 1 and e7d["verdict"] == "FAIL"
    assert ev["lipschitz"] == pytest.approx(0.7) and ev["lipschitz_source"] == "declared by the problem"
    assert ev["step_size_condition"] and ev["consistency"]
    assert ev["alpha_times_psharp"] > ev["kappa_ratio"] and ev["sharpness"] > ev["lipschitz"]
    assert any("declared L = 0.7 is below the local curvature" in n for n in e7d["notes"])


def test_e7d_without_a_preconditioner_is_not_applicable(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:adam", "--steps", "6", "--checks", "E7")
    e7d = next(c for k, c in checks.items() if k.startswith("E7d@"))
    assert e7d["verdict"] == "NOT_APPLICABLE" and "no curvature blocks" in e7d["evidence"]["not_applicable"]


# ============================================================================================ E8
def test_e8p_outside_the_step_size_condition_is_not_applicable(tmp_path, capsys):
    """The 1/m floor is a small-step prediction: above kappa_lo/(L kappa_hi^2) it is not claimed (an honest MLP
    run at lr 0.2 showed a floor ratio of 1.4, so deciding there would be a false FAIL)."""
    out = tmp_path / "run"
    rc = cli.main(["check", "--problem", "planted_problems:repeated_batches", "--steps", "12", "--checks", "E8",
                   "--out", str(out), "--no-progress", "--no-plots", "--checkpoints", "1", "--rate-seeds", "2"])
    capsys.readouterr()
    checks = {c["check"]: c for c in json.loads((out / "report.json").read_text())["checks"]}
    assert checks["E8p"]["verdict"] == "NOT_APPLICABLE"
    assert "small-step prediction" in checks["E8p"]["evidence"]["not_applicable"]
    assert checks["E8"]["verdict"] == "NOT_APPLICABLE"  # constant step above the limit: no rate promised


def test_e8p_with_a_fixed_loader_is_not_applicable(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["check", "--problem", "planted_problems:fixed_loader", "--steps", "8", "--checks", "E8",
                   "--out", str(out), "--no-progress", "--no-plots", "--checkpoints", "1", "--rate-seeds", "2"])
    capsys.readouterr()
    checks = {c["check"]: c for c in json.loads((out / "report.json").read_text())["checks"]}
    assert checks["E8p"]["verdict"] == "NOT_APPLICABLE" and "fixed DataLoader" in checks["E8p"]["evidence"]["not_applicable"]


PLATEAU = ["--no-progress", "--no-plots", "--checkpoints", "1", "--rate-seeds", "4", "--steps", "60", "--checks", "E8"]


def _run_plateau(tmp_path, capsys, problem: str) -> tuple[int, dict]:
    out = tmp_path / "run"
    rc = cli.main(["check", "--problem", f"planted_problems:{problem}", "--out", str(out), *PLATEAU])
    capsys.readouterr()
    return rc, {c["check"]: c for c in json.loads((out / "report.json").read_text())["checks"]}


def test_e8_and_e8p_pass_on_an_honest_noisy_quadratic(tmp_path, capsys):
    """Constant step inside kappa_lo/(L kappa_hi^2) with the exact L: E8's bound U_N is tested (it could fail) and
    holds; the runs reach their noise floors and the floor at m is about 4x the floor at 4m."""
    rc, checks = _run_plateau(tmp_path, capsys, "noisy_quadratic")
    assert rc == 0
    e8, e8p = checks["E8"], checks["E8p"]
    assert e8["verdict"] == "PASS" and e8["evidence"]["bound"]["applies"]
    assert e8["evidence"]["bound"]["W_N_lcb"] <= e8["evidence"]["bound"]["U_N"]
    assert e8p["verdict"] == "PASS", e8p["notes"]
    assert e8p["evidence"]["decrease_m"] >= 4 and 2.67 <= e8p["statistic"] <= 8


def test_e8p_repeated_example_batches_fail(tmp_path, capsys):
    """Every batch repeats one example: the floor at 4m is no lower than at m (ratio ~1), inside the step-size
    condition and after both runs reached their floors."""
    rc, checks = _run_plateau(tmp_path, capsys, "noisy_quadratic_repeated")
    e8p = checks["E8p"]
    assert rc == 1 and e8p["verdict"] == "FAIL", e8p["notes"]
    assert e8p["evidence"]["ratio_ci"][1] < 4 / 1.5 and e8p["evidence"]["decrease_m"] >= 4


def test_e8_clipped_gradients_fail_the_rate_bound(tmp_path, capsys):
    """The closure clips |g| to 1e-3: the loss barely moves, so W_N stays far above U_N. E8p is NOT_APPLICABLE on
    the same runs (no decrease, so the flat tail is not a noise floor; the old flatness rule read it as ratio 1,
    a FAIL)."""
    rc, checks = _run_plateau(tmp_path, capsys, "clipped_gradients")
    e8 = checks["E8"]
    assert rc == 1 and e8["verdict"] == "FAIL"
    assert e8["evidence"]["bound"]["applies"] and e8["evidence"]["bound"]["W_N_lcb"] > e8["evidence"]["bound"]["U_N"]
    assert any("W_N exceeds the general bound" in n for n in e8["notes"])
    assert checks["E8p"]["verdict"] == "NOT_APPLICABLE" and "transient" in checks["E8p"]["evidence"]["not_applicable"]


# ============================================================================================ honest
def test_honest_run_passes_every_check_that_can_fail(tmp_path, capsys):
    """Theory-mode K-BFGS(L) on least squares with alpha_k = 0.005 (k+1)^-0.75: inside the theorem's step-size
    condition, so E6, E7a and E8's bound could all fail; nothing is rejected."""
    rc, checks, _ = _run(tmp_path, capsys, "--optimizer", "kbfgsl", "--problem", "least-squares", "--lr", "0.005",
                         "--beta", "0.75", "--batch-size", "64", "--steps", "30",
                         "--checks", "E1,E3,E4,E5,E6,E7,E8")
    verdicts = {k: c["verdict"] for k, c in checks.items()}
    for check in ("E0", "E1", "E4", "E4.apply", "E7a", "E7b", "E7c", "E8"):
        assert verdicts[check] == "PASS", (check, checks[check]["notes"])
    for prefix in ("E3", "E5a", "E5b", "E6", "E6.form", "E7d"):
        assert _verdicts(checks, prefix) == ["PASS"], (prefix, verdicts)
    assert _verdicts(checks, "E5c") == ["NOT_APPLICABLE"]
    assert rc == 0


def test_honest_gradients_pass_e2_with_equivalence(tmp_path, capsys):
    rc, checks, _ = _run(tmp_path, capsys, "--problem", "planted_problems:honest", "--lr", "0.002", "--batch-size", "64",
                         "--steps", "200", "--checks", "E2")
    assert rc == 0 and checks["E2"]["verdict"] == "PASS"
    assert checks["E2"]["evidence"]["relative_bias_upper"] < 0.05
