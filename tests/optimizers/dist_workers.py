"""Worker functions for the distributed tests, run in processes spawned by ``torch.multiprocessing``.

Not a test module (pytest does not collect it): the tests put this directory on ``sys.path`` and
import it as ``dist_workers`` so that spawned children can unpickle the functions. Each worker
initializes a gloo process group from a ``file://`` rendezvous, runs one scenario and writes its
results with ``torch.save`` to ``<out>/rank<r>.pt`` for the parent to compare.
"""

from __future__ import annotations

import os
import threading
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


# ---------------------------------------------------------------------------------------------
# optimizer scenarios: the same 20-step runs on one process (the parent's oracle) and on W ranks

B = 10
STEPS = 20
D = torch.float64
SPLITS = {(2, "equal"): [5, 5], (2, "unequal"): [3, 7], (3, "unequal"): [2, 3, 5], (4, "equal"): [3, 3, 2, 2],
          (4, "unequal"): [1, 2, 3, 4]}
#: make_model seeds the global generator: ranks simulated by threads build their models one at a time
_SEED_LOCK = threading.Lock()


def make_model(seed: int = 0) -> torch.nn.Module:
    from torch import nn

    with _SEED_LOCK:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)


def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + k)
    return torch.randn(B, 5, generator=g, dtype=D), torch.rand(B, 3, generator=g, dtype=D)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample summed BCE-with-logits, mean over the batch (the Bernoulli likelihood's loss)."""
    return torch.nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none").sum(1).mean()


def make_optimizer(kind: str, model, **kw):
    from torch import nn

    from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer
    from optimizers.recipes import diagonal_block, kbfgsl_block, kfac_block

    if kind == "kfac":
        return KFAC(model, lr=0.3, damping=0.5, inverse_update_freq=3, inverse_warmup_steps=2, **kw)
    if kind == "kfac_mc":
        return KFAC(model, lr=0.3, damping=0.5, inverse_update_freq=3, inverse_warmup_steps=2, fisher="mc",
                    likelihood="bernoulli", seed=3, **kw)
    if kind == "kbfgs":
        return KBFGS(model, lr=0.2, damping=0.3, **kw)
    if kind == "kbfgsl":
        return KBFGSL(model, lr=0.2, damping=0.3, memory=4, **kw)
    if kind == "mixed":
        return CurvatureOptimizer(model, lr=0.2, damping=0.3, inverse_update_freq=2,
                                  blocks={nn.Linear: kbfgsl_block(memory=3), "2": kfac_block(), "4": diagonal_block()},
                                  **kw)
    raise ValueError(kind)


def flat_state(opt, model) -> torch.Tensor:
    """Parameters and every tensor of the optimizer's state_dict, flattened in a fixed order."""
    parts = [p.detach().reshape(-1) for p in model.parameters()]

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                parts.append(obj.detach().reshape(-1).to(D))
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                walk(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)

    walk(opt.state_dict())
    return torch.cat(parts)


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_run(kind: str, steps: int = STEPS, start: int = 0, checkpoint: dict | None = None) -> dict:
    """One process, the full batch of B: parameters after every step (the oracle)."""
    from optimizers.communicator import LocalCommunicator

    model = make_model()
    opt = make_optimizer(kind, model, distributed=LocalCommunicator())
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
    trajectory = []
    for k in range(start, start + steps):
        x, y = batch(k)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        trajectory.append(params(model))
    return {"params": trajectory, "model": model.state_dict(), "opt": opt.state_dict(),
            "skipped": opt.skipped_steps}


def distributed_run(rank: int, world: int, kind: str, distribute: str, wrap: str, split: list[int],
                    steps: int = STEPS, start: int = 0, checkpoint: dict | None = None,
                    nan_loss_at: tuple[int, int] | None = None, nan_second_at: tuple[int, int] | None = None,
                    comm=None) -> dict:
    """W ranks, rank r on ``split[r]`` rows of each batch; DDP ("ddp") or a plain module whose
    gradients :func:`all_reduce_gradients` averages ("plain"). ``comm``: the communicator of a plain
    module (default: a TorchCommunicator over the process group; the thread tests pass their own)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from optimizers.communicator import TorchCommunicator
    from optimizers.data_parallel import all_reduce_gradients

    comm = comm if comm is not None else TorchCommunicator()
    model = make_model()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    net = DDP(model) if wrap == "ddp" else model
    reductions = []
    if wrap == "ddp":
        def count_hook(state, bucket):
            reductions.append(1)
            fut = torch.distributed.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        net.register_comm_hook(None, count_hook)
        opt = make_optimizer(kind, net, distribute=distribute)
    else:
        opt = make_optimizer(kind, model, distributed=comm, distribute=distribute)
    if checkpoint is not None:
        opt.load_state_dict(checkpoint["opt"])
    lo = sum(split[:rank])
    n = split[rank]
    weight = n * world / sum(split)  # local mean * N_r W / B: DDP's average is the global mean
    trajectory, states, per_step_reductions, comm_bytes = [], [], [], []
    for k in range(start, start + steps):
        x, y = batch(k)
        x, y = x[lo:lo + n], y[lo:lo + n]
        calls = []

        def closure():
            calls.append(1)
            opt.zero_grad()
            loss = loss_fn(net(x), y) * weight
            loss.backward()
            if wrap == "plain":
                all_reduce_gradients(model, comm)
            if nan_loss_at == (k, rank) and len(calls) == 1:
                return loss * float("nan")
            if nan_second_at == (k, rank) and len(calls) == 2:
                return loss * float("nan")
            return loss

        before = len(reductions)
        opt.step(closure)
        per_step_reductions.append(len(reductions) - before)
        trajectory.append(params(model))
        states.append(flat_state(opt, model))
        comm_bytes.append(opt.data_parallel.comm.stats.as_dict())
    return {"params": trajectory, "states": states, "reductions": per_step_reductions, "comm": comm_bytes,
            "model": model.state_dict(), "opt": opt.state_dict(), "counters": opt.counters,
            "closure_calls": None}


def optimizer_suite(rank: int, world: int, cases: list[dict]) -> list[dict]:
    return [distributed_run(rank, world, **case) for case in cases]


# ---------------------------------------------------------------------------------------------
# integration: examples/ddp.py and the experiment runner on W ranks

RUNNER_CONFIG = {"dataset": "curves", "n_train": 200, "n_test": 100, "batch_size": 50, "epochs": 2,
                 "widths": [196, 16, 4, 16, 196], "threads": 1, "optimizers": ["kbfgs", "kfac"]}


def runner_data():
    from benchmarks.experiment.datasets import DataBundle

    g = torch.Generator().manual_seed(5)
    return DataBundle(torch.rand(200, 196, generator=g), torch.rand(100, 196, generator=g), "synthetic")


def run_runner(out: str, parallel=None) -> dict[str, float]:
    from benchmarks.experiment import build_config, run_experiment

    cfg = build_config(config_file=dict(RUNNER_CONFIG))
    res = run_experiment(cfg, out, progress=False, print_fn=None, data=runner_data(), parallel=parallel)
    return {name: rec.final_train_loss for name, rec in res.records.items()}


def run_example(steps: int = 8) -> list[float]:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "ddp.py"
    spec = importlib.util.spec_from_file_location("example_ddp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train(steps)


def integration_scenario(rank: int, world: int, out: str) -> dict:
    from benchmarks.experiment.parallel import Parallel
    from optimizers.communicator import TorchCommunicator

    rank_out = Path(out) / f"rank{rank}"
    finals = run_runner(str(rank_out), Parallel(TorchCommunicator()))
    files = sorted(str(p.relative_to(rank_out)) for p in rank_out.rglob("*") if p.is_file())
    return {"finals": finals, "files": files, "example": run_example()}
