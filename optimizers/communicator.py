r"""Collectives for data-parallel curvature: a small communicator over ``torch.distributed``.

Everything the optimizers exchange between processes goes through a :class:`Communicator`:

* :meth:`~Communicator.all_reduce_sum` -- a *coalesced* sum: all tensors of one dtype and device
  are packed into one flat buffer and reduced by one collective call;
* :meth:`~Communicator.weighted_mean` -- the average of per-rank tensors weighted by each rank's
  count (row or sample count), :math:`\bar x = \sum_r w_r x_r / \sum_r w_r`, so that the statistic
  of the global batch is recovered exactly when ranks hold batches of different sizes; the weights
  travel in the same buffer, so this is still one call per dtype;
* :meth:`~Communicator.broadcast_from_owners` -- each tensor is sent from the rank that owns it,
  one flat buffer (one call) per owning rank and dtype (layerwise work distribution);
* :meth:`~Communicator.broadcast_object` -- a picklable object from one rank (states whose shapes
  only the owner knows);
* :meth:`~Communicator.any_true` -- the agreement primitive: one small all-reduce of flags, true on
  every rank when it is true on any rank.

:class:`LocalCommunicator` is the single-process implementation (every operation is the identity
and nothing is counted); :class:`TorchCommunicator` wraps a ``torch.distributed`` process group
(gloo on CPU, NCCL on GPU: tensors are sent from the device they live on; nothing is home-made for
transport). Both keep a :class:`CommStats` of calls and payload bytes, per operation, in total and
for the current step.

Bytes are the payload handed to each collective (``numel * element_size`` of the flat buffer),
counted once per call on every rank; how many bytes cross the wire depends on the backend's
algorithm (a ring all-reduce moves about :math:`2(W-1)/W` times the payload per rank).
"""

from __future__ import annotations

import io
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist


@dataclass
class OpStats:
    """Calls and payload bytes of one kind of collective."""

    calls: int = 0
    bytes: int = 0

    def add(self, nbytes: int) -> None:
        self.calls += 1
        self.bytes += int(nbytes)

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "bytes": self.bytes}


