"""The first K-BFGS / K-BFGS(L) updates computed by hand from the spec's formulas (spec/kbfgs.md §2-§4).

The oracle below uses nothing from the library: explicit matrix products for the forward pass,
``torch.autograd.grad`` for ∂L/∂h, ``torch.linalg.inv`` for the initial inverse of A_LM, and the
formulas of the spec written out (momentum in EMA form on the L2-regularised gradient, the warm-start
A not updated at k = 0, H_g = I, the second-pass pair, its EMA from zero, double damping with
μ1 = 0.2 and μ2 = √λ, the inverse BFGS update with the reference code's skip rules, the
Hessian-action update of H_a with s = H_a ā̄ and y = (A + λ_A I)s, the EMA of A from k = 1 on).

Without a warm start, the data seen before the first step are batch 0 alone, so the spec's
"A comes from a warm start and is not updated at k = 0" gives A_0 = S_0 (batch 0's statistic, used
once), which is what the optimizer implements.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optimizers import KBFGS, KBFGSL

D = torch.float64
TAU, MU1 = 1e-5, 0.2
THRESHOLD = 1e-4  # the reference code's relative curvature threshold


def _homogeneous(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def _forward(weights: list[torch.Tensor], x: torch.Tensor, target: torch.Tensor):
    """Inputs ā_l, pre-activations h_l, per-sample gradients g_l = N ∂L/∂h_l and the batch-mean loss."""
    abar, hs, out = [], [], x
    with torch.enable_grad():
        for l, w in enumerate(weights):
            a = _homogeneous(out)
            h = a @ w.detach().requires_grad_(True).T
            abar.append(a)
            hs.append(h)
            out = torch.tanh(h) if l < len(weights) - 1 else h
        loss = 0.5 * ((out - target) ** 2).sum(1).mean()
        dh = torch.autograd.grad(loss, hs)
    n = x.shape[0]
    return [a.detach() for a in abar], [h.detach() for h in hs], [n * d for d in dh], loss.detach()


def _bfgs(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor, ref: float) -> torch.Tensor:
    """Inverse BFGS, H⁺ = (I − ρsyᵀ)H(I − ρysᵀ) + ρssᵀ, skipped when sᵀy ≤ 0 or sᵀy ≤ 1e-4‖s‖²·ref."""
    sy = float(s @ y)
    if sy <= 0 or sy <= THRESHOLD * float(s @ s) * ref:
        return H
    rho = 1.0 / sy
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return (eye - rho * torch.outer(s, y)) @ H @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)


def _double_damping(s, y, H, mu2):
    """DD of spec §4: Powell on H with μ1 (s ← θ1 s + (1−θ1)Hy), then Powell with B = I and μ2."""
    Hy = H @ y
    yHy, sy = float(y @ Hy), float(s @ y)
    if sy < MU1 * yHy:
        theta1 = (1 - MU1) * yHy / (yHy - sy)
        s = theta1 * s + (1 - theta1) * Hy
    ss, sy = float(s @ s), float(s @ y)
    if sy < mu2 * ss:
        theta2 = (1 - mu2) * ss / (ss - sy)
        y = theta2 * y + (1 - theta2) * s
    return s, y


def _h_g(pairs, dim, memory, dtype, device):
    """H_g from H0 = I: BFGS over every pair (memory None) or over the last ``memory`` pairs (L-BFGS)."""
    H = torch.eye(dim, dtype=dtype, device=device)
    for s, y, ref in (pairs if memory is None else pairs[-memory:]):
        H = _bfgs(H, s, y, ref)
    return H


def _by_hand(weights, batches, warm, lr, lam, memory):
    """Parameters [W|b] after each step, and H_a, H_g after the last, from the spec's formulas."""
    lam_a = mu2 = math.sqrt(lam)
    weights = [w.clone() for w in weights]
    L = len(weights)
    dtype, device = weights[0].dtype, weights[0].device
    m = [torch.zeros_like(w) for w in weights]
    s_avg = [torch.zeros(w.shape[0], dtype=dtype, device=device) for w in weights]
    y_avg = [torch.zeros_like(s) for s in s_avg]
    pairs: list[list] = [[] for _ in weights]
    H_g = [torch.eye(w.shape[0], dtype=dtype, device=device) for w in weights]
    A: list[torch.Tensor | None] = [None] * L
    if warm is not None:  # plain average over the warm-start batches at the initial weights
        stats = [_forward(weights, xb, xb[:, : weights[-1].shape[0]])[0] for xb in warm]
        A = [sum(st[l].T @ st[l] / st[l].shape[0] for st in stats) / len(stats) for l in range(L)]
    H_a: list[torch.Tensor | None] = [None] * L
    history = []
    for k, (x, t) in enumerate(batches):
        abar, h, g, _ = _forward(weights, x, t)
        grads = [gl.T @ al / x.shape[0] for gl, al in zip(g, abar)]  # ∇[W|b] = (1/N) Σ g āᵀ
        new = []
        for l in range(L):
            S = abar[l].T @ abar[l] / x.shape[0]
            if k == 0:
                A[l] = S if A[l] is None else A[l]  # not updated at k = 0 (warm start, or batch 0 alone)
                H_a[l] = torch.linalg.inv(A[l] + lam_a * torch.eye(S.shape[0], dtype=dtype, device=device))
            else:
                A[l] = 0.9 * A[l] + 0.1 * S
            m[l] = 0.9 * m[l] + 0.1 * (grads[l] + TAU * weights[l])
            new.append(weights[l] - lr * H_g[l] @ m[l] @ H_a[l])
        _, h2, g2, _ = _forward(new, x, t)  # the second pass: same batch, new point
        for l in range(L):
            s_avg[l] = 0.9 * s_avg[l] + 0.1 * (h2[l].mean(0) - h[l].mean(0))
            y_avg[l] = 0.9 * y_avg[l] + 0.1 * (g2[l].mean(0) - g[l].mean(0))
            s_t, y_t = _double_damping(s_avg[l], y_avg[l], H_g[l], mu2)
            pairs[l].append((s_t, y_t, float(g[l].mean(0).norm())))
            H_g[l] = _h_g(pairs[l], H_g[l].shape[0], memory, dtype, device)
            v = abar[l].mean(0)  # [mean a; 1]
            A_lm = A[l] + lam_a * torch.eye(A[l].shape[0], dtype=dtype, device=device)
            s_a = H_a[l] @ v
            H_a[l] = _bfgs(H_a[l], s_a, A_lm @ s_a, float(v.norm()))
        weights = new
        history.append([w.clone() for w in weights])
    return history, H_a, H_g


