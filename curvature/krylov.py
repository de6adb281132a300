r"""Krylov solvers for matrix-free curvature: truncated CG (Hessian-free) and Lanczos (saddle-free Newton).

Everything here needs only ``v -> Av`` on flat 1-D tensors (a callable or a
:class:`~curvature.products.CurvatureOperator`), so it runs on any device and with any of the
products of :mod:`curvature.products`.

* :func:`truncated_cg` -- conjugate gradient on :math:`Ax = b` for a symmetric :math:`A` that is
  positive definite on the Krylov space, with the tricks of Martens (2010, "Deep learning via
  Hessian-free optimization", §4): warm start from a given :math:`x_0`; the relative-progress stop
  on the quadratic :math:`\phi(x) = \tfrac12 x^\top A x - b^\top x`,

  .. math::  i > k,\quad \phi(x_i) < 0,\quad \frac{\phi(x_i) - \phi(x_{i-k})}{\phi(x_i)} < k\,\varepsilon,
             \qquad k = \max(10, \lceil 0.1\,i\rceil),\ \varepsilon = 5\cdot10^{-4};

  and the iterates saved at :math:`i = \lceil\gamma^j\rceil` (:math:`\gamma = 1.3`) for
  CG-iteration backtracking by the caller. :math:`\phi` costs no product:
  :math:`\phi(x) = -\tfrac12 x^\top(b + r)` with :math:`r = b - Ax`. Directions of non-positive
  curvature (:math:`p^\top Ap \le 0`) stop the run with the last iterate (counted).
* :func:`lanczos` -- Lanczos tridiagonalization with full reorthogonalization (also used by the
  convergence harness's spectrum tools).
* :func:`saddle_free_operator` -- Dauphin et al. (2014)'s :math:`|H|^{-1}` restricted to a
  :math:`k`-dimensional Krylov space: with :math:`Q` the Lanczos basis, :math:`T = Q^\top H Q =
  S\Theta S^\top` and :math:`V = QS` the Ritz vectors,

  .. math::  |H|_k^{-1} g = V\,\mathrm{diag}\big(1/(\max(|\theta_i|, \mu) + \lambda)\big)\,V^\top g
             \;+\; \frac{(I - QQ^\top)\,g}{c},\qquad c = \max_i \max(|\theta_i|,\mu) + \lambda,

  where :math:`\mu` is the absolute-eigenvalue floor and :math:`\lambda \ge 0` the damping. The
  rest of the space (not seen by Lanczos) gets a damped gradient step of size :math:`1/c`, the
  safe :math:`1/(\|H\|+\lambda)` step since Lanczos finds the extreme eigenvalues first. When the
  Krylov space starts from :math:`g` (the default of the optimizer), :math:`g\in\mathrm{span}\,Q`
  and the second term vanishes up to rounding; with ``k = n`` and :math:`\mu = \lambda = 0` the
  result is exactly :math:`|H|^{-1}g`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from curvature.products import CurvatureOperator, as_matvec

__all__ = [
    "CGResult",
    "truncated_cg",
    "backtracking_schedule",
    "LanczosResult",
    "lanczos",
    "SaddleFreeOperator",
    "saddle_free_operator",
]

Matvec = Callable[[torch.Tensor], torch.Tensor] | CurvatureOperator


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None:
        if generator.device.type != "cpu":
            raise ValueError("pass a CPU torch.Generator; probes are drawn on the CPU and moved to the device")
        return generator
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else int(seed))
    return gen




# ============================================================================ truncated CG
def backtracking_schedule(max_iters: int, gamma: float = 1.3) -> list[int]:
    r"""Iterations :math:`\lceil\gamma^j\rceil \le` ``max_iters`` (deduplicated, ascending) at which
    :func:`truncated_cg` saves iterates (Martens 2010 §4.6)."""
    if not gamma > 1.0:
        raise ValueError(f"gamma must be > 1, got {gamma!r}")
    out, j = [], 0
    while True:
        i = math.ceil(gamma**j)
        if i > max_iters:
            return out
        if not out or i != out[-1]:
            out.append(i)
        j += 1


@dataclass
class CGResult:
    r"""Output of :func:`truncated_cg`.

    ``x`` is the last iterate, ``iterations`` the number of CG iterations run, ``products`` the
    number of products with :math:`A` used (one per iteration, plus one for a nonzero :math:`x_0`),
    ``stop_reason`` one of ``"tolerance"``, ``"progress"``, ``"max_iters"``,
    ``"negative_curvature"``, ``"non_finite"``; ``phi[i]`` is :math:`\phi(x_i)` and
    ``residual_norms[i]`` is :math:`\|b - Ax_i\|` for :math:`i = 0..` ``iterations``;
    ``saved`` holds ``(i, x_i)`` at the backtracking schedule, the last iterate always included.
    """

    x: torch.Tensor
    iterations: int
    products: int
    stop_reason: str
    phi: list[float] = field(default_factory=list)
    residual_norms: list[float] = field(default_factory=list)
    saved: list[tuple[int, torch.Tensor]] = field(default_factory=list)


def truncated_cg(
    matvec: Matvec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    max_iters: int = 250,
    tol: float = 0.0,
    progress_eps: float | None = 5e-4,
    min_progress_window: int = 10,
    progress_fraction: float = 0.1,
    save_gamma: float | None = 1.3,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> CGResult:
    r"""(Preconditioned) conjugate gradient on :math:`Ax = b`, truncated as in Hessian-free optimization.

    Args:
        matvec: ``v -> Av``, :math:`A` symmetric (positive definite on the Krylov space).
        b: right-hand side (1-D).
        x0: warm start (Martens: :math:`\zeta` times the previous solution), default zero.
        max_iters: iteration cap (Martens 2010: 250).
        tol: stop when :math:`\|r_i\| \le` ``tol`` :math:`\cdot\|b\|` (0 disables).
        progress_eps: :math:`\varepsilon` of the relative-progress rule (None disables it).
        min_progress_window, progress_fraction: :math:`k = \max(10, \lceil 0.1 i\rceil)`.
        save_gamma: save iterates at :math:`\lceil\gamma^j\rceil` for backtracking (None: only the last).
        preconditioner: ``r -> M^{-1} r`` for a symmetric positive definite :math:`M` (Martens uses a
            diagonal one); default none.
        callback: ``callback(i, x_i, r_i)`` after every iterate, :math:`i = 0..`.

    Raises ``ValueError`` for a non-1-D or non-finite ``b``/``x0`` or bad settings (nothing is computed).
    """
    if not isinstance(b, torch.Tensor) or b.dim() != 1:
        raise ValueError("b must be a 1-D tensor")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be an integer >= 1, got {max_iters!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if progress_eps is not None and not (math.isfinite(progress_eps) and progress_eps > 0):
        raise ValueError(f"progress_eps must be > 0 or None, got {progress_eps!r}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b is not finite")
    if x0 is not None and (x0.shape != b.shape or not bool(torch.isfinite(x0).all())):
        raise ValueError("x0 must be a finite tensor shaped like b")
    mv = matvec.matvec if isinstance(matvec, CurvatureOperator) else matvec
    save_at = set(backtracking_schedule(max_iters, save_gamma)) if save_gamma is not None else set()
    products = 0
    if x0 is None or not bool(x0.any()):
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - mv(x)
        products += 1
    b_norm = float(torch.linalg.vector_norm(b))
    z = preconditioner(r) if preconditioner is not None else r
    p = z.clone()
    rz = torch.dot(r, z)
    phi = [float(-0.5 * torch.dot(x, b + r))]
    res = [float(torch.linalg.vector_norm(r))]
    saved: list[tuple[int, torch.Tensor]] = []
    if callback is not None:
        callback(0, x, r)
    reason = "max_iters"
    i = 0
    if b_norm == 0.0 and x0 is None:
        return CGResult(x, 0, products, "tolerance", phi, res, [(0, x.clone())])
    while i < max_iters:
        if res[-1] <= tol * b_norm:
            reason = "tolerance"
            break
        ap = mv(p)
        products += 1
        pap = torch.dot(p, ap)
        if not bool(torch.isfinite(pap)) or not bool(torch.isfinite(ap).all()):
            reason = "non_finite"
            break
        if float(pap) <= 0.0:
            reason = "negative_curvature"
            break
        alpha = rz / pap
        x = x + alpha * p
        r = r - alpha * ap
        z = preconditioner(r) if preconditioner is not None else r
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
        i += 1
        phi.append(float(-0.5 * torch.dot(x, b + r)))
        res.append(float(torch.linalg.vector_norm(r)))
        if callback is not None:
            callback(i, x, r)
        if i in save_at:
            saved.append((i, x.clone()))
        if progress_eps is not None:
            k = max(min_progress_window, math.ceil(progress_fraction * i))
            if i > k and phi[i] < 0 and (phi[i] - phi[i - k]) / phi[i] < k * progress_eps:
                reason = "progress"
                break
    if not saved or saved[-1][0] != i:
        saved.append((i, x.clone()))
    return CGResult(x, i, products, reason, phi, res, saved)

# ================================================================================= Lanczos
@dataclass(frozen=True)
class LanczosResult:
    r"""Output of :func:`lanczos`: :math:`A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top`.

    ``alphas`` (length :math:`m`) is the diagonal and ``betas`` (length :math:`m-1`) the
    off-diagonal of the symmetric tridiagonal :math:`T_m = Q_m^\top A Q_m`; ``basis`` is
    :math:`Q_m` (``n × m``, orthonormal columns, first column = normalized start vector);
    ``residual_norm`` is :math:`\beta_m`.  ``m`` can be smaller than the requested number of steps
    when an invariant subspace is found (breakdown), in which case ``breakdown`` is True.
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    basis: torch.Tensor
    residual_norm: float
    breakdown: bool

    @property
    def num_steps(self) -> int:
        return int(self.alphas.shape[0])

    def tridiagonal(self) -> torch.Tensor:
        """The dense ``m × m`` tridiagonal matrix :math:`T_m`."""
        t = torch.diag(self.alphas)
        if self.betas.numel():
            t = t + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)
        return t

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values (ascending) and eigenvectors of :math:`T_m` (``torch.linalg.eigh``)."""
        return torch.linalg.eigh(self.tridiagonal())


def lanczos(
    matvec: Matvec,
    n: int,
    num_steps: int,
    *,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    breakdown_tol: float | None = None,
    check_every: int | None = 1,
    stop_when: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> LanczosResult:
    r"""Lanczos tridiagonalization of the symmetric operator ``matvec`` with full reorthogonalization.

    Starting from :math:`q_1 = v_0/\|v_0\|` (a seeded Gaussian vector when ``v0`` is None), for
    :math:`j = 1..m`:
    :math:`w = Aq_j - \beta_{j-1}q_{j-1}`, :math:`\alpha_j = q_j^\top w`, :math:`w \leftarrow w - \alpha_j q_j`,
    then :math:`w` is re-orthogonalized twice against all previous :math:`q`'s (classical
    Gram–Schmidt, "twice is enough"), :math:`\beta_j = \|w\|`, :math:`q_{j+1} = w/\beta_j`.
    Stops early (breakdown) when :math:`\beta_j \le` ``breakdown_tol`` (default
    :math:`\sqrt{n}\,\varepsilon\cdot\max_i(|\alpha_i|, \beta_i)\cdot 100`): the Krylov space is then
    invariant and the Ritz values are exact eigenvalues.

    Host synchronization: every quantity stays on the tensors' device; the breakdown test reads
    the device once every ``check_every`` steps (default 1: after every step) and once at the end
    (``None``: only at the end). Steps run past a breakdown between two reads are discarded, so the
    result is the same for every ``check_every``; only up to ``check_every - 1`` extra products are
    spent. (:math:`q_{j+1} = w/\max(\beta_j, \text{tiny})`, so an exact breakdown :math:`w = 0`
    produces zeros, never NaN, in the discarded steps.)

    ``stop_when(alphas, betas, residual)`` (optional) is evaluated at the same reads on the
    tridiagonal built so far (diagonal, off-diagonal, :math:`\beta_j`) and returns a 0-dim bool
    tensor on the device; True ends the run there (e.g. converged Ritz values), in the same read.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"check_every must be an integer >= 1 or None, got {check_every!r}")
    op = as_matvec(matvec, n, dtype, device)
    m_max = min(int(num_steps), n)
    if v0 is None:
        gen = _generator(generator, seed)
        v0 = torch.randn(n, generator=gen, dtype=torch.float64)
    if v0.dim() != 1 or v0.shape[0] != n:
        raise ValueError(f"v0 has shape {tuple(v0.shape)}, expected a 1-D vector of length n={n}")
    q = v0.detach().to(dtype=op.dtype, device=op.device)
    norm = torch.linalg.vector_norm(q)
    if not norm > 0:
        raise ValueError("the start vector is zero")
    q = q / norm
    eps = torch.finfo(op.dtype).eps
    tiny = torch.finfo(op.dtype).tiny
    basis = torch.empty(n, m_max, dtype=op.dtype, device=op.device)
    alphas: list[torch.Tensor] = []
    all_betas: list[torch.Tensor] = []  # beta_j for every step run (the last one is the residual)
    tols: list[torch.Tensor] = []
    scale = torch.zeros((), dtype=op.dtype, device=op.device)
    beta_prev = None
    unchecked = 0  # index of the first step whose breakdown test has not been read
    stop = None  # index of the breakdown step, once read
    for j in range(m_max):
        basis[:, j] = q
        w = op.matvec(q)
        if beta_prev is not None:
            w = w - beta_prev * basis[:, j - 1]
        alpha = torch.dot(q, w)
        w = w - alpha * q
        qj = basis[:, : j + 1]
        for _ in range(2):
            w = w - qj @ (qj.T @ w)
        beta = torch.linalg.vector_norm(w)
        alphas.append(alpha)
        all_betas.append(beta)
        scale = torch.maximum(scale, torch.maximum(alpha.abs(), beta))
        if breakdown_tol is not None:
            tols.append(torch.as_tensor(breakdown_tol, dtype=op.dtype, device=op.device))
        else:
            tols.append(100.0 * math.sqrt(n) * eps * torch.clamp_min(scale, 1e-300))
        last = j + 1 == m_max
        if last or (check_every is not None and (j + 1) % check_every == 0):
            flags = torch.stack(all_betas[unchecked:]) <= torch.stack(tols[unchecked:])
            if stop_when is not None and not last:
                done = stop_when(torch.stack(alphas), torch.stack(all_betas[:-1]) if j else alphas[0].new_zeros(0),
                                 beta).reshape(1).to(torch.bool)
                flags = torch.cat([flags, done])
            hit = torch.nonzero(flags)  # one read of the device for the whole block
            if hit.numel():
                first = int(hit[0, 0])
                if first < flags.numel() - (stop_when is not None and not last):
                    stop = unchecked + first  # a breakdown
                break  # (else: stop_when said done; all steps so far are kept)
            unchecked = j + 1
        if not last:
            q = w / torch.clamp_min(beta, tiny)
            beta_prev = beta
    m = len(alphas) if stop is None else stop + 1
    breakdown = stop is not None and m < n
    alphas_t = torch.stack(alphas[:m])
    betas_t = torch.stack(all_betas[: m - 1]) if m > 1 else torch.zeros(0, dtype=op.dtype, device=op.device)
    residual = float(all_betas[m - 1])
    basis = basis[:, :m]
    return LanczosResult(alphas=alphas_t, betas=betas_t, basis=basis, residual_norm=residual, breakdown=breakdown)




