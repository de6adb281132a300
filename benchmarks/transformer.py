"""A tiny decoder-only transformer and a generated sequence task (for tests and throughput).

The model: token + learned position embeddings, pre-LN blocks of causal ``nn.MultiheadAttention``
and a GELU MLP, a final LayerNorm and a Linear head (optionally tied to the token embedding). The
task: modular addition written as a sequence ``a b = c`` over the digits ``0..p-1`` plus the
token ``=``; the model is trained to predict every next token (loss the mean over positions).
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """One pre-LN decoder block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyDecoder(nn.Module):
    """Decoder-only transformer on ``[B, S]`` token ids, returning ``[B, S, vocab]`` logits."""

    def __init__(self, vocab: int, dim: int = 16, heads: int = 2, layers: int = 2, max_len: int = 8,
                 tied: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, 2 * dim) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=not tied)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(s, device=tokens.device)).unsqueeze(0)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens.device), diagonal=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def modular_addition(n: int, p: int = 5, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` sequences ``[a, b, =, (a+b) mod p]`` (token ``p`` is ``=``), vocabulary ``p + 1``."""
    a = torch.randint(0, p, (n,), generator=generator)
    b = torch.randint(0, p, (n,), generator=generator)
    return torch.stack([a, b, torch.full_like(a, p), (a + b) % p], 1)


def next_token_loss(model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every next token, the mean over all positions (expand setting)."""
    logits = model(seq[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
