"""Empirical checks of the SQN assumptions (theory notes §3) and the machinery they share.

Checks live in submodules (import them directly):

* :mod:`convergence.checks.preconditioner` — E4, AS.3: spectrum bounds, symmetry, live DD invariants;
* :mod:`convergence.checks.independence` — E5, AS.4: counterfactual batch swap and data-flow audit;
* :mod:`convergence.checks.descent` — E6: expected descent lemma (L0, L2) and the SQN-form side-check;
* :mod:`convergence.checks.stepsize` — E7: step-size conditions, schedule, batch size, EoS corollary.

Shared here: :class:`RunSnapshot` (freeze and restore model, optimizer and RNG state, so a check
can run counterfactual steps and leave the run exactly as it was), :func:`closure_factory` (the
standard closure for ``optimizer.step``) and :func:`capture_operators` (the operator a step
applies, as float64 copies). Family-wise error control across checkpoints (Holm) is in
:mod:`convergence.multiple`; statistical checks put their p-value in ``evidence["p_value"]``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from convergence.monitor import OperatorSnapshot

__all__ = ["RunSnapshot", "closure_factory", "capture_operators", "split_batch", "MakeClosure"]

MakeClosure = Callable[[Any], Callable[[], torch.Tensor]]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a batch given as a pair (tuple or list)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("a batch must be an (inputs, targets) pair")


def closure_factory(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable) -> MakeClosure:
    """``make_closure(batch)`` -> closure that zeroes gradients, runs forward and backward on ``batch``
    (an ``(inputs, targets)`` pair) and returns the loss — what ``optimizer.step(closure)`` expects."""

    def make(batch: Any) -> Callable[[], torch.Tensor]:
        x, y = split_batch(batch)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        return closure

    return make


class RunSnapshot:
    """A deep copy of ``model.state_dict()``, ``optimizer.state_dict()`` and the torch RNG states.

    :meth:`restore` puts everything back (each time from a fresh copy, because the optimizer's
    ``load_state_dict`` may keep references to the tensors it is given). Gradients are cleared.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.model_state = copy.deepcopy(model.state_dict())
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        with torch.no_grad():
            self.model.load_state_dict(copy.deepcopy(self.model_state))
        self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

    def __enter__(self) -> "RunSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def capture_operators(model: nn.Module, optimizer, make_closure: MakeClosure, batch: Any) -> dict[str, OperatorSnapshot]:
    """The operator (per layer, float64 copies) that the step on ``batch`` applies at the current state.

    Runs one step from a :class:`RunSnapshot` with a precondition-hook spy and restores everything.
    """
    ops: dict[str, OperatorSnapshot] = {}

    def spy(step, name, block, inputs, direction):
        ops[name] = OperatorSnapshot.from_block(block)

    with RunSnapshot(model, optimizer):
        handle = optimizer.register_precondition_hook(spy)
        try:
            optimizer.step(make_closure(batch))
        finally:
            handle.remove()
    return ops
