"""Batched damped inversion of many factors: one call per (size, dtype, device) group.

Blocks do not invert their factors one by one. They *request* an inverse from a
:class:`BatchedInverter`; :meth:`BatchedInverter.run` stacks the requests that share a size, dtype
and device and inverts them with one batched call to :func:`curvature.linalg.damped_inverse`
(float64 retry included), then hands each result back through its callback.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from curvature.linalg import InverseMethod, InversionStats, damped_inverse


class BatchedInverter:
    """Collects ``(matrix, damping, callback)`` requests and serves them in batches."""

    def __init__(self, method: InverseMethod = "cholesky", stats: InversionStats | None = None) -> None:
        self.method = method
        self.stats = stats if stats is not None else InversionStats()
        self._requests: dict[tuple, list[tuple[torch.Tensor, float, Callable[[torch.Tensor], None]]]] = defaultdict(list)

    def request(self, matrix: torch.Tensor, damping: float, callback: Callable[[torch.Tensor], None]) -> None:
        key = (matrix.shape[-1], matrix.dtype, matrix.device)
        self._requests[key].append((matrix, float(damping), callback))

    def run(self) -> int:
        """Invert everything requested; returns the number of inverses computed."""
        done = 0
        for (_, dtype, device), items in self._requests.items():
            stack = torch.stack([m for m, _, _ in items])
            damp = torch.tensor([d for _, d, _ in items], dtype=dtype, device=device)
            inverses = damped_inverse(stack, damp, self.method, self.stats)
            for (_, _, callback), inverse in zip(items, inverses):
                callback(inverse)
            done += len(items)
        self._requests.clear()
        return done
