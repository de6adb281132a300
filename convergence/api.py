r"""``convergence.check``: the harness on the user's own model, data and optimizer.

>>> report = convergence.check(model, loss_fn, dataset, lambda m: KBFGSL(m, lr=0.1, **theory_mode_kwargs()),
...                            steps=60, batch_size=16, checks=["E2", "E3", "E4", "E6"])
>>> print(report.table()); report.exit_status

``data`` is either a map-style data set of ``(input, target)`` pairs (a ``TensorDataset``, a
``(inputs, targets)`` tuple of tensors, or any ``Dataset``): f is the mean loss over all of it and
training batches are i.i.d. draws with replacement of ``batch_size`` examples (theory mode; a fresh
seeded sampler per run) -- or a ``DataLoader``: then it *is* the training loader (its sampler,
``drop_last`` and collation are part of what E2/E3 test; E8's runs at 4m are not possible) and f is
the loss over its ``dataset``. ``make_optimizer(model)`` returns the optimizer: any optimizer built
from the curvature blocks gets every check; the whole-model matrix-free ones (``HessianFree``,
``LevenbergMarquardt``, ``SaddleFreeNewton``, e.g. ``lambda m: HessianFree(m, loss_fn)``) get their
batch targets through the closures and the whole-model E4/E4.apply/E7a of
:mod:`convergence.whole_model` (NOT_APPLICABLE for saddle-free Newton), E5 NOT_APPLICABLE; any other ``torch.optim`` optimizer (e.g. Adam, as a
baseline) gets the checks that need only its steps (E1, E2, E3, E6 in step form, E7b/c, E8) and
NOT_APPLICABLE for the ones that need a preconditioner (E4, E5, E7a, E7d).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from convergence.harness import CHECKS, HarnessConfig, HarnessError, Report, Source, run_harness

__all__ = ["check", "make_source", "load_entry_point"]


def _dataset(data: Any, device: torch.device | None) -> Dataset:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data = TensorDataset(data[0], data[1])
    if isinstance(data, TensorDataset) and device is not None:
        return TensorDataset(*(t.to(device) for t in data.tensors))
    if isinstance(data, Dataset):
        if device is None:
            return data
        from torch.utils.data import default_collate

        items = default_collate([data[i] for i in range(len(data))])
        return TensorDataset(items[0].to(device), items[1].to(device))
    raise TypeError(f"data must be a Dataset, an (inputs, targets) pair of tensors or a DataLoader, "
                    f"got {type(data).__name__}")


def make_source(model: nn.Module, loss_fn: Callable, data: Any, make_optimizer: Callable[[nn.Module], Any], *,
                batch_size: int | None = None, lipschitz: float | None = None, device: torch.device | str | None = None,
                make_closure: Callable | None = None, make_loader: Callable | None = None,
                name: str = "user") -> Source:
    """The :class:`~convergence.harness.Source` of :func:`check` (also used by ``--problem module:fn``)."""
    from convergence.monitor import iid_loader
    from convergence.problems import Problem

    device = torch.device(device) if device is not None else None
    if device is not None:
        model.to(device)
    if isinstance(data, DataLoader):
        loader = data
        dataset = _dataset(loader.dataset, device)
        size = batch_size or loader.batch_size
        if size is None:
            raise HarnessError("the DataLoader has no batch_size (a custom batch_sampler): pass batch_size")
        problem = Problem(name, model, loss_fn, dataset, lipschitz)
        return Source(problem, make_optimizer, int(size), loader=loader, make_closure=make_closure, theory_mode=None,
                      name=name)
    dataset = _dataset(data, device)
    if make_loader is not None:  # the user's own sampler: make_loader(seed, batch_size, num_batches)
        if batch_size is None:
            raise HarnessError("pass batch_size with make_loader")
        problem = Problem(name, model, loss_fn, dataset, lipschitz)
        return Source(problem, make_optimizer, int(batch_size), make_loader=make_loader, make_closure=make_closure,
                      theory_mode=None, name=name)
    if batch_size is None:
        raise HarnessError("pass batch_size when data is a data set (training batches are i.i.d. draws of that size)")
    if batch_size > len(dataset):
        raise HarnessError(f"batch_size {batch_size} exceeds the {len(dataset)} examples")
    problem = Problem(name, model, loss_fn, dataset, lipschitz)

    def make_loader(seed: int, size: int, num_batches: int):
        gen = torch.Generator().manual_seed(int(seed))
        return iid_loader(dataset, size, gen, num_samples=size * max(1, num_batches))

    return Source(problem, make_optimizer, int(batch_size), make_loader=make_loader, make_closure=make_closure,
                  theory_mode=True, name=name)


def check(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], data: Any,
          make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], *, steps: int = 60,
          checks: Sequence[str] = CHECKS, device: torch.device | str | None = None, batch_size: int | None = None,
          lr: float | None = None, beta: float = 0.0, seed: int = 0, lipschitz: float | None = None,
          make_closure: Callable | None = None, alpha: float = 0.01, checkpoints: int = 3, rate_seeds: int = 4,
          descent_batches: int = 32, plateau: bool = True, progress: bool = False) -> Report:
    r"""Train ``model`` for ``steps`` steps with ``make_optimizer(model)`` and run the selected checks.

    Args:
        model: any ``nn.Module`` (its current parameters are the initial point; left at the final point).
        loss_fn: ``loss_fn(model(inputs), targets)``, a *mean* over the batch of per-example losses.
        data: a data set of ``(input, target)`` pairs or a ``DataLoader`` (see the module docstring).
        make_optimizer: ``make_optimizer(model) -> optimizer`` (called again for E8's extra runs).
        steps: training steps; checks: subset of ``E1..E8`` (E0, run health, always runs first);
        device: where model and data live (default: leave them where they are).
        batch_size: m (required for a data set; default the loader's).
        lr, beta: :math:`\alpha_k = \text{lr}\,(k+1)^{-\beta}` (lr default: the optimizer's).
        seed: seeds the samplers and the checks; lipschitz: a known global L (else estimated, E1).
        make_closure: ``make_closure(optimizer)(batch) -> closure`` to replace the standard closure
            (zero_grad, forward, backward, return the loss).
        alpha: family-wise level (Holm); checkpoints: snapshot steps; rate_seeds: runs for E8;
        descent_batches: R of E6 (and E5c); plateau: E8's m-vs-4m comparison for a constant step.

    Returns a :class:`~convergence.harness.Report`: ``report.results``, ``report.table()``,
    ``report.summary``, ``report.exit_status`` (0 / 1 a FAIL / 2 an ERROR), ``report["E4"]``.
    """
    source = make_source(model, loss_fn, data, make_optimizer, batch_size=batch_size, lipschitz=lipschitz,
                         device=device, make_closure=make_closure)
    config = HarnessConfig(steps=steps, checks=tuple(c.upper() for c in checks), lr=lr, beta=beta, seed=seed,
                           checkpoints=checkpoints, rate_seeds=rate_seeds, descent_batches=descent_batches,
                           alpha=alpha, plateau=plateau, progress=progress)
    return run_harness(source, config)


def load_entry_point(spec: str) -> Callable[[], Any]:
    """``"package.module:function"`` -> the function (a clear error when it cannot be found)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise HarnessError(f"--problem {spec!r}: expected MODULE:FUNCTION, e.g. my_package.problems:make_problem")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HarnessError(f"--problem {spec!r}: cannot import {module_name!r} ({exc}); run from the directory that "
                           "contains it or put it on PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise HarnessError(f"--problem {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def entry_point_fields(obj: Any) -> dict[str, Any]:
    """Normalize what a ``--problem module:fn`` function returned: a :class:`~convergence.problems.Problem`
    or a mapping with ``model``, ``loss_fn``, ``data`` and optionally ``make_optimizer``, ``make_closure``,
    ``make_loader`` (``make_loader(seed, batch_size, num_batches)``, the user's own sampler), ``lipschitz``,
    ``batch_size``, ``name``."""
    from convergence.problems import Problem

    if isinstance(obj, Problem):
        return {"model": obj.model, "loss_fn": obj.loss_fn, "data": obj.dataset, "lipschitz": obj.lipschitz,
                "name": obj.name}
    if isinstance(obj, dict):
        missing = [k for k in ("model", "loss_fn", "data") if k not in obj]
        if missing:
            raise HarnessError(f"the problem entry point returned a dict without {missing}")
        allowed = {"model", "loss_fn", "data", "make_optimizer", "make_closure", "make_loader", "lipschitz",
                   "batch_size", "name"}
        extra = sorted(set(obj) - allowed)
        if extra:
            raise HarnessError(f"the problem entry point returned unknown keys {extra}; allowed: {sorted(allowed)}")
        return dict(obj)
    raise HarnessError(f"the problem entry point must return a convergence.problems.Problem or a dict, "
                       f"got {type(obj).__name__}")
