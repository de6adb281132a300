"""Parameter groups with torch.optim semantics: per-group lr, weight decay, momentum and damping read
at every step (schedulers work), weight and bias of one layer in different groups, add_param_group,
the constructor's ``param_groups`` form, errors for settings that cannot be honoured per part, and the
fallback rule's own learning rate, betas and eps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvature.adapters import UnsupportedLayerError
from optimizers import KBFGS, KFAC, CurvatureOptimizer, kfac_block

D = torch.float64


def _problem(device, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=D).to(device)
    y = torch.randn(n, 3, generator=g, dtype=D).to(device)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(D).to(device)
    return model, x, y


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    return closure


def _deltas(model, before):
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def test_each_part_of_the_split_direction_gets_its_groups_lr(device):
    """Weight and bias of one layer in different groups: ΔW = −lr_w d_W and Δb = −lr_b d_b for the
    same direction d (oracle: a one-group optimizer with lr 1 on a copy)."""
    model, x, y = _problem(device)
    twin = copy.deepcopy(model)
    ref = KFAC(twin, lr=1.0, damping=0.3, momentum=0.0, weight_decay=0.0)
    groups = [{"params": [model[0].weight, model[2].weight], "lr": 0.3},
              {"params": [model[0].bias, model[2].bias], "lr": 0.7},]
    opt = KFAC(model, lr=1.0, damping=0.3, momentum=0.0, weight_decay=0.0, param_groups=groups)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(opt, model, x, y))
    ref.step(_closure(ref, twin, x, y))
    got, want = _deltas(model, before), _deltas(twin, before)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, (0.3 if i % 2 == 0 else 0.7) * b)


def test_head_with_lr_zero_does_not_move(device):
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.1, damping=0.3, param_groups=[{"params": model[0].parameters()},
                                                         {"params": model[2].parameters(), "lr": 0.0}])
    head = [p.detach().clone() for p in model[2].parameters()]
    body = [p.detach().clone() for p in model[0].parameters()]
    for _ in range(2):
        opt.step(_closure(opt, model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), head))
    assert not any(torch.equal(p, q) for p, q in zip(model[0].parameters(), body))


def test_per_part_weight_decay_enters_the_preconditioner_input(device):
    """No weight decay on biases: the preconditioner input is grad + [τ W | 0]."""
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.1, damping=0.3, momentum=0.0,
               param_groups=[{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
                             {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}])
    seen = {}
    opt.register_precondition_hook(lambda k, name, block, inp, d: seen.setdefault(name, inp.clone()))
    wm = {n: s.adapter.weight_matrix().clone() for n, s in opt.slots.items()}
    grads = {}
    opt.register_step_hook(lambda info: grads.update(info.grads))
    opt.step(_closure(opt, model, x, y))
    for name in opt.slots:
        decay = 0.1 * wm[name]
        decay[:, -1] = 0.0
        torch.testing.assert_close(seen[name], grads[name] + decay)


def test_lambda_lr_per_group_is_applied(device):
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.2, damping=0.3, momentum=0.0, weight_decay=0.0,
               param_groups=[{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda k: 0.5**k, lambda k: 1.0 / (k + 1)])
    for k in range(3):
        info = {}
        opt.register_step_hook(lambda i: info.update(d=i.directions, lrs=i.layer_lrs))
        before = model[2].weight.detach().clone(), model[0].weight.detach().clone()
        opt.step(_closure(opt, model, x, y))
        assert info["lrs"]["0"] == (0.2 * 0.5**k, 0.2 * 0.5**k)
        assert info["lrs"]["2"] == (0.2 / (k + 1), 0.2 / (k + 1))
        d2, _ = opt.slots["2"].adapter.split_matrix(info["d"]["2"])
        torch.testing.assert_close(model[2].weight - before[0], -0.2 / (k + 1) * d2)
        sched.step()
        opt._hooks.clear()


def test_one_cycle_lr_cycles_the_ema_momentum_that_is_used(device):
    """m_k = β_k m_{k-1} + (1 − β_k)(g_k + τW) with β_k from OneCycleLR's momentum cycling."""
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.1, damping=0.3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=6, base_momentum=0.5, max_momentum=0.9)
    infos, betas = [], []
    opt.register_step_hook(lambda i: infos.append((i.grads["2"].clone(), i.inputs["2"].clone(), i.lr, i.layer_lrs["2"])))
    for k in range(5):
        betas.append(opt.param_groups[0]["momentum"])
        opt.step(_closure(opt, model, x + 0.05 * k, y))
        sched.step()
    assert len(set(betas)) > 2
    m = torch.zeros_like(infos[0][0])
    for beta, (grad, inp, lr, layer_lr) in zip(betas, infos):
        m = beta * m + (1 - beta) * grad
        torch.testing.assert_close(inp, m)
        assert lr == layer_lr[0]


def test_reduce_lr_on_plateau_changes_the_applied_step(device):
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.1, damping=0.3, momentum=0.0, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.25, patience=0)
    sched.step(1.0)
    sched.step(2.0)  # worse: lr 0.1 -> 0.025
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    info = {}
    opt.register_step_hook(lambda i: info.update(d=i.directions))
    before = model[0].weight.detach().clone()
    opt.step(_closure(opt, model, x, y))
    torch.testing.assert_close(model[0].weight - before, -0.025 * opt.slots["0"].adapter.split_matrix(info["d"]["0"])[0])


