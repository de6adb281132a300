"""The Shampoo-style user factor against a dense float64 matrix-root oracle (scipy), and in training."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from torch import nn

from curvature import BatchedInverter, KroneckerBlock, LayerRecord, LinearAdapter, Tikhonov
from optimizers import CurvatureOptimizer

D = torch.float64


def _root(matrix: torch.Tensor, p: int) -> torch.Tensor:
    """(matrix)^(-1/p) by scipy's Schur-Padé fractional power, independent of torch.linalg.eigh."""
    return torch.from_numpy(scipy.linalg.fractional_matrix_power(matrix.cpu().numpy(), -1.0 / p).real)


@pytest.mark.parametrize("root", [4, 2])
def test_shampoo_block_equals_dense_matrix_roots(device, example, root):
    ns = example("shampoo_factor")
    build = ns["shampoo_block"](decay=0.8, root=root)
    layer = nn.Linear(4, 3).to(D).to(device)
    block = build("layer", LinearAdapter(layer), type("Ctx", (), {"dtype": D, "device": device})())
    assert isinstance(block, KroneckerBlock) and not (block.needs_a or block.needs_g or block.needs_second_pass)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 5, generator=g, dtype=D) for _ in range(3)]
    L, R = grads[0] @ grads[0].T, grads[0].T @ grads[0]  # the first observation initializes
    for M in grads[1:]:
        L, R = 0.8 * L + 0.2 * M @ M.T, 0.8 * R + 0.2 * M.T @ M
    for M in grads:
        block.update_statistics(LayerRecord(), M.to(device))
    lam = 0.09
    block.request_inverses(BatchedInverter(), Tikhonov(damping=lam))
    H_g, H_a = _root(L + math.sqrt(lam) * torch.eye(3, dtype=D), root), _root(R + math.sqrt(lam) * torch.eye(5, dtype=D), root)
    V = torch.randn(3, 5, generator=g, dtype=D)
    torch.testing.assert_close(block.precondition(V.to(device)).cpu(), H_g @ V @ H_a)
    torch.testing.assert_close(block.to_dense().cpu(), torch.kron(H_a, H_g))
    clone = build("layer", LinearAdapter(layer), type("Ctx", (), {"dtype": D, "device": device})())
    clone.load_state_dict(block.state_dict())
    torch.testing.assert_close(clone.precondition(V.to(device)), block.precondition(V.to(device)), rtol=0, atol=0)


def test_shampoo_factor_rejects_bad_settings(example):
    factor = example("shampoo_factor")["ShampooFactor"]
    for kwargs in ({"decay": 1.0}, {"root": 0}, {"root": 2.5}):
        with pytest.raises(ValueError):
            factor(3, **kwargs)


def test_shampoo_blocks_train_a_small_network(device, example):
    ns = example("shampoo_factor")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g, dtype=D).to(device)
    y = torch.sin(x @ torch.randn(6, 2, generator=g, dtype=D).to(device))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2)).to(D).to(device)
    opt = CurvatureOptimizer(model, lr=0.5, damping=1e-4, blocks={nn.Linear: ns["shampoo_block"]()})
    assert "shampoo[A: ShampooFactor, G: ShampooFactor]" in opt.describe()

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(60)]
    assert all(math.isfinite(v) for v in losses) and opt.skipped_steps == 0
    assert losses[-1] < 0.1 * losses[0]  # 0.71 -> 0.05 when written