# ============================================================================ saddle-free Newton
@dataclass(frozen=True)
class SaddleFreeOperator:
    r""":math:`|H|_k^{-1}` of :func:`saddle_free_operator`: Ritz pairs of :math:`H` on a Krylov space,
    absolute values floored at ``floor``, plus ``damping``; the complement gets ``1/complement_curvature``."""

    basis: torch.Tensor
    ritz_values: torch.Tensor
    ritz_vectors: torch.Tensor
    floor: float
    damping: float

    @property
    def curvatures(self) -> torch.Tensor:
        r""":math:`\max(|\theta_i|, \mu) + \lambda`, the modelled curvature along each Ritz vector."""
        return self.ritz_values.abs().clamp_min(self.floor) + self.damping

    @property
    def complement_curvature(self) -> float:
        r""":math:`c`: the largest modelled curvature (the complement's damped gradient step is :math:`1/c`)."""
        return float(self.curvatures.max())

    def _split(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vecs = self.basis @ self.ritz_vectors
        coeff = vecs.T @ v
        rest = v - self.basis @ (self.basis.T @ v)
        return vecs, coeff, rest

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        r""":math:`|H|_k^{-1} g`."""
        vecs, coeff, rest = self._split(g)
        return vecs @ (coeff / self.curvatures) + rest / self.complement_curvature

    def matvec(self, d: torch.Tensor) -> torch.Tensor:
        r""":math:`|H|_k d` (the inverse of :meth:`solve`): the quadratic model of the step."""
        vecs, coeff, rest = self._split(d)
        return vecs @ (coeff * self.curvatures) + rest * self.complement_curvature

    def to_dense(self) -> torch.Tensor:
        """Dense :math:`|H|_k^{-1}` (``n`` solves; tests only)."""
        n = self.basis.shape[0]
        eye = torch.eye(n, dtype=self.basis.dtype, device=self.basis.device)
        return torch.stack([self.solve(eye[:, j]) for j in range(n)], dim=1)


def saddle_free_operator(
    matvec: Matvec,
    start: torch.Tensor,
    k: int,
    *,
    floor: float = 0.0,
    damping: float = 0.0,
    breakdown_tol: float | None = None,
) -> tuple[SaddleFreeOperator, LanczosResult]:
    r"""Build :math:`|H|_k^{-1}` from ``k`` Lanczos steps of ``matvec`` started at ``start``.

    Args:
        matvec: ``v -> Hv`` (symmetric, possibly indefinite).
        start: the Lanczos start vector (the gradient in :class:`~optimizers.saddle_free.SaddleFreeNewton`).
        k: number of Lanczos vectors (products); capped at ``n``; fewer on breakdown.
        floor: :math:`\mu \ge 0`, absolute eigenvalues below it are raised to it.
        damping: :math:`\lambda \ge 0`, added to every modelled curvature.

    Raises ``ValueError`` when ``k < 1``, ``floor``/``damping`` are negative or not finite, or
    :math:`\mu + \lambda = 0` while a Ritz value is (numerically) zero -- the inverse would not exist.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    for name, value in (("floor", floor), ("damping", damping)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    n = start.shape[0]
    op = as_matvec(matvec, n, start.dtype, start.device)
    result = lanczos(op, n, k, v0=start, breakdown_tol=breakdown_tol)
    values, vectors = result.ritz()
    sfo = SaddleFreeOperator(result.basis, values, vectors, float(floor), float(damping))
    if not bool((sfo.curvatures > 0).all()):
        raise ValueError("a Ritz value is zero and floor + damping = 0: |H|^-1 does not exist; set floor or damping > 0")
    return sfo, result
