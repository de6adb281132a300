"""The revert snapshot holds references to the factor tensors a step replaces; nothing may mutate them.

:meth:`CurvatureOptimizer._snapshot` takes every block's ``revert_state``: copies of the tensors a
step updates in place (KFAC's and K-BFGS's covariance ``F``, the pair EMAs, momentum, parameters)
and *references* to those it only replaces (the BFGS matrices ``H``, the L-BFGS memory, cached
inverses), which ``load_state_dict`` copies on a restore. The invariant: every tensor a snapshot
holds is bit-identical after the step to what it was when the snapshot was taken. The check below
deep-copies each snapshot as it is taken and compares after every step (finite steps, reverted ones,
KFAC's inverse refreshes), and a planted in-place update of H shows that the check catches a violation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvature.factors import BFGSFactor, EMACovarianceFactor, HessianActionFactor, LBFGSFactor
from optimizers import KBFGS, KBFGSL, KFAC

D = torch.float64

MAKERS = {
    "kbfgs": lambda m: KBFGS(m, lr=0.2, damping=0.3, momentum=0.9, weight_decay=0.01),
    "kbfgsl": lambda m: KBFGSL(m, lr=0.2, damping=0.3, memory=3),
    "kfac": lambda m: KFAC(m, lr=0.2, damping=0.5, inverse_update_freq=2, inverse_warmup_steps=0),
}
# "spike": the new point is not finite (the step is reverted from the snapshot)
PLAN = ["ok", "ok", "ok", "spike", "ok", "ok", "ok"]


def _tensors(obj, path="state"):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k!r}]" if not isinstance(k, torch.Tensor) else f"{path}[param]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


def _run(name, monkeypatch, plan=PLAN):
    """Run ``plan`` with the snapshot watched; returns the paths of snapshot tensors changed during a step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(D)
    opt = MAKERS[name](model)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 5, generator=g, dtype=D), torch.randn(24, 3, generator=g, dtype=D)
    taken = []
    original = opt._snapshot

    def watched():
        snap = original()
        taken.append((snap, copy.deepcopy(snap)))
        return snap

    monkeypatch.setattr(opt, "_snapshot", watched)
    changed, reverts = [], 0
    for kind in plan:
        def closure():
            opt.zero_grad()
            loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
            (1e300 * loss if kind == "spike" else loss).backward()
            return loss

        if kind == "spike":
            for group in opt.param_groups:
                group["lr"] = 1e300
        before = opt.counters["reverted_steps"]
        opt.step(closure)
        reverts += opt.counters["reverted_steps"] - before
        if kind == "spike":
            for group in opt.param_groups:
                group["lr"] = 0.2
        for snap, copied in taken:
            for (path, t), (_, c) in zip(_tensors(snap), _tensors(copied)):
                live_parameter = path.startswith("state['params']") and path.endswith("[0]")  # (p, copy of p)
                if not live_parameter and not _same_bits(t, c):
                    changed.append(path)
        taken.clear()
    return changed, reverts, opt


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_snapshot_tensors_are_not_mutated_by_the_step(name, monkeypatch):
    changed, reverts, opt = _run(name, monkeypatch)
    assert changed == []
    assert reverts == 1  # the spike was reverted from the snapshot


@pytest.mark.parametrize("name", ["kbfgs", "kbfgsl", "kfac"])
def test_revert_state_references_only_replaced_tensors(name):
    """What each factor's revert_state shares with the live factor: only H / the L-BFGS memory / the
    cached inverse (replaced by a step), never F or the pair EMA (updated in place)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(D)
    opt = MAKERS[name](model)
    x, y = torch.randn(24, 5, dtype=D), torch.randn(24, 3, dtype=D)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    for slot in opt.slots.values():
        for factor in (slot.block.a_factor, slot.block.g_factor):
            live = {id(t) for _, t in _tensors(vars(factor))}
            for sub in ("covariance", "lbfgs"):
                if hasattr(factor, sub):
                    live |= {id(t) for _, t in _tensors(vars(getattr(factor, sub)))}
            shared = sorted(path for path, t in _tensors(factor.revert_state()) if id(t) in live)
            expected = {BFGSFactor: ["state['H']"], HessianActionFactor: ["state['H']"],
                        LBFGSFactor: [f"state['lbfgs'][{k!r}]" for k in ("S", "SY", "Y", "YY")],
                        EMACovarianceFactor: ["state['inverse']"]}[type(factor)]
            assert shared == sorted(expected), type(factor).__name__
            # and a state_dict shares nothing
            assert not [p for p, t in _tensors(factor.state_dict()) if id(t) in live]


def test_a_planted_in_place_update_of_h_is_caught(monkeypatch):
    """Plant: the BFGS factor's update scales the old H in place before replacing it. The watched
    snapshot sees its referenced H change (a revert would restore the scaled H): the check reports it."""
    original = BFGSFactor._prepare_incorporate

    def planted(self, s, y, reference_norm, **batch):
        scalars, finish = original(self, s, y, reference_norm, **batch)

        def finish_planted(values):
            self.H.mul_(1.0 + 2.0**-20)  # the in-place mutation a careless edit could add
            return finish(values)

        return scalars, finish_planted

    monkeypatch.setattr(BFGSFactor, "_prepare_incorporate", planted)
    changed, reverts, _ = _run("kbfgs", monkeypatch)
    assert changed and all(path.endswith("['g']['H']") for path in changed)
