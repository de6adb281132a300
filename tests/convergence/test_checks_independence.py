"""E5 (AS.4): counterfactual batch swap and data-flow audit — lagged factors pass, factors built from the
current batch fail; the checks leave the run exactly as it was."""

from __future__ import annotations

import pytest
import torch

from convergence import problems
from convergence.checks import RunSnapshot
from convergence.checks.independence import DataFlowAudit, check_batch_swap, check_data_flow, swap_tolerance
from convergence.monitor import iid_loader, theory_mode_kwargs
from convergence.results import Verdict
from optimizers import KBFGS, KBFGSL, KFAC


def _dtype(device):
    return torch.float64 if device.type == "cpu" else torch.float32


def _setup(device, cls, steps, problem="least_squares", **kw):
    prob = getattr(problems, problem)(n=96, dtype=_dtype(device), device=device)
    opt = cls(prob.model, lr=0.1, damping=0.3, **kw)
    make = prob.make_closure(opt)
    batches = list(iid_loader(prob.dataset, 16, torch.Generator().manual_seed(2), num_samples=16 * (steps + 8)))
    for b in batches[:steps]:
        opt.step(make(b))
    return prob, opt, make, batches[steps:]


@pytest.mark.parametrize("cls,kw", [(KBFGSL, theory_mode_kwargs()),
                                    (KFAC, dict(inverse_update_freq=1, **theory_mode_kwargs()))])
def test_batch_swap_passes_with_lagged_factors(device, cls, kw):
    prob, opt, make, rest = _setup(device, cls, 3, problem="softmax_regression", **kw)
    res = check_batch_swap(prob.model, opt, make, rest[0], rest[1], probes=4)
    assert res.verdict is Verdict.PASS
    if device.type == "cpu":
        assert res.statistic == 0.0  # the same operator, bit for bit
    assert res.statistic <= res.expected
    assert res.expected == swap_tolerance(_dtype(device))


def test_kfac_unlagged_fails_at_an_inverse_refresh_only(device):
    # inverse refreshes at steps 0, 4, 8: step 4 reads the current batch through the refreshed inverse
    prob, opt, make, rest = _setup(device, KFAC, 4, inverse_update_freq=4, inverse_warmup_steps=0, momentum=0.0,
                                   weight_decay=0.0, lag_factors=False)
    res = check_batch_swap(prob.model, opt, make, rest[0], rest[1])
    assert res.verdict is Verdict.FAIL and res.statistic > 1e-6
    assert all(v["relative"] > 0 for v in res.evidence["per_layer"].values())
    opt.step(make(rest[2]))  # step 4 (a refresh) is done; step 5 reuses the inverse
    res_next = check_batch_swap(prob.model, opt, make, rest[0], rest[1])
    assert res_next.verdict is Verdict.PASS


def test_swap_leaves_the_run_untouched(device):
    prob_a, opt_a, make_a, rest_a = _setup(device, KBFGS, 3, lag_factors=False)
    prob_b, opt_b, make_b, rest_b = _setup(device, KBFGS, 3, lag_factors=False)
    check_batch_swap(prob_b.model, opt_b, make_b, rest_b[0], rest_b[1])
    check_data_flow(prob_b.model, opt_b, make_b, rest_b[2:4])
    for b_a, b_b in zip(rest_a[:3], rest_b[:3]):
        opt_a.step(make_a(b_a))
        opt_b.step(make_b(b_b))
    for pa, pb in zip(prob_a.model.parameters(), prob_b.model.parameters()):
        assert torch.equal(pa, pb)


def test_deterministic_mode_uses_zero_tolerance_and_identical_batches_are_not_applicable(device):
    prob, opt, make, rest = _setup(device, KBFGSL, 2, **theory_mode_kwargs())
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        res = check_batch_swap(prob.model, opt, make, rest[0], rest[1], probes=2)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert res.expected == 0.0 and res.verdict is Verdict.PASS
    same = check_batch_swap(prob.model, opt, make, rest[0], rest[0], probes=2)
    assert same.verdict is Verdict.NOT_APPLICABLE and "tests nothing" in same.reason


@pytest.mark.parametrize("cls,kw,fails", [
    (KBFGSL, theory_mode_kwargs(), False),
    (KFAC, dict(inverse_update_freq=3, **theory_mode_kwargs()), False),
    (KFAC, dict(inverse_update_freq=3, momentum=0.0, weight_decay=0.0, lag_factors=False), True),
    (KBFGS, dict(momentum=0.0, weight_decay=0.0, lag_factors=False), True),  # the EMA of A reads xi_k first
])
def test_data_flow_audit(device, cls, kw, fails):
    prob, opt, make, rest = _setup(device, cls, 2, **kw)
    res = check_data_flow(prob.model, opt, make, rest[:3], batch_ids=["x", "y", "z"])
    assert res.verdict is (Verdict.FAIL if fails else Verdict.PASS)
    events = res.evidence["events"]
    assert [e["batch_id"] for e in events] == ["x", "y", "z"]
    if fails:
        assert res.statistic == 3.0
        assert all(any(":statistic" in key for key in e["before"]) for e in events)
    else:
        assert all(e["before"] == [] for e in events)
        assert all(e["after"] for e in events)  # the statistics do read each batch, after the direction


def test_audit_provenance_and_first_step_exemption(device):
    prob = problems.least_squares(n=64, dtype=_dtype(device), device=device)
    opt = KFAC(prob.model, lr=0.1, damping=0.3, momentum=0.0, weight_decay=0.0, lag_factors=False)
    make = prob.make_closure(opt)
    batches = list(iid_loader(prob.dataset, 16, torch.Generator().manual_seed(0), num_samples=48))
    with RunSnapshot(prob.model, opt):
        audit = DataFlowAudit(opt, exempt_first_step=True)
        for i, b in enumerate(batches):
            audit.label(f"b{i}")
            opt.step(make(b))
        audit.detach()
    assert [e.violation for e in audit.events] == [False, True, True]
    assert audit.events[2].ids_read_before == ["b0", "b1", "b2"]
    assert audit.result().statistic == 2.0
    assert opt.steps == 0  # the snapshot was restored
