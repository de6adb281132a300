r"""First-order baselines of the K-BFGS paper, as the authors' code implements them (spec §6).

All three share the authors' conventions, for every parameter tensor :math:`\theta` (weights *and*
biases) with minibatch gradient :math:`g_k` at step :math:`k = 1, 2, \dots`:

* L2 regularisation added to the gradient: :math:`\tilde g_k = g_k + \tau\theta_k`
  (``weight_decay`` τ, default 1e-5);
* momentum in EMA form (not heavy ball), starting from :math:`m_0 = 0`:
  :math:`m_k = \mu m_{k-1} + (1-\mu)\tilde g_k` (``momentum`` μ, default 0.9).

The rules (``lr`` α):

:class:`SGDMomentum`
    :math:`\theta_{k+1} = \theta_k - \alpha\, m_k`.

:class:`Adam` (β1 = μ; **β2 = 0.9**, not the usual 0.999; ε default 1e-4)
    :math:`\hat m_k = m_k / (1-\mu^k)`,
    :math:`v_k = \beta_2 v_{k-1} + (1-\beta_2)\, q_k^2`,
    :math:`\hat v_k = v_k / (1-\beta_2^k)`,
    :math:`\theta_{k+1} = \theta_k - \alpha\, \hat m_k / (\sqrt{\hat v_k} + \varepsilon)`,
    with :math:`v_0 = 0`. In the authors' code (``first_order_methods.RMSprop_update``) the
    second moment is that of the *bias-corrected momentum*, :math:`q_k = \hat m_k`
    (``second_moment_of="momentum"``, the default here); ``second_moment_of="gradient"`` uses the
    textbook :math:`q_k = \tilde g_k` (then this is ``torch.optim.Adam`` with L2 weight decay).
    With μ = 0 there is no first-moment correction (:math:`\hat m_k = \tilde g_k`).

:class:`RMSprop` (β2 = 0.9, ε default 1e-4, no bias corrections)
    :math:`v_k = \beta_2 v_{k-1} + (1-\beta_2)\, q_k^2`,
    :math:`\theta_{k+1} = \theta_k - \alpha\, m_k / (\sqrt{v_k} + \varepsilon)`,
    with :math:`q_k = m_k` (authors' code, default) or :math:`q_k = \tilde g_k`
    (``second_moment_of="gradient"``; with μ = 0 that is ``torch.optim.RMSprop``). The second moment
    is **warm-started** (:meth:`RMSprop.warm_start`) by one pass over the training set at the initial
    weights: :math:`v_0 = \frac1J\sum_{j=1}^J (g^{(j)} + \tau\theta_0)^2` over the J full minibatches
    (``training_utils.train_initialization``); without a warm start :math:`v_0 = 0`.

Squares, square roots and divisions are elementwise. All three are ``torch.optim.Optimizer``
subclasses: hyperparameters live in ``param_groups`` (so LR schedulers and per-group settings work),
are validated by frozen config dataclasses, and ``step(closure)`` follows the usual protocol.
Parameters whose ``grad`` is ``None`` are left alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

__all__ = [
    "SECOND_MOMENT_SOURCES",
    "Adam",
    "AdamConfig",
    "RMSprop",
    "RMSpropConfig",
    "SGDMomentum",
    "SGDMomentumConfig",
]

SECOND_MOMENT_SOURCES = ("momentum", "gradient")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class SGDMomentumConfig:
    """Hyperparameters of :class:`SGDMomentum`: α > 0, μ ∈ [0, 1), τ ≥ 0."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5

    def __post_init__(self) -> None:
        _require(_real(self.lr) and self.lr > 0, "lr", "a finite number > 0", self.lr)
        _require(_real(self.momentum) and 0 <= self.momentum < 1, "momentum", "a number in [0, 1)", self.momentum)
        _require(_real(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0",
                 self.weight_decay)


@dataclass(frozen=True)
class RMSpropConfig(SGDMomentumConfig):
    """Hyperparameters of :class:`RMSprop`: adds β2 ∈ [0, 1), ε > 0 and the second-moment source."""

    lr: float = 1e-3
    beta2: float = 0.9
    eps: float = 1e-4
    second_moment_of: str = "momentum"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(_real(self.beta2) and 0 <= self.beta2 < 1, "beta2", "a number in [0, 1)", self.beta2)
        _require(_real(self.eps) and self.eps > 0, "eps", "a finite number > 0", self.eps)
        _require(self.second_moment_of in SECOND_MOMENT_SOURCES, "second_moment_of",
                 f"one of {SECOND_MOMENT_SOURCES}", self.second_moment_of)


@dataclass(frozen=True)
class AdamConfig(RMSpropConfig):
    """Hyperparameters of :class:`Adam` (β1 is ``momentum``): same fields as :class:`RMSpropConfig`."""


class _EMABaseline(torch.optim.Optimizer):
    """Shared machinery: config validation per param group and the EMA momentum with L2."""

    Config: ClassVar[type[SGDMomentumConfig]] = SGDMomentumConfig

    def __init__(self, params: Iterable, **hyper: Any) -> None:
        config = self.Config(**hyper)
        super().__init__(params, asdict(config))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters (defaults filled in) are validated by :attr:`Config`."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = {f.name for f in fields(self.Config)}
        self.Config(**{k: v for k, v in group.items() if k in names})

    def config(self, group_index: int = 0) -> SGDMomentumConfig:
        """The validated hyperparameters of one param group."""
        group = self.param_groups[group_index]
        return self.Config(**{f.name: group[f.name] for f in fields(self.Config)})

    @staticmethod
    def _regularised_grad(p: torch.Tensor, weight_decay: float) -> torch.Tensor:
        g = p.grad.detach()
        return g.add(p.detach(), alpha=weight_decay) if weight_decay else g.clone()

    def _momentum(self, p: torch.Tensor, g: torch.Tensor, momentum: float) -> torch.Tensor:
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf.mul_(momentum).add_(g, alpha=1.0 - momentum)
        return buf

    def _next_step(self, p: torch.Tensor) -> int:
        state = self.state[p]
        state["step"] = int(state.get("step", 0)) + 1
        return state["step"]

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        """One step on every parameter with a gradient; returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._update(p, self._regularised_grad(p, group["weight_decay"]), group)
        return loss


class SGDMomentum(_EMABaseline):
    r"""SGD with EMA momentum: :math:`m \leftarrow \mu m + (1-\mu)(g + \tau\theta)`,
    :math:`\theta \leftarrow \theta - \alpha m` (the authors' ``SGD-momentum``)."""

    Config = SGDMomentumConfig

    def __init__(self, params: Iterable, lr: float = 0.01, *, momentum: float = 0.9,
                 weight_decay: float = 1e-5) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any]) -> None:
        self._next_step(p)
        m = self._momentum(p, g, group["momentum"])
        p.add_(m, alpha=-group["lr"])


