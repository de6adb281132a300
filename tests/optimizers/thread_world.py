"""W ranks simulated by threads in one process, for tests that a mutation tool must see (it cannot
follow spawned processes): a :class:`ThreadComm` per rank implements the Communicator primitives by
exchanging through shared slots between :class:`threading.Barrier` waits, so every collective is exact
(sums in rank order) and its calls are logged once, from the source or rank 0.

Not a test module: the thread tests of the communicator and of data-parallel training import it.
"""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from optimizers.communicator import Communicator

BARRIER_TIMEOUT_S = 10


class World:
    """The shared state of ``size`` thread ranks: one barrier, one slot per rank, the collective log."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=BARRIER_TIMEOUT_S)
        self.slots: list = [None] * size
        self.log: list = []  # (op, src, dtype, numel) once per collective, from rank 0 or the source


class ThreadComm(Communicator):
    """Rank ``rank`` of a :class:`World`: the primitives exchange through shared slots between barriers."""

    def __init__(self, world: World, rank: int) -> None:
        super().__init__()
        self.w, self.rank, self.world_size = world, rank, world.size

    def _all_reduce_flat(self, flat: torch.Tensor) -> None:
        w = self.w
        w.slots[self.rank] = flat.clone()
        w.barrier.wait()
        total = w.slots[0].clone()
        for r in range(1, w.size):
            total += w.slots[r]
        if self.rank == 0:
            w.log.append(("all_reduce", None, flat.dtype, flat.numel()))
        w.barrier.wait()
        flat.copy_(total)

    def _broadcast_flat(self, flat: torch.Tensor, src: int) -> None:
        w = self.w
        if self.rank == src:
            w.slots[0] = flat.clone()
            w.log.append(("broadcast", src, flat.dtype, flat.numel()))
        w.barrier.wait()
        value = w.slots[0]
        w.barrier.wait()
        assert value.shape == flat.shape and value.dtype == flat.dtype
        flat.copy_(value)

    def _broadcast_object(self, obj: Any, src: int) -> Any:
        w = self.w
        if self.rank == src:
            w.slots[0] = pickle.dumps(obj)
            w.log.append(("broadcast_object", src, None, None))
        else:
            assert obj is None  # non-sources hand over nothing
        w.barrier.wait()
        data = w.slots[0]
        w.barrier.wait()
        return pickle.loads(data)


def run_ranks(size: int, fn: Callable[[ThreadComm], Any]) -> tuple[list, World]:
    """``fn(comm)`` on every rank of a fresh world, one thread each; (results by rank, world).

    A rank that raises breaks the barrier, so the others fail at their next collective instead of
    waiting for the timeout; the first exception is re-raised here."""
    world = World(size)
    comms = [ThreadComm(world, r) for r in range(size)]

    def guarded(comm: ThreadComm) -> Any:
        try:
            return fn(comm)
        except BaseException:
            world.barrier.abort()
            raise

    with ThreadPoolExecutor(size) as pool:
        results = list(pool.map(guarded, comms))
    return results, world
