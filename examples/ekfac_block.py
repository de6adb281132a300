r"""EKFAC (George et al., NeurIPS 2018): eigenvalue-corrected KFAC as a user-defined block.

KFAC's running factors A and G give the Kronecker eigenbasis :math:`Q_A, Q_G`, refreshed with the
inverses (every ``T_inv`` steps). In that basis the diagonal curvature is re-estimated every step from
the per-sample gradients :math:`\nabla_i = \sum_t g_{it}\bar a_{it}^\top`:
:math:`s \leftarrow \beta s + (1-\beta)\frac1N\sum_i (Q_G^\top\nabla_i Q_A)^{\circ 2}`, and the step is
:math:`P(M) = Q_G\,[(Q_G^\top M Q_A) \oslash (s + \lambda)]\,Q_A^\top`. When the basis is refreshed,
:math:`s` restarts from KFAC's own diagonal in the new basis, :math:`e_G e_A^\top`.
"""

import torch

from curvature import CurvatureBlock, EMACovarianceFactor, a_statistic, g_statistic, vec_c


class EKFACBlock(CurvatureBlock):
    needs_a = needs_g = True  # input rows and output-gradient rows of the normal pass
    kind = "ekfac"

    def __init__(self, name, adapter, decay: float = 0.9, *, dtype=torch.float32, device=None) -> None:
        super().__init__(name, adapter)
        self.A = EMACovarianceFactor(adapter.a_dim, decay, dtype=dtype, device=device)
        self.G = EMACovarianceFactor(adapter.g_dim, decay, dtype=dtype, device=device)
        self.decay, self.basis, self.damping = decay, None, None
        self.s = torch.zeros(adapter.g_dim, adapter.a_dim, dtype=dtype, device=device)

    def update_statistics(self, record, grad) -> None:
        self.A.observe(a_statistic(record, self.adapter))
        self.G.observe(g_statistic(record))
        if self.basis is None:
            self.refresh_basis()
        q_a, q_g = self.basis
        n, t = record.batch_size, record.rows_per_sample
        a, g = (record.a_rows @ q_a).reshape(n, t, -1), (record.g_rows @ q_g).reshape(n, t, -1)
        projected = torch.einsum("ntg,nta->nga", g, a)  # Q_Gᵀ ∇_i Q_A for every sample i
        self.s.mul_(self.decay).add_(projected.pow(2).mean(0), alpha=1.0 - self.decay)

    def refresh_basis(self) -> None:
        (e_a, q_a), (e_g, q_g) = self.A.eigenbasis(), self.G.eigenbasis()
        self.basis, self.s = (q_a, q_g), torch.outer(e_g, e_a).clamp_min(0.0)

    def request_inverses(self, inverter, policy) -> None:
        self.refresh_basis()
        self.damping = float(policy.damping)

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        if self.damping is None:
            raise RuntimeError("EKFACBlock.precondition called before request_inverses")
        q_a, q_g = self.basis
        return q_g @ ((q_g.T @ grad @ q_a) / (self.s + self.damping)) @ q_a.T

    def to_dense(self) -> torch.Tensor:  # acts on vec_c(M): (Q_A ⊗ Q_G) diag(1 / vec_c(s + λ)) (Q_A ⊗ Q_G)ᵀ
        q = torch.kron(*self.basis)
        return (q / vec_c(self.s + self.damping)) @ q.T

    def spectrum_bounds(self) -> tuple[float, float]:
        scale = self.s + self.damping
        return 1.0 / float(scale.max()), 1.0 / float(scale.min())

    def state_dict(self) -> dict:
        basis = None if self.basis is None else tuple(q.clone() for q in self.basis)
        return {"A": self.A.state_dict(), "G": self.G.state_dict(), "s": self.s.clone(), "basis": basis,
                "damping": self.damping}

    def load_state_dict(self, state: dict) -> None:
        self.A.load_state_dict(state["A"])
        self.G.load_state_dict(state["G"])
        self.s = state["s"].to(self.s, copy=True)
        self.basis = None if state["basis"] is None else tuple(q.to(self.s, copy=True) for q in state["basis"])
        self.damping = state["damping"]


def ekfac_block(decay: float = 0.9):
    """A recipe: ``CurvatureOptimizer(model, lr, blocks={nn.Linear: ekfac_block()})``."""

    def build(name, adapter, ctx):
        return EKFACBlock(name, adapter, decay, dtype=ctx.dtype, device=ctx.device)

    return build
