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


def mean_square_closure(opt, model: torch.nn.Module, x: torch.Tensor, memory: torch.Tensor) -> Callable:
    """``closure()`` for a two-input model (e.g. cross-attention): zero the gradients, the mean square of
    ``model(x, memory)``, backward, return the loss."""
    def closure():
        opt.zero_grad()
        loss = model(x, memory).pow(2).mean()
        loss.backward()
        return loss

    return closure
