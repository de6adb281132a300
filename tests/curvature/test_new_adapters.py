"""Embedding, normalization and MultiheadAttention adapters against explicit float64 computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from curvature.adapters import (AttentionInProjAdapter, AttentionOutProjAdapter, EmbeddingAdapter, NormAffineAdapter,
                                UnsupportedLayerError, adapter_for)
from curvature.blocks import KroneckerBlock, vec_c
from curvature.capture import LayerCapture
from curvature.damping import Tikhonov
from curvature.factors import EMACovarianceFactor, OneHotCountFactor
from curvature.inverter import BatchedInverter

D = torch.float64


def test_embedding_kfac_is_the_exact_per_token_fisher_with_a_diagonal_a(device):
    """Embedding V=5, D=3 on [N, S] tokens, loss the mean over positions of ℓ = σ cᵀh: the dense
    per-token empirical Fisher equals diag(counts/NS) ⊗ ccᵀ, and A is kept as a vector."""
    torch.manual_seed(0)
    emb = nn.Embedding(5, 3).to(D).to(device)
    tokens = torch.tensor([[0, 1, 1, 3], [3, 3, 0, 2]], device=device)
    sign = torch.tensor([[1.0, -1, 1, 1], [-1, 1, 1, -1]], dtype=D, device=device)
    c = torch.randn(3, dtype=D, device=device)
    adapter = EmbeddingAdapter(emb)
    kw = {"dtype": D, "device": device}
    block = KroneckerBlock("e", adapter, OneHotCountFactor(5, 0.0, **kw), EMACovarianceFactor(3, 0.0, **kw))
    cap = LayerCapture({"e": adapter}, "mean")
    cap.set(a=True, g=True)
    ((emb(tokens) @ c) * sign).mean().backward()
    M = adapter.grad_matrix()
    torch.testing.assert_close(M, emb.weight.grad.T)
    block.update_statistics(cap.records["e"], M)
    assert block.a_factor.counts.shape == (5,), "A must never be a dense vocab x vocab matrix"

    def term(n, s):
        return lambda p: sign[n, s] * (functional_call(emb, p, (tokens[n, s],)) @ c)

    per = [vec_c(grad(term(n, s))({"weight": emb.weight.detach()})["weight"].T) for n in range(2) for s in range(4)]
    grads = torch.stack(per)
    fisher = grads.T @ grads / 8
    counts = torch.bincount(tokens.reshape(-1), minlength=5).to(D) / 8
    torch.testing.assert_close(block.a_factor.counts, counts)
    torch.testing.assert_close(block.g_factor.statistic, torch.outer(c, c))
    torch.testing.assert_close(torch.kron(torch.diag(block.a_factor.counts), block.g_factor.statistic), fisher)
    # the preconditioned gradient against the dense damped inverse
    inverter = BatchedInverter()
    block.request_inverses(inverter, Tikhonov(0.25))
    inverter.run()
    r = 0.5
    dense = torch.kron(torch.diag(counts) + r * torch.eye(5, dtype=D, device=device),
                       torch.outer(c, c) + r * torch.eye(3, dtype=D, device=device))
    torch.testing.assert_close(vec_c(block.precondition(M)), torch.linalg.solve(dense, vec_c(M)))
    w, _ = adapter.split_matrix(M)
    torch.testing.assert_close(w, emb.weight.grad)


def test_embedding_rejects_reduce_and_unsupported_options():
    adapter = EmbeddingAdapter(nn.Embedding(4, 2))
    with pytest.raises(ValueError, match="expand"):
        KroneckerBlock("e", adapter, OneHotCountFactor(4), EMACovarianceFactor(2), approx="reduce")
    with pytest.raises(UnsupportedLayerError, match="max_norm"):
        EmbeddingAdapter(nn.Embedding(4, 2, max_norm=1.0))
    with pytest.raises(UnsupportedLayerError, match="sparse"):
        EmbeddingAdapter(nn.Embedding(4, 2, sparse=True))


@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(4), lambda: nn.BatchNorm1d(4), lambda: nn.GroupNorm(2, 4)])
def test_norm_affine_matrix_round_trip(device, make):
    norm = make().to(D).to(device)
    adapter = adapter_for(norm)
    assert isinstance(adapter, NormAffineAdapter) and (adapter.g_dim, adapter.a_dim) == (4, 2)
    norm(torch.randn(3, 4, dtype=D, device=device)).pow(2).sum().backward()
    M = adapter.grad_matrix()
    torch.testing.assert_close(M, torch.stack([norm.weight.grad, norm.bias.grad], 1))
    w, b = adapter.split_matrix(M)
    torch.testing.assert_close(w, norm.weight.grad)
    torch.testing.assert_close(b, norm.bias.grad)
    with pytest.raises(UnsupportedLayerError):
        NormAffineAdapter(nn.LayerNorm(4, elementwise_affine=False))


def _manual_attention(x, mha, mask):
    """Self-attention by hand (batch-first x [B, S, E]), keeping the projections' inputs/outputs."""
    b, s, e = x.shape
    h = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    qkv.retain_grad()
    q, k, v = qkv.split(e, dim=-1)
    split = lambda t: t.reshape(b, s, h, e // h).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(e // h)
    scores = scores.masked_fill(mask, float("-inf"))
    o = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, s, e)
    out = F.linear(o, mha.out_proj.weight, mha.out_proj.bias)
    out.retain_grad()
    return out, qkv, o


