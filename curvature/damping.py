r"""Damping policies for Kronecker-factored and diagonal curvature blocks.

A policy owns the scalar damping :math:`\lambda` and decides how it is split between the two
Kronecker factors, :math:`(A + \lambda_A I) \otimes (G + \lambda_G I)`:

* :class:`Tikhonov`: :math:`\lambda_A = \lambda_G = \sqrt\lambda` (the K-BFGS authors' KFAC baseline);
* :class:`FactoredPi`: Martens & Grosse (2015) §6.3,
  :math:`\pi = \sqrt{(\operatorname{tr}A/d_A)/(\operatorname{tr}G/d_G)}`,
  :math:`\lambda_A = \pi\sqrt\lambda`, :math:`\lambda_G = \sqrt\lambda/\pi`; with it
  :math:`(A + \lambda_A I)\otimes(G + \lambda_G I) \succeq A\otimes G + \lambda I` (property P4);
* :class:`AdaptiveLM`: Levenberg–Marquardt adaptation of :math:`\lambda` by the reduction ratio
  :math:`\rho = (f(\theta+\delta) - f(\theta)) / (M(\delta) - M(0))` (Martens & Grosse §6.5): if
  :math:`\rho > 3/4`, :math:`\lambda \leftarrow \omega\lambda`; if :math:`\rho < 1/4`,
  :math:`\lambda \leftarrow \lambda/\omega`, with :math:`\omega = (19/20)^{T}` for an adjustment
  every :math:`T` steps. It splits :math:`\lambda` like :class:`FactoredPi` (or :class:`Tikhonov`).
  ``factor`` overrides :math:`\omega` (Martens 2010's Hessian-free rule: :math:`\omega = 2/3`, i.e.
  :math:`\lambda \leftarrow \tfrac23\lambda` for :math:`\rho > 3/4` and :math:`\tfrac32\lambda`
  for :math:`\rho < 1/4`);
* :class:`DelayedGratification`: the Levenberg–Marquardt schedule driven by step success,
  :math:`\lambda \leftarrow \lambda/\nu_{down}` when :math:`\rho >` ``threshold`` and
  :math:`\lambda \leftarrow \nu_{up}\lambda` otherwise (Transtrum & Sethna 2012's "delayed
  gratification": :math:`\nu_{down} = 3`, :math:`\nu_{up} = 2`).

Diagonal blocks use :math:`\lambda` itself: :math:`P = (v + \lambda)^{-1}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass
class DampingPolicy:
    """Base policy: holds ``damping`` (λ) and splits it between Kronecker factors."""

    damping: float = 1e-3

    def __post_init__(self) -> None:
        _check_positive("damping", self.damping)

    def factor_damping(self, a_factor: torch.Tensor | None, g_factor: torch.Tensor | None) -> tuple[float, float]:
        """Return ``(λ_A, λ_G)`` for a block whose (undamped) factors are ``a_factor`` and ``g_factor``."""
        root = math.sqrt(self.damping)
        return root, root

    def observe_reduction_ratio(self, rho: float) -> None:
        """Called by the optimizer after a step with the reduction ratio; fixed policies ignore it."""

    @property
    def needs_reduction_ratio(self) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"damping": self.damping}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.damping = float(state["damping"])


@dataclass
class Tikhonov(DampingPolicy):
    r"""λ_A = λ_G = √λ, so the damped block is :math:`(A + \sqrt\lambda I)\otimes(G + \sqrt\lambda I)`."""


def pi_split(damping: float, a_factor: torch.Tensor, g_factor: torch.Tensor, eps: float = 1e-12) -> tuple[float, float]:
    r"""Martens & Grosse's factored split with :math:`\pi^2 = (\operatorname{tr}A/d_A)/(\operatorname{tr}G/d_G)`."""
    ta = float(torch.diagonal(a_factor).sum()) / a_factor.shape[0]
    tg = float(torch.diagonal(g_factor).sum()) / g_factor.shape[0]
    root = math.sqrt(damping)
    if not (ta > eps and tg > eps and math.isfinite(ta) and math.isfinite(tg)):
        return root, root
    pi = math.sqrt(ta / tg)
    return pi * root, root / pi


@dataclass
class FactoredPi(DampingPolicy):
    """Factored Tikhonov damping with Martens & Grosse's π rescaling (§6.3)."""

    def factor_damping(self, a_factor, g_factor):
        if a_factor is None or g_factor is None:
            return super().factor_damping(a_factor, g_factor)
        return pi_split(self.damping, a_factor, g_factor)


