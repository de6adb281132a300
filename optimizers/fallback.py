"""First-order rules for parameters of modules that have no curvature block.

``"sgd"``: the driver's EMA momentum on the gradient (plus weight decay) and the driver's learning
rate; ``"adam"``: Adam with bias correction (β1 = momentum, β2 = 0.999, ε = 1e-8 by default).
"""

from __future__ import annotations

from typing import Any

import torch

FALLBACK_RULES = ("sgd", "adam", "error")


def fallback_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    *,
    rule: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    betas2: float = 0.999,
    eps: float = 1e-8,
) -> None:
    """Apply one step of the fallback ``rule`` to ``param`` in place (state is per parameter)."""
    g = grad + weight_decay * param if weight_decay else grad
    if rule == "sgd":
        buf = state.setdefault("momentum", torch.zeros_like(param))
        buf.mul_(momentum).add_(g, alpha=1.0 - momentum)
        param.add_(buf, alpha=-lr)
        return
    if rule == "adam":
        m = state.setdefault("exp_avg", torch.zeros_like(param))
        v = state.setdefault("exp_avg_sq", torch.zeros_like(param))
        t = state["adam_step"] = state.get("adam_step", 0) + 1
        m.mul_(momentum).add_(g, alpha=1.0 - momentum)
        v.mul_(betas2).addcmul_(g, g, value=1.0 - betas2)
        m_hat = m / (1.0 - momentum**t) if momentum > 0 else m
        v_hat = v / (1.0 - betas2**t)
        param.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)
        return
    raise ValueError(f"unknown fallback rule {rule!r}; choose one of {FALLBACK_RULES}")
