"""Out-of-the-box training of modern architectures: a decoder-only transformer and a CNN with
grouped/depthwise convolutions and BatchNorm, with every ready-made optimizer and a mixed composition."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from benchmarks.transformer import TinyDecoder, modular_addition, next_token_loss
from curvature.adapters import UnsupportedLayerError
from curvature.chunked import ChunkedBlock
from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer
from optimizers.recipes import diagonal_block, kbfgs_block, kbfgsl_block, kfac_block
from tests.optimizers.closures import mean_square_closure


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mixed(model, lr):
    return CurvatureOptimizer(model, lr=lr, damping=0.3, blocks={
        nn.Embedding: kfac_block(), nn.MultiheadAttention: kbfgsl_block(memory=5), "head": diagonal_block(),
        nn.Linear: kbfgs_block(), nn.LayerNorm: diagonal_block(power=0.5, source="gradient"),
        nn.Conv2d: kfac_block(approx="reduce"), nn.BatchNorm2d: diagonal_block(power=0.5, source="gradient")})


MAKERS = {
    "kfac": lambda m, lr: KFAC(m, lr=lr, damping=0.3),
    "kbfgs": lambda m, lr: KBFGS(m, lr=lr, damping=0.3),
    "kbfgsl": lambda m, lr: KBFGSL(m, lr=lr, damping=0.3, memory=10),
    "mixed": _mixed,
}


def _every_parameter_listed_once(opt, model):
    table = opt.describe()
    lines = table.splitlines()[1:]
    names = {line.split()[0] for line in lines}
    owners = {n.rsplit(".", 1)[0] if "." in n else "" for n, _ in model.named_parameters()}
    assert owners <= names, f"layers missing from describe(): {owners - names}\n{table}"
    assert sum(int(line.split()[-1]) for line in lines) == sum(p.numel() for p in model.parameters())
    return table


def _train(model, opt, loss_fn, steps):
    losses = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    return losses


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_decoder_transformer_trains_out_of_the_box(kind, tied):
    if tied and kind in ("kbfgs", "kbfgsl"):
        pytest.skip("the tied head is covered with KFAC and the mixed composition")
    torch.manual_seed(0)
    seq = modular_addition(32, generator=torch.Generator().manual_seed(0))
    model = TinyDecoder(6, dim=8, heads=2, layers=2, max_len=4, tied=tied)
    opt = MAKERS[kind](model, 0.1)
    table = _every_parameter_listed_once(opt, model)
    assert "MultiheadAttention" in table and "out_proj" in table
    if tied:  # the embedding/head tie is transposed: one Kronecker block cannot hold both
        assert "tied weights shared between ['tok', 'head']" in table and "transposed" in table
    else:
        assert "fallback" not in table, table
    losses = _train(model, opt, lambda: next_token_loss(model, seq), 100)
    assert all(math.isfinite(v) for v in losses)
    assert opt.counters["skipped_steps"] == 0 and opt.counters["reverted_steps"] == 0
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, (losses[:3], losses[-3:])


class SmallCNN(nn.Module):
    """Conv → BatchNorm → grouped conv → depthwise conv (+ pointwise) → pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_cnn_with_grouped_depthwise_and_batchnorm_trains(kind):
    torch.manual_seed(0)
    x = torch.randn(32, 1, 6, 6)
    y = (x[:, 0, :3].mean((1, 2)) > 0).long() + (x[:, 0, 3:].mean((1, 2)) > 0).long()
    model = SmallCNN()
    opt = MAKERS[kind](model, 0.3)
    table = _every_parameter_listed_once(opt, model)
    assert "BatchNorm2d" in table and "diagonal" in table
    losses = _train(model, opt, lambda: nn.functional.cross_entropy(model(x), y), 100)
    assert all(math.isfinite(v) for v in losses)
    assert opt.counters["skipped_steps"] == 0 and opt.counters["reverted_steps"] == 0
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, (losses[:3], losses[-3:])


