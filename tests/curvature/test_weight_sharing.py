"""KFAC-expand and KFAC-reduce (Eschenhagen et al. 2023) against dense float64 oracles.

Each oracle is computed independently of the capture: per-loss-term gradients by ``torch.func``
on the layer's parameters, assembled into the dense empirical Fisher of the setting, and the
Kronecker factors from their definitions by explicit loops. The "exact" cases are the settings of
the paper's propositions where the approximation equals the Fisher: a layer linear in its weight,
every loss term's output gradient of the same outer product (a linear loss with random signs), in
the expand setting (one loss term per position) for KFAC-expand and the reduce setting (one loss
term per sequence, on the position mean of the outputs) for KFAC-reduce.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from curvature.adapters import Conv1dAdapter, LinearAdapter
from curvature.blocks import KroneckerBlock, a_statistic, g_statistic, vec_c
from curvature.capture import LayerCapture
from curvature.damping import Tikhonov
from curvature.factors import EMACovarianceFactor
from curvature.inverter import BatchedInverter

D = torch.float64
N, S, DIN, DOUT = 3, 4, 3, 2


def _setup(device, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(DIN, DOUT).to(D).to(device)
    x = torch.randn(N, S, DIN, dtype=D, device=device)
    c = torch.randn(DOUT, dtype=D, device=device)
    return lin, x, c


def _flat_grad(lin, loss_of_params):
    """vec_c([∇W | ∇b]) of a scalar function of the layer's parameters."""
    params = {k: v.detach() for k, v in lin.named_parameters()}
    g = grad(loss_of_params)(params)
    return vec_c(torch.cat([g["weight"], g["bias"].reshape(-1, 1)], 1))


def _kfac_block(lin, approx, device):
    adapter = LinearAdapter(lin)
    kw = {"dtype": D, "device": device}
    return adapter, KroneckerBlock("l", adapter, EMACovarianceFactor(adapter.a_dim, 0.0, **kw),
                                   EMACovarianceFactor(adapter.g_dim, 0.0, **kw), approx=approx)


def _dense_preconditioned(A, G, M, damping):
    r"""(A + √λ I)^{-1} ⊗ (G + √λ I)^{-1} applied to vec_c(M), with dense matrices."""
    r = math.sqrt(damping)
    P = torch.linalg.inv(torch.kron(A + r * torch.eye(A.shape[0], dtype=D, device=A.device),
                                    G + r * torch.eye(G.shape[0], dtype=D, device=G.device)))
    return P @ vec_c(M)


def _precondition(block, M, damping):
    inverter = BatchedInverter()
    block.request_inverses(inverter, Tikhonov(damping))
    inverter.run()
    return vec_c(block.precondition(M))


def test_expand_is_the_exact_per_position_fisher_in_the_expand_setting(device):
    """Linear on [N, S, D], loss the mean over N·S positions of ℓ_ns = σ_ns cᵀh_ns: the per-position
    empirical Fisher (1/NS) Σ vec∇ℓ_ns vec∇ℓ_nsᵀ equals A ⊗ G of KFAC-expand (proposition: exact).
    The scaling bug this replaces gave G/S², which fails here."""
    lin, x, c = _setup(device)
    sign = torch.randint(0, 2, (N, S), generator=torch.Generator().manual_seed(1)).to(device, D) * 2 - 1
    adapter, block = _kfac_block(lin, "expand", device)
    cap = LayerCapture({"l": adapter}, "mean")
    cap.set(a=True, g=True)
    ((lin(x) @ c) * sign).mean().backward()
    block.update_statistics(cap.records["l"], adapter.grad_matrix())

    def term(n, s):
        return lambda p: sign[n, s] * (functional_call(lin, p, (x[n, s],)) @ c)

    grads = torch.stack([_flat_grad(lin, term(n, s)) for n in range(N) for s in range(S)])
    fisher = grads.T @ grads / (N * S)
    A, G = block.a_factor.statistic, block.g_factor.statistic
    torch.testing.assert_close(torch.kron(A, G), fisher)
    # the factors from their definitions
    abar = torch.cat([x.reshape(-1, DIN), torch.ones(N * S, 1, dtype=D, device=device)], 1)
    torch.testing.assert_close(A, abar.T @ abar / (N * S))
    torch.testing.assert_close(G, torch.outer(c, c))
    # the preconditioned gradient against the dense damped Kronecker inverse
    M = adapter.grad_matrix()
    torch.testing.assert_close(_precondition(block, M, 0.3), _dense_preconditioned(A, G, M, 0.3))


