"""The shared protocol of HessianFree, SaddleFreeNewton and LevenbergMarquardt: resume, skips, misuse."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimizers import HessianFree, LevenbergMarquardt, SaddleFreeNewton

F64 = torch.float64
METHODS = {
    "hf": lambda m, **kw: HessianFree(m, F.cross_entropy, damping=0.1, max_cg_iters=6, weight_decay=1e-3, **kw),
    "sfn": lambda m, **kw: SaddleFreeNewton(m, F.cross_entropy, k=4, weight_decay=1e-3, **kw),
    "lm": lambda m, **kw: LevenbergMarquardt(m, F.cross_entropy, momentum=True, max_cg_iters=6, weight_decay=1e-3, **kw),
}


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(device=device, dtype=F64)


def _batches(device, count: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 3, generator=g, dtype=F64).to(device), torch.randint(0, 3, (12,), generator=g).to(device))
            for _ in range(count)]


def _run(opt, model, batches):
    for x, y in batches:
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure, targets=y)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bit_exact_resume(device, method):
    batches = _batches(device, 4)
    model = _model(device)
    opt = METHODS[method](model)
    _run(opt, model, batches[:2])
    ckpt_model, ckpt_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _run(opt, model, batches[2:])
    model2 = _model(device)
    model2.load_state_dict(ckpt_model)
    opt2 = METHODS[method](model2)
    opt2.load_state_dict(ckpt_opt)
    _run(opt2, model2, batches[2:])
    assert torch.equal(_flat(model), _flat(model2))
    assert opt.counters == opt2.counters and opt.damping.damping == opt2.damping.damping
    assert opt.counters["steps"] == 4 and opt.counters["products"] > 0
    with pytest.raises(ValueError, match="state_dict is from"):
        other = [m for m in METHODS if m != method][0]
        METHODS[other](_model(device)).load_state_dict(ckpt_opt)


def _state_snapshot(opt):
    sd = opt.state_dict()
    return copy.deepcopy(sd)


def _assert_same_state(a, b):
    assert a["matrix_free"] == b["matrix_free"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, value in a["state"][k].items():
            assert torch.equal(value, b["state"][k][name])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_non_finite_step_is_skipped_with_state_untouched(device, method, bad):
    batches = _batches(device, 3)
    model = _model(device)
    opt = METHODS[method](model)
    _run(opt, model, batches[:2])
    params, state = _flat(model).clone(), _state_snapshot(opt)
    x, y = batches[2]
    if bad == "loss":
        x = x.clone()
        x[0, 0] = float("nan")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if bad == "gradient":
            next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    opt.step(closure, targets=y)
    assert torch.equal(_flat(model), params)
    after = opt.state_dict()
    assert after["matrix_free"]["counters"]["skipped_steps"] == 1
    assert after["matrix_free"]["steps"] == 2
    reason = "non-finite loss" if bad == "loss" else "non-finite gradient"
    assert opt.counters["skip_reasons"] == {reason: 1}
    after["matrix_free"]["counters"] = state["matrix_free"]["counters"]
    _assert_same_state(state, after)
    assert opt.last_step.skipped and opt.last_step.skip_reason == reason


@pytest.mark.parametrize("method", sorted(METHODS))
def test_misuse_raises_before_anything_changes(device, method):
    model = _model(device)
    opt = METHODS[method](model)
    x, y = _batches(device, 1)[0]
    params = _flat(model).clone()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="targets"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert torch.equal(_flat(model), params) and opt.counters["steps"] == 0
    with pytest.raises(ValueError, match="lr"):
        METHODS[method](model, lr=-1.0) if method != "hf" else HessianFree(model, F.cross_entropy, lr=0.0)
    with pytest.raises(ValueError):
        METHODS[method](model, targets_are_inputs=True).load_state_dict({"state": {}, "param_groups": []})


def test_invalid_settings_name_the_parameter():
    model = _model("cpu")
    with pytest.raises(ValueError, match="max_cg_iters"):
        HessianFree(model, F.cross_entropy, max_cg_iters=0)
    with pytest.raises(ValueError, match="curvature"):
        HessianFree(model, F.cross_entropy, curvature="fisher")
    with pytest.raises(ValueError, match="k must"):
        SaddleFreeNewton(model, F.cross_entropy, k=0)
    with pytest.raises(ValueError, match="eigenvalue_floor"):
        SaddleFreeNewton(model, F.cross_entropy, eigenvalue_floor=-1.0)
    with pytest.raises(ValueError, match="damping"):
        LevenbergMarquardt(model, F.cross_entropy, damping=0.0)
    with pytest.raises(TypeError):
        LevenbergMarquardt(model, "mse")
