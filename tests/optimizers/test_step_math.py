"""Exact tests of the step's pieces that a mutation audit found unpinned (issue 17): the complete
revert after a non-finite second pass, the weight-decay sign, the KL-clip factor, the EMA momentum,
and K-BFGS's Hessian-action pair for H_a on the optimizer path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from curvature.blocks import vec_c
from optimizers import KBFGS, KBFGSL, KFAC

D = torch.float64


def _problem(device, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=D).to(device)
    y = torch.randn(n, 3, generator=g, dtype=D).to(device)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(D).to(device)
    return model, x, y


def _loss(model, x, y):
    return 0.5 * ((model(x) - y) ** 2).sum(1).mean()


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    return closure


def _everything_but_counters(opt, model):
    state = opt.state_dict()
    state["secondorder"].pop("counters")
    state["secondorder"].pop("steps")
    return copy.deepcopy({"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "opt": state})


def _assert_identical(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_identical(u, v, f"{path}[{i}]")
    else:
        assert a == b, path


def _without_recovery_targets(state):
    """The state minus what the recovery policy deliberately changes after a revert: H_g's secant
    memory (reset) and the policy's own step multiplier."""
    state = copy.deepcopy(state)
    for block in state["opt"]["secondorder"]["blocks"].values():
        block.pop("g")
    state["opt"]["secondorder"].pop("recovery", None)
    return state


@pytest.mark.parametrize("recovery", [False, True], ids=["revert-only", "default-recovery"])
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL], ids=["kbfgs", "kbfgsl"])
def test_revert_after_non_finite_second_pass_is_complete(device, cls, recovery):
    """Finite at the current point, NaN at the new one: parameters, momentum and every factor (including
    the A statistics folded in before the direction) are bit-identical to before the step. With the
    default recovery policy the revert is followed by its documented actions, and only by them: H_g's
    secant memory is reset (counted) and the step multiplier shrinks."""
    model, x, y = _problem(device)
    opt = cls(model, lr=0.2, damping=0.3, recovery=recovery)
    for k in range(3):
        opt.step(_closure(opt, model, x + 0.1 * k, y))
    before = _everything_but_counters(opt, model)
    assert opt.state[model[0].weight]["momentum_matrix"].abs().sum() > 0
    calls = []

    def nan_at_new_point():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, 2 * x, y)
        if len(calls) == 2:
            loss = loss * float("nan")
        loss.backward()
        return loss

    opt.step(nan_at_new_point)
    assert len(calls) == 2
    assert opt.counters["reverted_steps"] == 1
    after = _everything_but_counters(opt, model)
    if recovery:
        assert opt.counters["recoveries"] == 1 and opt.counters["secant_resets"] == len(opt.blocks)  # one per block
        assert opt.counters["step_scale"] < 1.0
        _assert_identical(_without_recovery_targets(before), _without_recovery_targets(after))
    else:
        assert opt.counters["secant_resets"] == 0 and opt.counters["step_scale"] == 1.0
        _assert_identical(before, after)
    opt.step(_closure(opt, model, x, y))  # training goes on from the restored state
    assert opt.counters["reverted_steps"] == 1


def _dense_operator(block):
    return torch.kron(block.a_factor.to_dense().contiguous(), block.g_factor.to_dense().contiguous())


