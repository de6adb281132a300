"""Exact tests of CurvatureOptimizer's step control flow and recovery (optimizers/driver.py).

What every step hook sees (``StepInfo``) on normal, skipped and reverted steps; the counters over
repeated faults (two skips, two reverts, two rollbacks, the streak reset); which path a step takes
(the deferred first-pass check or the checked one) where the paths differ observably; the revert's
reason for each kind of bad new point; the exact error messages of the closure checks; the
reduction ratio of adaptive damping against its formula; the snapshot and rollback restoring state
that did not exist before the step; and the module-level helpers ``loss_rose`` and
``first_pass_flags`` on exact inputs. Small float64 models, a few steps each (the file runs once per
mutant of the mutation audit).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Callable

import pytest
import torch
from torch import nn

from curvature.damping import AdaptiveLM
from optimizers import KBFGS, KFAC
from optimizers.data_parallel import all_reduce_gradients
from optimizers.driver import (_BAD_NEW_POINT, _LOSS_ROSE, StepInfo, _FirstPassNotFinite, first_pass_flags,
                               loss_rose)
from optimizers.recovery import Recovery
from tests.optimizers.thread_world import run_ranks

D = torch.float64
NEW_POINT = "non-finite loss or gradient at the new point (step reverted)"
ROLLED_BACK = "non-finite loss or gradient at the point of the last step (rolled back)"
NAN_GRAD, NAN_LOSS = "non-finite gradient", "non-finite loss"


def _model(bias: bool = True, seed: int = 0) -> nn.Sequential:
    """4 → 5 → 3 with tanh; parameters from a local generator (thread ranks build it concurrently)."""
    model = nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)).to(D)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=D))
    return model


def _data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=D), torch.randn(n, 3, generator=g, dtype=D)


def _closure(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *kinds: str) -> Callable:
    """``closure()`` whose i-th call feeds ``kinds[i]`` (the last kind repeats):

    ``ok`` the mean squared error; ``nan-grad`` a finite loss with NaN gradients (d√z/dz at 0 is inf,
    times 0 NaN); ``inf-loss`` the loss plus a constant inf (finite gradients); ``nan`` NaN times the
    loss; ``rise`` 100 times the loss; ``huge`` the largest float as loss (finite gradients); ``huge-rows`` 1e307·Σ out (finite rows
    whose sum overflows);
    ``float`` the loss as a Python float; ``none`` None; ``no-backward`` the loss without backward;
    ``no-forward`` a constant tensor (the model is not run); ``spike`` the loss times 1e300."""
    calls = []

    def closure():
        kind = kinds[min(len(calls), len(kinds) - 1)]
        calls.append(kind)
        opt.zero_grad()
        if kind == "no-forward":
            return torch.tensor(1.0, dtype=D)
        out = model(x)
        loss = 0.5 * ((out - y) ** 2).sum(1).mean()
        if kind == "nan-grad":
            loss = loss + 0.0 * torch.sqrt(0.0 * out.sum())
        elif kind == "nan":
            loss = float("nan") * loss
        elif kind == "rise":
            loss = 100.0 * loss
        elif kind == "huge-rows":
            loss = 1e307 * out.sum()
        elif kind == "spike":
            loss = 1e300 * loss
        if kind != "no-backward":
            loss.backward()
        if kind == "inf-loss":
            return loss.detach() + float("inf")
        if kind == "huge":
            return loss.detach() * 0.0 + torch.finfo(D).max
        if kind == "float":
            return float(loss.detach())
        if kind == "none":
            return None
        return loss

    closure.calls = calls
    return closure


def _infos(opt) -> list[StepInfo]:
    seen: list[StepInfo] = []
    opt.register_step_hook(seen.append)
    return seen


def _kbfgs(**options) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, KBFGS, list[StepInfo]]:
    """The default model and batch, a K-BFGS (lr 0.2, λ 0.3, ``options``) on them, and its step-info list."""
    model = _model()
    x, y = _data()
    opt = KBFGS(model, lr=0.2, damping=0.3, **options)
    return model, x, y, opt, _infos(opt)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


# ---------------------------------------------------------------------------------------------- loss_rose
def test_loss_rose_boundary_on_floats():
    """f⁺ − f > (factor − 1)|f|: equality is no rise; the next float above is."""
    assert loss_rose(1.0, 10.0, 10.0) is False
    assert loss_rose(1.0, math.nextafter(10.0, math.inf), 10.0) is True
    assert loss_rose(-1.0, 8.0, 10.0) is False  # |f| = 1: 9 > 9 is false
    assert loss_rose(-1.0, math.nextafter(8.0, math.inf), 10.0) is True
    assert loss_rose(2.0, 3.0, 1.5) is False and loss_rose(2.0, 3.5, 1.5) is True


@pytest.mark.parametrize("before,after,want", [
    (torch.tensor([1.0], dtype=D), 10.0, False),  # a shape-(1,) loss: the flag is 0-dim all the same
    (torch.tensor([1.0], dtype=D), 10.5, True),
    (1.0, torch.tensor(10.5, dtype=D), True),
    (2.0, torch.tensor([19.0], dtype=D), False),
    (torch.tensor(-1.0, dtype=D), torch.tensor(8.5, dtype=D), True),
])
def test_loss_rose_mixed_tensor_and_float_is_a_0dim_device_flag(before, after, want):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tensor is detached, never copy-constructed (torch.tensor(t) warns)
        flag = loss_rose(before, after, 10.0)
    assert isinstance(flag, torch.Tensor) and flag.shape == () and flag.dtype == torch.bool
    assert bool(flag) is want


def test_loss_rose_of_a_tensor_that_requires_grad_does_not_warn():
    f = torch.tensor(1.0, dtype=D, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flag = loss_rose(f * 1.0, (f * 30.0), 10.0)
    assert bool(flag) is True and not flag.requires_grad


# ---------------------------------------------------------------------------------------- first_pass_flags
INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("loss,grads,want", [
    (None, [], [True, True]),
    (None, [torch.ones(2, 2, dtype=D)], [True, True]),
    (torch.tensor(1.0, dtype=D), [], [True, True]),
    (torch.tensor(INF, dtype=D), [torch.ones(3, dtype=D)], [False, True]),
    (torch.tensor(-INF, dtype=D), [torch.ones(3, dtype=D)], [False, True]),
    (torch.tensor(NAN, dtype=D), [torch.ones(3, dtype=D)], [False, True]),
    (torch.tensor(1.0, dtype=D), [torch.ones(3, dtype=D), torch.tensor([0.0, NAN, 1.0], dtype=D)], [True, False]),
    (torch.tensor(1.0, dtype=D), [torch.tensor([[-INF, 0.0]], dtype=D)], [True, False]),
    (torch.tensor(1.0, dtype=D), [torch.tensor([INF], dtype=D), torch.ones(2, dtype=D)], [True, False]),
    (None, [torch.zeros(0, dtype=D), torch.tensor([1e308, -1e308], dtype=D)], [True, True]),  # empty: skipped
    (torch.tensor(NAN, dtype=D), [torch.tensor([NAN], dtype=D)], [False, False]),
    (None, [torch.tensor([1 + 1j, complex(0, NAN)])], [True, False]),
])
def test_first_pass_flags_exact(loss, grads, want):
    flags = first_pass_flags(loss, grads)
    assert flags.dtype == torch.bool and flags.shape == (2,)
    assert flags.tolist() == want


def test_first_pass_not_finite_carries_its_reason():
    err = _FirstPassNotFinite(NAN_GRAD)
    assert err.reason == NAN_GRAD and str(err) == NAN_GRAD and err.args == (NAN_GRAD,)


# --------------------------------------------------------------------------------------- StepInfo fields
def test_normal_step_info_of_kbfgs_is_exact():
    """step, lr, the losses of both calls, no skip, scale 1, the records and learning rates of every layer."""
    model, x, y, opt, seen = _kbfgs()
    for k in range(2):
        closure = _closure(opt, model, x, y, "ok")
        loss = opt.step(closure)
        info = seen[-1]
        with torch.no_grad():
            want_after = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        assert info.step == k and info.lr == 0.2 and info.loss == float(loss.detach())
        assert info.loss_after == float(want_after)
        assert info.skipped is False and info.skip_reason is None and info.step_scale == 1.0
        assert set(info.records) == {"0", "2"} and all(r.batch_size == 16 for r in info.records.values())
        assert info.layer_lrs == {"0": (0.2, 0.2), "2": (0.2, 0.2)}
        assert set(info.grads) == set(info.directions) == set(info.inputs) == {"0", "2"}
    assert len(seen) == 2


def test_skipped_step_info_and_counters_over_two_skips():
    """A skipped step reports the step index it did not take, the lr, its loss and the reason; the
    counters add up (two skips of one reason, one of another; no rollback point is kept)."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.5, inverse_update_freq=1, inverse_warmup_steps=0,
               recovery=Recovery(rollback=False))
    seen = _infos(opt)
    opt.step(_closure(opt, model, x, y, "ok"))
    nan_grad = _closure(opt, model, x, y, "nan-grad")
    for _ in range(2):
        loss = opt.step(nan_grad)
        info = seen[-1]
        assert (info.step, info.lr, info.skipped, info.skip_reason) == (1, 0.1, True, NAN_GRAD)
        assert info.loss == float(loss.detach()) and math.isfinite(info.loss)
        assert info.loss_after is None and info.step_scale == 1.0 and info.records == {}
    opt.step(_closure(opt, model, x, y, "inf-loss"))
    assert (seen[-1].step, seen[-1].skipped, seen[-1].skip_reason, seen[-1].loss) == (1, True, NAN_LOSS, INF)
    assert opt.counters["skipped_steps"] == 3 and opt.skipped_steps == 3 and opt.steps == 1
    assert opt.counters["skip_reasons"] == {NAN_GRAD: 2, NAN_LOSS: 1}
    assert len(seen) == 4