def test_transformer_encoder_layer_with_a_closure_is_captured():
    """nn.TransformerEncoderLayer: out_proj is never called as a module; its statistics come from the
    attention's F.linear call (this used to fail with 'no statistics were captured ... out_proj')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(),
                          nn.Linear(8 * 5, 3))
    x, y = torch.randn(16, 5, 8), torch.randint(0, 3, (16,))
    opt = KFAC(model, lr=0.1, damping=0.3)
    assert "fallback" not in opt.describe()
    losses = _train(model, opt, lambda: nn.functional.cross_entropy(model(x), y), 15)
    assert opt.blocks["0.self_attn.out_proj"].a_factor.updates == 15
    assert losses[-1] < losses[0] and opt.counters["skipped_steps"] == 0


class Cross(nn.Module):
    """One attention with distinct query and key/value (``how`` chooses how it is called)."""

    def __init__(self, how: str = "kv") -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.how = how

    def forward(self, x, memory):
        if self.how == "kv":  # key is value, query differs (encoder-decoder attention)
            return self.attn(x, memory, memory, need_weights=False)[0]
        if self.how == "qkv":  # three different tensors, as keywords
            return self.attn(query=x, key=memory, value=memory * 2, need_weights=False)[0]
        return self.attn(x, x, x, need_weights=False)[0]  # self-attention


@pytest.mark.parametrize("how", ["kv", "qkv"])
@pytest.mark.parametrize("make", [KFAC, KBFGS], ids=["kfac", "kbfgs"])
def test_cross_attention_in_proj_gets_per_chunk_blocks(make, how):
    """At the first step that sees distinct q/k/v (before the step mutates anything) the packed in_proj
    gets one block per q/k/v chunk (built by its recipe); describe() and counters say so, and a
    reloaded optimizer continues bit-identically (it rebuilds the per-chunk blocks on load)."""
    torch.manual_seed(0)
    model = Cross(how).double()
    x, m = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    opt = make(model, lr=0.1, damping=0.3, fallback="error")
    assert "per chunk" not in opt.describe()
    for _ in range(3):
        opt.step(mean_square_closure(opt, model, x, m))
    block = opt.blocks["attn"]
    assert isinstance(block, ChunkedBlock) and set(block.parts) == {"q", "k", "v"}
    assert all(b.kind == make.__name__.lower() for _, b in block.parts.values())
    assert "per chunk (q, k, v)" in opt.describe() and not opt.fallback_modules
    assert opt.counters["chunked_layers"] == 1 and opt.counters["runtime_fallbacks"] == 0
    assert opt.counters["skipped_steps"] == 0 and opt.counters["reverted_steps"] == 0
    if make is KFAC:
        assert all(b.a_factor.updates == 3 for _, b in block.parts.values())

    saved = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = make(model2, lr=0.1, damping=0.3)
    opt2.load_state_dict(saved)
    assert opt2.describe() == opt.describe()
    for _ in range(2):
        opt.step(mean_square_closure(opt, model, x, m))
        opt2.step(mean_square_closure(opt2, model2, x, m))
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


class SelfAndCross(nn.Module):
    """One attention called both as self-attention and as cross-attention in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x, memory):
        h = self.attn(x, x, x, need_weights=False)[0]
        return self.attn(h, memory, memory, need_weights=False)[0]


@pytest.mark.parametrize("make", [KFAC, KBFGS], ids=["kfac", "kbfgs"])
def test_attention_called_both_ways_falls_back_automatically_like_exclude(make):
    """Such a layer's in_proj moves to the fallback rule at the first step, before the step mutates
    anything: every step equals that of an optimizer told to exclude it from the start; describe()
    gives the reason, counters count it, state_dict keeps it; fallback='error' raises before mutating."""
    torch.manual_seed(0)
    model = SelfAndCross().double()
    twin = copy.deepcopy(model)
    x, m = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    opt = make(model, lr=0.1, damping=0.3)
    ref = make(twin, lr=0.1, damping=0.3, exclude=["attn"])  # out_proj keeps its block in both
    assert "attn" in opt.slots and "attn" not in ref.slots
    for _ in range(3):
        opt.step(mean_square_closure(opt, model, x, m))
        ref.step(mean_square_closure(ref, twin, x, m))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert "attn" not in opt.slots and "attn.out_proj" in opt.slots
    assert "both as self-attention" in opt.fallback_reasons["attn"]
    assert opt.counters["runtime_fallbacks"] == 1 and opt.counters["skipped_steps"] == 0
    lines = opt.describe().splitlines()[1:]
    assert sum(int(line.split()[-1]) for line in lines) == sum(p.numel() for p in model.parameters())

    saved = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = make(model2, lr=0.1, damping=0.3)
    opt2.load_state_dict(saved)
    assert "attn" not in opt2.slots and opt2.describe() == opt.describe()
    opt.step(mean_square_closure(opt, model, x, m))
    opt2.step(mean_square_closure(opt2, model2, x, m))
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    model3 = SelfAndCross()
    opt3 = make(model3, lr=0.1, fallback="error")
    before = [p.detach().clone() for p in model3.parameters()]
    with pytest.raises(UnsupportedLayerError, match="both as self-attention.*exclude"):
        opt3.step(mean_square_closure(opt3, model3, x.float(), m.float()))
    assert all(torch.equal(p, q) for p, q in zip(model3.parameters(), before))
    assert not opt3.state and opt3.steps == 0


