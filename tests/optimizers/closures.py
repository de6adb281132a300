"""The training closure shared by the optimizer tests."""

from __future__ import annotations

from typing import Callable

import torch


def loss_closure(opt, model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> Callable:
    """``closure()`` for ``opt.step``: zero the gradients, ``loss_fn(model(x), y)``, backward, return the loss."""
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure
