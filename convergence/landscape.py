r"""Loss-landscape slices along filter-normalized random directions (Li et al., NeurIPS 2018).

A direction :math:`d` has the shapes of the trainable parameters.  *Filter normalization*: for
every parameter tensor :math:`\theta_j` with ``dim >= 2`` and every filter (slice along dim 0)
:math:`i`,

.. math:: d_{i,j} \leftarrow \frac{d_{i,j}}{\|d_{i,j}\| + 10^{-10}}\,\|\theta_{i,j}\|,

(Frobenius norms of the slices) so :math:`\|d_{i,j}\| = \|\theta_{i,j}\|` up to the
:math:`10^{-10}`.  Tensors with ``dim <= 1`` (biases, BatchNorm affine parameters) get
:math:`d = 0` by default (Li et al.'s ``ignore='biasbn'``); with ``include_low_dim=True`` they are
normalized as a single filter instead (:math:`\|d_j\| = \|\theta_j\|`).  Because the direction
scales with each filter, :math:`f(\theta + \alpha d)` is invariant to per-filter rescalings
:math:`\theta_{i,j}\to c_{i,j}\theta_{i,j}` of scale-invariant layers (ReLU + BatchNorm with batch
statistics).

Slices are evaluated with :func:`torch.func.functional_call` on perturbed copies, so the module's
parameters are never written; buffers and the ``training`` flags are snapshotted and restored,
so the model is left bit-exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "trainable_parameters",
    "filter_normalize",
    "random_direction",
    "loss_slice_1d",
    "loss_slice_2d",
]

Direction = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]

_NORM_EPS = 1e-10


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` for the parameters with ``requires_grad=True`` (module order)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _as_dict(direction: Direction, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(direction, Mapping):
        missing = [name for name in params if name not in direction]
        if missing:
            raise ValueError(f"direction lacks entries for parameters {missing}")
        out = {name: direction[name] for name in params}
    else:
        direction = list(direction)
        if len(direction) != len(params):
            raise ValueError(
                f"direction has {len(direction)} tensors, the model has {len(params)} trainable parameters"
            )
        out = dict(zip(params.keys(), direction))
    for name, p in params.items():
        if out[name].shape != p.shape:
            raise ValueError(f"direction for {name!r} has shape {tuple(out[name].shape)}, expected {tuple(p.shape)}")
    return out


def filter_normalize(
    direction: Direction,
    params: Mapping[str, torch.Tensor] | nn.Module,
    *,
    include_low_dim: bool = False,
) -> dict[str, torch.Tensor]:
    r"""Filter-normalize ``direction`` against ``params`` (see the module docstring).

    ``params`` is a module (its trainable parameters are used) or ``{name: tensor}``.  Returns a new
    ``{name: tensor}``; the input is not modified.
    """
    if isinstance(params, nn.Module):
        params = trainable_parameters(params)
    direction = _as_dict(direction, params)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, theta in params.items():
            d = direction[name].detach().to(dtype=theta.dtype, device=theta.device)
            theta = theta.detach()
            if theta.dim() <= 1:
                if not include_low_dim:
                    out[name] = torch.zeros_like(theta)
                    continue
                out[name] = d / (torch.linalg.vector_norm(d) + _NORM_EPS) * torch.linalg.vector_norm(theta)
                continue
            d_rows = d.reshape(d.shape[0], -1)
            t_rows = theta.reshape(theta.shape[0], -1)
            d_norm = torch.linalg.vector_norm(d_rows, dim=1, keepdim=True)
            t_norm = torch.linalg.vector_norm(t_rows, dim=1, keepdim=True)
            out[name] = (d_rows / (d_norm + _NORM_EPS) * t_norm).reshape(theta.shape)
    return out


def random_direction(
    model: nn.Module,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    normalize: bool = True,
    include_low_dim: bool = False,
) -> dict[str, torch.Tensor]:
    r"""A Gaussian direction with the shapes of the trainable parameters, filter-normalized by default.

    Entries are drawn on the CPU in float64 (seeded ``torch.Generator``; ``seed`` defaults to 0)
    and cast to each parameter's dtype/device, so the raw draw depends only on the shapes and the
    seed.  ``normalize=False`` returns the raw Gaussian direction.
    """
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0 if seed is None else int(seed))
    params = trainable_parameters(model)
    raw = {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype=p.dtype, device=p.device)
        for name, p in params.items()
    }
    if not normalize:
        return raw
    return filter_normalize(raw, params, include_low_dim=include_low_dim)


class _PreservedState:
    """Snapshot buffers and ``training`` flags; optionally switch to eval mode; restore exactly on exit."""

    def __init__(self, model: nn.Module, eval_mode: bool) -> None:
        self.model = model
        self.eval_mode = eval_mode

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        if self.eval_mode:
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.copy_(saved)
        for module, flag in self.flags:
            module.training = flag


def _loss_at(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    params: Mapping[str, torch.Tensor],
    steps: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
) -> float:
    perturbed = {}
    for name, p in params.items():
        value = p.detach()
        for coeff, d in steps:
            value = value + coeff * d[name]
        perturbed[name] = value
    out = functional_call(model, perturbed, (inputs,))
    return float(loss_fn(out, targets))


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Sequence) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("batch must be an (inputs, targets) pair")


def loss_slice_1d(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: tuple[Any, Any],
    direction: Direction,
    alphas: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    eval_mode: bool = True,
) -> np.ndarray:
    r"""Losses :math:`f(\theta + \alpha d)` for each ``alpha`` (float64 numpy array).

    ``batch`` is ``(inputs, targets)``; ``direction`` is ``{name: tensor}`` or a list aligned with
    the trainable parameters.  With ``eval_mode=True`` (default) the model is evaluated in eval
    mode (BatchNorm running statistics, no dropout).  Parameters, buffers and training flags are
    exactly as before on return.
    """
    inputs, targets = _split_batch(batch)
    params = trainable_parameters(model)
    d = _as_dict(direction, params)
    alphas_np = np.asarray(torch.as_tensor(alphas).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
    losses = np.empty(alphas_np.shape[0], dtype=np.float64)
    with _PreservedState(model, eval_mode), torch.no_grad():
        for i, alpha in enumerate(alphas_np):
            losses[i] = _loss_at(model, loss_fn, inputs, targets, params, [(float(alpha), d)])
    return losses


def loss_slice_2d(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: tuple[Any, Any],
    direction_x: Direction,
    direction_y: Direction,
    alphas: Sequence[float] | np.ndarray | torch.Tensor,
    betas: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    eval_mode: bool = True,
) -> np.ndarray:
    r"""Losses ``L[i, j]`` :math:`= f(\theta + \alpha_i\delta + \beta_j\eta)`.

    Float64 array of shape ``len(alphas) × len(betas)``.

    Same conventions and exact restoration as :func:`loss_slice_1d`.
    """
    inputs, targets = _split_batch(batch)
    params = trainable_parameters(model)
    dx = _as_dict(direction_x, params)
    dy = _as_dict(direction_y, params)
    a = np.asarray(torch.as_tensor(alphas).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
    b = np.asarray(torch.as_tensor(betas).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
    losses = np.empty((a.shape[0], b.shape[0]), dtype=np.float64)
    with _PreservedState(model, eval_mode), torch.no_grad():
        for i, alpha in enumerate(a):
            for j, beta in enumerate(b):
                losses[i, j] = _loss_at(
                    model, loss_fn, inputs, targets, params, [(float(alpha), dx), (float(beta), dy)]
                )
    return losses