def test_checked_step_skips_an_infinite_tensor_loss_with_finite_gradients():
    """With a precondition hook the first pass is checked before the step: an inf loss whose
    gradients are finite is a non-finite loss (the loss is part of the check)."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.5, inverse_update_freq=1)
    opt.register_precondition_hook(lambda *args: None)
    seen = _infos(opt)
    before = _params(model)
    opt.step(_closure(opt, model, x, y, "inf-loss"))
    assert (seen[-1].skipped, seen[-1].skip_reason) == (True, NAN_LOSS)
    assert _same(_params(model), before) and opt.steps == 0


def test_python_float_losses_are_checked_on_the_host():
    """A closure may return a Python float: a finite one steps, a NaN one is skipped as a
    non-finite loss (the deferred on-device check cannot see it: such a step is checked first)."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.5, inverse_update_freq=100, inverse_warmup_steps=0)
    seen = _infos(opt)
    loss = opt.step(_closure(opt, model, x, y, "float"))
    assert isinstance(loss, float) and seen[-1].skipped is False and seen[-1].loss == loss
    before = _params(model)

    def nan_closure():
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
        return float("nan")

    opt.step(nan_closure)
    assert (seen[-1].step, seen[-1].skipped, seen[-1].skip_reason) == (1, True, NAN_LOSS)
    assert _same(_params(model), before) and opt.counters["skip_reasons"] == {NAN_LOSS: 1}


