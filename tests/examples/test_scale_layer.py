"""The user ``Scale`` layer with its own adapter: captured rows, A and G against per-sample autograd
definitions; KFAC's step against a dense Kronecker solve; K-BFGS pairs against the layer's outputs."""

from __future__ import annotations

import math

import torch
from torch import nn

from optimizers import KBFGS, KFAC

D = torch.float64


def _problem(scale_type, device, n=6, d=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g, dtype=D).to(device)
    t = torch.randn(n, 2, generator=g, dtype=D).to(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, d), scale_type(d), nn.Tanh(), nn.Linear(d, 2)).to(D).to(device)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(d, generator=g, dtype=D))
        model[1].bias.copy_(torch.randn(d, generator=g, dtype=D))
    return model, x, t


def _loss(model, x, t):
    return 0.5 * ((model(x) - t) ** 2).sum(1).mean()


def _closure(opt, model, x, t):
    def closure():
        opt.zero_grad()
        loss = _loss(model, x, t)
        loss.backward()
        return loss

    return closure


def _definitions(model, x, t):
    """Scale input u, output y, per-sample dℓ_i/dy_i, gradient matrix [∇w | ∇b] -- all by autograd."""
    u = model[0](x).detach()
    y = model[1](u)
    rest = model[2:]
    per_sample = torch.stack([torch.autograd.grad(0.5 * ((rest(y[i:i + 1]) - t[i:i + 1]) ** 2).sum(), y,
                                                  retain_graph=True)[0][i] for i in range(x.shape[0])])
    model.zero_grad()
    _loss(model, x, t).backward()
    grad = torch.stack([model[1].weight.grad, model[1].bias.grad], dim=1).clone()
    return u, y.detach(), per_sample, grad


def test_scale_adapter_rows_reproduce_the_gradient(device, example):
    ns = example("scale_layer")
    model, x, t = _problem(ns["Scale"], device)
    u, y, per_sample, grad = _definitions(model, x, t)
    adapter = ns["ScaleAdapter"](model[1])
    assert (adapter.a_dim, adapter.g_dim) == (2, 4)
    a_rows = torch.cat([adapter.input_rows(u), torch.ones(u.numel(), 1, dtype=D, device=device)], dim=1)
    g_rows = adapter.output_rows(per_sample / x.shape[0])  # dL/dy of the batch-mean loss
    torch.testing.assert_close(g_rows.T @ a_rows, grad)
    torch.testing.assert_close(adapter.grad_matrix(), grad)
    torch.testing.assert_close(adapter.output_rows(y).sum(0), y.sum(0))


def test_kfac_on_scale_captures_the_per_sample_factors_and_steps_by_the_dense_solve(device, example):
    ns = example("scale_layer")
    model, x, t = _problem(ns["Scale"], device)
    n, d = x.shape[0], 4
    u, _, per_sample, grad = _definitions(model, x, t)
    opt = KFAC(model, lr=0.2, damping=0.04, momentum=0.0, weight_decay=0.0, layer_types=(nn.Linear, ns["Scale"]))
    table = opt.describe()
    assert "ScaleAdapter" in table and "Scale " in table
    before = torch.stack([model[1].weight, model[1].bias], dim=1).detach().clone()
    opt.step(_closure(opt, model, x, t))
    block = opt.blocks["1"]
    a_bar = torch.stack([u.reshape(-1), torch.ones(n * d, dtype=D, device=device)], dim=1)
    A_def = a_bar.T @ a_bar / n  # (1/N) Σ_i Σ_j ā_ij ā_ijᵀ: the features are locations (KFC)
    G_def = torch.diag((per_sample ** 2).sum(0)) / (n * d)  # (1/(N d)) Σ_ij (dℓ_i/dy_ij)² e_j e_jᵀ
    torch.testing.assert_close(block.a_factor.statistic, A_def)
    torch.testing.assert_close(block.g_factor.statistic, G_def)
    lam = math.sqrt(0.04)
    step = torch.linalg.solve(G_def + lam * torch.eye(d, dtype=D, device=device),
                              torch.linalg.solve(A_def + lam * torch.eye(2, dtype=D, device=device), grad.T).T)
    after = torch.stack([model[1].weight, model[1].bias], dim=1).detach()
    torch.testing.assert_close(after, before - 0.2 * step)


def test_kbfgs_on_scale_uses_the_layer_pairs_and_trains(device, example):
    ns = example("scale_layer")
    model, x, t = _problem(ns["Scale"], device)
    d = 4
    opt = KBFGS(model, lr=0.2, damping=0.3, momentum=0.0, weight_decay=0.0, layer_types=(nn.Linear, ns["Scale"]))
    assert "kbfgs[A: HessianActionFactor, G: BFGSFactor]" in opt.describe()
    _, y0, g0, _ = _definitions(model, x, t)
    first = float(opt.step(_closure(opt, model, x, t)).detach())
    _, y1, g1, _ = _definitions(model, x, t)
    g_factor = opt.blocks["1"].g_factor  # pair EMA (decay 0.9) starts at zero: s_avg = 0.1 s
    torch.testing.assert_close(g_factor.s_avg, 0.1 * (y1 - y0).mean(0) / d)
    torch.testing.assert_close(g_factor.y_avg, 0.1 * (g1 - g0).mean(0) / d)
    losses = [float(opt.step(_closure(opt, model, x, t)).detach()) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses) and opt.skipped_steps == 0
    assert losses[-1] < 0.5 * first
