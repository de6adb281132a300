"""The deferred first-pass check (one host read per step) against the checked step.

With default settings a step checks its first pass (loss and gradients finite) in the same host read
as the new point (and, for K-BFGS, every pair decision); a step whose first pass was not finite is
undone bit for bit and skipped. The oracle is the checked step, which reads the first-pass check
before mutating anything: a no-op precondition hook forces it (hooks see the direction, so the
step checks first). The same sequence of batches -- finite ones, a batch with a NaN input, a batch
whose loss is finite but whose gradients are NaN, a learning-rate spike that makes the new point
non-finite -- must leave parameters, gradients, optimizer state, every block's state and every
counter bit-identical on both paths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmarks.syncs import SyncCounter
from optimizers import KBFGS, KBFGSL, KFAC, Diagonal
from optimizers.driver import _BAD_NEW_POINT

D = torch.float64

MAKERS = {
    "kfac": lambda m: KFAC(m, lr=0.2, damping=0.5, inverse_update_freq=3, inverse_warmup_steps=0),
    "kfac-lag": lambda m: KFAC(m, lr=0.2, damping=0.5, inverse_update_freq=3, inverse_warmup_steps=0, lag_factors=True),
    "kfac-momentum-wd": lambda m: KFAC(m, lr=0.2, damping=0.5, momentum=0.9, weight_decay=0.01,
                                       inverse_update_freq=3, inverse_warmup_steps=0),
    "kfac-kl-clip": lambda m: KFAC(m, lr=0.2, damping=0.5, inverse_update_freq=3, inverse_warmup_steps=0, kl_clip=0.01),
    "diagonal": lambda m: Diagonal(m, lr=0.05),
    "kbfgs": lambda m: KBFGS(m, lr=0.2, damping=0.3),
    "kbfgsl": lambda m: KBFGSL(m, lr=0.2, damping=0.3, memory=3),
}

# what each step of the sequence feeds: a finite batch, a NaN input, NaN gradients with a finite
# loss, a spike (the largest float as learning rate and a loss scaled by 1e3: the new point is not
# finite; step 7 is not an inverse refresh for KFAC's T_inv = 3)
PLAN = ["ok", "ok", "nan-input", "ok", "nan-grad", "ok", "ok", "spike", "ok", "nan-input", "nan-input", "ok"]


def _data(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 5, generator=g, dtype=D)
    y = torch.randn(24, 3, generator=g, dtype=D)
    return x.to(device), y.to(device)


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(D).to(device)


def _closure(opt, model, x, y, kind, raise_on_second=False):
    calls = []

    def closure():
        calls.append(1)
        if raise_on_second and len(calls) == 2:
            raise ValueError("the second call of this closure fails")
        opt.zero_grad()
        inp = x.clone()
        if kind == "nan-input":
            inp[0, 0] = float("nan")
        out = model(inp)
        loss = 0.5 * ((out - y) ** 2).sum(1).mean()
        if kind == "spike":
            loss = 1e3 * loss
        if kind == "nan-grad":  # d/dz sqrt(z) at z = 0 is inf; times 0 it is NaN, the loss stays finite
            loss = loss + 0.0 * torch.sqrt(0.0 * out.sum())
        loss.backward()
        return loss

    return closure


def _state(model, opt):
    return {"params": [p.detach().clone() for p in model.parameters()],
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "opt.state": copy.deepcopy([opt.state[p] for p in model.parameters()]),
            "blocks": copy.deepcopy({n: s.block.state_dict() for n, s in opt.slots.items()}),
            "counters": copy.deepcopy(dict(opt.counters)), "inversion_stats": copy.deepcopy(vars(opt.inversion_stats))}


def _run(device, name, checked, plan=PLAN, raise_on_second_at=None):
    """The optimizer's complete state after every step of ``plan``."""
    model = _model(device)
    opt = MAKERS[name](model)
    if checked:
        opt.register_precondition_hook(lambda *args: None)
    x, y = _data(device)
    states = []
    for k, kind in enumerate(plan):
        lr = opt.param_groups[0]["lr"]
        if kind == "spike":
            for group in opt.param_groups:
                group["lr"] = torch.finfo(D).max
        opt.step(_closure(opt, model, x, y, kind, raise_on_second=(k == raise_on_second_at)))
        for group in opt.param_groups:
            group["lr"] = lr
        states.append(_state(model, opt))
    return opt, states