def test_precondition_hook_gets_the_step_and_never_runs_on_a_skipped_step():
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.5, inverse_update_freq=1)
    calls = []
    opt.register_precondition_hook(lambda k, name, block, g, d: calls.append((k, name)))
    opt.step(_closure(opt, model, x, y, "ok"))
    opt.step(_closure(opt, model, x, y, "nan-grad"))
    opt.step(_closure(opt, model, x, y, "ok"))
    assert calls == [(0, "0"), (0, "2"), (1, "0"), (1, "2")]
    assert opt.counters["skipped_steps"] == 1


def test_monte_carlo_step_checks_its_first_pass_before_the_sampling_pass():
    """fisher='mc': a step whose sampling pass is due checks the first pass first, so a NaN batch runs
    no extra forward (the model sees exactly the closure's forward)."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.5, likelihood="gaussian", inverse_update_freq=100, inverse_warmup_steps=0)
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    opt.step(_closure(opt, model, x, y, "ok"))
    assert len(forwards) == 2  # the closure and the sampling pass
    opt.step(_closure(opt, model, x, y, "nan-grad"))
    assert len(forwards) == 3 and opt.counters["skipped_steps"] == 1


def test_without_rollback_a_step_without_snapshot_does_not_check_the_new_point():
    """Recovery(rollback=False) keeps no point: a step that takes no snapshot (no inverse refresh) has
    nothing to revert to, checks its first pass before the step and not its new point."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.2, damping=0.5, inverse_update_freq=100, inverse_warmup_steps=0,
               recovery=Recovery(rollback=False))
    opt.step(_closure(opt, model, x, y, "ok"))
    for group in opt.param_groups:
        group["lr"] = torch.finfo(D).max
    opt.step(_closure(opt, model, x, y, "spike"))
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert opt.counters["reverted_steps"] == 0 and opt.steps == 2


