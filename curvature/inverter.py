r"""Batched damped inversion of many factors: one call per (size, dtype, device) group.

Blocks do not invert their factors one by one. They *request* an inverse from a
:class:`BatchedInverter`; :meth:`BatchedInverter.run` stacks the requests that share a size, dtype
and device and inverts them with one batched call to :func:`curvature.linalg.damped_inverse_entries`
(float64 retry included), then hands each result back through its callback.

**Recovery.** An entry that cannot be inverted even in float64 (not finite, or :math:`F + \lambda I`
not positive definite) is never handed to its callback. With ``strict=True`` it raises
:class:`~curvature.linalg.InversionError`. Otherwise its ``on_failure(damping)`` is called: the
requester returns a larger damping to retry with at once (at most ``max_retries`` times), or None
to keep what it already has (e.g. its previous inverse). Each failure that the requester handled is
counted in ``stats.recovered``; a request without ``on_failure`` (or whose retries all fail)
raises :class:`~curvature.linalg.InversionError`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch

from curvature.linalg import (InverseMethod, InversionError, InversionStats, damped_inverse_entries, finish_inverses,
                              launch_inverses)

#: ``on_failure(damping) -> new damping to retry with, or None to keep the current inverse``
FailureHandler = Callable[[float], "float | None"]


class BatchedInverter:
    """Collects ``(matrix, damping, callback[, on_failure])`` requests and serves them in batches.

    Args:
        method: "cholesky" or "eigh".
        stats: where calls, float64 retries, failures and recoveries are counted.
        strict: raise :class:`~curvature.linalg.InversionError` on any failure instead of recovering.
        max_retries: how many immediate retries with a larger damping one request may get.
    """

    def __init__(self, method: InverseMethod = "cholesky", stats: InversionStats | None = None, *,
                 strict: bool = False, max_retries: int = 8) -> None:
        self.method = method
        self.stats = stats if stats is not None else InversionStats()
        self.strict = bool(strict)
        self.max_retries = int(max_retries)
        self._requests: dict[tuple, list[tuple[torch.Tensor, float, Callable[[torch.Tensor], None], FailureHandler | None]]] = defaultdict(list)

    def request(self, matrix: torch.Tensor, damping: float, callback: Callable[[torch.Tensor], None],
                on_failure: FailureHandler | None = None) -> None:
        key = (matrix.shape[-1], matrix.dtype, matrix.device)
        self._requests[key].append((matrix, float(damping), callback, on_failure))

    def run(self) -> int:
        """Invert everything requested; returns the number of inverses handed to callbacks.

        Every (size, dtype, device) group is launched first; the success masks of all groups are
        then read with one host synchronization (per device), and only failures cost more.
        """
        done = 0
        requests, self._requests = self._requests, defaultdict(list)
        launched = []
        for (_, dtype, device), items in requests.items():
            dampings = [d for _, d, _, _ in items]
            if not all(math.isfinite(d) for d in dampings):
                self.stats.failures += len(items)
                self.stats.failed_shapes.append((len(items), *items[0][0].shape))
                raise InversionError(f"the damping {dampings!r} is not finite")
            stack = torch.stack([m for m, _, _, _ in items])
            damp = torch.tensor(dampings, dtype=dtype, device=device)
            launched.append((items, launch_inverses(stack, damp, self.method)))
        masks: dict[torch.device, list[bool]] = {}
        for device in {p.ok.device for _, p in launched}:  # one read per device of every group's mask
            masks[device] = torch.cat([p.ok for _, p in launched if p.ok.device == device]).tolist()
        offsets: dict[torch.device, int] = defaultdict(int)
        for items, pending in launched:
            device = pending.ok.device
            start = offsets[device]
            offsets[device] = start + len(items)
            inverses, ok = finish_inverses(pending, masks[device][start:start + len(items)], self.stats)
            for (matrix, damping, callback, on_failure), inverse, good in zip(items, inverses, ok):
                if good:
                    callback(inverse)
                    done += 1
                else:
                    done += self._recover(matrix, damping, callback, on_failure)
        return done

    def _recover(self, matrix: torch.Tensor, damping: float, callback, on_failure: FailureHandler | None) -> int:
        if self.strict or on_failure is None:
            raise InversionError(
                f"damped factor of size {matrix.shape[-1]} (damping {damping:g}) is not finite or not positive "
                "definite even in float64; increase the damping"
                + ("" if self.strict else " (this request has no recovery handler)"))
        for _ in range(self.max_retries + 1):
            retry = on_failure(damping)
            if retry is None:  # the requester keeps what it has
                self.stats.recovered += 1
                return 0
            damping = float(retry)
            inverses, ok = damped_inverse_entries(matrix.unsqueeze(0), damping, self.method, self.stats)
            if bool(ok[0]):
                self.stats.recovered += 1
                callback(inverses[0])
                return 1
        raise InversionError(
            f"damped factor of size {matrix.shape[-1]} could not be inverted even with damping {damping:g} "
            f"after {self.max_retries} retries (is the factor finite?)")