def test_reduce_is_the_exact_per_sequence_fisher_in_the_reduce_setting(device):
    """Loss the mean over N sequences of ℓ_n = σ_n cᵀ mean_s(h_ns): the per-sequence empirical Fisher
    equals A ⊗ G of KFAC-reduce, A = (1/N)Σ â âᵀ (â the position-mean input), G = (1/N)Σ ĝĝᵀ
    (ĝ the position-sum output gradient)."""
    lin, x, c = _setup(device, seed=2)
    sign = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(3)).to(device, D) * 2 - 1
    adapter, block = _kfac_block(lin, "reduce", device)
    cap = LayerCapture({"l": adapter}, "mean")
    cap.set(a=True, g=True)
    ((lin(x).mean(1) @ c) * sign).mean().backward()
    block.update_statistics(cap.records["l"], adapter.grad_matrix())

    def term(n):
        return lambda p: sign[n] * (functional_call(lin, p, (x[n],)).mean(0) @ c)

    grads = torch.stack([_flat_grad(lin, term(n)) for n in range(N)])
    fisher = grads.T @ grads / N
    A, G = block.a_factor.statistic, block.g_factor.statistic
    torch.testing.assert_close(torch.kron(A, G), fisher)
    ahat = torch.cat([x.mean(1), torch.ones(N, 1, dtype=D, device=device)], 1)
    torch.testing.assert_close(A, ahat.T @ ahat / N)
    torch.testing.assert_close(G, torch.outer(c, c))
    M = adapter.grad_matrix()
    torch.testing.assert_close(_precondition(block, M, 0.3), _dense_preconditioned(A, G, M, 0.3))
    # expand on the same batch is not exact here (a negative control: the two differ)
    _, expand = _kfac_block(lin, "expand", device)
    expand.update_statistics(cap.records["l"], M)
    assert not torch.allclose(torch.kron(expand.a_factor.statistic, expand.g_factor.statistic), fisher)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factors_match_their_definitions_for_a_nonlinear_loss(device, approx):
    """General case (no exactness): A and G from per-position / per-sequence output gradients of a
    nonlinear loss, computed one loss term at a time."""
    lin, x, c = _setup(device, seed=4)
    adapter = LinearAdapter(lin)
    cap = LayerCapture({"l": adapter}, "mean")
    cap.set(a=True, g=True)
    h = lin(x)
    if approx == "expand":  # mean over positions of ℓ_ns = tanh(cᵀh_ns)²
        torch.tanh(h @ c).pow(2).mean().backward()
        hd = h.detach()
        per = vmap(vmap(grad(lambda v: torch.tanh(v @ c).pow(2))))(hd)  # ∂ℓ_ns/∂h_ns
        g_rows = per.reshape(-1, DOUT)
        G_ref = g_rows.T @ g_rows / (N * S)
        a_rows = torch.cat([x.reshape(-1, DIN), torch.ones(N * S, 1, dtype=D, device=device)], 1)
        A_ref = a_rows.T @ a_rows / (N * S)
    else:  # mean over sequences of ℓ_n = tanh(cᵀ Σ_s h_ns)²  (loss per sequence)
        torch.tanh(h.sum(1) @ c).pow(2).mean().backward()
        hd = h.detach()
        per = vmap(grad(lambda v: torch.tanh(v.sum(0) @ c).pow(2)))(hd)  # ∂ℓ_n/∂h_ns, [N, S, DOUT]
        ghat = per.sum(1)
        G_ref = ghat.T @ ghat / N
        ahat = torch.cat([x.mean(1), torch.ones(N, 1, dtype=D, device=device)], 1)
        A_ref = ahat.T @ ahat / N
    rec = cap.records["l"]
    torch.testing.assert_close(a_statistic(rec, adapter, approx), A_ref)
    torch.testing.assert_close(g_statistic(rec, approx), G_ref)


def test_module_called_twice_is_the_exact_fisher_over_its_calls(device):
    """A module applied to two inputs in one forward, loss (1/N) Σ_n Σ_c ℓ_nc with ℓ_nc = σ_nc cᵀh_nc:
    expand over the calls gives the Fisher (1/N) Σ_{n,c} vec∇ℓ_nc vec∇ℓ_ncᵀ of the loss terms."""
    lin, x, c = _setup(device, seed=5)
    x1, x2 = x[:, 0], x[:, 1]
    sign = torch.randint(0, 2, (N, 2), generator=torch.Generator().manual_seed(6)).to(device, D) * 2 - 1
    adapter, block = _kfac_block(lin, "expand", device)
    cap = LayerCapture({"l": adapter}, "mean")
    cap.set(a=True, g=True)
    ((lin(x1) @ c) * sign[:, 0] + (lin(x2) @ c) * sign[:, 1]).mean().backward()
    block.update_statistics(cap.records["l"], adapter.grad_matrix())
    assert cap.records["l"].calls == 2

    def term(n, k):
        inp = (x1, x2)[k][n]
        return lambda p: sign[n, k] * (functional_call(lin, p, (inp,)) @ c)

    grads = torch.stack([_flat_grad(lin, term(n, k)) for n in range(N) for k in range(2)])
    fisher = grads.T @ grads / N
    torch.testing.assert_close(torch.kron(block.a_factor.statistic, block.g_factor.statistic), fisher)


