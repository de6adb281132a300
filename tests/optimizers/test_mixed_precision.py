r"""The model under ``torch.autocast`` with the factors kept and inverted in float32.

Under autocast the hooks see bfloat16 (or float16) activations and pre-activation gradients; the
capture widens them to the weight's dtype (float32) once, so statistics, means and secant
differences are formed in float32 and no factor is ever half precision.

**Tolerances.** bfloat16 keeps 8 significant bits: unit roundoff :math:`u = 2^{-8} \approx 3.9\cdot10^{-3}`
(float16: :math:`2^{-11}`). A statistic :math:`\frac1n X^\top X` formed from rows rounded to
relative :math:`u` differs from the float32 one by at most :math:`2u + u^2` relative per term; in
norm (terms of mixed sign may cancel) we allow :math:`8u`. The pre-activation gradients come out
of a bfloat16 backward through the layers above (each matmul rounds its output to :math:`u`): for the
two-layer MLP here at most 3 roundings, :math:`\le 4u` per entry, so G gets :math:`16u`. The
step's direction :math:`(G+\pi\sqrt\lambda I)^{-1}\nabla W (A+\sqrt\lambda I/\pi)^{-1}` moves by at most
:math:`\kappa_A\epsilon_A + \kappa_G\epsilon_G + \epsilon_\nabla` relative (first order), with
:math:`\kappa` the condition numbers of the damped float32 factors (computed in the test) and
:math:`\epsilon_\nabla` the measured relative difference of the two models' weight gradients.
K-BFGS's first step uses :math:`H_g = I` and :math:`H_a = (A + \lambda_A I)^{-1}`, so the same
bound holds for it. The test asserts that bound (with a factor 2 for the second-order terms).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optimizers import KBFGS, KBFGSL, KFAC

U_BF16 = 2.0**-8

MAKERS = {
    "kfac": lambda m: KFAC(m, inverse_update_freq=1),
    "kbfgs": lambda m: KBFGS(m),
    "kbfgsl": lambda m: KBFGSL(m, memory=5),
}


def _data(device):
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 10, generator=g).to(device), torch.randn(256, 4, generator=g).to(device)


def _model(device):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)


def _closure(opt, model, x, t, autocast: bool, dtype=torch.bfloat16):
    def closure():
        opt.zero_grad()
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            out = model(x)
        loss = 0.5 * ((out.float() - t) ** 2).sum(1).mean()
        loss.backward()
        return loss

    return closure


def _statistics(opt):
    """Per layer: (A statistic, G statistic or None) as float32 tensors, asserting no factor is half precision."""
    out = {}
    for name, slot in opt.slots.items():
        block = slot.block
        for factor in (block.a_factor, block.g_factor):
            for value in factor.state_dict().values():
                tensors = value.values() if isinstance(value, dict) else [value]
                for t in tensors:
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        assert t.dtype == torch.float32, (name, t.dtype)
        g = block.g_factor.statistic
        out[name] = (block.a_factor.statistic.clone(), None if g is None else g.clone())
    return out


def _cond(matrix: torch.Tensor, damping: float) -> float:
    ev = torch.linalg.eigvalsh(matrix.double())
    return float((ev[-1] + damping) / (ev[0].clamp_min(0) + damping))


@pytest.mark.parametrize("method", sorted(MAKERS))
def test_one_step_under_autocast_matches_float32(device, method):
    x, t = _data(device)
    base = _model(device)
    runs = {}
    for tag, autocast in (("fp32", False), ("amp", True)):
        model = copy.deepcopy(base)
        opt = MAKERS[method](model)
        before = [p.detach().clone() for p in model.parameters()]
        seen = []
        opt.register_step_hook(seen.append)
        opt.step(_closure(opt, model, x, t, autocast))
        grads = [g.clone() for g in seen[0].grads.values()]  # the first pass's [dW | db] per layer
        steps = [(p.detach() - b) for p, b in zip(model.parameters(), before)]
        runs[tag] = (opt, _statistics(opt), grads, steps)
    opt32, stats32, grads32, steps32 = runs["fp32"]
    _, stats16, grads16, steps16 = runs["amp"]
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    eps_grad = max(rel(a, b) for a, b in zip(grads16, grads32))
    bound = eps_grad
    lam = opt32.param_groups[0]["damping"]
    for name in stats32:
        a32, g32 = stats32[name]
        a16, g16 = stats16[name]
        assert rel(a16, a32) <= 8 * U_BF16, name
        bound += 8 * U_BF16 * _cond(a32, lam ** 0.5 if method == "kfac" else lam)
        if g32 is not None:
            assert rel(g16, g32) <= 16 * U_BF16, name
            bound += 16 * U_BF16 * _cond(g32, lam ** 0.5)
    for s16, s32 in zip(steps16, steps32):
        assert rel(s16, s32) <= 2 * bound
    assert eps_grad > 0  # autocast really ran in bfloat16 (the gradients differ)


@pytest.mark.parametrize("method", sorted(MAKERS))
def test_fifty_steps_under_autocast_lower_the_loss(device, method):
    x, t = _data(device)
    model = _model(device)
    opt = MAKERS[method](model)
    closure = _closure(opt, model, x, t, True)
    losses = [float(opt.step(closure).detach()) for _ in range(50)]
    _statistics(opt)  # every factor still float32
    assert opt.counters["skipped_steps"] == 0 and opt.counters["reverted_steps"] == 0
    assert losses[-1] < 0.9 * losses[0]
