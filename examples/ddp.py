"""Data-parallel K-BFGS with DistributedDataParallel: the minimal training loop.

    torchrun --nproc_per_node 2 examples/ddp.py            # gloo, CPU
    torchrun --nproc_per_node 2 examples/ddp.py --cuda     # NCCL, one GPU per rank

Every rank draws the same global batch and trains on its shard; DDP averages the gradients and the
optimizer (given the DDP model) averages its curvature statistics over the ranks, so the run is the
one-process run with the global batch. ``distribute="layerwise"`` spreads the factor work over
the ranks. Rank 0 saves the checkpoint; it loads at any world size.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from optimizers import KBFGS
from optimizers.communicator import init_process_group_from_env


def train(steps: int = 30, cuda: bool = False, checkpoint: str | None = None) -> list[float]:
    """Train a small regression MLP; returns the global loss of every step (on every rank)."""
    comm = init_process_group_from_env("nccl" if cuda else "gloo")
    rank, world = comm.rank, comm.world_size
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = KBFGS(net, lr=0.3, damping=0.3, distribute="layerwise")
    g = torch.Generator().manual_seed(1)
    x_all, w_true = torch.randn(2048, 8, generator=g), torch.randn(8, 4, generator=g)
    y_all = torch.tanh(x_all @ w_true)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (256,), generator=g)  # the same global batch everywhere
        x, y = x_all[idx][rank::world].to(device), y_all[idx][rank::world].to(device)  # equal shards

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        losses.append(opt.data_parallel.agreed_loss(float(loss.detach())))  # the global batch's loss
    if rank == 0:
        print(f"world size {world}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
              f"{opt.data_parallel.comm.stats.bytes / steps:.0f} optimizer bytes/step")
        if checkpoint is not None:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint)
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpoint", default=None, help="rank 0 saves model and optimizer here")
    args = parser.parse_args()
    train(args.steps, args.cuda, args.checkpoint)
