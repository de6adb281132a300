r"""Limited-memory BFGS in the compact representation of Byrd, Nocedal & Schnabel (1994).

With the ``m`` stored pairs as columns of :math:`S, Y \in \mathbb{R}^{d\times m}` (oldest first),
:math:`H_0 = \gamma I`, :math:`R = \operatorname{triu}(S^\top Y)` (upper triangle, diagonal
included) and :math:`D = \operatorname{diag}(s_i^\top y_i)`, the matrix obtained by applying the
inverse BFGS update to :math:`H_0` with the pairs oldest to newest is

.. math::

    H = \gamma I + [S\ \ \gamma Y]
        \begin{bmatrix} R^{-\top}(D + \gamma Y^\top Y) R^{-1} & -R^{-\top} \\ -R^{-1} & 0 \end{bmatrix}
        \begin{bmatrix} S^\top \\ \gamma Y^\top \end{bmatrix}.

:meth:`CompactLBFGS.apply` multiplies a whole matrix ``V`` (``d × n``) with two thin products,
two triangular solves and no Python loop over columns or pairs: :math:`O(dmn + m^2 n)`.
:math:`S^\top Y`, :math:`Y^\top Y` and :math:`R` are updated incrementally (one new row and column) when
a pair enters, and the oldest row and column are dropped when the memory is full.
"""

from __future__ import annotations

from typing import Any

import torch


def _bordered(block: torch.Tensor, drop: int, row: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """``block`` without its first ``drop`` rows and columns, with ``row`` (``1 × m−1``) below it and ``column``
    (``m × 1``, its last entry the new corner) to the right: one new pair's row and column of an ``m × m`` matrix."""
    return torch.cat([torch.cat([block[drop:, drop:], row]), column], 1)


class CompactLBFGS:
    """A memory of at most ``memory`` secant pairs of dimension ``dim`` applied in compact form.

    Args:
        dim: dimension of the pairs.
        memory: the number of pairs kept (default 100, K-BFGS(L)'s p); the oldest is dropped first.
        gamma: H0 = gamma·I (default 1).
        dtype, device: of the stored pairs and matrices; appended pairs and loaded states are converted.
    """

    def __init__(
        self,
        dim: int,
        memory: int = 100,
        gamma: float = 1.0,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        if not gamma > 0:
            raise ValueError(f"gamma (H0 = gamma*I) must be > 0, got {gamma}")
        self.dim, self.memory, self.gamma = dim, memory, float(gamma)
        kw = {"dtype": dtype, "device": device}
        self.S = torch.zeros(0, dim, **kw)  # rows s_i, oldest first
        self.Y = torch.zeros(0, dim, **kw)
        self.SY = torch.zeros(0, 0, **kw)  # (S^T Y)_{ij} = s_i^T y_j
        self.YY = torch.zeros(0, 0, **kw)
        self.R = torch.zeros(0, 0, **kw)  # triu(S^T Y), kept up to date as pairs enter

    @property
    def size(self) -> int:
        """Number of pairs currently stored."""
        return self.S.shape[0]

    def append(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Add a pair (the caller has checked ``sᵀy > 0``); drop the oldest when the memory is full."""
        s = s.to(self.S).reshape(1, self.dim)
        y = y.to(self.Y).reshape(1, self.dim)
        drop = 1 if self.size == self.memory else 0
        S, Y = torch.cat([self.S[drop:], s]), torch.cat([self.Y[drop:], y])
        # new last rows: sᵀy_j (SᵀY), YᵀY's last column mirrored (so YᵀY stays exactly symmetric), zeros left of R's
        # diagonal; new last columns: s_iᵀy (SᵀY, and R's, which lies on and above the diagonal), y_iᵀy (YᵀY)
        Sy, Yy, sY = S @ y.T, Y @ y.T, s @ Y.T
        self.SY = _bordered(self.SY, drop, sY[:, :-1], Sy)
        self.YY = _bordered(self.YY, drop, Yy[:-1].T, Yy)
        self.R = _bordered(self.R, drop, sY.new_zeros(1, S.shape[0] - 1), Sy)
        self.S, self.Y = S, Y

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``H @ V`` for ``V`` of shape ``[dim]`` or ``[dim, n]``."""
        vector = V.dim() == 1
        V2 = V.reshape(self.dim, -1)
        if not self.size:
            out = self.gamma * V2
            return out.reshape(self.dim) if vector else out
        R, g = self.R, self.gamma
        X1 = torch.linalg.solve_triangular(R, self.S @ V2, upper=True)  # R^{-1} S^T V
        D = torch.diagonal(self.SY)
        # inner = D X1 + γ YᵀY X1 − γ Yᵀ V and out = γV + S top − γ Y X1, each as one GEMM chain
        # (addmm with beta/alpha) instead of separate products, scalings and full-size sums
        inner = torch.addmm(torch.addmm(D.unsqueeze(1) * X1, self.YY, X1, alpha=g), self.Y, V2, alpha=-g)
        top = torch.linalg.solve_triangular(R.T, inner, upper=False)  # R^{-T}[...]
        out = torch.addmm(torch.addmm(V2, self.S.T, top, beta=g), self.Y.T, X1, alpha=-g)
        return out.reshape(self.dim) if vector else out

    def to_dense(self) -> torch.Tensor:
        """The ``dim × dim`` matrix H (by applying it to the identity)."""
        return self.apply(torch.eye(self.dim, dtype=self.S.dtype, device=self.S.device))

    def state_dict(self) -> dict[str, Any]:
        return {"S": self.S.clone(), "Y": self.Y.clone(), "SY": self.SY.clone(), "YY": self.YY.clone(),
                "gamma": self.gamma, "memory": self.memory}

    def revert_state(self) -> dict[str, Any]:
        """:meth:`state_dict` by reference: :meth:`append` builds new ``S``, ``Y``, ``SY``, ``YY`` and nothing
        writes into them in place once built; :meth:`load_state_dict` copies."""
        return {"S": self.S, "Y": self.Y, "SY": self.SY, "YY": self.YY, "gamma": self.gamma, "memory": self.memory}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["S"].shape[1:] != (self.dim,):
            raise ValueError(f"L-BFGS state of dimension {state['S'].shape[1:]} does not match dim {self.dim}")
        self.gamma, self.memory = float(state["gamma"]), int(state["memory"])
        for key in ("S", "Y", "SY", "YY"):
            setattr(self, key, state[key].to(self.S, copy=True))
        self.R = torch.triu(self.SY)
