"""Grouped and depthwise convolutions: one KFC block per group, against float64 oracles.

A convolution with ``groups = g`` is ``g`` independent convolutions. The oracle builds group
``j``'s factors from their definitions with ``F.unfold`` on the group's input channels (independent
of the adapter's patch extraction) and autograd's output gradients, and solves the damped Kronecker
system densely; the whole layer's operator is checked against the block-diagonal assembly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature.adapters import Conv1dAdapter, Conv2dAdapter
from curvature.blocks import KroneckerBlock, vec_c
from curvature.capture import LayerCapture
from curvature.chunked import ChunkedBlock
from curvature.damping import Tikhonov
from curvature.factors import EMACovarianceFactor
from curvature.inverter import BatchedInverter
from optimizers import KFAC
from optimizers.communicator import LocalCommunicator

D = torch.float64


def _kfac(adapter, device):
    kw = {"dtype": D, "device": device}
    return KroneckerBlock("c", adapter, EMACovarianceFactor(adapter.a_dim, 0.0, **kw),
                          EMACovarianceFactor(adapter.g_dim, 0.0, **kw))


@pytest.mark.parametrize("c_in,c_out,groups", [(4, 6, 2), (3, 6, 3)], ids=["grouped", "depthwise_x2"])
def test_per_group_kfc_matches_the_definitions_and_a_dense_solve(device, c_in, c_out, groups):
    torch.manual_seed(5)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, stride=2, groups=groups).to(D).to(device)
    x = torch.randn(3, c_in, 5, 5, dtype=D, device=device)
    target = torch.randn(3, c_out, 3, 3, dtype=D, device=device)
    adapter = Conv2dAdapter(conv)
    assert (adapter.a_dim, adapter.g_dim) == (c_in // groups * 9 + 1, c_out)
    cap = LayerCapture({"conv": adapter}, "mean")
    cap.set(a=True, h=True, g=True)
    y = conv(x)
    y.retain_grad()
    torch.sin(y - target).pow(2).sum(1).mean().backward()
    record = cap.records["conv"]
    grad_matrix = adapter.grad_matrix()

    damping = 0.05
    rows = adapter.chunk_rows()
    blocks = {c: _kfac(a, device) for c, a in adapter.chunk_adapters().items()}
    block = ChunkedBlock("conv", adapter, {c: (rows[c], blocks[c]) for c in blocks}, split=adapter.split_record,
                         label="group")
    block.update_statistics(record, grad_matrix)
    inverter = BatchedInverter()
    block.request_inverses(inverter, Tikhonov(damping))
    inverter.run()
    direction = block.precondition(grad_matrix)

    n, per_in, per_out = x.shape[0], c_in // groups, c_out // groups
    r = math.sqrt(damping)
    for j, chunk in enumerate(blocks):
        xs = x[:, j * per_in:(j + 1) * per_in]
        patches = F.unfold(xs, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, per_in * 9)  # [N·L, C/g·9]
        abar = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=D, device=device)], 1)
        A = abar.T @ abar / n  # KFC: sum over locations, mean over images
        g = n * y.grad[:, j * per_out:(j + 1) * per_out].movedim(1, -1).reshape(-1, per_out)
        G = g.T @ g / g.shape[0]
        torch.testing.assert_close(blocks[chunk].a_factor.statistic, A)
        torch.testing.assert_close(blocks[chunk].g_factor.statistic, G)
        M = grad_matrix[rows[chunk]]
        torch.testing.assert_close(M, g.T @ abar / n)  # the group's [∇W_j | ∇b_j]
        w = conv.weight.grad[j * per_out:(j + 1) * per_out].reshape(per_out, -1)
        torch.testing.assert_close(M[:, :-1], w)
        dense = torch.linalg.solve(torch.kron(A + r * torch.eye(A.shape[0], dtype=D, device=device),
                                              G + r * torch.eye(G.shape[0], dtype=D, device=device)), vec_c(M))
        torch.testing.assert_close(vec_c(direction[rows[chunk]]), dense)
    torch.testing.assert_close(block.to_dense() @ vec_c(grad_matrix), vec_c(direction))
    cap.remove()


def test_grouped_conv_equals_separate_convolutions_in_the_optimizer(device):
    """KFAC on a groups=2 Conv1d takes the same steps as KFAC on two groups=1 convolutions holding the
    groups' weights (a grouped convolution is independent convolutions), also after a warm start."""
    torch.manual_seed(6)

    class Separate(nn.Module):
        def __init__(self, grouped):
            super().__init__()
            self.a, self.b = nn.Conv1d(2, 3, 3), nn.Conv1d(2, 3, 3)
            with torch.no_grad():
                for k, part in enumerate((self.a, self.b)):
                    part.weight.copy_(grouped.weight[3 * k:3 * k + 3])
                    part.bias.copy_(grouped.bias[3 * k:3 * k + 3])

        def forward(self, x):
            return torch.cat([self.a(x[:, :2]), self.b(x[:, 2:])], 1)

    grouped = nn.Conv1d(4, 6, 3, groups=2).to(D).to(device)
    separate = Separate(grouped).to(D).to(device)
    x = torch.randn(5, 4, 7, dtype=D, device=device)
    target = torch.randn(5, 6, 5, dtype=D, device=device)
    weights = []
    for model in (grouped, separate):
        opt = KFAC(model, lr=0.2, damping=0.1)
        opt.warm_start([(x, target)], lambda out, t: (out - t).pow(2).mean())
        for _ in range(4):
            def closure(opt=opt, model=model):
                opt.zero_grad()
                loss = torch.tanh(model(x) - target).pow(2).mean()
                loss.backward()
                return loss
            opt.step(closure)
        weights.append(opt)
    assert "per group (2 groups)" in weights[0].describe() and "fallback" not in weights[0].describe()
    torch.testing.assert_close(grouped.weight[:3], separate.a.weight)
    torch.testing.assert_close(grouped.weight[3:], separate.b.weight)
    torch.testing.assert_close(grouped.bias, torch.cat([separate.a.bias, separate.b.bias]))
    assert isinstance(Conv1dAdapter(grouped).chunk_adapters()["g1"].g_dim, int)


class _TwoRanks(LocalCommunicator):
    """Says it is data-parallel (construction-time decisions only; no collective is called)."""

    distributed = property(lambda self: True)
    world_size = property(lambda self: 2)


def test_per_group_and_per_chunk_blocks_fall_back_under_data_parallel_training():
    opt = KFAC(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), lr=0.1, distributed=_TwoRanks())
    assert "grouped convolution have no data-parallel reduction" in opt.fallback_reasons["0"]

    attn = nn.MultiheadAttention(4, 2, batch_first=True)
    opt = KFAC(attn, lr=0.1, distributed=_TwoRanks())
    x, m = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    attn(x, m, m, need_weights=False)[0].sum().backward()
    opt._apply_runtime_fallbacks()  # what step() does first
    assert "no data-parallel reduction" in opt.fallback_reasons[""] and "" not in opt.slots
