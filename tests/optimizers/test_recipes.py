"""The block recipes (optimizers/recipes.py): what each builds, with which settings, and the default mapping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvature.adapters import UnsupportedLayerError, adapter_for
from curvature.blocks import DiagonalBlock, KroneckerBlock
from curvature.factors import BFGSFactor, EMACovarianceFactor, HessianActionFactor, LBFGSFactor, OneHotCountFactor
from optimizers.recipes import (
    DEFAULT_LAYER_TYPES,
    NORM_TYPES,
    RecipeContext,
    default_blocks,
    diagonal_block,
    kbfgs_block,
    kbfgsl_block,
    kfac_block,
)

D = torch.float64


def _ctx(device, damping=0.49):
    return RecipeContext(dtype=D, device=device, damping=damping)


def _linear():
    return adapter_for(nn.Linear(3, 2))


def _embedding():
    return adapter_for(nn.Embedding(6, 2))


def _on(t: torch.Tensor, device) -> bool:
    return t.dtype == D and t.device.type == torch.device(device).type


def test_kfac_block_builds_ema_factors_with_its_settings(device):
    block = kfac_block(decay=0.7, approx="reduce")("fc", _linear(), _ctx(device))
    assert isinstance(block, KroneckerBlock) and block.kind == "kfac" and block.approx == "reduce"
    assert block.name == "fc"
    for f, dim in ((block.a_factor, 4), (block.g_factor, 2)):
        assert isinstance(f, EMACovarianceFactor) and f.decay == 0.7 and f.dim == dim and _on(f.F, device)
    default = kfac_block()("fc", _linear(), _ctx(device))
    assert (default.a_factor.decay, default.g_factor.decay, default.approx) == (0.9, 0.9, "expand")


def test_kfac_block_gives_an_embedding_a_one_hot_a_factor_always_expand(device):
    block = kfac_block(decay=0.8, approx="reduce")("emb", _embedding(), _ctx(device))
    assert block.kind == "kfac" and block.approx == "expand" and block.name == "emb"
    assert isinstance(block.a_factor, OneHotCountFactor) and block.a_factor.decay == 0.8 and block.a_factor.dim == 6
    assert _on(block.a_factor.counts, device)
    assert isinstance(block.g_factor, EMACovarianceFactor) and block.g_factor.decay == 0.8 and _on(block.g_factor.F, device)


def test_kbfgs_block_defaults_derive_from_the_damping(device):
    """λ_A = μ2 = √λ from the context, μ1 0.2, EMA 0.9 for A and the pairs, H_g = I, dense (kind kbfgs)."""
    block = kbfgs_block()("fc", _linear(), _ctx(device, damping=0.49))
    a, g = block.a_factor, block.g_factor
    assert block.kind == "kbfgs" and block.approx == "expand" and block.name == "fc"
    assert isinstance(a, HessianActionFactor) and a.damping == pytest.approx(0.7) and a.covariance.decay == 0.9
    assert a.dim == 4 and _on(a.covariance.F, device)
    assert isinstance(g, BFGSFactor) and g.dim == 2 and g.pair_decay == 0.9 and g.init_scale == 1.0
    assert (g.damping.mu1, g.damping.mu2, g.damping.variant) == (0.2, pytest.approx(0.7), "interpolate")
    assert _on(g.H, device) and torch.equal(g.H, torch.eye(2, dtype=D, device=device))


def test_kbfgs_block_settings_reach_the_factors(device):
    block = kbfgs_block(a_decay=0.6, pair_decay=0.5, mu1=0.1, mu2=0.3, lambda_a=0.2, variant="lm", g_init_scale=2.0,
                        approx="reduce")("fc", _linear(), _ctx(device))
    a, g = block.a_factor, block.g_factor
    assert block.approx == "reduce" and a.damping == 0.2 and a.covariance.decay == 0.6
    assert g.pair_decay == 0.5 and g.init_scale == 2.0 and torch.equal(g.H, 2.0 * torch.eye(2, dtype=D, device=device))
    assert (g.damping.mu1, g.damping.mu2, g.damping.variant) == (0.1, 0.3, "lm")


def test_kbfgsl_block_keeps_a_limited_memory(device):
    block = kbfgsl_block(memory=7, g_init_scale=3.0, pair_decay=0.4)("fc", _linear(), _ctx(device))
    g = block.g_factor
    assert block.kind == "kbfgsl" and isinstance(g, LBFGSFactor)
    assert (g.lbfgs.memory, g.lbfgs.gamma, g.pair_decay) == (7, 3.0, 0.4)
    assert kbfgsl_block()("fc", _linear(), _ctx(device)).g_factor.lbfgs.memory == 100
    assert (g.damping.mu1, g.damping.mu2) == (0.2, pytest.approx(0.7))  # double damping, as the dense H_g
    assert _on(g.s_avg, device) and _on(g.lbfgs.S, device)


class _BareAdapter:
    """A duck-typed adapter that declares nothing beyond its sizes (no ``one_hot_input``)."""

    a_dim, g_dim = 4, 2


def test_an_adapter_without_one_hot_input_counts_as_dense(device):
    kfac = kfac_block()("x", _BareAdapter(), _ctx(device))
    assert isinstance(kfac.a_factor, EMACovarianceFactor)
    kbfgs = kbfgs_block()("x", _BareAdapter(), _ctx(device))
    assert isinstance(kbfgs.a_factor, HessianActionFactor)


def test_kbfgs_block_rejects_an_embedding_with_a_clear_error(device):
    with pytest.raises(UnsupportedLayerError, match=r"layer 'emb': K-BFGS needs a dense A; embeddings take kfac_block\(\)"):
        kbfgs_block()("emb", _embedding(), _ctx(device))


def test_diagonal_block_settings(device):
    block = diagonal_block()("fc", _linear(), _ctx(device))
    assert isinstance(block, DiagonalBlock) and block.name == "fc"
    assert (block.decay, block.power, block.source) == (0.9, 1.0, "empirical_fisher") and _on(block.v, device)
    other = diagonal_block(decay=0.5, power=0.5, source="gradient")("fc", _linear(), _ctx(device))
    assert (other.decay, other.power, other.source) == (0.5, 0.5, "gradient")


def test_default_blocks_mapping_and_override_order(device):
    kfac, emb = kfac_block(), kfac_block(decay=0.5)
    out = default_blocks(kfac, emb)
    assert DEFAULT_LAYER_TYPES == (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)
    assert all(out[t] is kfac for t in DEFAULT_LAYER_TYPES) and out[nn.Embedding] is emb
    for t in NORM_TYPES:  # RMSprop-like diagonal on the gradient, power 1/2
        norm = out[t]("ln", adapter_for(nn.LayerNorm(3)), _ctx(device))
        assert isinstance(norm, DiagonalBlock) and (norm.power, norm.source) == (0.5, "gradient")
    assert set(out) == set(DEFAULT_LAYER_TYPES) | {nn.Embedding} | set(NORM_TYPES)
    only = default_blocks(kfac, emb, layer_types=(nn.Linear,))
    assert only == {nn.Linear: kfac}
    over = default_blocks(kfac, emb, overrides={"head": None, nn.Conv1d: emb})
    assert list(over)[:2] == ["head", nn.Conv1d] and over["head"] is None and over[nn.Conv1d] is emb
    assert over[nn.Linear] is kfac
    with pytest.raises(TypeError, match=r"^blocks must be a mapping from module types or layer names to recipes \(or None\)$"):
        default_blocks(kfac, emb, overrides=[nn.Linear])