def test_only_steps_that_need_it_take_a_full_snapshot_and_the_rollback_point_shares_it(monkeypatch):
    """KFAC with T_inv = 3: the full snapshot is taken at the inverse refreshes (steps 0 and 3) only;
    the rollback point of such a step is the snapshot's copy of the parameters, not a second copy."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.5, inverse_update_freq=3, inverse_warmup_steps=0)
    taken = []
    original = opt._snapshot

    def spy():
        taken.append(original())
        return taken[-1]

    monkeypatch.setattr(opt, "_snapshot", spy)
    for k in range(4):
        opt.step(_closure(opt, model, x, y, "ok"))
        assert len(taken) == (1 if k < 3 else 2)
        if k in (0, 3):
            assert opt._rollback_point["params"] is taken[-1]["params"]
            assert opt._rollback_point["state"] is taken[-1]["state"]
        else:
            assert opt._rollback_point["params"] is not taken[-1]["params"]


# ------------------------------------------------------------------------------------------- the update
def test_weight_decay_on_layers_without_bias_and_no_momentum_buffer_at_momentum_zero():
    """Bias-free layers: the preconditioner input is τW + g; momentum 0 keeps no buffer."""
    model = _model(bias=False)
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.5, momentum=0.0, weight_decay=0.25, inverse_update_freq=1)
    seen = _infos(opt)
    weights = {n: model[int(n)].weight.detach().clone() for n in ("0", "2")}
    opt.step(_closure(opt, model, x, y, "ok"))
    info = seen[-1]
    for name, w in weights.items():
        assert torch.equal(info.inputs[name], (0.25 * w).add_(info.grads[name]))
        assert "momentum_matrix" not in opt.state[model[int(name)].weight]
    assert all(not s for s in opt.state.values())


def test_step_after_a_revert_is_scaled_by_the_recovery_multiplier():
    """After a revert step_scale = 0.1: the next step applies −lr·0.1·d and reports 0.1; then 0.2."""
    model, x, y, opt, seen = _kbfgs()
    opt.step(_closure(opt, model, x, y, "ok"))
    opt.step(_closure(opt, model, x, y, "ok", "rise"))
    assert seen[-1].skip_reason == _LOSS_ROSE and opt.counters["step_scale"] == pytest.approx(0.1)
    w0 = model[0].weight.detach().clone()
    opt.step(_closure(opt, model, x, y, "ok"))
    info = seen[-1]
    assert info.skipped is False and info.step_scale == pytest.approx(0.1)
    d_w = info.directions["0"][:, :-1]
    torch.testing.assert_close(model[0].weight.detach() - w0, -0.2 * 0.1 * d_w, rtol=1e-12, atol=1e-15)
    assert opt.counters["step_scale"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------ reverts (2nd pass)
def test_two_loss_rise_reverts_count_twice_and_reset_the_secant_memory_twice():
    model, x, y, opt, seen = _kbfgs()
    opt.step(_closure(opt, model, x, y, "ok"))
    for k in (1, 2):
        before = _params(model)
        loss = opt.step(_closure(opt, model, x, y, "ok", "rise"))
        info = seen[-1]
        assert (info.step, info.skipped, info.skip_reason) == (k, True, _LOSS_ROSE)
        assert info.loss == float(loss.detach()) and info.loss_after == pytest.approx(100.0 * float(loss.detach()), rel=0.5)
        assert _same(_params(model), before)
    c = opt.counters
    assert (c["reverted_steps"], c["recoveries"], c["secant_resets"], c["skipped_steps"]) == (2, 2, 4, 0)
    assert c["skip_reasons"] == {_LOSS_ROSE: 2} and c["step_scale"] == pytest.approx(0.01)


@pytest.mark.parametrize("second,reason", [
    ("nan", NEW_POINT),  # NaN loss and rows at the new point, finite parameters
    ("inf-loss", NEW_POINT),  # an infinite loss with finite rows
    ("nan-grad", NEW_POINT),  # a finite loss, NaN rows
])
def test_second_pass_revert_reason_for_each_bad_new_point(second, reason):
    model, x, y, opt, seen = _kbfgs(recovery=Recovery(max_loss_rise=None))
    opt.step(_closure(opt, model, x, y, "ok"))
    before = _params(model)
    opt.step(_closure(opt, model, x, y, "ok", second))
    assert (seen[-1].skipped, seen[-1].skip_reason) == (True, reason)
    assert _same(_params(model), before)
    assert opt.counters["skip_reasons"] == {reason: 1} and opt.counters["reverted_steps"] == 1


def test_second_pass_revert_of_non_finite_parameters_names_the_update():
    model, x, y, opt, seen = _kbfgs()
    opt.step(_closure(opt, model, x, y, "ok"))
    before = _params(model)
    for group in opt.param_groups:
        group["lr"] = torch.finfo(D).max
    opt.step(_closure(opt, model, x, y, "spike"))
    assert (seen[-1].skipped, seen[-1].skip_reason) == (True, _BAD_NEW_POINT)
    assert _same(_params(model), before)


def test_huge_finite_rows_at_the_new_point_are_confirmed_finite():
    """The second call's loss is 1e307·Σ out: its pre-activation gradient rows are finite (1e307 at each of
    the last layer's 16×3 outputs), but their sum overflows the fused check; the exact check finds every
    row and the loss finite, and the step is taken."""
    model, x, y, opt, seen = _kbfgs()
    opt.step(_closure(opt, model, x, y, "ok", "huge-rows"))
    info = seen[-1]
    assert info.skipped is False and info.skip_reason is None and opt.counters["reverted_steps"] == 0
    with torch.no_grad():
        assert info.loss_after == float(1e307 * model(x).sum())


def test_the_largest_float_as_loss_at_the_new_point_is_a_rise():
    """A finite loss at the new point as large as a float can be: reverted as a rise, not as non-finite."""
    model, x, y, opt, seen = _kbfgs()
    opt.step(_closure(opt, model, x, y, "ok", "huge"))
    assert (seen[-1].skipped, seen[-1].skip_reason) == (True, _LOSS_ROSE)
    assert seen[-1].loss_after == torch.finfo(D).max


def test_python_float_losses_through_the_second_pass():
    """K-BFGS with Python-float losses: finite ones step; a NaN at the new point reverts the step."""
    model, x, y, opt, seen = _kbfgs()
    opt.step(_closure(opt, model, x, y, "float"))
    assert seen[-1].skipped is False and isinstance(seen[-1].loss_after, float)
    before = _params(model)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return float(loss.detach()) if len(calls) == 1 else float("nan")

    opt.step(closure)
    assert (seen[-1].skipped, seen[-1].skip_reason) == (True, NEW_POINT) and _same(_params(model), before)


@pytest.mark.parametrize("second", ["no-backward", "no-forward"])
def test_second_call_that_misses_the_layers_is_an_error_naming_the_first(second):
    model = _model()
    x, y = _data()
    opt = KBFGS(model, lr=0.2, damping=0.3)
    opt.step(_closure(opt, model, x, y, "ok"))
    before = _params(model)
    message = ("layer '0' was not evaluated (forward and backward) by the closure on both calls: the closure "
               "must run the same batch through the model and call backward every time")
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        opt.step(_closure(opt, model, x, y, "ok", second))
    assert _same(_params(model), before) and opt.steps == 1


def test_second_call_that_misses_the_layers_with_a_nan_loss_is_reverted():
    """Missing rows do not matter when the new point is bad anyway: the step is reverted."""
    model, x, y, opt, seen = _kbfgs()
    opt.step(_closure(opt, model, x, y, "ok"))
    before = _params(model)

    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        if len(calls) == 1:
            loss.backward()
            return loss
        return loss * float("nan")  # no backward: no rows at the new point

    opt.step(closure)
    assert (seen[-1].skipped, seen[-1].skip_reason) == (True, NEW_POINT) and _same(_params(model), before)


def test_nan_first_pass_with_a_second_call_missing_rows_is_a_skip():
    """The deferred first-pass flags are read with the second pass even when layers are missing: a
    NaN first pass is a skip (nothing reverted), whatever the second call did."""
    model, x, y, opt, seen = _kbfgs()
    opt.step(_closure(opt, model, x, y, "ok"))
    opt.step(_closure(opt, model, x, y, "nan-grad", "no-backward"))
    assert (seen[-1].skipped, seen[-1].skip_reason) == (True, NAN_GRAD)
    assert opt.counters["reverted_steps"] == 0 and opt.counters["skipped_steps"] == 1


# ------------------------------------------------------------------------------------- closure messages
def test_closure_messages_are_exact():
    model = _model()
    x, y = _data()
    opt = KBFGS(model, lr=0.2, damping=0.3)
    first = ("the closure returned None: return the loss (after loss.backward()); KBFGS compares it with the "
             "loss at the new point")
    with pytest.raises(TypeError, match=f"^{re.escape(first)}$"):
        opt.step(_closure(opt, model, x, y, "none"))
    second = first.replace("the closure returned", "the closure (second call, at the new point) returned")
    with pytest.raises(TypeError, match=f"^{re.escape(second)}$"):
        opt.step(_closure(opt, model, x, y, "ok", "none"))
    for value, name in (("1.0", "str"), (True, "bool"), ([1.0], "list")):
        with pytest.raises(TypeError, match=re.escape(
                f"the closure must return the loss as a scalar tensor or a number, got {name}") + "$"):
            opt.step(lambda value=value: value)

    def vector():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean(0)
        loss.sum().backward()
        return loss

    shape = "the closure returned a loss of shape (3,); return a scalar, e.g. loss.mean() (and call backward on that scalar)"
    with pytest.raises(ValueError, match=f"^{re.escape(shape)}$"):
        opt.step(vector)
    assert opt.steps == 0


def test_sparse_gradient_message_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)).to(D)
    opt = KFAC(model, blocks={nn.Embedding: None})
    ids = torch.tensor([[1, 2], [3, 4]])

    def closure():
        opt.zero_grad()
        loss = model(ids).pow(2).sum()
        loss.backward()
        return loss

    message = ("a parameter of shape (5, 3) has a torch.sparse_coo gradient; KFAC needs dense gradients: create the "
               "module with sparse=False (e.g. nn.Embedding(..., sparse=False)) or optimize that parameter with "
               "another optimizer")
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        opt.step(closure)


# ----------------------------------------------------------------------------------- rollback and streak
def test_rollbacks_streak_and_recoveries_over_repeated_bad_points():
    """Finite inputs, NaN gradients: the second bad first pass in a row rolls back to the point before
    the last accepted step (parameters, and no optimizer state, as before step 0) and resets the
    streak; with no point left further bad passes only skip; an accepted step keeps a new point and
    the next two bad passes roll back again."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.5, momentum=0.9, inverse_update_freq=100, inverse_warmup_steps=0)
    seen = _infos(opt)
    initial = _params(model)
    opt.step(_closure(opt, model, x, y, "ok"))
    assert len(opt.state) == 2  # the momentum buffers of both layers
    reasons, streaks = [], []
    for _ in range(4):
        opt.step(_closure(opt, model, x, y, "nan-grad"))
        reasons.append(seen[-1].skip_reason)
        streaks.append(opt.counters["bad_point_streak"])
        if len(reasons) == 2:
            assert _same(_params(model), initial) and len(opt.state) == 0
    assert reasons == [NAN_GRAD, ROLLED_BACK, NAN_GRAD, NAN_GRAD]
    assert streaks == [1, 0, 1, 2]
    c = opt.counters
    assert (c["rollbacks"], c["recoveries"], c["secant_resets"]) == (1, 1, 0)
    assert c["step_scale"] == pytest.approx(0.1)
    opt.step(_closure(opt, model, x, y, "ok"))
    assert seen[-1].step == 1 and seen[-1].skipped is False and seen[-1].step_scale == pytest.approx(0.1)
    assert c is opt.counters and c["bad_point_streak"] == 0
    after_accepted = _params(model)
    for _ in range(2):
        opt.step(_closure(opt, model, x, y, "nan-grad"))
    assert seen[-1].skip_reason == ROLLED_BACK and seen[-1].step == 2
    assert not _same(_params(model), after_accepted)  # back to the point before step 1
    assert (c["rollbacks"], c["recoveries"], c["skipped_steps"], c["bad_point_streak"]) == (2, 2, 6, 0)
    assert c["skip_reasons"] == {NAN_GRAD: 4, ROLLED_BACK: 2}


