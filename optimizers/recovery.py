r"""Recovery after a fault at the new point: what the optimizer does after a reverted or rolled-back step.

A step is *reverted* when K-BFGS's second pass finds a non-finite loss or gradient at the new
point, or a loss that rose by more than ``max_loss_rise`` on the same batch (a finite blow-up:
:math:`f(\theta^+) - f(\theta) > (\text{max\_loss\_rise} - 1)\,|f(\theta)|`); it is *rolled back* when the first pass of the next step finds a non-finite loss or
gradient on a batch whose inputs are finite (so the fault is in the parameters that the previous
step produced: the optimizer returns to the point before that step). Either way the step left the
region where the model is finite, and repeating it would fail again. The policy then

* resets the secant memory (``reset_secant``): H_g back to its initial scale (dense BFGS), the
  L-BFGS memory cleared, the pair EMA zeroed — the pairs that led here are not trusted;
* shrinks the step (``step_shrink``): the next steps use ``lr · step_scale`` with
  ``step_scale ← step_shrink · step_scale`` after each fault (never below ``min_step_scale``),
  then relaxes back by ``× relax`` per accepted step up to 1.

Everything is counted in ``opt.counters`` (``recoveries``, ``secant_resets``, ``rollbacks``) and
``opt.counters["step_scale"]`` is the current multiplier. ``Recovery(enabled=False)`` restores the
old behaviour (the step is reverted or skipped, nothing else changes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch

from optimizers.validation import check_float


@dataclass
class Recovery:
    """Configuration and state of the recovery policy (see the module docstring).

    Args:
        enabled: apply the policy at all.
        reset_secant: reset H_g's secant memory after a fault.
        step_shrink: factor in (0, 1] applied to the step multiplier after a fault.
        relax: factor ≥ 1 by which the multiplier grows back per accepted step (capped at 1).
        min_step_scale: the multiplier never goes below this.
        rollback: keep the point before each step so that a fault found by the next first pass
            (finite inputs, non-finite loss or gradient) can return to it; costs one copy of the
            parameters and momentum.
        max_loss_rise: on steps with a second pass on the same batch (K-BFGS, K-BFGS(L)), revert
            the step when the loss at the new point exceeds the loss before by more than this
            factor, f⁺ − f > (max_loss_rise − 1)·|f| (a finite blow-up; the
            recovery then applies as after a non-finite point). None turns it off. Not applied
            with adaptive damping, whose reduction ratio judges the step itself.
    """

    enabled: bool = True
    reset_secant: bool = True
    step_shrink: float = 0.1
    relax: float = 2.0
    min_step_scale: float = 1e-4
    rollback: bool = True
    max_loss_rise: float | None = 10.0
    step_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("step_shrink", "min_step_scale", "step_scale"):  # (0, 1]; step_scale is the current multiplier
            check_float(f"Recovery.{name}", getattr(self, name), 0.0, 1.0, lo_open=True, hi_open=False)
        check_float("Recovery.relax", self.relax, 1.0)
        if self.max_loss_rise is not None:
            check_float("Recovery.max_loss_rise (or None)", self.max_loss_rise, 1.0, lo_open=True)

    def after_fault(self) -> None:
        """Shrink the step multiplier (the caller resets the secant memory when ``reset_secant``)."""
        if self.enabled:
            self.step_scale = max(self.min_step_scale, self.step_scale * self.step_shrink)

    def after_accepted_step(self) -> None:
        """Relax the step multiplier back toward 1."""
        if self.step_scale < 1.0:
            self.step_scale = min(1.0, self.step_scale * self.relax)

    @property
    def loss_rise_factor(self) -> float | None:
        """``max_loss_rise`` when the policy is enabled, else None."""
        return self.max_loss_rise if self.enabled else None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_scale = float(state["step_scale"])


def make_recovery(value: "Recovery | bool | None") -> Recovery:
    """``True``/None: the default policy; ``False``: disabled; a :class:`Recovery` is used as given."""
    if value is None or value is True:
        return Recovery()
    if value is False:
        return Recovery(enabled=False, rollback=False, max_loss_rise=None)
    if isinstance(value, Recovery):
        return value
    raise TypeError(f"recovery must be a Recovery, True or False, got {type(value).__name__}")


def inputs_finite(inputs: Any) -> bool:
    """True when every floating-point tensor in (nested tuples, lists, dicts of) ``inputs`` is finite."""
    from curvature.linalg import all_finite

    tensors: list = []

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                tensors.append(obj.detach())
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item)

    walk(inputs)
    return all_finite(*tensors)


def reset_secant_memory(blocks: Iterable[Any]) -> int:
    """Reset every secant factor (H_g of K-BFGS / K-BFGS(L)) among ``blocks``; returns how many."""
    from curvature.factors import SecantFactor

    n = 0
    for block in blocks:
        parts = getattr(block, "parts", None)  # a ChunkedBlock: its chunks' blocks
        if isinstance(parts, dict):
            n += reset_secant_memory(b for _, b in parts.values())
            continue
        for side in ("a_factor", "g_factor"):
            factor = getattr(block, side, None)
            if isinstance(factor, SecantFactor):
                factor.reset_secant_memory()
                n += 1
    return n
