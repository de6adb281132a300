"""K-BFGS's second pass with all layers' updates in one UpdateBatch, against each block updating on its own.

The optimizer hands one :class:`~curvature.update_batch.UpdateBatch` to every block that joins batches; a
block that does not (here: the same block with the capability switched off) prepares its own. Both paths
must train identically up to rounding and decide the same skips (reverts: tests/optimizers/test_revert_snapshot.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvature.update_batch import UpdateBatch
from optimizers import KBFGS, KBFGSL
from tests.optimizers.closures import loss_closure

F64 = torch.float64


def _model(device) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 6)).to(device, F64)


def _train(device, cls, batched: bool, steps: int = 6):
    model = _model(device)
    opt = cls(model, lr=0.2, damping=0.3)
    if not batched:
        for slot in opt.slots.values():
            slot.block.joins_update_batch = False  # each block prepares a batch of its own
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=gen, dtype=F64).to(device)
    for _ in range(steps):
        opt.step(loss_closure(opt, model, nn.functional.mse_loss, x, x))
    return model, opt


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_one_batch_for_all_layers_trains_like_one_batch_per_layer(device, cls):
    (m1, o1), (m2, o2) = _train(device, cls, True), _train(device, cls, False)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    for name in o1.slots:
        b1, b2 = o1.slots[name].block, o2.slots[name].block
        torch.testing.assert_close(b1.g_factor.to_dense(), b2.g_factor.to_dense(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b1.a_factor.to_dense(), b2.a_factor.to_dense(), rtol=1e-9, atol=1e-12)
        assert b1.diagnostics() == b2.diagnostics()
        assert b1.a_factor.updates > 0 and b1.g_factor.updates > 0


def test_the_step_hands_every_block_the_same_batch(device, monkeypatch):
    model, opt = _train(device, KBFGS, True, steps=1)
    seen = []
    for slot in opt.slots.values():
        original = slot.block.prepare_after_step

        def spy(before, after, updates=None, original=original):
            seen.append(updates)
            return original(before, after, updates=updates)

        monkeypatch.setattr(slot.block, "prepare_after_step", spy)
    x = torch.randn(16, 6, dtype=F64, device=device)
    opt.step(loss_closure(opt, model, nn.functional.mse_loss, x, x))
    assert len(seen) == len(opt.slots) and isinstance(seen[0], UpdateBatch) and all(u is seen[0] for u in seen)


def _prepared_batches(monkeypatch) -> list[int]:
    """The number of requests of every UpdateBatch prepared from now on, in order."""
    sizes = []
    original = UpdateBatch.prepare

    def prepare(self):
        out = original(self)
        sizes.append(len(self.pending))
        return out

    monkeypatch.setattr(UpdateBatch, "prepare", prepare)
    return sizes


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
@pytest.mark.parametrize("batched", [True, False])
def test_every_factor_request_of_a_step_lands_in_one_batch_per_step_or_per_block(device, monkeypatch, cls, batched):
    """A step prepares one batch holding every layer's three requests (H_g's damping, then its update or L-BFGS
    check, and H_a's update); a block that does not join the step's batch prepares one batch of its own with
    its three, not one per factor."""
    model, opt = _train(device, cls, batched, steps=1)
    sizes = _prepared_batches(monkeypatch)
    x = torch.randn(16, 6, dtype=F64, device=device)
    opt.step(loss_closure(opt, model, nn.functional.mse_loss, x, x))
    layers = len(opt.slots)
    nonempty = [n for n in sizes if n]  # the step's own batch is prepared (empty) when no block joins it
    assert nonempty == ([3 * layers] if batched else [3] * layers), sizes
