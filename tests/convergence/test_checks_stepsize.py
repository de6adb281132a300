"""E7: step-size condition (definite FAIL above κ_lo/(L̂κ_hi²)), schedule, batch size and the EoS corollary."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from convergence import problems
from convergence.checks.stepsize import (
    check_batch_size,
    check_eos_corollary,
    check_schedule,
    check_step_size,
    check_step_size_conditions,
    fit_schedule,
    step_size_limit,
)
from convergence.monitor import TrainingMonitor, iid_loader, theory_mode_kwargs
from convergence.results import Verdict
from optimizers import KBFGS, KBFGSL


def _dtype(device):
    return torch.float64 if device.type == "cpu" else torch.float32


def _run(device, lr, steps=8, cls=KBFGS, schedule=None, loader=None, problem="least_squares", n=128):
    prob = getattr(problems, problem)(n=n, dtype=_dtype(device), device=device)
    opt = cls(prob.model, lr=lr, damping=0.3, **theory_mode_kwargs())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule is not None else None
    mon = TrainingMonitor(opt, keep_pairs=False)
    make = prob.make_closure(opt)
    if loader is None:
        loader = iid_loader(prob.dataset, 16, torch.Generator().manual_seed(0), num_samples=16 * steps)
    for k, b in enumerate(loader):
        if k == steps:
            break
        opt.step(make(b))
        if sched is not None:
            sched.step()
    mon.detach()
    return prob, opt, mon


def test_step_size_below_the_limit_passes_and_above_fails(device):
    _, _, probe = _run(device, 0.01, cls=KBFGSL)
    lo, hi = probe.kappa_observed()
    prob = problems.least_squares(n=128)
    limit = step_size_limit(lo, hi, prob.lipschitz)
    _, _, small = _run(device, 0.2 * limit, cls=KBFGSL)
    res = check_step_size(small, prob.lipschitz)
    assert res.verdict is Verdict.PASS and res.statistic < 1.0
    assert res.evidence["per_step_violations"] == 0
    _, _, large = _run(device, 50 * limit, cls=KBFGSL)
    res = check_step_size(large, prob.lipschitz)
    assert res.verdict is Verdict.FAIL and res.statistic > 1.0
    assert res.evidence["violating_steps"] == list(range(8))
    assert res.evidence["per_step_violations"] == 8  # the per-step form fails too
    # the limit is computed from the run's own κ's
    k_lo, k_hi = large.kappa_observed()
    assert res.evidence["limit"] == pytest.approx(step_size_limit(k_lo, k_hi, prob.lipschitz), rel=1e-6)


def test_schedule_rules(device):
    decay = lambda k: (k + 1) ** -0.75  # noqa: E731  (LambdaLR: lr_k = lr0 * (k + 1)^-0.75)
    _, _, mon = _run(device, 0.01, schedule=decay)
    res = check_schedule(mon)
    assert res.verdict is Verdict.PASS and res.statistic == pytest.approx(0.75, rel=1e-6)
    _, _, const = _run(device, 0.01)
    assert check_schedule(const).verdict is Verdict.FAIL
    assert check_schedule(const, allow_constant=True).verdict is Verdict.PASS
    _, _, slow = _run(device, 0.01, schedule=lambda k: (k + 1) ** -0.3)
    assert check_schedule(slow).verdict is Verdict.FAIL
    _, _, steps = _run(device, 0.01, schedule=lambda k: 0.5 ** (k // 3))
    assert check_schedule(steps).verdict is Verdict.INCONCLUSIVE
    assert check_schedule(mon.records[:2]).verdict is Verdict.INCONCLUSIVE
    fit = fit_schedule([0, 1, 2, 3], [2.0 * (k + 1) ** -1.0 for k in range(4)])
    assert fit["kind"] == "power" and fit["beta"] == pytest.approx(1.0) and fit["c"] == pytest.approx(2.0)


def test_batch_size_rule(device):
    _, _, mon = _run(device, 0.01)
    assert check_batch_size(mon).verdict is Verdict.PASS
    assert check_batch_size(mon, expected=16).verdict is Verdict.PASS
    assert check_batch_size(mon, expected=32).verdict is Verdict.FAIL
    prob = problems.least_squares(n=40, dtype=_dtype(device), device=device)
    ragged = DataLoader(prob.dataset, 16, sampler=RandomSampler(prob.dataset, replacement=True,
                                                                 generator=torch.Generator().manual_seed(0)))
    _, _, mon = _run(device, 0.01, steps=3, loader=ragged)  # 16, 16, 8
    res = check_batch_size(mon)
    assert res.verdict is Verdict.FAIL and res.evidence["batch_sizes"] == [8, 16]
    results = check_step_size_conditions(mon, 1.0)
    assert [r.check for r in results] == ["E7a", "E7b", "E7c"]


def test_eos_corollary(device):
    prob, opt, mon = _run(device, 0.01, steps=4, cls=KBFGS, problem="softmax_regression", n=64)
    lipschitz = prob.lipschitz  # a valid upper bound on the Hessian norm of softmax regression
    batch = next(iter(iid_loader(prob.dataset, 16, torch.Generator().manual_seed(7))))
    ok = check_eos_corollary(prob.model, prob.loss_fn, prob.full_batch, opt, batch, lipschitz)
    ev = ok.evidence
    assert ok.verdict is Verdict.PASS and ev["step_size_condition"] and ev["consistency"]
    assert ev["alpha_times_psharp"] <= ev["kappa_ratio"] <= 1.0 and ev["gd_stable"]
    assert ev["sharpness"] <= lipschitz
    # an L̂ far below the curvature makes a large step look admissible: the corollary exposes it
    l_hat = lipschitz / 200.0
    big = step_size_limit(ev["lambda_min_P"], ev["lambda_max_P"], l_hat)
    bad = check_eos_corollary(prob.model, prob.loss_fn, prob.full_batch, opt, batch, l_hat, lr=big)
    assert bad.verdict is Verdict.FAIL and bad.evidence["step_size_condition"]
    assert bad.evidence["alpha_times_psharp"] > bad.evidence["kappa_ratio"]
    assert any("L_hat" in n for n in bad.notes)
    # the Lanczos estimate agrees with the dense one
    lz = check_eos_corollary(prob.model, prob.loss_fn, prob.full_batch, opt, batch, lipschitz, method="lanczos")
    rel = 1e-6 if _dtype(device) == torch.float64 else 1e-3
    assert lz.evidence["preconditioned_sharpness"] == pytest.approx(ev["preconditioned_sharpness"], rel=rel)
