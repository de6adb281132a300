"""Data-parallel runs of the experiments (``torchrun --nproc_per_node N -m benchmarks.autoencoder ...``).

Every rank draws the same permutation (the shared seed), takes the global minibatch of N images
and trains on its contiguous shard (sizes differ by at most one); the model is wrapped in
``DistributedDataParallel`` and each rank's loss is its local mean times :math:`N_r W / N`, so the
averaged gradient is the global minibatch's (see :mod:`optimizers.data_parallel`). Parameters are
identical on every rank, so every rank evaluates the same losses; only rank 0 prints, writes
checkpoints, ``results.json``, the CSV and the plots. Without torchrun's environment this is one
process and nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from optimizers.communicator import Communicator, LocalCommunicator, init_process_group_from_env


@dataclass
class Parallel:
    """This process's place in a data-parallel run (one process: rank 0 of 1)."""

    comm: Communicator = field(default_factory=LocalCommunicator)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def is_main(self) -> bool:
        return self.comm.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of a global batch of ``n`` that this rank trains on (sizes differ by <= 1)."""
        base, extra = divmod(n, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def loss_weight(self, n: int) -> float:
        r""":math:`N_r W / N`: the local mean loss times this is the rank's share of the global mean."""
        lo, hi = self.shard(n)
        return (hi - lo) * self.world_size / n

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` with several ranks, else ``model``."""
        if self.world_size == 1:
            return model
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def mean(self, value: float) -> float:
        """The mean over ranks of a number (one small all-reduce; the value itself on one process)."""
        if self.world_size == 1:
            return value
        (total,) = self.comm.all_reduce_sum([torch.tensor([value], dtype=torch.float64, device=self.comm.device)])
        return float(total) / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def setup_parallel(device: str | None) -> Parallel:
    """A :class:`Parallel` from torchrun's environment (gloo for CPU, NCCL for ``cuda`` devices)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Parallel()
    cuda = device is not None and device.startswith("cuda")
    return Parallel(init_process_group_from_env("nccl" if cuda else "gloo"))
