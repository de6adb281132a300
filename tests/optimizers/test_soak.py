"""Soak: thousands of steps of KFAC, K-BFGS and K-BFGS(L) on a small autoencoder with random faults.

Injected (at disjoint random steps, ≥ 3 apart): NaN input batches (1%), a NaN loss returned by
K-BFGS's second pass, one-step learning-rate spikes (× 1e30 through a ``LambdaLR`` schedule),
batches of size 1, duplicated batches (the same rows twice). Asserted after every step: no
non-finite parameter or factor. At the end: every injected fault appears in the counters exactly
once, the final loss is below the initial one. At random steps ``state_dict()`` round-trips
bit-exactly into a fresh optimizer, and that optimizer's next step is bit-identical.

``SOAK_STEPS`` sets the number of steps: 500 in the suite (CI); the full soak is
``SOAK_STEPS=3000 python -m pytest -q tests/optimizers/test_soak.py`` (README, "Robustness").
"""

from __future__ import annotations

import copy
import math
import os
import random

import pytest
import torch
from torch import nn

from optimizers import KBFGS, KBFGSL, KFAC

STEPS = int(os.environ.get("SOAK_STEPS", "500"))
SPIKE = 1e30


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3), nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 12))


def _data():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 12, generator=g)
    codes = torch.randn(512, 3, generator=g)
    return torch.sigmoid(codes @ basis)


def _loss(out, target):
    return nn.functional.binary_cross_entropy_with_logits(out, target, reduction="none").sum(1).mean()


MAKERS = {
    "kfac": lambda m: KFAC(m, lr=0.3, damping=1.0, likelihood="bernoulli"),
    "kbfgs": lambda m: KBFGS(m, lr=0.1, damping=0.3),
    "kbfgsl": lambda m: KBFGSL(m, lr=0.1, damping=0.3, memory=10),
}


def _plan(steps: int, second_pass: bool, rng: random.Random) -> dict[int, str]:
    """Disjoint fault steps, at least 3 apart, none in the first 10 steps."""
    kinds = ["nan_batch"] * max(1, steps // 100) + ["spike"] * max(1, steps // 500)
    kinds += ["size1"] * max(1, steps // 300) + ["duplicate"] * max(1, steps // 300)
    if second_pass:
        kinds += ["nan_second"] * max(1, steps // 500)
    slots = list(range(10, steps - 5, 3))
    rng.shuffle(slots)
    return dict(zip(sorted(slots[: len(kinds)]), rng.sample(kinds, len(kinds))))


def _factors_finite(opt) -> bool:
    for block in opt.blocks.values():
        for factor in (block.a_factor, block.g_factor):
            try:
                dense = factor.to_dense()
            except RuntimeError:  # no inverse yet
                continue
            if not bool(torch.isfinite(dense).all()):
                return False
    return True


def _equal_states(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MAKERS))
def test_soak_with_injected_faults(name):
    torch.set_num_threads(1)
    rng = random.Random(11)
    data = _data()
    model = _model()
    opt = MAKERS[name](model)
    second_pass = opt.require_closure and name != "kfac"
    plan = _plan(STEPS, second_pass, rng)
    spikes = {k for k, kind in plan.items() if kind == "spike"}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: SPIKE if k in spikes else 1.0)
    roundtrips = set(rng.sample(range(20, STEPS - 2), 5))
    with torch.no_grad():
        initial = float(_loss(model(data), data))

    for k in range(STEPS):
        kind = plan.get(k)
        idx = torch.tensor(rng.sample(range(data.shape[0]), 32))
        xb = data[idx]
        if kind == "nan_batch":
            xb = xb.clone()
            xb[rng.randrange(32), rng.randrange(12)] = float("nan")
        elif kind == "size1":
            xb = xb[:1]
        elif kind == "duplicate":
            xb = torch.cat([xb[:16], xb[:16]])
        calls = [0]

        def closure(xb=xb, kind=kind, calls=calls):
            calls[0] += 1
            opt.zero_grad()
            loss = _loss(model(xb), xb)
            if kind == "nan_second" and calls[0] == 2:
                loss = loss * float("nan")
            loss.backward()
            return loss

        if k in roundtrips:
            twin_model = copy.deepcopy(model)
            twin = MAKERS[name](twin_model)
            state = opt.state_dict()
            twin.load_state_dict(state)
            assert _equal_states(twin.state_dict(), state), f"state_dict round trip at step {k}"
            twin_sched = torch.optim.lr_scheduler.LambdaLR(twin, lambda j: SPIKE if j in spikes else 1.0)
            twin_sched.load_state_dict(sched.state_dict())

            def twin_closure(xb=xb, kind=kind, calls=[0]):
                calls[0] += 1
                twin.zero_grad()
                loss = _loss(twin_model(xb), xb)
                if kind == "nan_second" and calls[0] == 2:
                    loss = loss * float("nan")
                loss.backward()
                return loss

            twin.step(twin_closure)
        opt.step(closure)
        sched.step()
        if k in roundtrips:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters())), k
            assert _equal_states(twin.state_dict(), opt.state_dict()), k
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), f"non-finite parameter at step {k}"
        assert _factors_finite(opt), f"non-finite factor at step {k}"

    c = opt.counters
    n = {kind: sum(1 for v in plan.values() if v == kind) for kind in ("nan_batch", "spike", "nan_second")}
    assert c["skip_reasons"].get("non-finite input batch", 0) == n["nan_batch"], c
    if second_pass:  # the second pass sees a spike's non-finite point: the step is reverted
        assert c["reverted_steps"] == n["spike"] + n["nan_second"], c
        assert c["rollbacks"] == 0 and c["skipped_steps"] == n["nan_batch"], c
    else:  # KFAC: non-finite parameters are reverted at once; a finite but bad point is found by the
        # next two first passes (one skip, then the rollback, also a skip)
        assert c["reverted_steps"] + c["rollbacks"] == n["spike"], c
        assert c["skipped_steps"] == n["nan_batch"] + 2 * c["rollbacks"], c
        assert c["skip_reasons"].get("non-finite loss", 0) + c["skip_reasons"].get("non-finite gradient", 0) == c["rollbacks"], c
    assert c["recoveries"] == n["spike"] + n["nan_second"], c
    with torch.no_grad():
        final = float(_loss(model(data), data))
    assert final < initial, (initial, final)