def test_checkpoint_without_a_streak_counter_counts_from_zero():
    """A checkpoint whose counters predate ``bad_point_streak``: the first bad pass counts 1."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.5, inverse_update_freq=100, inverse_warmup_steps=0)
    opt.step(_closure(opt, model, x, y, "ok"))
    state = opt.state_dict()
    del state["secondorder"]["counters"]["bad_point_streak"]
    fresh = KFAC(model, lr=0.1, damping=0.5, inverse_update_freq=100, inverse_warmup_steps=0)
    fresh.load_state_dict(state)
    fresh.step(_closure(fresh, model, x, y, "nan-grad"))
    assert fresh.counters["bad_point_streak"] == 1 and fresh.counters["rollbacks"] == 0


# ------------------------------------------------------------------------------- snapshots and restores
def test_revert_of_the_first_step_leaves_no_optimizer_state():
    """Step 0 (an inverse refresh: full snapshot) with a non-finite new point: the momentum buffers
    it created are removed again."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=torch.finfo(D).max, damping=0.5, inverse_update_freq=1)
    before = _params(model)
    opt.step(_closure(opt, model, x, y, "spike"))
    assert opt.counters["reverted_steps"] == 1 and len(opt.state) == 0 and _same(_params(model), before)


@pytest.mark.parametrize("inverse_update_freq", [1, 100], ids=["full-snapshot", "light-point"])
def test_revert_restores_the_adam_fallback_step_count(inverse_update_freq):
    """Adam fallback state holds an int step count: a reverted step puts it back (1), the next
    accepted step counts on (2), on both the full-snapshot and the light-point path."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.5, inverse_update_freq=inverse_update_freq, inverse_warmup_steps=0,
               exclude=["2"], fallback="adam")
    w = model[2].weight
    opt.step(_closure(opt, model, x, y, "ok"))
    assert opt.state[w]["adam_step"] == 1
    for group in opt.param_groups:
        group["lr"] = torch.finfo(D).max
    opt.step(_closure(opt, model, x, y, "spike"))
    assert opt.counters["reverted_steps"] == 1 and opt.state[w]["adam_step"] == 1
    for group in opt.param_groups:
        group["lr"] = 0.1
    opt.step(_closure(opt, model, x, y, "ok"))
    assert opt.state[w]["adam_step"] == 2 and type(opt.state[w]["adam_step"]) is int


# ------------------------------------------------------------------------------------- adaptive damping
def _model_change(opt, info: StepInfo, lam: float) -> float:
    r""":math:`m = \sum_l g_l\cdot\delta_l + \tfrac12(\delta_l^\top C_l \delta_l + \lambda|\delta_l|^2)`,
    :math:`\delta_l = -\alpha\nu d_l` (the step actually applied)."""
    m = 0.0
    for name, slot in opt.slots.items():
        delta = -info.lr * info.step_scale * info.directions[name]
        m += float(torch.sum(info.grads[name] * delta))
        m += 0.5 * float(slot.block.curvature_quadratic(delta) + lam * torch.sum(delta * delta))
    return m


def test_reduction_ratio_is_the_actual_over_the_predicted_decrease():
    """ρ = (f⁺ − f)/m with the KL-clipped step (ν < 1), and the rise rule is not applied."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.3, damping=AdaptiveLM(0.5), inverse_update_freq=1, kl_clip=1e-6)
    seen = _infos(opt)
    for kinds in (("ok",), ("ok",), ("ok", "rise")):
        lam = opt.damping.damping
        opt.step(_closure(opt, model, x, y, *kinds))
        info = seen[-1]
        assert info.skipped is False and 0 < info.step_scale < 1
        m = _model_change(opt, info, lam)
        assert m < 0
        assert info.reduction_ratio == pytest.approx((info.loss_after - info.loss) / m, rel=1e-9)
    assert opt.counters["reverted_steps"] == 0 and seen[-1].reduction_ratio < -1