def test_self_attention_keeps_its_packed_block():
    torch.manual_seed(0)
    model = Cross("self")
    x = torch.randn(2, 3, 4)
    opt = KFAC(model, lr=0.1)
    for _ in range(2):
        opt.step(mean_square_closure(opt, model, x, None))
    assert not isinstance(opt.blocks["attn"], ChunkedBlock) and opt.counters["chunked_layers"] == 0
    assert opt.blocks["attn"].a_factor.updates == 2


class EncoderDecoder(nn.Module):
    """A small encoder-decoder: encoder self-attention over the source, decoder causal self-attention
    and cross-attention to the encoder output, MLPs, LayerNorms, a Linear head."""

    def __init__(self, vocab: int, dim: int = 16, heads: int = 2, max_len: int = 8) -> None:
        super().__init__()
        self.src = nn.Embedding(vocab, dim)
        self.tgt = nn.Embedding(vocab + 1, dim)  # + a start token
        self.pos = nn.Embedding(max_len, dim)
        self.enc_ln, self.enc_attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.enc_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.dec_ln1, self.dec_self = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dec_ln2, self.cross = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dec_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, src, tgt_in):
        s, t = src.shape[1], tgt_in.shape[1]
        x = self.src(src) + self.pos(torch.arange(s)).unsqueeze(0)
        h = self.enc_ln(x)
        x = x + self.enc_attn(h, h, h, need_weights=False)[0]
        memory = x + self.enc_mlp(x)
        y = self.tgt(tgt_in) + self.pos(torch.arange(t)).unsqueeze(0)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        h = self.dec_ln1(y)
        y = y + self.dec_self(h, h, h, attn_mask=mask, need_weights=False)[0]
        y = y + self.cross(self.dec_ln2(y), memory, memory, need_weights=False)[0]
        y = y + self.dec_mlp(y)
        return self.head(self.ln(y))


@pytest.mark.parametrize("kind", ["kfac", "kbfgs", "mixed"])
def test_encoder_decoder_with_cross_attention_trains(kind):
    """Reverse a sequence: 100 steps, loss falling, no skipped steps, every parameter listed once;
    the cross-attention's in_proj gets per-chunk blocks, every other layer its usual block."""
    torch.manual_seed(0)
    vocab, length = 5, 4
    src = torch.randint(0, vocab, (32, length), generator=torch.Generator().manual_seed(0))
    tgt = src.flip(1)
    tgt_in = torch.cat([torch.full((32, 1), vocab), tgt[:, :-1]], 1)
    model = EncoderDecoder(vocab)
    opt = MAKERS[kind](model, 0.1)
    loss_fn = lambda: nn.functional.cross_entropy(model(src, tgt_in).reshape(-1, vocab), tgt.reshape(-1))  # noqa: E731
    losses = _train(model, opt, loss_fn, 100)
    table = _every_parameter_listed_once(opt, model)
    assert not opt.fallback_modules and "per chunk (q, k, v)" in table, table
    assert isinstance(opt.blocks["cross"], ChunkedBlock) and not isinstance(opt.blocks["dec_self"], ChunkedBlock)
    assert opt.counters["chunked_layers"] == 1 and opt.counters["runtime_fallbacks"] == 0
    assert all(math.isfinite(v) for v in losses)
    assert opt.counters["skipped_steps"] == 0 and opt.counters["reverted_steps"] == 0
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, (losses[:3], losses[-3:])
