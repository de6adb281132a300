"""The after-step updates of many factors, computed together: double damping, guarded inverse-BFGS and pair checks.

After each K-BFGS step every layer damps its H_g pair and updates H_g and H_a by inverse BFGS. The
vector part of that work is a few dozen tiny kernels per factor; on a network of small layers their
launch cost, not their arithmetic, is the time. An :class:`UpdateBatch` collects the requests of all
factors and computes them as the rows of padded matrices (:mod:`curvature.rows`), a few kernels for
all layers. It follows the split-at-one-read pattern of the factors:

1. factors register requests: :meth:`UpdateBatch.add_damping` (a pair to damp, with a continuation that
   receives the damped candidate and may register an update or a check), :meth:`UpdateBatch.add_update`
   (a guarded inverse-BFGS update) and :meth:`UpdateBatch.add_check` (the skip rules' scalars of a pair that
   its factor uses another way, e.g. appends to an L-BFGS memory); nothing is computed yet;
2. :meth:`UpdateBatch.prepare` computes every damping, then every update and check, on the device, without a
   host synchronization, and returns all the scalars their decisions read, request by request;
3. the caller reads them with the step's other scalars and hands them back with :meth:`UpdateBatch.receive`;
   each request's owner then decides from its request's ``values`` and commits (or skips).

Requests of different dtypes, devices or damping settings are computed in separate groups. Nothing is
committed by the batch itself, so a step that fails before the owners' decisions changes no factor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from curvature.bfgs import pair_scalar_tensors_many, prepare_guarded_updates
from curvature.pair_damping import DampingDraft, DoubleDamping


@dataclass
class PendingDamping:
    """A pair to damp: after :meth:`UpdateBatch.prepare`, ``draft`` (the damped candidate) and ``scalars`` (the
    draft's, then those the continuation returned); after :meth:`UpdateBatch.receive`, their ``values``."""

    damping: DoubleDamping
    s: torch.Tensor
    y: torch.Tensor
    Hy: torch.Tensor
    then: Callable[[DampingDraft], list[torch.Tensor]]
    draft: DampingDraft | None = None
    scalars: list[torch.Tensor] = field(default_factory=list)
    values: list[float] | None = None


@dataclass
class PendingUpdate:
    """A guarded inverse-BFGS update of ``H``: after :meth:`UpdateBatch.prepare`, the candidate ``updated`` and
    the ``scalars`` its guard reads; after :meth:`UpdateBatch.receive`, their ``values`` (what
    :func:`~curvature.bfgs.finish_guarded_update` takes)."""

    H: torch.Tensor
    s: torch.Tensor
    y: torch.Tensor
    reference_norm: torch.Tensor | float | None
    updated: torch.Tensor | None = None
    scalars: list[torch.Tensor] = field(default_factory=list)
    values: list[float] | None = None


@dataclass
class PendingCheck:
    """A pair to check by the skip rules: after :meth:`UpdateBatch.prepare`, the ``scalars`` of
    :func:`~curvature.bfgs.pair_scalar_tensors`; after :meth:`UpdateBatch.receive`, their ``values`` (what
    :func:`~curvature.bfgs.pair_values` and :func:`~curvature.bfgs.pair_reason` take)."""

    s: torch.Tensor
    y: torch.Tensor
    reference_norm: torch.Tensor | float | None
    scalars: list[torch.Tensor] = field(default_factory=list)
    values: list[float] | None = None


class UpdateBatch:
    """Dampings, guarded inverse-BFGS updates and pair checks of several factors, computed together (see the module)."""

    def __init__(self) -> None:
        self.pending: list[PendingDamping | PendingUpdate | PendingCheck] = []
        self.state = "open"  # then "preparing" (continuations may add updates and checks), then "prepared"

    def add_damping(self, damping: DoubleDamping, s: torch.Tensor, y: torch.Tensor, Hy: torch.Tensor,
                    then: Callable[[DampingDraft], list[torch.Tensor]]) -> PendingDamping:
        """Damp ``(s, y)`` against ``H`` (``Hy`` = H applied to ``y``); ``then(draft)`` is called during
        :meth:`prepare` with the damped candidate and returns further scalars to read with the draft's."""
        return self._add(PendingDamping(damping, s, y, Hy, then), ("open",))

    def add_update(self, H: torch.Tensor, s: torch.Tensor, y: torch.Tensor,
                   reference_norm: torch.Tensor | float | None = None) -> PendingUpdate:
        """A candidate :func:`~curvature.bfgs.bfgs_inverse_update` of ``H`` with ``(s, y)`` and its guard's scalars
        (registered during :meth:`prepare` too, by a damping's continuation)."""
        return self._add(PendingUpdate(H, s, y, reference_norm), ("open", "preparing"))

    def add_check(self, s: torch.Tensor, y: torch.Tensor, reference_norm: torch.Tensor | float | None = None
                  ) -> PendingCheck:
        """The skip rules' scalars of the pair ``(s, y)`` (registered during :meth:`prepare` too, by a damping's
        continuation)."""
        return self._add(PendingCheck(s, y, reference_norm), ("open", "preparing"))

    def _add(self, request, states: tuple[str, ...]):
        if self.state not in states:
            raise RuntimeError(f"UpdateBatch: a request added while {self.state}; add every request before prepare "
                               "(a damping's continuation may add updates and checks only)")
        self.pending.append(request)
        return request

    def prepare(self) -> list[torch.Tensor]:
        """Compute every request (dampings first, then updates and checks) and return their scalars, request by
        request."""
        if self.state != "open":
            raise RuntimeError("UpdateBatch.prepare called twice")
        self.state = "preparing"
        try:
            dampings = [p for p in self.pending if isinstance(p, PendingDamping)]
            for group in _groups(dampings, _damping_key).values():
                drafts = group[0].damping.prepare_many([p.s for p in group], [p.y for p in group], [p.Hy for p in group])
                for p, draft in zip(group, drafts):
                    p.draft = draft
                    p.scalars = draft.scalars + list(p.then(draft))
            updates = [p for p in self.pending if isinstance(p, PendingUpdate)]
            for group in _groups(updates, lambda p: (p.s.dtype, p.s.device)).values():
                results = prepare_guarded_updates([p.H for p in group], [p.s for p in group], [p.y for p in group],
                                                  [p.reference_norm for p in group])
                for p, (updated, scalars) in zip(group, results):
                    p.updated, p.scalars = updated, scalars
            checks = [p for p in self.pending if isinstance(p, PendingCheck)]
            for group in _groups(checks, lambda p: (p.s.dtype, p.s.device)).values():
                results = pair_scalar_tensors_many([p.s for p in group], [p.y for p in group],
                                                   [p.reference_norm for p in group])
                for p, scalars in zip(group, results):
                    p.scalars = scalars
        finally:
            self.state = "prepared"
        return [x for p in self.pending for x in p.scalars]

    def receive(self, values: list[float]) -> None:
        """The values of :meth:`prepare`'s scalars, read on the host, handed to each request."""
        if self.state != "prepared":
            raise ValueError("UpdateBatch.receive before prepare: prepare the batch and read its scalars first")
        expected = sum(len(p.scalars) for p in self.pending)
        if len(values) != expected:
            raise ValueError(f"UpdateBatch.receive needs the {expected} values of prepare's scalars, got {len(values)}")
        start = 0
        for p in self.pending:
            p.values = list(values[start:start + len(p.scalars)])
            start += len(p.scalars)


def _damping_key(p: PendingDamping) -> tuple:
    """Requests damped together: the same damping class and settings, dtype and device."""
    return (type(p.damping), dataclasses.astuple(p.damping), p.s.dtype, p.s.device)


def _groups(requests: list, key: Callable) -> dict:
    groups: dict = {}
    for p in requests:
        groups.setdefault(key(p), []).append(p)
    return groups