@dataclass
class AdaptiveLM(DampingPolicy):
    """Levenberg–Marquardt adaptation of λ by the reduction ratio (Martens & Grosse §6.5).

    Args:
        damping: initial λ.
        interval: T, the number of steps between adjustments (ω = (19/20)^T).
        lower, upper: ratio thresholds (1/4 and 3/4).
        min_damping, max_damping: λ is clipped to this range.
        use_pi: split λ between factors with π (True) or as √λ each (False).
        factor: ω itself in (0, 1) instead of (19/20)^T (Martens 2010 HF: 2/3); None keeps (19/20)^T.
    """

    interval: int = 1
    lower: float = 0.25
    upper: float = 0.75
    min_damping: float = 1e-8
    max_damping: float = 1e8
    use_pi: bool = True
    factor: float | None = None
    history: list[tuple[float, float]] = field(default_factory=list, repr=False)
    _pending: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.interval, int) and self.interval >= 1):
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if not 0.0 < self.lower < self.upper < 1.0:
            raise ValueError(f"need 0 < lower < upper < 1, got lower={self.lower}, upper={self.upper}")
        _check_positive("min_damping", self.min_damping)
        if not self.max_damping > self.min_damping:
            raise ValueError("max_damping must exceed min_damping")
        if self.factor is not None and not (isinstance(self.factor, (int, float)) and 0.0 < self.factor < 1.0):
            raise ValueError(f"factor must be a number in (0, 1) or None, got {self.factor!r}")

    @property
    def omega(self) -> float:
        if self.factor is not None:
            return float(self.factor)
        return (19.0 / 20.0) ** self.interval

    @property
    def needs_reduction_ratio(self) -> bool:
        return True

    def factor_damping(self, a_factor, g_factor):
        if self.use_pi and a_factor is not None and g_factor is not None:
            return pi_split(self.damping, a_factor, g_factor)
        return super().factor_damping(a_factor, g_factor)

    def observe_reduction_ratio(self, rho: float) -> None:
        """Record ρ; every ``interval`` observations adjust λ by the mean ratio (non-finite ρ: increase λ)."""
        self._pending.append(rho if math.isfinite(rho) else -math.inf)
        if len(self._pending) < self.interval:
            return
        mean_rho = sum(self._pending) / len(self._pending)
        self._pending.clear()
        if mean_rho > self.upper:
            self.damping *= self.omega
        elif mean_rho < self.lower:
            self.damping /= self.omega
        self.damping = min(max(self.damping, self.min_damping), self.max_damping)
        self.history.append((mean_rho, self.damping))

    def state_dict(self) -> dict[str, Any]:
        return {"damping": self.damping, "pending": list(self._pending), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.damping = float(state["damping"])
        self._pending = list(state.get("pending", []))
        self.history = [tuple(h) for h in state.get("history", [])]


@dataclass
class DelayedGratification(DampingPolicy):
    r"""Levenberg–Marquardt λ schedule by step success (Transtrum & Sethna 2012, "delayed gratification").

    ``observe_reduction_ratio(ρ)``: :math:`\lambda \leftarrow \lambda/` ``down`` when
    :math:`\rho >` ``threshold`` (the step reduced the loss), else :math:`\lambda \leftarrow`
    ``up`` :math:`\cdot\lambda` (a non-finite ρ counts as a failure); λ is clipped to
    ``[min_damping, max_damping]``. With ``down > up`` λ falls faster than it rises, which lets the
    method approach Gauss–Newton (and its fast local convergence) near a minimum.
    """

    down: float = 3.0
    up: float = 2.0
    threshold: float = 0.0
    min_damping: float = 1e-12
    max_damping: float = 1e10
    history: list[tuple[float, float]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("down", "up"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 1.0):
                raise ValueError(f"{name} must be a finite number > 1, got {value!r}")
        _check_positive("min_damping", self.min_damping)
        if not self.max_damping > self.min_damping:
            raise ValueError("max_damping must exceed min_damping")

    @property
    def needs_reduction_ratio(self) -> bool:
        return True

    def observe_reduction_ratio(self, rho: float) -> None:
        if math.isfinite(rho) and rho > self.threshold:
            self.damping /= self.down
        else:
            self.damping *= self.up
        self.damping = min(max(self.damping, self.min_damping), self.max_damping)
        self.history.append((rho, self.damping))

    def state_dict(self) -> dict[str, Any]:
        return {"damping": self.damping, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.damping = float(state["damping"])
        self.history = [tuple(h) for h in state.get("history", [])]


def make_damping(spec: DampingPolicy | float) -> DampingPolicy:
    """A policy from a number (Tikhonov with that λ) or the policy itself."""
    if isinstance(spec, DampingPolicy):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise ValueError(f"damping must be a number > 0 or a DampingPolicy, got {spec!r}")
    return Tikhonov(float(spec))