def _same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def _assert_identical(run_a, run_b):
    for k, (a, b) in enumerate(zip(run_a[1], run_b[1])):
        _same(a, b, f"after step {k}")


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_deferred_step_equals_the_checked_step_through_faults(device, name):
    deferred, checked = _run(device, name, checked=False), _run(device, name, checked=True)
    opt = deferred[0]
    reasons = opt.counters["skip_reasons"]  # every fault path was taken (the spike reverts, or rolls back next step)
    assert reasons.get("non-finite gradient") == 1 and reasons.get("non-finite input batch", 0) >= 2, reasons
    if name.endswith("kl-clip"):  # the clip bounds the spike's step: nothing to revert
        assert opt.counters["reverted_steps"] == 0 and opt.counters["rollbacks"] == 0, reasons
    elif name.startswith("kfac"):  # the revert of the step without a snapshot (statistics folded in after the read)
        assert opt.counters["reverted_steps"] == 1 and reasons.get(_BAD_NEW_POINT) == 1, reasons
    elif name.startswith("kbfgs"):  # the new point may be finite with an infinite loss there
        assert opt.counters["reverted_steps"] == 1, reasons
    else:  # the diagonal step lands at a huge finite point: the next step rolls back
        assert opt.counters["rollbacks"] == 1, reasons
    _assert_identical(deferred, checked)


@pytest.mark.parametrize("name", ["kbfgs", "kbfgsl"])
def test_an_error_of_the_second_call_on_a_bad_first_pass_is_a_skip(device, name):
    """The checked step never calls the closure again after a non-finite first pass; the deferred
    attempt does (it learns of the fault in its one read) and an error that call raises is not
    surfaced: the step is skipped exactly as the checked step skips it."""
    plan = ["ok", "ok", "nan-input", "ok"]
    deferred = _run(device, name, checked=False, plan=plan, raise_on_second_at=2)
    checked = _run(device, name, checked=True, plan=plan)
    assert deferred[0].counters["skipped_steps"] == 1
    _assert_identical(deferred, checked)


@pytest.mark.parametrize("name", ["kfac", "kbfgs"])
def test_an_error_on_a_finite_first_pass_is_raised_with_nothing_changed(device, name):
    model = _model(device)
    opt = MAKERS[name](model)
    x, y = _data(device)
    for _ in range(2):
        opt.step(_closure(opt, model, x, y, "ok"))
    before = ([p.detach().clone() for p in model.parameters()], {n: s.block.state_dict() for n, s in opt.slots.items()},
              dict(opt.counters))

    if name == "kbfgs":
        with pytest.raises(ValueError, match="second call"):
            opt.step(_closure(opt, model, x, y, "ok", raise_on_second=True))
    else:  # KFAC calls the closure once: fail inside the step, after the first layer's direction
        block = opt.slots["2"].block

        def fail(grad):
            raise RuntimeError("planted failure of precondition")

        block.precondition = fail
        with pytest.raises(RuntimeError, match="planted failure"):
            opt.step(_closure(opt, model, x, y, "ok"))
        del block.precondition
    _same([p.detach() for p in model.parameters()], before[0], "params")
    _same({n: s.block.state_dict() for n, s in opt.slots.items()}, before[1], "blocks")
    _same(dict(opt.counters), before[2], "counters")


@pytest.mark.parametrize("name", ["kfac", "kbfgs", "kbfgsl", "diagonal"])
def test_a_deferred_skip_reads_no_more_than_the_checked_one_needs(device, name):
    """The common step reads once; a skipped step pays the classification (still a handful)."""
    model = _model(device)
    opt = MAKERS[name](model)
    x, y = _data(device)
    opt.step(_closure(opt, model, x, y, "ok"))
    with SyncCounter() as common:
        opt.step(_closure(opt, model, x, y, "ok"))
    assert common.count == 1 + int(name.startswith("kfac") and opt.steps - 1 == 3), dict(common.sites)
    with SyncCounter() as skipped:
        opt.step(_closure(opt, model, x, y, "nan-input"))
    assert opt.counters["skipped_steps"] == 1 and skipped.count <= 4, dict(skipped.sites)


def test_first_pass_flags_are_exact():
    """first_pass_flags: exact per element (NaN, +inf, -inf in any gradient; finite gradients whose sum
    overflows read finite), empty and complex gradients handled, mixed dtypes, no host read."""
    from optimizers.driver import first_pass_flags

    big = torch.tensor([3e38, 3e38, -1.0])  # the sum overflows; every element is finite
    ok = [torch.randn(3, 4), big, torch.zeros(0), torch.randn(5, dtype=torch.float64)]
    assert first_pass_flags(torch.tensor(1.0), ok).tolist() == [True, True]
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = torch.randn(3, 4)
        g[2, 1] = bad
        assert first_pass_flags(torch.tensor(1.0), ok + [g]).tolist() == [True, False]
        assert first_pass_flags(torch.tensor(bad), ok).tolist() == [False, True]
        c = torch.randn(3, dtype=torch.complex64)
        c[1] = complex(1.0, bad)
        assert first_pass_flags(None, [c]).tolist() == [True, False]
    assert first_pass_flags(None, [torch.randn(2, dtype=torch.complex64)]).tolist() == [True, True]
    assert first_pass_flags(None, []).tolist() == [True, True]
