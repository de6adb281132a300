"""Independent oracles shared by several test files (no library code in them)."""

from __future__ import annotations

import torch


def loop_gradients(model, loss_fn, x, y) -> torch.Tensor:
    """Per-example gradients, one autograd backward per example on the batch of one: row i is the
    flattened gradient of ``loss_fn(model(x[i:i+1]), y[i:i+1])`` over ``model.parameters()``."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)
