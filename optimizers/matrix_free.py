r"""The shared frame of the whole-model matrix-free optimizers (Hessian-free, saddle-free Newton, LM).

These methods precondition the gradient of *all* trainable parameters at once with an operator
known only through curvature-vector products (:mod:`curvature.products`) and solved by a Krylov
method (:mod:`curvature.krylov`). They are ``torch.optim.Optimizer`` subclasses that follow the
conventions of :class:`~optimizers.driver.CurvatureOptimizer`:

* **closure protocol** -- ``loss = opt.step(closure, targets=y)``: the closure zeroes the
  gradients, runs forward and backward on the batch and returns the loss
  ``loss_fn(model(inputs), targets)``. The model's inputs (positional and keyword: a model with
  several inputs is replayed as :class:`~curvature.products.ModelCall`) are recorded by a forward
  pre-hook during the closure, which must call the model exactly once with gradients enabled; the targets are passed to ``step`` (or carried by the closure as its ``targets``
  attribute, see :class:`BatchClosure`, which is how a caller that only knows
  ``optimizer.step(closure)`` -- the convergence harness -- hands them over; or, with
  ``targets_are_inputs=True``, are the model's first input, as for an autoencoder). The products and the extra loss evaluations (the
  reduction ratio, backtracking, line searches) are functional
  (:func:`torch.func.functional_call`) on that batch: the closure is called exactly once per step.
* the objective is :math:`F(\theta) = f(\theta) + \tfrac\tau2\|\theta\|^2` with ``weight_decay``
  :math:`\tau` (its curvature :math:`\tau I` is added to every product);
* ``lr`` is read from ``param_groups[0]`` at every step (schedulers work);
* **validate, then mutate** -- bad arguments raise before anything changes; a step whose loss or
  gradient is not finite is skipped with parameters and every piece of state bit-identical, and
  counted in :attr:`counters` (``skipped_steps``, ``skip_reasons``); a step the method itself
  declines (no decrease found) leaves the parameters as they were and counts as
  ``rejected_steps``;
* :attr:`counters` also accumulates ``products`` (curvature-vector products) and ``loss_evals``
  (extra forward passes), so the per-step cost is measurable;
* **step hooks** receive :class:`MatrixFreeStepInfo`, including the batch gradient ``grad``, the
  applied parameter change ``update`` and -- for the methods whose step is
  :math:`-(C + \operatorname{diag}(\delta))^{-1}g` solved by CG (Hessian-free, LM) -- the operator
  itself (``operator``: :math:`v \mapsto Cv`, uncounted; ``operator_shift``: :math:`\delta`, the
  L2 term plus the damping) and the CG preconditioner; the operator is dropped after the hooks ran
  (it holds the batch's linearization), so ``last_step.operator`` is None;
* ``state_dict()`` holds every piece of state (per-parameter vectors such as the previous CG
  solution in ``state``, scalars and the damping policy under ``"matrix_free"``) and
  ``load_state_dict`` resumes bit for bit.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from curvature.damping import DampingPolicy
from curvature.products import FunctionalLoss, ModelCall, make_functional
from optimizers.validation import check_float, check_int  # noqa: F401  (re-exported for the methods)

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class MatrixFreeStepInfo:
    """What happened in one step (``opt.last_step`` and step hooks).

    ``loss`` is :math:`F(\\theta_k)` on the batch (with the L2 term), ``loss_after`` at the point the
    step ended at (the old point for a rejected or skipped step); ``step_scale`` the applied scale
    of the direction (0 when rejected); ``products`` and ``loss_evals`` the cost of this step;
    ``details`` method-specific numbers (CG iterations, chosen damping, ...).
    """

    step: int
    lr: float
    loss: float | None
    loss_after: float | None = None
    skipped: bool = False
    skip_reason: str | None = None
    accepted: bool = False
    step_scale: float = 0.0
    reduction_ratio: float | None = None
    damping: float | None = None
    products: int = 0
    loss_evals: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    #: the flat gradient of F the step preconditioned (L2 included), None for a skipped step
    grad: torch.Tensor | None = None
    #: the applied change of the flat parameters (None when nothing was applied)
    update: torch.Tensor | None = None
    #: ``v -> C v``, the curvature part of the operator the step solved with, at the step's point and
    #: batch (not counted in ``products``); step hooks only (dropped afterwards)
    operator: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: :math:`\delta`, the diagonal added to ``operator`` (L2 τ plus the damping), so the system was
    #: :math:`(C + \operatorname{diag}(\delta))\,p = -g`
    operator_shift: torch.Tensor | None = None
    #: :math:`\operatorname{diag}(M^{-1})` of the CG preconditioner, when one was used
    cg_preconditioner: torch.Tensor | None = None


@dataclass
class StepContext:
    """The batch view a method's :meth:`MatrixFreeOptimizer._propose` works with."""

    functional: FunctionalLoss
    theta: torch.Tensor
    grad: torch.Tensor
    loss: float
    lr: float
    info: MatrixFreeStepInfo
    weight_decay: float

    def objective(self, theta: torch.Tensor) -> float:
        r""":math:`F(\theta) = f(\theta) + \frac\tau2\|\theta\|^2` on the batch (one forward pass, counted)."""
        self.info.loss_evals += 1
        value = float(self.functional.loss_at(theta))
        if self.weight_decay:
            value += 0.5 * self.weight_decay * float(torch.dot(theta, theta))
        return value

    def expose(self, curvature: Callable[[torch.Tensor], torch.Tensor], damping: float | torch.Tensor) -> None:
        r"""Publish the system the step solves, :math:`(C + \tau I + \operatorname{diag}(\lambda d))p = -g`,
        to the step hooks: ``curvature`` is the *uncounted* :math:`v \mapsto Cv` and ``damping`` the
        damping term (a number :math:`\lambda`, or the vector :math:`\lambda d`)."""
        shift = torch.as_tensor(damping, dtype=self.theta.dtype, device=self.theta.device)
        shift = (shift + self.weight_decay) * torch.ones_like(self.theta)
        self.info.operator, self.info.operator_shift = curvature, shift

    def counted(self, matvec: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``matvec`` plus the L2 curvature :math:`\\tau v`, counting products into this step's info."""
        tau = self.weight_decay

        def product(v: torch.Tensor) -> torch.Tensor:
            self.info.products += 1
            out = matvec(v)
            return out + tau * v if tau else out

        return product


class BatchClosure:
    """A closure that carries its batch's targets: ``opt.step(BatchClosure(closure, y))`` is
    ``opt.step(closure, targets=y)``. Any callable with a ``targets`` attribute works the same way."""

    def __init__(self, closure: Callable[[], torch.Tensor], targets: Any) -> None:
        if not callable(closure):
            raise TypeError("closure must be callable")
        self.closure, self.targets = closure, targets

    def __call__(self) -> torch.Tensor:
        return self.closure()


class MatrixFreeOptimizer(torch.optim.Optimizer):
    """Base class: the closure/batch protocol, skip-on-non-finite, counters and checkpointing.

    Subclasses implement :meth:`_propose` (return the new flat parameters, or None to reject) and
    may keep per-parameter vectors with :meth:`_get_vector` / :meth:`_set_vector`.

    Args:
        model: the module whose trainable parameters (all of one dtype and device) are optimized.
        loss_fn: ``loss_fn(output, targets)``, the loss the closure computes.
        lr: step scale α.
        damping: the damping policy (see each method's defaults).
        weight_decay: τ, the L2 term :math:`\\tfrac\\tau2\\|\\theta\\|^2` of the objective.
        targets_are_inputs: the targets are the model's first input (autoencoders); then
            ``step(closure)`` needs no ``targets``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, lr: float, damping: DampingPolicy,
                 weight_decay: float = 0.0, targets_are_inputs: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(output, targets)")
        if not isinstance(damping, DampingPolicy):
            raise TypeError(f"damping must be a DampingPolicy, got {type(damping).__name__}")
        check_float("lr", lr, 0.0, lo_open=True)
        self.weight_decay = check_float("weight_decay", weight_decay, 0.0)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        if len({p.dtype for p in params}) != 1 or len({p.device for p in params}) != 1:
            raise ValueError("all trainable parameters must share one dtype and one device")
        super().__init__(params, {"lr": lr})
        self.model, self.loss_fn, self.damping = model, loss_fn, damping
        self.targets_are_inputs = bool(targets_are_inputs)
        self.steps = 0
        self.counters: dict[str, Any] = {"steps": 0, "skipped_steps": 0, "reverted_steps": 0, "rejected_steps": 0,
                                         "products": 0, "loss_evals": 0, "skip_reasons": {}}
        self.last_step: MatrixFreeStepInfo | None = None
        self._hooks: OrderedDict[int, Callable[[MatrixFreeStepInfo], None]] = OrderedDict()
        self._inputs: list[tuple[tuple, dict[str, Any]]] = []
        self._recording = False
        self._root_hook = model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)

    # ------------------------------------------------------------------ protocol
    def _record_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._recording and torch.is_grad_enabled():
            self._inputs.append((args, kwargs))

    def register_step_hook(self, hook: Callable[[MatrixFreeStepInfo], None]) -> RemovableHandle:
        """Call ``hook(info)`` after every step (skipped and rejected ones included)."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    @property
    def skipped_steps(self) -> int:
        return int(self.counters["skipped_steps"])

    def describe(self) -> str:
        n = sum(p.numel() for p in self.param_groups[0]["params"])
        return f"{type(self).__name__}: whole model ({n} parameters) preconditioned matrix-free"

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, targets: Any = None):  # type: ignore[override]
        """One step on the closure's batch; returns the closure's loss (see the module docstring)."""
        return self._step(closure, targets)

    def _step(self, closure: Callable[[], torch.Tensor] | None, targets: Any) -> Any:
        """The body of :meth:`step`, run under its ``torch.no_grad()`` (undecorated: mutation testing reaches it)."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__} needs step(closure): the closure must zero the gradients, run forward "
                "and backward on the batch and return loss_fn(model(inputs), targets)")
        if targets is None:
            targets = getattr(closure, "targets", None)
        if targets is None and not self.targets_are_inputs:
            raise RuntimeError(
                f"{type(self).__name__} needs the batch targets for its curvature products: call "
                "opt.step(closure, targets=y) (or pass a closure with a `targets` attribute, e.g. "
                "optimizers.matrix_free.BatchClosure), or build it with targets_are_inputs=True for an autoencoder")
        k = self.steps
        lr = float(self.param_groups[0]["lr"])
        self._inputs = []
        self._recording = True
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            self._recording = False
        if not self._inputs:
            raise RuntimeError("the closure did not call the model with gradients enabled; no batch was recorded")
        if len(self._inputs) > 1:
            raise RuntimeError(
                f"the closure called the model {len(self._inputs)} times with gradients enabled; "
                f"{type(self).__name__} measures curvature on one batch, so the closure must call it exactly once "
                "(concatenate the batches, or run the extra calls under torch.no_grad())")
        args, kwargs = self._inputs[0]
        inputs = args[0] if len(args) == 1 and not kwargs else ModelCall(args, kwargs)
        if targets is None:
            if not args:
                raise RuntimeError("targets_are_inputs=True needs the model's first positional input, but the "
                                   "model was called with keyword arguments only")
            targets = args[0]
        info = MatrixFreeStepInfo(step=k, lr=lr, loss=None if loss is None else float(loss.detach()),
                                  damping=float(self.damping.damping))
        params = self.param_groups[0]["params"]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        reason = None
        if loss is None or not math.isfinite(info.loss):
            reason = "non-finite loss"
        elif not all(bool(torch.isfinite(g).all()) for g in grads):
            reason = "non-finite gradient"
        if reason is not None:
            self.counters["skipped_steps"] += 1
            self.counters["skip_reasons"][reason] = self.counters["skip_reasons"].get(reason, 0) + 1
            info.skipped, info.skip_reason, info.loss_after = True, reason, info.loss
            self._finish(info)
            return loss
        functional = make_functional(self.model, self.loss_fn, inputs, targets)
        theta = functional.theta.clone()
        grad = torch.cat([g.reshape(-1) for g in grads])
        if self.weight_decay:
            grad = grad + self.weight_decay * theta
            info.loss += 0.5 * self.weight_decay * float(torch.dot(theta, theta))
        info.grad = grad
        ctx = StepContext(functional, theta, grad, info.loss, lr, info, self.weight_decay)
        new_theta = self._propose(ctx)
        if new_theta is None:
            self.counters["rejected_steps"] += 1
            info.accepted, info.step_scale = False, 0.0
            if info.loss_after is None:
                info.loss_after = info.loss
        else:
            info.accepted = True
            info.update = new_theta - theta
            for p, value in zip(params, functional.unflatten(new_theta).values()):
                p.copy_(value)
        self.steps += 1
        self.counters["steps"] = self.steps
        self._finish(info)
        return loss

    def _finish(self, info: MatrixFreeStepInfo) -> None:
        self.counters["products"] += info.products
        self.counters["loss_evals"] += info.loss_evals
        self.last_step = info
        try:
            for hook in list(self._hooks.values()):
                hook(info)
        finally:
            info.operator = None  # holds the batch's linearization: step hooks only

    def _propose(self, ctx: StepContext) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ per-parameter vectors
    def _get_vector(self, key: str) -> torch.Tensor | None:
        """The flat vector stored as ``state[p][key]`` for every parameter, or None if absent."""
        params = self.param_groups[0]["params"]
        pieces = [self.state[p].get(key) for p in params]
        if any(piece is None for piece in pieces):
            return None
        return torch.cat([piece.reshape(-1) for piece in pieces])

    def _set_vector(self, key: str, vector: torch.Tensor) -> None:
        offset = 0
        for p in self.param_groups[0]["params"]:
            self.state[p][key] = vector[offset: offset + p.numel()].reshape(p.shape).clone()
            offset += p.numel()

    # ------------------------------------------------------------------ checkpointing
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["matrix_free"] = {
            "version": 1,
            "method": type(self).__name__,
            "steps": self.steps,
            "counters": {**self.counters, "skip_reasons": dict(self.counters["skip_reasons"])},
            "damping": self.damping.state_dict(),
            "extra": self._extra_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = copy.deepcopy(dict(state_dict))  # never alias the caller's checkpoint
        extra = state_dict.pop("matrix_free", None)
        if extra is None:
            raise ValueError("not a matrix-free optimizer state_dict (missing the 'matrix_free' entry)")
        if extra["method"] != type(self).__name__:
            raise ValueError(f"state_dict is from {extra['method']}, not {type(self).__name__}")
        super().load_state_dict(state_dict)
        self.steps = int(extra["steps"])
        self.counters = {**extra["counters"], "skip_reasons": dict(extra["counters"]["skip_reasons"])}
        self.damping.load_state_dict(extra["damping"])
        self._load_extra_state(extra["extra"])