def test_attention_projections_are_captured_from_the_functional_calls(device):
    """in_proj rows are the attention's input and ∂L/∂[q;k;v]; out_proj rows the merged heads and
    ∂L/∂output; batch-major rows; gradients are Σ_rows g āᵀ. Also with a KBFGS-style frozen pass."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).to(D).to(device)
    x = torch.randn(2, 3, 4, dtype=D, device=device)
    mask = torch.triu(torch.ones(3, 3, dtype=torch.bool, device=device), diagonal=1)
    target = torch.randn(2, 3, 4, dtype=D, device=device)
    ref, qkv, o = _manual_attention(x, mha, mask)
    (ref - target).pow(2).mean().backward()
    qkv_grad, out_grad = qkv.grad.clone(), ref.grad.clone()
    mha.zero_grad()
    inp, outp = AttentionInProjAdapter(mha), AttentionOutProjAdapter(mha.out_proj, mha)
    cap = LayerCapture({"attn": inp, "attn.out_proj": outp}, "mean")
    cap.set(a=True, h=True, g=True)
    y = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(y, ref.detach())
    (y - target).pow(2).mean().backward()
    rin, rout = cap.records["attn"], cap.records["attn.out_proj"]
    assert F.linear is torch._C._nn.linear, "the functional hook must restore F.linear"
    assert (rin.batch_size, rin.groups, rout.batch_size, rout.groups) == (6, 2, 6, 2)
    torch.testing.assert_close(rin.input_rows, x.reshape(-1, 4))
    torch.testing.assert_close(rin.grad_rows, qkv_grad.reshape(-1, 12))
    torch.testing.assert_close(rin.h_rows, qkv.detach().reshape(-1, 12))
    torch.testing.assert_close(rout.input_rows, o.detach().reshape(-1, 4))
    torch.testing.assert_close(rout.grad_rows, out_grad.reshape(-1, 4))
    torch.testing.assert_close(inp.grad_matrix(), rin.grad_rows.T @ rin.a_rows)
    torch.testing.assert_close(outp.grad_matrix(), rout.grad_rows.T @ rout.a_rows)
    # a second pass with frozen parameters (K-BFGS) still yields ∂L/∂h for both projections
    for p in mha.parameters():
        p.requires_grad_(False)
    cap.set(h=True, g=True, preactivation_grads_only=True)
    (mha(x, x, x, attn_mask=mask, need_weights=False)[0] - target).pow(2).mean().backward()
    torch.testing.assert_close(cap.records["attn"].grad_rows, qkv_grad.reshape(-1, 12))
    torch.testing.assert_close(cap.records["attn.out_proj"].grad_rows, out_grad.reshape(-1, 4))
    cap.remove()


def test_attention_configurations_without_packed_projection_are_rejected():
    with pytest.raises(UnsupportedLayerError, match="kdim"):
        AttentionInProjAdapter(nn.MultiheadAttention(4, 2, kdim=3, vdim=3))
    with pytest.raises(UnsupportedLayerError, match="add_bias_kv"):
        AttentionInProjAdapter(nn.MultiheadAttention(4, 2, add_bias_kv=True))