def test_per_group_damping_is_read_at_every_step(device):
    """KFAC inverses use the damping of the layer's group, as the one-group optimizer with that damping."""
    model, x, y = _problem(device)
    twin = copy.deepcopy(model)
    opt = KFAC(model, lr=0.1, damping=0.3, inverse_update_freq=1,
               param_groups=[{"params": model[0].parameters()}, {"params": model[2].parameters(), "damping": 2.0}])
    ref = KFAC(twin, lr=0.1, damping=2.0, inverse_update_freq=1)
    opt.step(_closure(opt, model, x, y))
    ref.step(_closure(ref, twin, x, y))
    torch.testing.assert_close(opt.blocks["2"].a_factor.inverse, ref.blocks["2"].a_factor.inverse)
    assert not torch.allclose(opt.blocks["0"].a_factor.inverse, ref.blocks["0"].a_factor.inverse)
    opt.param_groups[0]["damping"] = 2.0
    ref.param_groups[0]["damping"] = 2.0
    opt.step(_closure(opt, model, x, y))
    ref.step(_closure(ref, twin, x, y))
    torch.testing.assert_close(opt.blocks["0"].a_factor.inverse, ref.blocks["0"].a_factor.inverse, rtol=1e-4, atol=1e-6)


def test_settings_that_cannot_be_honoured_per_part_are_errors(device):
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.1, param_groups=[{"params": [model[0].weight, model[2].weight]},
                                            {"params": [model[0].bias, model[2].bias], "momentum": 0.5}])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="same momentum"):
        opt.step(_closure(opt, model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    kb = KBFGS(model, lr=0.1, damping=0.3)
    kb.param_groups[0]["damping"] = 1.0
    with pytest.raises(ValueError, match="build a new optimizer"):
        kb.step(_closure(kb, model, x, y))
    opt = KFAC(model, lr=0.1)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step(_closure(opt, model, x, y))


def test_constructor_param_groups_must_cover_every_trainable_parameter():
    model, _, _ = _problem("cpu")
    with pytest.raises(ValueError, match=r"\['2.weight', '2.bias'\].*requires_grad=False"):
        KFAC(model, param_groups=[{"params": model[0].parameters()}])
    with pytest.raises(TypeError, match="'params'"):
        KFAC(model, param_groups=[{"lr": 0.1}])


def test_add_param_group_never_ignores_a_parameter(device):
    model, x, y = _problem(device)
    opt = KFAC(model, lr=0.1, damping=0.3)
    temperature = nn.Parameter(torch.ones((), dtype=D, device=device))
    opt.add_param_group({"params": [temperature], "lr": 0.5})
    assert "param_groups[1][0]" in opt.describe()

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) * temperature - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert temperature.item() != 1.0
    # a layer added to the model later, with a block recipe in its group
    model.add_module("3", nn.Linear(3, 2).to(D).to(device))
    opt.add_param_group({"params": model[3].parameters(), "block": kfac_block()})
    assert opt.blocks["3"].kind == "kfac"
    before = model[3].weight.detach().clone()
    opt.step(_closure_for_output(opt, model, x))
    assert not torch.equal(before, model[3].weight)
    with pytest.raises(UnsupportedLayerError, match="fallback='error'"):
        KFAC(_problem(device)[0], fallback="error").add_param_group({"params": [nn.Parameter(torch.ones(2))]})


def _closure_for_output(opt, model, x):
    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum(1).mean()
        loss.backward()
        return loss

    return closure


class _WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.body(x))


@pytest.mark.parametrize("fallback_lr", [None, 0.01])
def test_adam_fallback_has_its_own_lr_betas_and_eps(device, fallback_lr):
    torch.manual_seed(0)
    model = _WithNorm().to(D).to(device)
    opt = KFAC(model, lr=0.5, damping=0.3, fallback="adam", fallback_lr=fallback_lr, fallback_betas=(0.8, 0.99),
               fallback_eps=1e-10, blocks={nn.LayerNorm: None})  # LayerNorm would get a diagonal block
    lr = 1e-3 if fallback_lr is None else fallback_lr
    assert f"fallback (adam, lr={lr:g}, betas=(0.8, 0.99), eps=1e-10)" in opt.describe()
    x = torch.randn(8, 5, dtype=D, device=device)
    before = model.norm.weight.detach().clone()
    opt.step(_closure_for_output(opt, model, x))
    g = opt.state[model.norm.weight]["exp_avg"] / (1 - 0.8)  # the first Adam step: m̂ = g, v̂ = g²
    expected = before - lr * g / (g.abs() + 1e-10)
    torch.testing.assert_close(model.norm.weight.detach(), expected)


def test_sgd_fallback_uses_the_groups_lr_unless_told(device):
    torch.manual_seed(0)
    model = _WithNorm().to(D).to(device)
    opt = KFAC(model, lr=0.5, damping=0.3, momentum=0.0, weight_decay=0.0, blocks={nn.LayerNorm: None})
    assert "fallback (sgd, lr=0.5, momentum=0)" in opt.describe()
    x = torch.randn(8, 5, dtype=D, device=device)
    before = model.norm.bias.detach().clone()
    opt.step(_closure_for_output(opt, model, x))
    torch.testing.assert_close(model.norm.bias.detach(), before - 0.5 * opt.state[model.norm.bias]["momentum"])
    opt2 = CurvatureOptimizer(model, 0.5, {nn.Linear: kfac_block()}, fallback_lr=0.05)
    assert "fallback (sgd, lr=0.05" in opt2.describe()
