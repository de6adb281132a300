r"""Count host-device synchronizations by instrumentation (works on the CPU, where nothing syncs).

On a GPU, reading a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``, ``int(t)``,
``t.tolist()``, ``t.cpu()``, using a tensor as an index, ``torch.nonzero`` or boolean-mask
indexing, whose output size depends on the data) waits for every queued kernel. On the CPU those
calls cost nothing, so a regression that adds one is invisible to CPU timing; :class:`SyncCounter`
makes them visible by recording every such call made while it is active (a
:class:`~torch.overrides.TorchFunctionMode`, which sees tensor methods and dunder conversions),
with the source line that made it.

``python -m benchmarks.syncs`` prints the per-step counts of the main optimizers on a small MLP.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: Tensor methods / functions whose result is a host value computed from device data.
SYNCING = frozenset({"item", "__float__", "__bool__", "__int__", "__index__", "__complex__", "tolist", "cpu",
                     "numpy", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
                     "repeat_interleave", "__format__"})


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in SYNCING:
        if name == "repeat_interleave":  # syncs only when the repeats are a tensor without output_size
            return isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) and \
                kwargs.get("output_size") is None
        return True
    if name == "to":  # a copy to the host
        target = next((a for a in args[1:] if isinstance(a, (torch.device, str))), kwargs.get("device"))
        return target is not None and torch.device(target).type == "cpu" and isinstance(args[0], torch.Tensor) \
            and args[0].device.type != "cpu"
    if name == "__getitem__" and len(args) > 1:  # boolean-mask indexing
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    if name == "where" and len(args) == 1 and not kwargs:  # torch.where(cond) is nonzero
        return True
    return False


class SyncCounter(TorchFunctionMode):
    """Records every synchronizing call while active: ``count`` and ``sites`` (file:line -> calls).

    Only calls on tensors count (``float`` of a Python number does not reach torch). A CPU tensor
    read this way would not sync on the CPU, but would on a GPU, so it is counted all the same.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.sites: Counter[str] = Counter()
        self.names: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _is_sync(name, args, kwargs):
            self.count += 1
            self.names[name] += 1
            self.sites[_caller()] += 1
        return func(*args, **kwargs)


def _caller() -> str:
    """The innermost frame outside torch and this module: where the syncing call was made."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("syncs.py"):
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "?"


def _demo() -> None:  # pragma: no cover - a command-line report
    from torch import nn

    from optimizers import KBFGS, KBFGSL, KFAC, Diagonal

    torch.manual_seed(0)
    x, t = torch.randn(64, 12), torch.randn(64, 6)
    for make in (lambda m: KFAC(m, inverse_update_freq=5, inverse_warmup_steps=0), KBFGS,
                 lambda m: KBFGSL(m, memory=5), Diagonal):
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
        opt = make(model)

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), t)
            loss.backward()
            return loss

        for k in range(6):
            with SyncCounter() as sc:
                opt.step(closure)
            if k in (1, 5):
                print(f"{type(opt).__name__} step {k}: {sc.count} syncs")
                for site, n in sc.sites.most_common():
                    print(f"    {n:3d}  {site}")


if __name__ == "__main__":  # pragma: no cover
    _demo()
