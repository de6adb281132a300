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


def spectrum_matrix(eigs, seed: int, device) -> torch.Tensor:
    """U diag(eigs) Uᵀ (float64) with a seeded random orthogonal U: a symmetric matrix of known spectrum."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return (q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T).to(device)


def seeded_vector(n: int, seed: int, device) -> torch.Tensor:
    """A seeded standard normal float64 vector of length n."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
