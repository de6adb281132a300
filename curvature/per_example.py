r"""Per-example gradients of a batch loss with ``torch.func`` (``vmap`` of ``grad``), and the diagonals built from them.

For a batch :math:`\{(x_i, y_i)\}_{i=1}^N` and a loss ``loss_fn(model(X), Y)`` that is a *mean* over
the examples, the per-example gradient is :math:`g_i = \nabla_\theta\,\ell(\text{model}(x_i), y_i)`,
computed as the gradient of ``loss_fn`` on the batch of one example :math:`(x_i, y_i)` (so the
batch gradient is :math:`\frac1N\sum_i g_i`), vectorized over the examples with
:func:`torch.func.vmap` in chunks (the :math:`N\times n` matrix is never formed in full).

:func:`squared_gradient_diagonal` returns :math:`\frac1N\sum_i g_i\odot g_i`, the diagonal of the
empirical Fisher of the mean loss: the statistic of Martens's (2010, §4.7) diagonal CG
preconditioner for Hessian-free optimization. :func:`gauss_newton_diagonal` returns the exact
diagonal of the Gauss–Newton matrix :math:`\frac1N\sum_i J_i^\top J_i` (per-example output
Jacobians, ``vmap`` of ``jacrev``), the damping matrix of Levenberg–Marquardt's maximum-diagonal
damping.

Models must treat the examples independently (no batch statistics: a ``BatchNorm`` in training mode
couples them and is rejected by ``vmap``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.func import functional_call, grad, jacrev, vjp, vmap

from curvature.products import FunctionalLoss

__all__ = ["per_example_gradients", "squared_gradient_diagonal", "gauss_newton_diagonal", "DEFAULT_CHUNK"]

#: examples per ``vmap`` call (bounds the memory of the per-example gradients to chunk × n)
DEFAULT_CHUNK = 128


def _examples(fl: FunctionalLoss) -> tuple[torch.Tensor, Any, int]:
    x, y = fl.inputs, fl.targets
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TypeError("per-example gradients need a single tensor input batch (examples along dim 0), got "
                        f"{type(x).__name__}")
    n = x.shape[0]
    if isinstance(y, torch.Tensor) and (y.dim() == 0 or y.shape[0] != n):
        raise ValueError(f"targets must have the batch size {n} along dim 0, got shape {tuple(y.shape)}")
    return x, y, n


def _chunks(fl: FunctionalLoss, chunk: int):
    x, y, n = _examples(fl)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    for start in range(0, n, chunk):
        yield x[start:start + chunk], (y[start:start + chunk] if isinstance(y, torch.Tensor) else y)


def _per_example_fn(fl: FunctionalLoss) -> Callable:
    def loss_one(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: Any) -> torch.Tensor:
        out = functional_call(fl.model, params, (xi.unsqueeze(0),))
        target = yi.unsqueeze(0) if isinstance(yi, torch.Tensor) else yi
        return fl.loss_fn(out, target)

    return loss_one


def _flat_rows(fl: FunctionalLoss, tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tree[name].reshape(tree[name].shape[0], -1) for name in fl.names], dim=1)


def per_example_gradients(fl: FunctionalLoss, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    r"""The ``(N, n)`` matrix of per-example gradients :math:`g_i` at ``fl``'s point (``fl.params``)."""
    loss_one = _per_example_fn(fl)
    params = {k: v.detach() for k, v in fl.params.items()}
    y_dim = 0 if isinstance(fl.targets, torch.Tensor) else None
    rows = [_flat_rows(fl, vmap(grad(loss_one), in_dims=(None, 0, y_dim))(params, xc, yc))
            for xc, yc in _chunks(fl, chunk)]
    return torch.cat(rows, dim=0).detach()


def squared_gradient_diagonal(fl: FunctionalLoss, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    r""":math:`\frac1N\sum_{i=1}^N g_i\odot g_i` (length ``n``), accumulated chunk by chunk."""
    loss_one = _per_example_fn(fl)
    params = {k: v.detach() for k, v in fl.params.items()}
    y_dim = 0 if isinstance(fl.targets, torch.Tensor) else None
    total = torch.zeros(fl.n, dtype=fl.dtype, device=fl.device)
    count = 0
    for xc, yc in _chunks(fl, chunk):
        rows = _flat_rows(fl, vmap(grad(loss_one), in_dims=(None, 0, y_dim))(params, xc, yc))
        total += rows.detach().pow(2).sum(0)
        count += rows.shape[0]
    return total / count


def gauss_newton_diagonal(fl: FunctionalLoss, *, samples: int | None = None, generator: torch.Generator | None = None,
                          chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    r"""The diagonal of the Gauss–Newton matrix :math:`\frac1N\sum_i J_i^\top J_i` (length ``n``).

    :math:`J_i = \partial z_i/\partial\theta` is the Jacobian of example :math:`i`'s (flattened)
    output, so :math:`\operatorname{diag}(J_i^\top J_i)_j = \sum_o (J_i)_{oj}^2`. It is the GGN
    :math:`J^\top H_\ell J` of the half squared error summed over the outputs and averaged over the
    batch (:math:`H_\ell = I/N`); other losses differ by their output-space Hessian.

    Args:
        fl: the model, loss and batch at a point (``fl.params``).
        samples: None -- **exact**: one ``jacrev`` per example (``outputs`` backward passes,
            vectorized; affordable for few outputs); an integer k -- **Monte Carlo**: the mean over
            k Rademacher vectors :math:`v \in \{\pm1\}^{O}` of :math:`(J_i^\top v)^{\odot 2}`, unbiased
            because :math:`E[vv^\top] = I` (k backward passes per example).
        generator: the random source of the Monte-Carlo vectors (on ``fl.device``'s CPU side).
        chunk: examples per ``vmap`` call.
    """
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be None (exact) or an integer >= 1, got {samples!r}")
    params = {k: v.detach() for k, v in fl.params.items()}

    def out_one(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(fl.model, p, (xi.unsqueeze(0),)).reshape(-1)

    def projected(p: dict[str, torch.Tensor], xi: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        _, pullback = vjp(lambda q: out_one(q, xi), p)
        (u,) = pullback(vi)
        return torch.cat([u[name].reshape(-1) for name in fl.names])

    total = torch.zeros(fl.n, dtype=fl.dtype, device=fl.device)
    count = 0
    for xc, _ in _chunks(fl, chunk):
        if samples is None:
            jac = vmap(jacrev(out_one), in_dims=(None, 0))(params, xc)  # {name: (c, outputs, *shape)}
            rows = torch.cat([jac[name].reshape(jac[name].shape[0], jac[name].shape[1], -1) for name in fl.names],
                             dim=2)
            total += rows.detach().pow(2).sum(dim=(0, 1))
        else:
            outputs = out_one(params, xc[0]).numel()
            for _ in range(samples):
                v = torch.randint(0, 2, (xc.shape[0], outputs), generator=generator).to(fl.device, fl.dtype) * 2 - 1
                u = vmap(projected, in_dims=(None, 0, 0))(params, xc, v)
                total += u.detach().pow(2).sum(0) / samples
        count += xc.shape[0]
    return total / count