def test_kbfgs_means_under_expand_and_reduce(device):
    """h̄, ḡ, ā̄: means over rows of h, of the per-sample rows N·∂L/∂h, of ā (expand); means over
    sequences of the position-mean h, of the position-sum gradient N_seq·Σ_s ∂L/∂h, of the
    position-mean ā (reduce)."""
    lin, x, c = _setup(device, seed=7)
    x = torch.cat([x, torch.randn(2, S + 2, DIN, dtype=D, device=device)[:, :S]], 0)  # 5 sequences
    cap = LayerCapture({"l": LinearAdapter(lin)}, "mean")
    cap.set(a=True, h=True, g=True)
    h = lin(x)
    h.retain_grad()
    torch.sin(h @ c).mean().backward()
    rec, r, hd = cap.records["l"], h.grad, h.detach()
    nseq = x.shape[0]
    ones = torch.ones(1, dtype=D, device=device)
    torch.testing.assert_close(rec.h_mean("expand"), hd.reshape(-1, DOUT).mean(0))
    torch.testing.assert_close(rec.g_mean("expand"), (nseq * S * r).reshape(-1, DOUT).mean(0))
    torch.testing.assert_close(rec.a_mean("expand"), torch.cat([x.reshape(-1, DIN).mean(0), ones]))
    torch.testing.assert_close(rec.h_mean("reduce"), hd.mean(1).mean(0))
    torch.testing.assert_close(rec.g_mean("reduce"), (nseq * r.sum(1)).mean(0))
    torch.testing.assert_close(rec.a_mean("reduce"), torch.cat([x.mean(1).mean(0), ones]))


def test_reduce_groups_micro_batches_of_different_lengths(device):
    """Two passes (micro-batches) with sequences of different lengths: reduce averages within each
    sequence, then over all sequences."""
    lin, _, c = _setup(device, seed=8)
    xa = torch.randn(2, 3, DIN, dtype=D, device=device)
    xb = torch.randn(3, 5, DIN, dtype=D, device=device)
    cap = LayerCapture({"l": LinearAdapter(lin)}, "mean")
    cap.set(a=True, g=True)
    for xm in (xa, xb):
        cap.begin_pass()
        lin(xm).sum().backward()
    rec = cap.records["l"]
    assert rec.groups == 5 and rec.batch_size == 2 * 3 + 3 * 5
    means = torch.cat([xa.mean(1), xb.mean(1)], 0)
    ahat = torch.cat([means, torch.ones(5, 1, dtype=D, device=device)], 1)
    torch.testing.assert_close(a_statistic(rec, None, "reduce"), ahat.T @ ahat / 5)


def test_conv1d_is_expand_over_locations(device):
    """Conv1d (KFC: A = (1/N)Σ_{n,l} āāᵀ, G = (1/(NL))Σ ğğᵀ) against explicit patches."""
    torch.manual_seed(9)
    conv = nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1).to(D).to(device)
    x = torch.randn(2, 2, 7, dtype=D, device=device)
    adapter = Conv1dAdapter(conv)
    cap = LayerCapture({"c": adapter}, "mean")
    cap.set(a=True, g=True)
    out = conv(x)
    out.retain_grad()
    out.pow(2).sum((1, 2)).mean().backward()
    xp = torch.nn.functional.pad(x, (1, 1))
    L = out.shape[2]
    patches = torch.stack([xp[n, :, 2 * l:2 * l + 3].reshape(-1) for n in range(2) for l in range(L)])
    abar = torch.cat([patches, torch.ones(len(patches), 1, dtype=D, device=device)], 1)
    g = 2 * out.grad.permute(0, 2, 1).reshape(-1, 3)
    rec = cap.records["c"]
    torch.testing.assert_close(a_statistic(rec, adapter), abar.T @ abar / 2)
    torch.testing.assert_close(g_statistic(rec), g.T @ g / (2 * L))
    torch.testing.assert_close(adapter.grad_matrix(), (out.grad.permute(0, 2, 1).reshape(-1, 3)).T @ abar)
