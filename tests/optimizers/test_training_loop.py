"""A realistic training loop, resumed from disk in a new process, is bit-identical to the run that was
never interrupted: two parameter groups (different lr and weight decay), OneCycleLR (lr and momentum
cycling), gradient clipping, gradient accumulation over 2 micro-batches, for KFAC (the caller's own
loop, no closure), K-BFGS, K-BFGS(L) and a mixed composition (closures that run both micro-batches)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("kfac", "kbfgs", "kbfgsl", "mixed")
STEPS, SPLIT = 8, 4

LOOP = r'''
import sys
import torch
from torch import nn
from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer, diagonal_block, kbfgsl_block, kfac_block

D = torch.float64


def build(kind, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.LayerNorm(10), nn.Tanh(),
                          nn.Linear(10, 3)).to(D)
    weights = [p for n, p in model.named_parameters() if p.ndim == 2]
    others = [p for n, p in model.named_parameters() if p.ndim != 2]  # biases and LayerNorm
    groups = [{"params": weights, "lr": 0.1, "weight_decay": 1e-3}, {"params": others, "lr": 0.05, "weight_decay": 0.0}]
    common = dict(damping=0.3, fallback="adam", param_groups=groups)
    if kind == "kfac":
        opt = KFAC(model, lr=0.1, inverse_update_freq=2, **common)
    elif kind == "kbfgs":
        opt = KBFGS(model, lr=0.1, **common)
    elif kind == "kbfgsl":
        opt = KBFGSL(model, lr=0.1, memory=3, **common)
    else:
        opt = CurvatureOptimizer(model, 0.1, {"0": kfac_block(), "2": kbfgsl_block(memory=3), "5": diagonal_block()},
                                 **common)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.2, 0.1], total_steps=8, base_momentum=0.8,
                                                max_momentum=0.95)
    return model, opt, sched


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=g, dtype=D)
    return x, torch.sin(x[:, :3]) + 0.1 * torch.randn(16, 3, generator=g, dtype=D)


def loss_fn(model, x, y):
    return 0.5 * ((model(x) - y) ** 2).sum(1).mean()


def train(kind, model, opt, sched, start, stop):
    losses = []
    for step in range(start, stop):
        x, y = batch(step)
        micro = list(zip(x.chunk(2), y.chunk(2)))
        if kind == "kfac":  # the caller's own loop: accumulate, clip, step
            opt.zero_grad()
            total = 0.0
            for xm, ym in micro:
                loss = loss_fn(model, xm, ym) / 2
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        else:  # K-BFGS: the closure runs both micro-batches (it is called again at the new point)
            def closure():
                opt.zero_grad()
                total = 0.0
                for xm, ym in micro:
                    loss = loss_fn(model, xm, ym) / 2
                    loss.backward()
                    total = total + loss.detach()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                return total

            total = float(opt.step(closure))
        sched.step()
        losses.append(total)
    return losses


def resume(kind, ckpt, out):
    model, opt, sched = build(kind, seed=123)  # a different init: everything must come from the checkpoint
    state = torch.load(ckpt, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    losses = train(kind, model, opt, sched, state["step"], state["stop"])
    torch.save({"losses": losses, "params": [p.detach().clone() for p in model.parameters()],
                "counters": opt.counters}, out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    directory = sys.argv[1]
    for kind in sys.argv[2:]:
        resume(kind, f"{directory}/{kind}.pt", f"{directory}/{kind}.out.pt")
'''


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("secondorder_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    loop = _load(script)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = {}
        for kind in KINDS:
            model, opt, sched = loop.build(kind, seed=0)
            losses = loop.train(kind, model, opt, sched, 0, STEPS)
            assert opt.counters["skipped_steps"] == 0 and opt.counters["reverted_steps"] == 0
            reference[kind] = (losses, [p.detach().clone() for p in model.parameters()])
            # the interrupted run: SPLIT steps, then a checkpoint on disk
            model, opt, sched = loop.build(kind, seed=0)
            first = loop.train(kind, model, opt, sched, 0, SPLIT)
            assert first == losses[:SPLIT]
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": SPLIT, "stop": STEPS}, tmp_path / f"{kind}.pt")
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), *KINDS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for kind in KINDS:
        resumed = torch.load(tmp_path / f"{kind}.out.pt", weights_only=False)
        losses, params = reference[kind]
        assert resumed["losses"] == losses[SPLIT:], kind
        assert len(resumed["params"]) == len(params)
        for p, q in zip(params, resumed["params"]):
            assert torch.equal(p, q), kind