@dataclass
class CommStats:
    """Counters of the collectives a communicator issued: in total and since :meth:`begin_step`.

    ``by_op`` / ``step_by_op`` map an operation name (``"all_reduce"``, ``"broadcast"``,
    ``"broadcast_object"``) to :class:`OpStats`; ``steps`` counts :meth:`begin_step` calls.
    """

    by_op: dict[str, OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    step_by_op: dict[str, OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    steps: int = 0

    def record(self, op: str, nbytes: int) -> None:
        self.by_op[op].add(nbytes)
        self.step_by_op[op].add(nbytes)

    def begin_step(self) -> None:
        """Start counting a new step (the per-step counters restart from zero)."""
        self.step_by_op = defaultdict(OpStats)
        self.steps += 1

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.by_op.values())

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.by_op.values())

    @property
    def step_calls(self) -> int:
        return sum(s.calls for s in self.step_by_op.values())

    @property
    def step_bytes(self) -> int:
        return sum(s.bytes for s in self.step_by_op.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls, "bytes": self.bytes, "steps": self.steps,
            "step_calls": self.step_calls, "step_bytes": self.step_bytes,
            "by_op": {k: v.as_dict() for k, v in self.by_op.items()},
            "step_by_op": {k: v.as_dict() for k, v in self.step_by_op.items()},
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _groups(tensors: Sequence[torch.Tensor]) -> "OrderedDict[tuple, list[int]]":
    """Indices of ``tensors`` grouped by (dtype, device), in first-seen order (deterministic)."""
    out: OrderedDict[tuple, list[int]] = OrderedDict()
    for i, t in enumerate(tensors):
        out.setdefault((t.dtype, t.device), []).append(i)
    return out


def _flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat: torch.Tensor, targets: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in targets:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


class Communicator:
    """Interface and shared logic; subclasses implement the four primitive collectives.

    Attributes:
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of processes W.
        stats: a :class:`CommStats` of everything issued.
    """

    rank: int = 0
    world_size: int = 1

    def __init__(self) -> None:
        self.stats = CommStats()

    # -------------------------------------------------------------- primitives (subclasses)
    def _all_reduce_flat(self, flat: torch.Tensor) -> None:
        """In-place sum of a flat buffer over all ranks."""
        raise NotImplementedError

    def _broadcast_flat(self, flat: torch.Tensor, src: int) -> None:
        """In-place broadcast of a flat buffer from ``src``."""
        raise NotImplementedError

    def _broadcast_object(self, obj: Any, src: int) -> Any:
        raise NotImplementedError

    # -------------------------------------------------------------- coalesced operations
    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The elementwise sums over ranks of ``tensors`` (new tensors; inputs are not modified).

        One collective per (dtype, device) group. Every rank must pass tensors of the same shapes,
        dtypes and order.
        """
        tensors = list(tensors)
        if not self.distributed or not tensors:
            return [t.clone() for t in tensors]
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for _, idx in _groups(tensors).items():
            flat = _flatten(tensors[i] for i in idx)
            self._all_reduce_flat(flat)
            self.stats.record("all_reduce", _nbytes(flat))
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                out[i] = flat[offset:offset + n].view_as(tensors[i])
                offset += n
        return out  # type: ignore[return-value]

    def weighted_mean(self, items: Sequence[tuple[torch.Tensor, float]]) -> list[torch.Tensor]:
        r"""For each ``(x_r, w_r)``: :math:`\sum_r w_r x_r / \sum_r w_r` over ranks.

        ``x_r`` is this rank's statistic (a mean over its ``w_r`` rows or samples); the result is
        the mean over all ranks' rows. The weights ride in the same buffers, so this is one
        collective per (dtype, device). A weight may be 0 on some ranks but its sum must be > 0.
        """
        items = list(items)
        if not self.distributed or not items:
            return [x.clone() for x, _ in items]
        payload = [x * float(w) for x, w in items]
        weights: dict[tuple, list[int]] = _groups([x for x, _ in items])
        extra = [torch.tensor([float(items[i][1]) for i in idx], dtype=dtype, device=device)
                 for (dtype, device), idx in weights.items()]
        reduced = self.all_reduce_sum(payload + extra)
        sums, totals = reduced[: len(items)], reduced[len(items):]
        out: list[torch.Tensor | None] = [None] * len(items)
        for (key, idx), total in zip(weights.items(), totals):
            for j, i in enumerate(idx):
                w = float(total[j])
                if not w > 0:
                    raise RuntimeError("weighted_mean: the weights sum to zero over all ranks")
                out[i] = sums[i] / w
        return out  # type: ignore[return-value]

    def broadcast_from_owners(self, tensors: Sequence[torch.Tensor], owners: Sequence[int]) -> None:
        """In place: every ``tensors[i]`` takes the value it has on rank ``owners[i]``.

        One collective per owning rank and (dtype, device), in rank order. Every rank must pass
        tensors of the same shapes, dtypes and order (non-owners' values are overwritten).
        """
        tensors, owners = list(tensors), list(owners)
        if len(tensors) != len(owners):
            raise ValueError("broadcast_from_owners: one owner per tensor")
        if not self.distributed or not tensors:
            return
        for src in range(self.world_size):
            mine = [i for i, o in enumerate(owners) if o == src]
            if not mine:
                continue
            for _, idx in _groups([tensors[i] for i in mine]).items():
                chosen = [tensors[mine[j]] for j in idx]
                flat = _flatten(chosen)
                self._broadcast_flat(flat, src)
                self.stats.record("broadcast", _nbytes(flat))
                if self.rank != src:
                    _unflatten_into(flat, chosen)

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``obj`` as it is on rank ``src`` (pickled; tensors keep their exact bits)."""
        if not self.distributed:
            return obj
        out = self._broadcast_object(obj if self.rank == src else None, src)
        buf = io.BytesIO()
        torch.save(out, buf)  # the payload size, counted identically on every rank
        self.stats.record("broadcast_object", buf.tell())
        return out

    def any_true(self, *flags: bool) -> list[bool]:
        """For each flag: whether it is true on any rank (one small all-reduce)."""
        if not self.distributed:
            return [bool(f) for f in flags]
        (total,) = self.all_reduce_sum([torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64,
                                                     device=self.device)])
        return [bool(v > 0) for v in total.tolist()]

    @property
    def device(self) -> torch.device:
        """The device small control tensors are placed on (the GPU for NCCL)."""
        return torch.device("cpu")


class LocalCommunicator(Communicator):
    """One process: every collective is the identity and issues nothing."""

    rank = 0
    world_size = 1

    def _all_reduce_flat(self, flat):  # pragma: no cover - never called with one process
        return None

    def _broadcast_flat(self, flat, src):  # pragma: no cover
        return None

    def _broadcast_object(self, obj, src):  # pragma: no cover
        return obj


class TorchCommunicator(Communicator):
    """Collectives of a ``torch.distributed`` process group (the default group unless ``group``).

    The group must be initialized (``torch.distributed.init_process_group``, e.g. by ``torchrun``);
    with NCCL, tensors must live on this rank's GPU (``torch.cuda.set_device(local_rank)``).
    """

    def __init__(self, group: Any = None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCommunicator needs an initialized process group: call "
                "torch.distributed.init_process_group(backend='gloo' or 'nccl') first (torchrun sets the "
                "environment), or use LocalCommunicator for one process"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _global(self, src: int) -> int:
        return src if self.group is None else dist.get_global_rank(self.group, src)

    def _all_reduce_flat(self, flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)

    def _broadcast_flat(self, flat: torch.Tensor, src: int) -> None:
        dist.broadcast(flat, src=self._global(src), group=self.group)

    def _broadcast_object(self, obj: Any, src: int) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group,
                                   device=self.device if self.backend == "nccl" else None)
        return box[0]


def default_communicator() -> Communicator:
    """A :class:`TorchCommunicator` when ``torch.distributed`` is initialized, else a :class:`LocalCommunicator`."""
    if dist.is_available() and dist.is_initialized():
        return TorchCommunicator()
    return LocalCommunicator()


def init_process_group_from_env(backend: str | None = None, timeout_s: float = 600.0) -> Communicator:
    """Initialize ``torch.distributed`` from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1`` and return a communicator.

    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise. An already initialized
    group is used as it is. Without those variables (a plain ``python`` run) nothing is initialized
    and a :class:`LocalCommunicator` is returned.
    """
    import os

    if dist.is_available() and dist.is_initialized():
        return TorchCommunicator()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return LocalCommunicator()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return TorchCommunicator()


__all__ = ["CommStats", "Communicator", "LocalCommunicator", "OpStats", "TorchCommunicator",
           "default_communicator", "init_process_group_from_env"]