def test_reduction_ratio_of_a_zero_step_is_minus_infinity():
    """Zero gradients, no momentum or decay: the step and the predicted change are 0, ρ = −∞."""
    model = _model()
    x, _ = _data()
    opt = KFAC(model, lr=0.3, damping=AdaptiveLM(0.5), momentum=0.0, weight_decay=0.0, inverse_update_freq=1)
    seen = _infos(opt)

    def closure():
        opt.zero_grad()
        loss = 0.0 * model(x).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert seen[-1].reduction_ratio == -math.inf and seen[-1].skipped is False


# ------------------------------------------------------------------------------------ two thread ranks
def _rank_run(comm, second_on_rank0: str) -> dict:
    """K-BFGS on rank ``comm.rank``'s half of the batch; step 1's second call on rank 0 is ``second_on_rank0``."""
    model = _model()
    x, y = _data()
    rows = slice(8 * comm.rank, 8 * comm.rank + 8)
    opt = KBFGS(model, lr=0.2, damping=0.3, distributed=comm)
    seen = _infos(opt)
    params = []
    for k in range(2):
        kinds = ("ok", second_on_rank0) if (k == 1 and comm.rank == 0) else ("ok",)
        inner = _closure(opt, model, x[rows], y[rows], *kinds)

        def closure(inner=inner):
            loss = inner()
            all_reduce_gradients(model, comm)
            return loss

        opt.step(closure)
        params.append(_params(model))
    return {"infos": seen, "params": params, "counters": opt.counters}


@pytest.mark.parametrize("second,reason", [("rise", _LOSS_ROSE), ("ok", None)])
def test_two_ranks_revert_a_rise_of_the_agreed_loss_together(second, reason):
    """Rank 0's loss at the new point is 100×: the mean over ranks rose more than 10×, both ranks revert
    the step (the parameters are those of step 0); with a normal second call both accept it."""
    ranks, _ = run_ranks(2, lambda c: _rank_run(c, second))
    for res in ranks:
        info = res["infos"][-1]
        assert (info.step, info.skipped, info.skip_reason) == (1, reason is not None, reason)
        assert _same(res["params"][1], res["params"][0]) is (reason is not None)
        assert res["counters"]["reverted_steps"] == (1 if reason else 0)
    assert _same(ranks[0]["params"][1], ranks[1]["params"][1])
