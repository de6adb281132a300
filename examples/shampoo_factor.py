r"""A Shampoo-style factor (Gupta, Koren & Singer 2018) as a user factor, composed with KroneckerBlock.

Each side keeps an EMA of the layer gradient's Gram matrix on that side, :math:`L = \mathrm{EMA}(MM^\top)`
(G side) and :math:`R = \mathrm{EMA}(M^\top M)` (A side), and applies its damped inverse p-th root:
:math:`P(M) = (L+\lambda_G I)^{-1/p}\,M\,(R+\lambda_A I)^{-1/p}` (p = 4 for a matrix, as in Shampoo).
"""

import torch

from curvature import Factor, KroneckerBlock


class ShampooFactor(Factor):
    uses_gradient = True  # observe_gradient(V) receives M (G side) or Mᵀ (A side): V has `dim` rows

    def __init__(self, dim: int, decay: float = 0.9, root: int = 4, *, dtype=torch.float32, device=None) -> None:
        super().__init__(dim)
        if not 0.0 <= decay < 1.0 or isinstance(root, bool) or not isinstance(root, int) or root < 1:
            raise ValueError(f"need decay in [0, 1) and an integer root >= 1, got {decay!r}, {root!r}")
        self.decay, self.root = decay, root
        self.gram = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.H = torch.eye(dim, dtype=dtype, device=device)
        self.initialized = False

    @property
    def statistic(self) -> torch.Tensor:  # what the damping policy splits λ against
        return self.gram

    def observe_gradient(self, V: torch.Tensor) -> None:
        weight = 1.0 - self.decay if self.initialized else 1.0
        self.gram.mul_(1.0 - weight).addmm_(V, V.T, alpha=weight)  # first observation initializes
        self.initialized = True

    def request_inverse(self, inverter, damping: float) -> None:
        evals, evecs = torch.linalg.eigh(0.5 * (self.gram + self.gram.T).double())
        powers = (evals.clamp_min(0.0) + damping).pow(-1.0 / self.root)
        self.H = ((evecs * powers) @ evecs.T).to(self.gram.dtype)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return self.H @ V

    def to_dense(self) -> torch.Tensor:
        return self.H

    def state_dict(self) -> dict:
        return {"gram": self.gram.clone(), "H": self.H.clone(), "initialized": self.initialized}

    def load_state_dict(self, state: dict) -> None:
        self.gram, self.H = state["gram"].to(self.gram, copy=True), state["H"].to(self.H, copy=True)
        self.initialized = bool(state["initialized"])


def shampoo_block(decay: float = 0.9, root: int = 4):
    """A recipe: ``CurvatureOptimizer(model, lr, blocks={nn.Linear: shampoo_block()})``."""
    def build(name, adapter, ctx):
        kw = {"dtype": ctx.dtype, "device": ctx.device}
        return KroneckerBlock(name, adapter, ShampooFactor(adapter.a_dim, decay, root, **kw),
                              ShampooFactor(adapter.g_dim, decay, root, **kw), kind="shampoo")

    return build