def _model(widths, device, seed):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(D).to(device)


def _weights(model):
    return [torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1).clone() for m in model if isinstance(m, nn.Linear)]


CASES = [
    pytest.param(KBFGS, None, [6, 4], id="kbfgs-1layer"),
    pytest.param(KBFGS, None, [6, 5, 4], id="kbfgs-2layer"),
    pytest.param(KBFGSL, 100, [6, 4], id="kbfgsl-1layer"),
    pytest.param(KBFGSL, 1, [6, 5, 4], id="kbfgsl-memory1-2layer"),
]


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize("cls,memory,widths", CASES)
def test_first_updates_match_the_spec_by_hand(device, cls, memory, widths, warm):
    gen = torch.Generator().manual_seed(3)
    d_in, d_out = widths[0], widths[-1]
    data = [torch.randn(12, d_in, generator=gen, dtype=D).to(device) for _ in range(5)]
    # targets: the first d_out inputs, scaled (an autoencoder-like regression)
    batches = [(x, 0.5 * x[:, :d_out]) for x in data[:3]]
    warm_batches = data if warm else None
    model = _model(widths, device, seed=1)
    lr, lam = 0.3, 0.3
    expected, H_a, H_g = _by_hand(_weights(model), batches, warm_batches, lr, lam, memory)

    kwargs = {} if memory is None else {"memory": memory}
    opt = cls(model, lr=lr, damping=lam, **kwargs)
    if warm:
        assert opt.warm_start(data) == len(data)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for k, (x, t) in enumerate(batches):

        def closure(x=x, t=t):
            opt.zero_grad()
            loss = 0.5 * ((model(x) - t) ** 2).sum(1).mean()
            loss.backward()
            return loss

        opt.step(closure)
        got = _weights(model)
        for l, (w, e) in enumerate(zip(got, expected[k])):
            torch.testing.assert_close(w, e, rtol=0, atol=1e-12, msg=f"step {k}, layer {l}")
    for l, (name, block) in enumerate(opt.blocks.items()):
        torch.testing.assert_close(block.a_factor.to_dense(), H_a[l], rtol=0, atol=1e-12)
        torch.testing.assert_close(block.g_factor.to_dense(), H_g[l], rtol=0, atol=1e-12)
    assert len(linears) == len(expected[-1])


def test_oracle_memory_one_differs_from_dense_bfgs(device):
    """The K-BFGS(L) memory-1 case is a real check: its third update differs from K-BFGS's."""
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(12, 6, generator=gen, dtype=D).to(device) for _ in range(3)]
    batches = [(x, 0.5 * x[:, :4]) for x in data]
    w = _weights(_model([6, 5, 4], device, seed=1))
    dense, _, _ = _by_hand(w, batches, None, 0.3, 0.3, None)
    limited, _, _ = _by_hand(w, batches, None, 0.3, 0.3, 1)
    assert all(torch.equal(a, b) for a, b in zip(dense[1], limited[1]))
    assert max(float((a - b).abs().max()) for a, b in zip(dense[2], limited[2])) > 1e-8
