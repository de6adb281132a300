"""The harness on the whole-model matrix-free optimizers (HF, SFN, LM): CLI, API, monitor, E4 / E4.apply.

Oracles: the dense GGN of a tiny model from ``torch.func.jacrev`` (Jᵀ H_ℓ J with H_ℓ = I/N for
half-MSE), the exact solve ``torch.linalg.solve`` in float64; planted failures (a wrong-sign
curvature product, a negative damping bypass, a direction longer than the operator allows) that E4
and E4.apply must FAIL.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import convergence
from convergence import cli, problems
from convergence.results import Verdict
from convergence.whole_model import (AS4_REASON, SFN_REASON, WholeModelMonitor, check_whole_model_preconditioner,
                                     check_whole_model_step_form, whole_model_violations, with_targets)
from curvature.damping import Tikhonov
from optimizers import HessianFree, LevenbergMarquardt, SaddleFreeNewton
from optimizers.matrix_free import BatchClosure

FAST = ["--steps", "5", "--checkpoints", "1", "--no-progress", "--no-plots"]


def _rows(report_json):
    return {r["check"]: r for r in report_json["checks"]}


def _run_cli(tmp_path, capsys, optimizer, checks, *extra):
    out = tmp_path / optimizer
    status = cli.main(["check", "--optimizer", optimizer, "--problem", "mlp", "--checks", checks, "--out", str(out),
                       *FAST, *extra])
    text = capsys.readouterr().out
    return status, _rows(json.loads((out / "report.json").read_text())), text


# ============================================================================================ CLI
def test_cli_hf_checks_the_damped_operator_and_marks_as4_not_applicable(tmp_path, capsys):
    status, rows, text = _run_cli(tmp_path, capsys, "hf", "E4,E5")
    assert status == 0, text
    assert rows["E0"]["verdict"] == "PASS"
    assert rows["E4"]["verdict"] == "PASS" and rows["E4.apply"]["verdict"] == "PASS"
    e4 = rows["E4"]["evidence"]
    assert e4["rules"]["curvature PSD"]["checked"] == 5 and e4["violations"] == []
    assert 0 < e4["kappa_lo_obs"] <= e4["kappa_hi_obs"]
    for k in ("E5a@4", "E5b@4", "E5c@4"):
        assert rows[k]["verdict"] == "NOT_APPLICABLE" and rows[k]["notes"][0] == AS4_REASON
    assert "HessianFree builds its operator from the current batch" in text
    assert "exit status 0" in text


def test_cli_lm_checks_the_damped_operator(tmp_path, capsys):
    status, rows, text = _run_cli(tmp_path, capsys, "lm", "E4,E5")
    assert status == 0, text
    assert rows["E4"]["verdict"] == "PASS" and rows["E4.apply"]["verdict"] == "PASS"
    assert rows["E5a@4"]["verdict"] == "NOT_APPLICABLE"


def test_cli_sfn_preconditioner_checks_are_not_applicable_with_the_reason(tmp_path, capsys):
    status, rows, text = _run_cli(tmp_path, capsys, "sfn", "E4,E5,E7")
    assert status == 0, text
    assert rows["E0"]["verdict"] == "PASS"
    for k in ("E4", "E4.apply", "E5a@4", "E5b@4", "E5c@4", "E7a"):
        assert rows[k]["verdict"] == "NOT_APPLICABLE" and rows[k]["notes"][0] == SFN_REASON, k
    assert rows["E7c"]["verdict"] == "PASS"  # the step-only checks run as for any optimizer


def test_cli_hf_full_step_violates_the_step_size_condition(tmp_path, capsys):
    """lr 1 (HF's own step) is far above kappa_lo/(L kappa_hi^2): E7a FAILs, exit status 1 (documented)."""
    status, rows, _ = _run_cli(tmp_path, capsys, "hf", "E7")
    assert status == 1
    e7a = rows["E7a"]
    assert e7a["verdict"] == "FAIL" and e7a["statistic"] > 1
    ev = e7a["evidence"]
    assert ev["limit"] == pytest.approx(ev["kappa_lo_obs"] / (ev["lipschitz"] * ev["kappa_hi_obs"] ** 2))
    assert rows["E7d@4"]["verdict"] == "NOT_APPLICABLE"


def test_cli_step_only_checks_run_for_hf(tmp_path, capsys):
    status, rows, text = _run_cli(tmp_path, capsys, "hf", "E3,E6", "--descent-batches", "8")
    assert status in (0, 1), text
    assert rows["E3@4"]["verdict"] in ("PASS", "FAIL")  # the statistical check ran (not ERROR / NOT_APPLICABLE)
    assert rows["E6@4"]["verdict"] != "ERROR"


# ============================================================================================ API
def _tiny(seed=0, n=32):
    return problems.tanh_mlp(n=n, d=3, hidden=3, outputs=2, seed=seed)


class WrongSignHF(HessianFree):
    """Planted: the curvature product entry point returns -Cv."""

    def _curvature_product(self, ctx):
        product = super()._curvature_product(ctx)
        return lambda v: -product(v)


class LongStepHF(HessianFree):
    """Planted: the applied change is 5x the CG direction while the reported step scale stays the same."""

    def _propose(self, ctx):
        new = super()._propose(ctx)
        return None if new is None else ctx.theta + 5.0 * (new - ctx.theta)


def _check(optimizer_factory, checks=("E4",), steps=4, seed=0):
    p = _tiny(seed)
    return convergence.check(p.model, p.loss_fn, p.dataset, optimizer_factory, steps=steps, batch_size=8,
                             checks=list(checks), checkpoints=1, seed=seed)


def test_api_accepts_matrix_free_optimizers():
    p = _tiny()
    report = _check(lambda m: HessianFree(m, p.loss_fn, cg_decay=0.0))
    assert report["E4"].verdict is Verdict.PASS and report["E4.apply"].verdict is Verdict.PASS
    assert report.meta["matrix_free_optimizer"] is True
    assert report.whole_model is not None and len(report.whole_model.records) == 4


def test_planted_wrong_sign_product_fails_e4():
    p = _tiny()
    report = _check(lambda m: WrongSignHF(m, p.loss_fn, damping=1e-3, cg_decay=0.0, line_search=False))
    e4 = report["E4"]
    assert e4.verdict is Verdict.FAIL
    failed = {v["rule"] for v in e4.evidence["violations"]}
    assert {"curvature PSD", "positive definite"} <= failed
    assert report.exit_status == 1


def test_planted_negative_damping_bypass_fails_e4():
    p = _tiny()

    def make(m):
        opt = HessianFree(m, p.loss_fn, damping=Tikhonov(1.0), cg_decay=0.0)
        opt.damping.damping = -0.5  # bypasses the constructor's validation
        return opt

    e4 = _check(make)["E4"]
    assert e4.verdict is Verdict.FAIL
    assert "damping positive" in {v["rule"] for v in e4.evidence["violations"]}


def test_planted_long_step_fails_the_step_form():
    p = _tiny()
    report = _check(lambda m: LongStepHF(m, p.loss_fn, cg_decay=0.0, line_search=False, backtrack=False))
    assert report["E4"].verdict is Verdict.PASS  # the operator is fine ...
    apply = report["E4.apply"]
    assert apply.verdict is Verdict.FAIL  # ... the applied step is not
    assert any(v["rule"] == "|d| <= kappa_hi |g|" for v in apply.evidence["violations"])


def test_warm_started_steps_are_not_checked_and_listed_as_violation():
    p = _tiny()
    report = _check(lambda m: HessianFree(m, p.loss_fn, cg_decay=0.95), steps=4)
    skipped = report["E4.apply"].evidence["skipped"]
    assert any("warm-started" in k for k in skipped)
    assert any("cg_decay=0.95" in v for v in report.violations)


# ============================================================================================ monitor
def _dense_ggn(model, x, y, theta_dict):
    """Jᵀ H_ℓ J for half-MSE mean (loss = ½ mean over rows of the squared error summed over outputs)."""
    names = list(theta_dict)

    def out(*flat):
        return torch.func.functional_call(model, dict(zip(names, flat)), (x,)).reshape(-1)

    jac = torch.func.jacrev(out, argnums=tuple(range(len(names))))(*theta_dict.values())
    j = torch.cat([t.reshape(t.shape[0], -1) for t in jac], dim=1)
    return j.T @ j / x.shape[0]


def test_monitor_probe_is_the_dense_ggn_plus_damping(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double().to(device)
    x = torch.randn(8, 3, dtype=torch.float64, device=device)
    y = torch.randn(8, 2, dtype=torch.float64, device=device)

    def loss_fn(out, t):
        return 0.5 * ((out - t) ** 2).sum(1).mean()

    opt = LevenbergMarquardt(model, loss_fn, damping=0.3, weight_decay=0.01)
    mon = WholeModelMonitor(opt, probe_interval=1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    theta = torch.cat([v.reshape(-1) for v in params.values()])
    g_ref = torch.cat([t.reshape(-1) for t in torch.func.grad(
        lambda ps: loss_fn(torch.func.functional_call(model, ps, (x,)), y))(params).values()]) + 0.01 * theta

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    opt.step(closure, targets=y)
    a = _dense_ggn(model, x, y, params) + (0.3 + 0.01) * torch.eye(theta.numel(), dtype=torch.float64, device=device)
    ev = torch.linalg.eigvalsh(a)
    probe = mon.records[0].probe
    assert probe.a_min == pytest.approx(float(ev[0]), rel=1e-10)
    assert probe.a_max == pytest.approx(float(ev[-1]), rel=1e-10)
    assert probe.kappa_hi == pytest.approx(1.0 / float(ev[0]), rel=1e-10)
    assert probe.shift_min == pytest.approx(0.31) and probe.shift_max == pytest.approx(0.31)
    exact = torch.linalg.solve(a, -g_ref)
    d = mon.records[0]
    assert d.grad_norm == pytest.approx(float(g_ref.norm()), rel=1e-12)
    # CG to 1e-10: the applied step is the exact solve
    assert probe.step_form["deviation_from_exact"] < 1e-7
    assert d.step_norm == pytest.approx(float(exact.norm()) * d.alpha, rel=1e-7)
    assert opt.last_step.operator is None  # the linearization is released after the hooks


def test_monitored_run_is_bit_identical_and_closure_targets_equal_keyword(device):
    def run(monitor: bool, carried: bool):
        p = _tiny()
        model = p.model.to(device)
        x, y = (t.to(device) for t in p.dataset.tensors)
        opt = HessianFree(model, p.loss_fn, cg_decay=0.9)
        mon = WholeModelMonitor(opt) if monitor else None
        make = with_targets(p.make_closure(opt)) if carried else p.make_closure(opt)
        for k in range(3):
            batch = (x[8 * k: 8 * k + 8], y[8 * k: 8 * k + 8])
            closure = make(batch)
            if carried:
                assert isinstance(closure, BatchClosure)
                opt.step(closure)
            else:
                opt.step(closure, targets=batch[1])
        if mon is not None:
            assert len(mon.records) == 3
        return torch.cat([q.detach().reshape(-1) for q in model.parameters()])

    ref = run(False, False)
    assert torch.equal(ref, run(True, True))
    assert torch.equal(ref, run(False, True))


def test_step_without_targets_still_raises_before_anything_changes():
    p = _tiny()
    opt = HessianFree(p.model, p.loss_fn)
    before = [q.detach().clone() for q in p.model.parameters()]
    x, y = p.dataset.tensors
    with pytest.raises(RuntimeError, match="targets"):
        opt.step(p.make_closure(opt)((x[:8], y[:8])))
    assert all(torch.equal(a, b) for a, b in zip(before, p.model.parameters()))


def test_no_probe_gives_not_applicable():
    p = _tiny()
    opt = HessianFree(p.model, p.loss_fn)
    mon = WholeModelMonitor(opt, probe_interval=0)
    res = check_whole_model_preconditioner(mon)
    assert res.verdict is Verdict.NOT_APPLICABLE
    assert check_whole_model_step_form(mon).verdict is Verdict.NOT_APPLICABLE


def test_violations_name_the_settings_outside_the_theory():
    p = _tiny()
    hf = whole_model_violations(HessianFree(p.model, p.loss_fn, cg_decay=0.5))
    assert any("AS.4" in v for v in hf) and any("cg_decay=0.5" in v for v in hf)
    lm = whole_model_violations(LevenbergMarquardt(p.model, p.loss_fn, momentum=True, uphill=True))
    assert any("momentum=True" in v for v in lm) and any("uphill=True" in v for v in lm)
    sfn = whole_model_violations(SaddleFreeNewton(p.model, p.loss_fn))
    assert any("not a quasi-Newton" in v for v in sfn)


def test_preconditioned_cg_step_form_uses_the_preconditioned_bounds():
    """With Martens's preconditioner the step-form bounds are those of M^-1/2 A M^-1/2 scaled by M^-1 (PASS)."""
    p = _tiny()
    report = _check(lambda m: HessianFree(m, p.loss_fn, cg_decay=0.0, preconditioner="martens"))
    apply = report["E4.apply"]
    assert apply.verdict is Verdict.PASS
    probes = report.whole_model.probes()
    assert probes and all(pr.step_form.get("preconditioned") for _, pr in probes)


@pytest.mark.parametrize("optimizer", ["hf", "sfn"])
def test_cli_rate_checks_run_for_matrix_free(tmp_path, capsys, optimizer):
    """E8 runs as for any optimizer; E8p's gate uses E4's kappa for hf (lr 1 is outside it) and is NOT_APPLICABLE
    with the saddle-free reason for sfn."""
    status, rows, text = _run_cli(tmp_path, capsys, optimizer, "E8", "--steps", "6", "--rate-seeds", "2")
    assert status == 0, text
    assert rows["E8"]["verdict"] != "ERROR"
    e8p = rows["E8p"]
    assert e8p["verdict"] == "NOT_APPLICABLE"
    if optimizer == "sfn":
        assert e8p["notes"][0] == SFN_REASON
    else:
        assert "exceeds kappa_lo/(L_up kappa_hi^2)" in e8p["notes"][0]