def test_weight_decay_is_added_with_a_plus_sign_and_the_update_is_minus_lr_p(device):
    """momentum 0, τ = 0.1: the preconditioner input is grad + τ·[W|b], and ΔW = −lr·P(input)."""
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.3, damping=0.5, momentum=0.0, weight_decay=0.1, inverse_update_freq=1)
    inputs, grads = {}, {}
    opt.register_precondition_hook(lambda k, name, block, inp, d: inputs.__setitem__(name, inp.clone()))
    opt.register_step_hook(lambda info: grads.update(info.grads))
    weights = {n: s.adapter.weight_matrix().clone() for n, s in opt.slots.items()}
    opt.step(_closure(opt, model, x, y))
    for name, slot in opt.slots.items():
        torch.testing.assert_close(inputs[name], grads[name] + 0.1 * weights[name], rtol=0, atol=1e-15)
        delta = slot.adapter.weight_matrix() - weights[name]
        expected = -0.3 * _dense_operator(slot.block) @ vec_c(inputs[name])
        torch.testing.assert_close(vec_c(delta), expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("split", [False, True])
def test_weight_decay_input_is_bit_exact_and_leaves_gradients_and_weights_alone(device, split):
    """The preconditioner input with weight decay is exactly grad + [λ_w W | λ_b b] (bit for bit, on the
    deferred one-read path: no precondition hook), built in a fresh tensor: the gradients (info.grads and
    p.grad) and the parameters before the update are not written into."""
    model, x, y = _problem(device)
    if split:  # λ_b ≠ λ_w: the biases in a group of their own
        linears = [m for m in model if isinstance(m, nn.Linear)]
        groups = [{"params": [m.weight for m in linears], "weight_decay": 0.1},
                  {"params": [m.bias for m in linears], "weight_decay": 0.03}]
        opt = KFAC(model, lr=0.3, damping=0.5, momentum=0.0, inverse_update_freq=1, param_groups=groups)
        lam_b = 0.03
    else:
        opt = KFAC(model, lr=0.3, damping=0.5, momentum=0.0, weight_decay=0.1, inverse_update_freq=1)
        lam_b = 0.1
    infos = []
    opt.register_step_hook(infos.append)
    weights = {n: (s.weight.detach().clone(), s.bias.detach().clone()) for n, s in opt.slots.items()}
    closure = _closure(opt, model, x, y)
    opt.step(closure)
    (info,) = infos
    for name, slot in opt.slots.items():
        w, b = weights[name]
        grad = info.grads[name]
        expected = grad + torch.cat([0.1 * w, (lam_b * b).reshape(-1, 1)], 1)
        assert torch.equal(info.inputs[name], expected)
        assert info.inputs[name].data_ptr() != grad.data_ptr()
        assert torch.equal(grad, torch.cat([slot.weight.grad, slot.bias.grad.reshape(-1, 1)], 1))


def test_kl_clip_factor_is_the_square_root_of_c_over_the_quadratic(device):
    r"""ν = min(1, √(c / v)), v = lr² Σ_layers vec(m)ᵀ P vec(m), computed from the dense operator."""
    model, x, y = _problem(device)
    lr, c = 0.7, 1e-4
    opt = KFAC(model, lr=lr, damping=0.5, momentum=0.0, weight_decay=0.0, kl_clip=c, inverse_update_freq=1)
    seen = {}
    opt.register_step_hook(lambda info: seen.update(scale=info.step_scale, grads=info.grads))
    opt.step(_closure(opt, model, x, y))
    v = sum(lr * lr * float(vec_c(seen["grads"][n]) @ _dense_operator(s.block) @ vec_c(seen["grads"][n]))
            for n, s in opt.slots.items())
    assert c / v < 0.5  # clipping is active, and √(c/v) differs from c/v
    assert seen["scale"] == pytest.approx(math.sqrt(c / v), rel=1e-10)


def test_momentum_is_the_ema_form(device):
    """m_k = β m_{k−1} + (1 − β) g_k at β = 0.9 (the preconditioner input), from m_{-1} = 0."""
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.1, damping=0.5, momentum=0.9, weight_decay=0.0)
    seen = []
    opt.register_step_hook(lambda info: seen.append((info.grads["2"].clone(), info.inputs["2"].clone())))
    for k in range(4):
        opt.step(_closure(opt, model, x + 0.2 * k, y))
    m = torch.zeros_like(seen[0][0])
    for grad, used in seen:
        m = 0.9 * m + 0.1 * grad
        torch.testing.assert_close(used, m, rtol=1e-12, atol=1e-15)


def test_hessian_action_pair_of_h_a_on_the_optimizer_path(device):
    """At step 1: s = H_a ā̄ with ā̄ = [mean(x); 1] and H_a the factor before the update, and
    y = (A + λ_A I) s with A = 0.9 A_0 + 0.1 A_1 (A_k = [x_k 1]ᵀ[x_k 1] / N, computed here)."""
    model, x, y = _problem(device)
    damping = 0.3
    opt = KBFGS(model, lr=0.2, damping=damping)
    opt.step(_closure(opt, model, x, y))
    h_before = opt.blocks["0"].a_factor.H.clone()
    x1 = x + 0.5
    opt.step(_closure(opt, model, x1, y))
    ones = torch.ones(x.shape[0], 1, dtype=D, device=device)
    stat = lambda z: torch.cat([z, ones], 1).T @ torch.cat([z, ones], 1) / z.shape[0]  # noqa: E731
    A = 0.9 * stat(x) + 0.1 * stat(x1)
    abar = torch.cat([x1.mean(0), torch.ones(1, dtype=D, device=device)])
    s, yv = opt.blocks["0"].a_factor.last_pair
    torch.testing.assert_close(s, h_before @ abar, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(yv, (A + math.sqrt(damping) * torch.eye(6, dtype=D, device=device)) @ s,
                               rtol=1e-10, atol=1e-12)