class Adam(_EMABaseline):
    r"""The authors' Adam: β1 = ``momentum`` = 0.9, **β2 = 0.9**, ε = 1e-4, bias corrections, and by
    default the second moment of the bias-corrected momentum (see the module docstring)."""

    Config = AdamConfig

    def __init__(self, params: Iterable, lr: float = 1e-3, *, momentum: float = 0.9, beta2: float = 0.9,
                 eps: float = 1e-4, weight_decay: float = 1e-5, second_moment_of: str = "momentum") -> None:
        super().__init__(params, lr=lr, momentum=momentum, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         second_moment_of=second_moment_of)

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any]) -> None:
        k = self._next_step(p)
        mu, beta2 = group["momentum"], group["beta2"]
        m = self._momentum(p, g, mu)
        m_hat = m / (1.0 - mu**k) if mu > 0 else m.clone()
        q = m_hat if group["second_moment_of"] == "momentum" else g
        state = self.state[p]
        v = state.get("second_moment")
        if v is None:
            v = state["second_moment"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        v.mul_(beta2).addcmul_(q, q, value=1.0 - beta2)
        denom = (v / (1.0 - beta2**k)).sqrt_().add_(group["eps"])
        p.addcdiv_(m_hat, denom, value=-group["lr"])


class RMSprop(_EMABaseline):
    r"""The authors' RMSprop: β2 = 0.9, ε = 1e-4, EMA momentum 0.9 in the numerator, no bias
    corrections, second moment warm-started by :meth:`warm_start` (see the module docstring)."""

    Config = RMSpropConfig

    def __init__(self, params: Iterable, lr: float = 1e-3, *, momentum: float = 0.9, beta2: float = 0.9,
                 eps: float = 1e-4, weight_decay: float = 1e-5, second_moment_of: str = "momentum") -> None:
        super().__init__(params, lr=lr, momentum=momentum, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         second_moment_of=second_moment_of)

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict[str, Any]) -> None:
        self._next_step(p)
        m = self._momentum(p, g, group["momentum"])
        q = m if group["second_moment_of"] == "momentum" else g
        state = self.state[p]
        v = state.get("second_moment")
        if v is None:
            v = state["second_moment"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        v.mul_(group["beta2"]).addcmul_(q, q, value=1.0 - group["beta2"])
        p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])

    @torch.no_grad()
    def warm_start(self, closures: Iterable[Callable[[], Any]]) -> int:
        r"""Set the second moment to :math:`\frac1J\sum_j (g^{(j)} + \tau\theta)^2` at the current weights.

        Each element of ``closures`` computes the gradients of one minibatch (it must zero them,
        run forward and backward, like a ``step`` closure); the parameters do not change. Call it
        before the first step. Returns J, the number of minibatches used.
        """
        if any(int(self.state[p].get("step", 0)) > 0 for g in self.param_groups for p in g["params"]):
            raise RuntimeError("RMSprop.warm_start must be called before the first step")
        sums: dict[torch.Tensor, torch.Tensor] = {}
        count = 0
        for closure in closures:
            with torch.enable_grad():
                closure()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = self._regularised_grad(p, group["weight_decay"])
                    sq = g * g
                    sums[p] = sq if p not in sums else sums[p].add_(sq)
            count += 1
        if count == 0:
            raise ValueError("warm_start got no minibatches")
        for p, total in sums.items():
            self.state[p]["second_moment"] = total.div_(count)
        return count
