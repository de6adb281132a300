"""E6: the expected-descent lemma L0 holds for theory-mode K-BFGS(L) with unbiased batches and fails with
batches biased against the preconditioned gradient; the SQN-form side-check flags momentum and weight decay."""

from __future__ import annotations

import pytest
import torch

from convergence import problems
from convergence.checks import capture_operators
from convergence.checks.descent import check_expected_descent, descent_rhs_l0, one_sided_lcb
from convergence.monitor import iid_loader, theory_mode_kwargs
from convergence.results import Verdict
from optimizers import KBFGS, KBFGSL, KFAC

R = 32


def _dtype(device):
    return torch.float64 if device.type == "cpu" else torch.float32


def _setup(device, cls=KBFGS, steps=4, lr=0.1, **kw):
    prob = problems.least_squares(n=256, d=4, noise=1.0, dtype=_dtype(device), device=device)
    kw = {**theory_mode_kwargs(), **kw}
    opt = cls(prob.model, lr=lr, damping=0.3, **kw)
    make = prob.make_closure(opt)
    loader = iid_loader(prob.dataset, 16, torch.Generator().manual_seed(4), num_samples=16 * (steps + R))
    batches = list(loader)
    for b in batches[:steps]:
        opt.step(make(b))
    return prob, opt, make, batches[steps:]


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_unbiased_batches_satisfy_lemma_l0(device, cls):
    # lr 0.02: the lemma's right-hand side is negative, so the check could have failed
    prob, opt, make, batches = _setup(device, cls, lr=0.02)
    l0, form = check_expected_descent(prob.model, prob.loss_fn, prob.full_batch, opt, batches, lipschitz=prob.lipschitz,
                                      make_closure=make)
    assert l0.verdict is Verdict.PASS, l0.evidence
    ev = l0.evidence
    assert ev["R"] == R and ev["L_up"] == pytest.approx(2 * prob.lipschitz)
    assert ev["grad_H_grad_range"][0] == pytest.approx(ev["grad_H_grad_range"][1], rel=1e-9)  # one H_k (AS.4)
    assert ev["delta_mean"] < 0 and ev["lcb"] <= ev["rhs_l0"]
    assert 0 < ev["kappa"][0] <= ev["kappa"][1]
    assert ev["rhs_l0"] < 0
    assert form.verdict is Verdict.PASS and form.statistic <= form.expected  # read off the parameters


def test_a_nonnegative_right_hand_side_is_not_applicable(device):
    # lr 0.1 on this problem: RHS(L0) >= 0, the lemma promises no descent -- the old check "passed" here
    prob, opt, make, batches = _setup(device, KBFGS, lr=0.1)
    l0, _ = check_expected_descent(prob.model, prob.loss_fn, prob.full_batch, opt, batches, lipschitz=prob.lipschitz,
                                   make_closure=make)
    assert l0.verdict is Verdict.NOT_APPLICABLE and l0.evidence["rhs_l0"] >= 0
    assert "promises no descent" in l0.reason


def _anti_aligned_batches(prob, opt, make, batch, count, device):
    """Batches drawn (with replacement) from the quarter of the examples whose gradient points most
    against the preconditioned full gradient: E[g] is biased, so E[∇fᵀHg] < ∇fᵀH∇f."""
    ops = capture_operators(prob.model, opt, make, batch)
    x, t = prob.full_batch
    layer = prob.model
    xb = torch.cat([x, torch.ones_like(x[:, :1])], 1).double()
    with torch.no_grad():
        resid = (layer(x) - t).double()  # per-example gradient of ½(z - t)² is resid · x̄ᵀ
    grad_f = (resid.T @ xb) / x.shape[0]
    u = ops[""].apply(grad_f.to(device))
    score = resid[:, 0] * (xb @ u[0])
    chosen = torch.argsort(score)[: x.shape[0] // 4]
    gen = torch.Generator().manual_seed(9)
    out = []
    for _ in range(count):
        idx = chosen[torch.randint(len(chosen), (16,), generator=gen)].to(x.device)
        out.append((x[idx], t[idx]))
    return out


def test_batches_biased_against_the_step_fail(device):
    # a small step, so that the (biased) first-order term dominates the quadratic one
    prob, opt, make, batches = _setup(device, lr=0.02)
    biased = _anti_aligned_batches(prob, opt, make, batches[0], R, device)
    l0, form = check_expected_descent(prob.model, prob.loss_fn, prob.full_batch, opt, biased, lipschitz=prob.lipschitz,
                                      make_closure=make)
    assert l0.verdict is Verdict.FAIL, l0.evidence
    assert l0.evidence["delta_mean"] > 0 > l0.evidence["rhs_l0"] and l0.evidence["p_value"] < 1e-3
    assert form.verdict is Verdict.PASS  # the optimizer itself is still in SQN form


@pytest.mark.parametrize("kw,flag", [({"momentum": 0.9}, "momentum"), ({"weight_decay": 0.1}, "weight_decay")])
def test_sqn_form_side_check_flags_momentum_and_weight_decay(device, kw, flag):
    prob, opt, make, batches = _setup(device, steps=2, **kw)
    l0, form = check_expected_descent(prob.model, prob.loss_fn, prob.full_batch, opt, batches[:4],
                                      lipschitz=prob.lipschitz, make_closure=make)
    assert form.verdict is Verdict.FAIL and form.statistic > 1e-3
    assert any(note.startswith(flag) for note in form.notes)


def test_the_check_leaves_the_run_untouched(device):
    prob, opt, make, batches = _setup(device, cls=KFAC, inverse_update_freq=2)
    before = [p.detach().clone() for p in prob.model.parameters()]
    state = opt.state_dict()["secondorder"]["steps"]
    check_expected_descent(prob.model, prob.loss_fn, prob.full_batch, opt, batches[:3], lipschitz=prob.lipschitz,
                           make_closure=make)
    assert all(torch.equal(a, b) for a, b in zip(before, prob.model.parameters()))
    assert opt.steps == state


def test_statistics_helpers():
    mean, sd, lcb = one_sided_lcb([1.0, 2.0, 3.0, 4.0], 0.05)
    assert mean == 2.5 and sd == pytest.approx(1.2909944487) and lcb == pytest.approx(2.5 - 2.3533634 * 1.2909944487 / 2)
    assert descent_rhs_l0(0.1, 2.0, 3.0, 4.0) == pytest.approx(-0.2 + 0.5 * 4.0 * 0.01 * 3.0)
