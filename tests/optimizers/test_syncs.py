"""Host-device synchronizations in ``step()``: the documented budget (README "GPU-ready step").

On the CPU nothing really syncs, so the test counts the calls that would (``.item()``,
``float``/``bool``/``int``/``__index__`` of a tensor, ``.tolist()``, ``.cpu()``, ``nonzero``,
boolean-mask indexing) with :class:`benchmarks.syncs.SyncCounter`, a ``TorchFunctionMode`` that
sees tensor methods and conversions. On CUDA the same steps also run under
``torch.cuda.set_sync_debug_mode("error")`` minus the budgeted calls, so any unbudgeted
synchronizing call raises there.

Budget with default settings (one process, no KL clipping, fixed damping), per step: **one read**
for every optimizer. The first pass's finite check (exact on-device flags of the loss and every
gradient) is read together with the new point's check and, for K-BFGS/K-BFGS(L), every layer's pair
decisions; a step whose first pass was not finite is then undone bit for bit and skipped. KFAC adds
one read on a step that refreshes inverses (every success mask of every factor size at once).
Reads of options: KL clipping needs ⟨d, m⟩ of every layer on the host before the update, so the
first-pass flags are read with those, and the new point (and pair decisions) after: 2.
``recovery=False`` without a refresh keeps no point, so only the first pass is checked (1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.syncs import SyncCounter
from optimizers import KBFGS, KBFGSL, KFAC, Diagonal

D = torch.float64


def _setup(device, make, layers=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g, dtype=D).to(device)
    t = torch.randn(32, 4, generator=g, dtype=D).to(device)
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(6, 8), nn.Tanh()]
    for _ in range(layers - 2):
        mods += [nn.Linear(8, 8), nn.Tanh()]
    mods.append(nn.Linear(8, 4))
    model = nn.Sequential(*mods).to(D).to(device)
    opt = make(model)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - t) ** 2).sum(1).mean()
        loss.backward()
        return loss

    return opt, closure


CASES = {
    "kfac": (lambda m: KFAC(m, inverse_update_freq=4, inverse_warmup_steps=0), lambda L, refresh: 1 + refresh),
    "kfac-no-recovery": (lambda m: KFAC(m, inverse_update_freq=4, inverse_warmup_steps=0, recovery=False),
                         lambda L, refresh: 1 + refresh),
    "kfac-kl-clip": (lambda m: KFAC(m, inverse_update_freq=4, inverse_warmup_steps=0, kl_clip=1e-3),
                     lambda L, refresh: 2 + refresh),
    "diagonal": (lambda m: Diagonal(m), lambda L, refresh: 1),
    "kbfgs": (lambda m: KBFGS(m), lambda L, refresh: 1),
    "kbfgsl": (lambda m: KBFGSL(m, memory=3), lambda L, refresh: 1),
}


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_step_synchronizes_within_the_documented_budget(device, case, layers):
    make, budget = CASES[case]
    opt, closure = _setup(device, make, layers)
    counts = []
    for k in range(9):
        with SyncCounter() as counter:
            opt.step(closure)
        counts.append((k, counter.count, dict(counter.sites)))
    assert opt.counters["skipped_steps"] == 0 and opt.counters["reverted_steps"] == 0
    for k, count, sites in counts[1:]:  # step 0 initializes (first inverses / H_a) and may read more
        refresh = int(case.startswith("kfac") and k % 4 == 0)
        assert count == budget(layers, refresh), (k, sites)


def test_counter_sees_every_kind_of_synchronizing_call(device):
    """The instrument itself: each listed call is counted once, on-device arithmetic is not."""
    t = torch.arange(4.0, device=device)
    with SyncCounter() as counter:
        u = (t * 2).sum()  # no sync
        torch.where(t > 1, t, 0.0)  # no sync
    assert counter.count == 0
    calls = [lambda: t.sum().item(), lambda: float(t.sum()), lambda: bool(t.sum() > 0), lambda: int(t.sum()),
             lambda: t.tolist(), lambda: t.cpu(), lambda: torch.nonzero(t), lambda: t[t > 1],
             lambda: [0, 1, 2, 3][t.long()[1]], lambda: u.numpy() if device.type == "cpu" else u.cpu()]
    for call in calls:
        with SyncCounter() as counter:
            call()
        assert counter.count >= 1, call


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["kfac-no-recovery", "kbfgs"])
def test_cuda_step_has_no_unbudgeted_sync(device, case):
    """On a GPU: the budgeted reads are the only synchronizations (sync debug mode 'warn' records the
    others; they must not exist). Skipped without CUDA."""
    if device.type != "cuda":
        pytest.skip("CUDA only")
    make, budget = CASES[case]
    opt, closure = _setup(device, make, 2)
    opt.step(closure)
    torch.cuda.synchronize()
    with SyncCounter() as counter:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with pytest.warns(UserWarning) as record:
                opt.step(closure)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(syncs) <= counter.count == budget(2, 0)
