"""Cross-attention: the packed in_proj as one Kronecker block per q/k/v chunk, against float64 oracles.

The oracle is a cross-attention written by hand (explicit q/k/v projections on the query and on the
key/value, heads, softmax, out_proj): its projection outputs' gradients by autograd give each
chunk's A and G from their definitions, and the preconditioned gradient is a dense solve with
``torch.kron`` per chunk.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature.adapters import AttentionInProjAdapter
from curvature.blocks import KroneckerBlock, vec_c
from curvature.capture import ChunkedRecord, LayerCapture
from curvature.chunked import ChunkedBlock
from curvature.damping import Tikhonov
from curvature.factors import EMACovarianceFactor
from curvature.inverter import BatchedInverter

D = torch.float64
B, SQ, SK, E = 2, 3, 5, 4


def _cross_by_hand(mha, x, key, value):
    """Batch-first cross-attention with the projections kept (retain_grad)."""
    h = mha.num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q, k, v = x @ wq.T + bq, key @ wk.T + bk, value @ wv.T + bv
    for t in (q, k, v):
        t.retain_grad()
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, E // h).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(E // h)
    o = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape[0], x.shape[1], E)
    return F.linear(o, mha.out_proj.weight, mha.out_proj.bias), (q, k, v)


def _kfac(adapter, device):
    kw = {"dtype": D, "device": device}
    return KroneckerBlock("c", adapter, EMACovarianceFactor(adapter.a_dim, 0.0, **kw),
                          EMACovarianceFactor(adapter.g_dim, 0.0, **kw))


def _loss(y, target):
    return torch.sin(y - target).pow(2).mean()


@pytest.mark.parametrize("distinct_value", [False, True], ids=["key_is_value", "three_inputs"])
def test_per_chunk_kfac_matches_the_definitions_and_a_dense_solve(device, distinct_value):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(E, 2, batch_first=True).to(D).to(device)
    x = torch.randn(B, SQ, E, dtype=D, device=device)
    key = torch.randn(B, SK, E, dtype=D, device=device)
    value = torch.randn(B, SK, E, dtype=D, device=device) if distinct_value else key
    target = torch.randn(B, SQ, E, dtype=D, device=device)

    ref, projections = _cross_by_hand(mha, x, key, value)
    _loss(ref, target).backward()
    grads = [t.grad.clone() for t in projections]
    grad_matrix = torch.cat([mha.in_proj_weight.grad, mha.in_proj_bias.grad.reshape(-1, 1)], 1).clone()
    mha.zero_grad()

    adapter = AttentionInProjAdapter(mha)
    cap = LayerCapture({"attn": adapter}, "mean")
    cap.set(a=True, h=True, g=True)
    y = mha(x, key, value, need_weights=False)[0]
    torch.testing.assert_close(y, ref.detach())
    _loss(y, target).backward()
    assert F.linear is torch._C._nn.linear, "the functional hook must restore F.linear"
    assert adapter.modes == {"cross"}
    record = cap.records["attn"]
    assert isinstance(record, ChunkedRecord) and set(record.parts) == {"q", "k", "v"}
    assert set(cap.records) == {"attn"}
    torch.testing.assert_close(adapter.grad_matrix(), grad_matrix)

    inputs = {"q": x, "k": key, "v": value}
    damping = 0.05
    blocks = {c: _kfac(a, device) for c, a in adapter.chunk_adapters().items()}
    rows = adapter.chunk_rows()
    block = ChunkedBlock("attn", adapter, {c: (rows[c], blocks[c]) for c in blocks})
    block.update_statistics(record, grad_matrix)
    inverter = BatchedInverter()
    block.request_inverses(inverter, Tikhonov(damping))
    inverter.run()
    direction = block.precondition(grad_matrix)

    r = math.sqrt(damping)
    for i, chunk in enumerate(("q", "k", "v")):
        inp, g_out, proj = inputs[chunk], grads[i], projections[i]
        n = inp.shape[0] * inp.shape[1]  # every (sequence, position) of the chunk's input is a sample
        abar = torch.cat([inp.reshape(-1, E), torch.ones(n, 1, dtype=D, device=device)], 1)
        A = abar.T @ abar / n
        gs = n * g_out.reshape(-1, E)  # per-sample rows of the mean loss
        G = gs.T @ gs / n
        part = record.parts[chunk]
        torch.testing.assert_close(part.input_rows, inp.reshape(-1, E))
        torch.testing.assert_close(part.h_rows, proj.detach().reshape(-1, E))
        torch.testing.assert_close(blocks[chunk].a_factor.statistic, A)
        torch.testing.assert_close(blocks[chunk].g_factor.statistic, G)
        M = grad_matrix[rows[chunk]]
        torch.testing.assert_close(M, g_out.reshape(-1, E).T @ abar)  # ∇W_c = Σ_rows g āᵀ of the chunk
        dense = torch.linalg.solve(torch.kron(A + r * torch.eye(E + 1, dtype=D, device=device),
                                              G + r * torch.eye(E, dtype=D, device=device)), vec_c(M))
        torch.testing.assert_close(vec_c(direction[rows[chunk]]), dense)
    torch.testing.assert_close(block.to_dense() @ vec_c(grad_matrix), vec_c(direction))
    cap.remove()


def test_chunked_record_in_a_frozen_second_pass_and_self_attention_stays_packed(device):
    """K-BFGS's second pass (parameters frozen) still yields each chunk's ∂L/∂h; a self-attention call
    records the packed projection (no chunks); a layer called both ways is flagged."""
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(E, 2, batch_first=True).to(D).to(device)
    x = torch.randn(B, SQ, E, dtype=D, device=device)
    mem = torch.randn(B, SK, E, dtype=D, device=device)
    ref, projections = _cross_by_hand(mha, x, mem, mem)
    ref.pow(2).mean().backward()
    adapter = AttentionInProjAdapter(mha)
    cap = LayerCapture({"attn": adapter}, "mean")
    for p in mha.parameters():
        p.requires_grad_(False)
    cap.set(h=True, g=True, preactivation_grads_only=True)
    mha(x, mem, mem, need_weights=False)[0].pow(2).mean().backward()
    parts = cap.records["attn"].parts
    for chunk, proj in zip("qkv", projections):
        torch.testing.assert_close(parts[chunk].grad_rows, proj.grad.reshape(-1, E))
    for p in mha.parameters():
        p.requires_grad_(True)
    cap.set(a=True, g=True)
    mha(x, x, x, need_weights=False)[0].pow(2).mean().backward()
    assert not isinstance(cap.records["attn"], ChunkedRecord) and cap.records["attn"].grad_rows.shape[1] == 3 * E
    assert adapter.modes == {"cross", "self"} and "both" in adapter.runtime_fallback
    cap.remove()


def test_chunked_block_rejects_a_bad_partition_and_a_packed_record(device):
    mha = nn.MultiheadAttention(E, 2).to(D).to(device)
    adapter = AttentionInProjAdapter(mha)
    chunks = adapter.chunk_adapters()
    with pytest.raises(ValueError, match="partition"):
        ChunkedBlock("attn", adapter, {"q": (slice(0, E), _kfac(chunks["q"], device))})
    rows = adapter.chunk_rows()
    block = ChunkedBlock("attn", adapter, {c: (rows[c], _kfac(a, device)) for c, a in chunks.items()})
    with pytest.raises(RuntimeError, match="per-chunk records"):
        block.update_statistics(object(), torch.zeros(3 * E, E + 1, dtype=D, device=device))
