"""Worker functions for the distributed tests, run in processes spawned by ``torch.multiprocessing``.

Not a test module (pytest does not collect it): the tests put this directory on ``sys.path`` and
import it as ``dist_workers`` so that spawned children can unpickle the functions. Each worker
initializes a gloo process group from a ``file://`` rendezvous, runs one scenario and writes its
results with ``torch.save`` to ``<out>/rank<r>.pt`` for the parent to compare.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60.0
#: ``forkserver``: one server process imports torch and this module once per test session and forks
#: every worker from it (a fresh ``spawn`` re-imports torch in every child, many seconds on a busy
#: machine). The server has run no OpenMP region, so forking it is safe.
START_METHOD = "forkserver"
_PRELOADED = False


def _preload() -> None:
    global _PRELOADED
    if not _PRELOADED:
        import multiprocessing

        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["torch", "torch.distributed", "optimizers", "dist_workers"])
        _PRELOADED = True


def _entry(rank: int, world: int, init_file: str, out: str, scenario: Callable, kwargs: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        result = scenario(rank, world, **kwargs)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(scenario: Callable, world: int, tmp_path: Path, **kwargs) -> list:
    """Run ``scenario(rank, world, **kwargs)`` on ``world`` gloo processes; the ranks' results."""
    out = tmp_path / f"out{world}_{scenario.__name__}"
    out.mkdir(parents=True, exist_ok=True)
    init_file = tmp_path / f"init{world}_{scenario.__name__}"
    _preload()
    try:
        mp.start_processes(_entry, args=(world, str(init_file), str(out), scenario, kwargs), nprocs=world,
                           join=True, start_method=START_METHOD)
    except Exception as exc:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("*.err")))
        raise AssertionError(f"a rank failed:\n{errors}") from exc
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------------------------
# communicator scenarios

def rank_tensors(rank: int) -> dict[str, torch.Tensor]:
    """Deterministic per-rank inputs (the parent rebuilds them as the oracle)."""
    g = torch.Generator().manual_seed(100 + rank)
    return {
        "a64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "b64": torch.randn(5, generator=g, dtype=torch.float64),
        "c32": torch.randn(2, 2, generator=g, dtype=torch.float32),
        "rows": torch.randn(2 + 3 * rank, 3, generator=g, dtype=torch.float64),  # unequal counts
    }


def communicator_scenario(rank: int, world: int) -> dict:
    from optimizers.communicator import TorchCommunicator

    comm = TorchCommunicator()
    t = rank_tensors(rank)
    out: dict = {"rank": comm.rank, "world": comm.world_size}

    comm.stats.begin_step()
    out["sum"] = comm.all_reduce_sum([t["a64"], t["c32"], t["b64"]])
    out["sum_stats"] = comm.stats.as_dict()

    comm.stats.begin_step()
    rows = t["rows"]
    gram = rows.T @ rows / rows.shape[0]
    out["wmean"] = comm.weighted_mean([(rows.mean(0), rows.shape[0]), (gram, rows.shape[0]),
                                       (t["c32"], float(rank + 1))])
    out["wmean_stats"] = comm.stats.as_dict()

    comm.stats.begin_step()
    owned = [torch.full((2, 3), float(rank), dtype=torch.float64),      # owner 0
             torch.full((4,), 10.0 + rank, dtype=torch.float64),         # owner world-1
             torch.full((3,), 20.0 + rank, dtype=torch.float32),         # owner world-1 (other dtype)
             torch.full((1,), 30.0 + rank, dtype=torch.float64)]         # owner 0
    owners = [0, world - 1, world - 1, 0]
    comm.broadcast_from_owners(owned, owners)
    out["owned"] = owned
    out["owned_stats"] = comm.stats.as_dict()

    comm.stats.begin_step()
    obj = {"x": torch.arange(3.0) + rank, "n": rank}
    out["object"] = comm.broadcast_object(obj, src=world - 1)
    out["any"] = comm.any_true(rank == world - 1, False, True)
    out["final_stats"] = comm.stats.as_dict()
    return out
