"""The entry checks of ``CurvatureOptimizer.step`` and the snapshot a precondition hook is guarded by.

Oracles: the documented messages (full text) for a step without the closure K-BFGS and adaptive damping
need; and the rule that a step which raises leaves parameters, optimizer state and every factor
bit-identical -- here a precondition hook that raises on a step with no inverse refresh and no second
pass (nothing else would make that step keep a snapshot)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from curvature import AdaptiveLM
from optimizers import KBFGS, KFAC
from tests.optimizers.closures import loss_closure

D = torch.float64


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(6, 3, generator=g, dtype=D), torch.randn(6, 2, generator=g, dtype=D)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def test_kbfgs_without_a_closure_says_what_the_closure_must_do():
    model, x, y = _problem()
    opt = KBFGS(model, lr=0.1, damping=0.3)
    message = ("KBFGS needs step(closure): the closure must zero the gradients, run forward and backward on the "
               "current batch and return the loss; it is called again at the new parameters on the same batch")
    with pytest.raises(RuntimeError, match="^" + re.escape(message) + "$"):
        opt.step()


def test_adaptive_damping_without_a_closure_is_an_error():
    model, x, y = _problem()
    opt = KFAC(model, lr=0.1, damping=AdaptiveLM(0.3))
    with pytest.raises(RuntimeError, match="^adaptive damping needs step\\(closure\\) to measure the reduction ratio$"):
        opt.step()


def _state(opt, model):
    factors = [t.clone() for b in opt.blocks.values() for t in (b.a_factor.statistic, b.g_factor.statistic)]
    momenta = [s["momentum_matrix"].clone() for s in opt.state.values() if "momentum_matrix" in s]
    return [p.detach().clone() for p in model.parameters()] + factors + momenta


def test_a_raising_precondition_hook_leaves_the_step_without_trace():
    model, x, y = _problem()
    opt = KFAC(model, lr=0.1, damping=0.3, momentum=0.9, inverse_update_freq=10, inverse_warmup_steps=0)
    opt.step(loss_closure(opt, model, _loss, x, y))  # step 0 inverts; step 1 neither inverts nor has a second pass

    def hook(step, name, block, grad, direction):
        if step == 1:
            raise RuntimeError("hook failed")

    assert not opt._inverse_due(1)
    opt.register_precondition_hook(hook)
    before = _state(opt, model)
    assert before[-1].abs().sum() > 0  # a momentum buffer exists
    with pytest.raises(RuntimeError, match="^hook failed$"):
        opt.step(loss_closure(opt, model, _loss, x + 0.5, y))
    after = _state(opt, model)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    assert opt.steps == 1


def test_the_steps_counter_counts_applied_steps():
    model, x, y = _problem()
    opt = KFAC(model, lr=0.1, damping=0.3)
    opt.step(loss_closure(opt, model, _loss, x, y))
    opt.step(loss_closure(opt, model, lambda out, t: _loss(out, t) * float("nan"), x, y))  # skipped
    assert opt.counters["steps"] == opt.steps == 1
    opt.step(loss_closure(opt, model, _loss, x, y))
    assert opt.counters["skipped_steps"] == 1
    assert opt.counters["steps"] == opt.steps == 2


def test_a_step_skipped_on_the_checked_path_reports_its_loss():
    """A precondition hook keeps the step off the deferred path: the skip's StepInfo carries the loss."""
    model, x, y = _problem()
    opt = KFAC(model, lr=0.1, damping=0.3)
    opt.register_precondition_hook(lambda *args: None)
    seen = []
    opt.register_step_hook(seen.append)
    opt.step(loss_closure(opt, model, lambda out, t: _loss(out, t) * float("inf"), x, y))
    assert seen[-1].skipped and seen[-1].loss == float("inf")


def test_an_unguarded_checked_step_leaves_a_rollback_point():
    """Monte-Carlo Fisher (checked path), no inverse due, no second pass: the step keeps no snapshot but
    still a rollback point, so a second non-finite first pass in a row rolls back to before it."""
    model, x, y = _problem()
    opt = KFAC(model, lr=0.1, damping=0.3, fisher="mc", likelihood="gaussian", inverse_update_freq=10,
               inverse_warmup_steps=0)
    opt.step(loss_closure(opt, model, _loss, x, y))
    assert not opt._inverse_due(1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(loss_closure(opt, model, _loss, x + 0.5, y))
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    for _ in range(2):
        opt.step(loss_closure(opt, model, lambda out, t: _loss(out, t) * float("nan"), x, y))
    assert opt.counters["rollbacks"] == 1
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
