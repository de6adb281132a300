r"""Sharpness, preconditioned sharpness and edge-of-stability diagnostics.

* Sharpness :math:`\lambda_{\max}(H)` (largest *algebraic* eigenvalue of the loss Hessian).
* Preconditioned sharpness :math:`\lambda_{\max}(PH)` for a symmetric positive-definite
  preconditioner :math:`P` (the update is :math:`x^+ = x - \eta P\nabla f`).  :math:`PH` is not
  symmetric, but it is similar to the symmetric :math:`P^{1/2}HP^{1/2}`
  (:math:`PH = P^{1/2}(P^{1/2}HP^{1/2})P^{-1/2}`), so its eigenvalues are real and equal.
* Gradient descent on the quadratic :math:`\tfrac12 x^\top A x` (:math:`A \succ 0`) multiplies the
  error by :math:`I-\eta A`; it converges iff :math:`\eta\lambda_{\max}(A) < 2`.  Preconditioned:
  iff :math:`\eta\lambda_{\max}(PA) < 2`; heavy-ball momentum :math:`\beta`: iff
  :math:`\eta\lambda_{\max} < 2(1+\beta)`.  Cohen et al. (2021) observe full-batch GD hovering at
  sharpness :math:`\approx 2/\eta` (the *edge of stability*).

**Method for** :func:`preconditioned_sharpness` (only applications :math:`v\mapsto Pv` are needed).
:math:`K = HP` is self-adjoint in the :math:`P`-inner product :math:`\langle x,y\rangle_P = x^\top P y`
(:math:`\langle x, HPy\rangle_P = x^\top PHP\,y` is symmetric in :math:`x,y`), and it has the
eigenvalues of :math:`PH` (:math:`HP = P^{-1}(PH)P`).  Lanczos on :math:`K` in the
:math:`P`-inner product (full reorthogonalization) is exactly ordinary Lanczos on
:math:`P^{1/2}HP^{1/2}` in the variables :math:`u = P^{1/2}q` -- without ever forming
:math:`P^{1/2}` or :math:`P^{-1}`.  Each step costs one :math:`H` product and one :math:`P`
application; the Ritz values of the tridiagonal matrix are the estimates (exact after :math:`n`
steps, and the largest Ritz value increases monotonically to :math:`\lambda_{\max}` from below).
Alternatively ``precond_is_sqrt=True`` means the callable applies a symmetric :math:`S=P^{1/2}`
and the symmetric operator :math:`v\mapsto SHSv` goes to the torch Lanczos of :func:`sharpness`; ``method="dense"``
materializes :math:`H` and :math:`P` (small :math:`n` only) and takes the eigenvalues of
:math:`L^\top H L` with :math:`P = LL^\top` (Cholesky; similar to :math:`PH`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from convergence.hessian import CurvatureOperator, MatvecOperator, as_matvec
from convergence.spectrum import _generator, lanczos_extremes

__all__ = [
    "sharpness",
    "preconditioned_sharpness",
    "preconditioned_lanczos",
    "edge_of_stability_ratio",
    "stability_threshold",
    "gd_is_stable",
]

Matvec = Callable[[torch.Tensor], torch.Tensor] | CurvatureOperator


def sharpness(
    matvec: Matvec,
    n: int,
    *,
    tol: float = 0.0,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> float:
    r""":math:`\lambda_{\max}(H)`, the largest algebraic eigenvalue: torch Lanczos on the operator's device
    (:func:`~convergence.spectrum.lanczos_extremes`, ``which="largest"``), stopped when the Ritz residual
    bound is below ``tol`` (``0``: ``1e-10``) times the Ritz value, or at ``min(n, 1000)`` steps."""
    op = as_matvec(matvec, n, dtype, device)
    return _largest(op, n, tol=tol, seed=seed)


def _largest(op: CurvatureOperator, n: int, *, tol: float, seed: int | None) -> float:
    if n == 1:
        one = torch.ones(1, dtype=op.dtype, device=op.device)
        return float(op.matvec(one)[0])
    res = lanczos_extremes(op, n, which="largest", tol=tol if tol > 0 else 1e-10, max_steps=min(n, 1000), seed=seed)
    return res.lambda_max


def preconditioned_lanczos(
    hess_matvec: Matvec,
    precond_apply: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    num_steps: int,
    *,
    v0: torch.Tensor | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    check_every: int = 10,
) -> torch.Tensor:
    r"""Ritz values (ascending) of :math:`PH` from ``num_steps`` of :math:`P`-inner-product Lanczos on :math:`K = HP`.

    Recurrence with :math:`z_j = Pq_j` stored: :math:`w = HPq_j - \beta_{j-1}q_{j-1}`,
    :math:`\alpha_j = z_j^\top w`, :math:`w \leftarrow w - \alpha_j q_j`, twice
    :math:`w \leftarrow w - Q(Z^\top w)` (P-orthogonalization), :math:`\beta_j = \sqrt{w^\top Pw}`,
    :math:`q_{j+1} = w/\beta_j`.  With :math:`u_j = P^{1/2}q_j` this is Euclidean Lanczos on
    :math:`P^{1/2}HP^{1/2}`, so :math:`T = Q^\top PHP\,Q` and its eigenvalues are Ritz values of
    :math:`PH`.  ``precond_apply`` must be symmetric positive definite. Everything stays on the
    operator's device: the breakdown test is read once every ``check_every`` steps (steps past a
    breakdown are discarded), and the Ritz values are returned as a device tensor.
    """
    op = as_matvec(hess_matvec, n, dtype, device)
    m_max = min(int(num_steps), n)
    if m_max < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")

    def apply_p(v: torch.Tensor) -> torch.Tensor:
        out = precond_apply(v)
        if not isinstance(out, torch.Tensor) or out.shape != (n,):
            raise ValueError(f"precond_apply must return a 1-D tensor of length n={n}")
        return out.to(dtype=op.dtype, device=op.device)

    if v0 is None:
        v0 = torch.randn(n, generator=_generator(None, seed), dtype=torch.float64)
    q = v0.detach().to(dtype=op.dtype, device=op.device)
    z = apply_p(q)
    qpq = float(torch.dot(q, z))  # one read: the start vector must have q^T P q > 0
    if not qpq > 0:
        raise ValueError("q^T P q <= 0 for the start vector: the preconditioner is not positive definite")
    norm = math.sqrt(qpq)
    q, z = q / norm, z / norm
    eps = torch.finfo(op.dtype).eps
    tiny = torch.finfo(op.dtype).tiny
    Q = torch.empty(n, m_max, dtype=op.dtype, device=op.device)
    Z = torch.empty(n, m_max, dtype=op.dtype, device=op.device)
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    flags: list[torch.Tensor] = []  # breakdown test of each beta, read every check_every steps
    beta_prev = None
    scale = torch.zeros((), dtype=op.dtype, device=op.device)
    unchecked, stop = 0, None
    for j in range(m_max):
        Q[:, j], Z[:, j] = q, z
        w = op.matvec(z)  # H P q_j
        if beta_prev is not None:
            w = w - beta_prev * Q[:, j - 1]
        alpha = torch.dot(z, w)
        w = w - alpha * q
        Qj, Zj = Q[:, : j + 1], Z[:, : j + 1]
        for _ in range(2):
            w = w - Qj @ (Zj.T @ w)
        alphas.append(alpha)
        if j + 1 == m_max:
            break
        pw = apply_p(w)
        beta = torch.sqrt(torch.clamp_min(torch.dot(w, pw), 0.0))
        scale = torch.maximum(scale, torch.maximum(alpha.abs(), beta))
        flags.append(beta <= 100.0 * math.sqrt(n) * eps * torch.clamp_min(scale, 1e-300))
        betas.append(beta)
        if (j + 1) % check_every == 0 or j + 2 == m_max:
            hit = torch.nonzero(torch.stack(flags[unchecked:]))  # one read per check_every steps
            if hit.numel():
                stop = unchecked + int(hit[0, 0])  # invariant subspace: the Ritz values are exact eigenvalues
                break
            unchecked = j + 1
        beta_prev = beta
        safe = torch.clamp_min(beta, tiny)
        q, z = w / safe, pw / safe
    m = len(alphas) if stop is None else stop + 1
    t = torch.diag(torch.stack(alphas[:m]))
    if m > 1:
        off = torch.stack(betas[: m - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t)


def preconditioned_sharpness(
    hess_matvec: Matvec,
    precond_apply: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    method: str = "lanczos",
    precond_is_sqrt: bool = False,
    num_steps: int | None = None,
    tol: float = 0.0,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> float:
    r""":math:`\lambda_{\max}(PH) = \lambda_{\max}(P^{1/2}HP^{1/2})` for symmetric positive-definite :math:`P`.

    ``precond_apply`` applies :math:`P` (or :math:`P^{1/2}` when ``precond_is_sqrt=True``) to a flat
    vector.  Methods (see the module docstring):

    * ``"lanczos"`` (default): :func:`preconditioned_lanczos` with ``num_steps`` (default
      ``min(n, 100)``) steps; a lower bound that is exact once the Krylov space is invariant (at the
      latest after ``n`` steps).  With ``precond_is_sqrt=True``: the largest eigenvalue of
      :math:`v\mapsto SHSv` (torch Lanczos, as :func:`sharpness`).
    * ``"dense"``: materialize :math:`H` and :math:`P` by ``n`` products each and return the largest
      eigenvalue of :math:`L^\top HL`, :math:`P = LL^\top` (or of :math:`SHS`), in float64.
    """
    op = as_matvec(hess_matvec, n, dtype, device)
    if method not in ("lanczos", "dense"):
        raise ValueError(f"unknown method {method!r}; use 'lanczos' or 'dense'")
    if method == "dense":
        h = op.to_dense(max_n=max(n, 1)).detach().to(dtype=torch.float64)
        h = 0.5 * (h + h.T)
        eye = torch.eye(n, dtype=op.dtype, device=op.device)
        p = torch.stack([precond_apply(eye[:, j]) for j in range(n)], dim=1).to(device=h.device, dtype=torch.float64)
        p = 0.5 * (p + p.T)
        if precond_is_sqrt:
            return float(torch.linalg.eigvalsh(p @ h @ p)[-1])
        chol = torch.linalg.cholesky(p)
        return float(torch.linalg.eigvalsh(chol.T @ h @ chol)[-1])
    if precond_is_sqrt:
        sym = MatvecOperator(
            lambda v: precond_apply(op.matvec(precond_apply(v).to(dtype=op.dtype, device=op.device))).to(
                dtype=op.dtype, device=op.device
            ),
            n,
            dtype=op.dtype,
            device=op.device,
        )
        return _largest(sym, n, tol=tol, seed=seed)
    steps = min(n, 100) if num_steps is None else num_steps
    return float(preconditioned_lanczos(op, precond_apply, n, steps, seed=seed)[-1])


def edge_of_stability_ratio(lr: float, sharpness: float) -> float:
    r""":math:`\eta\lambda_{\max}/2`: below 1 GD is stable on the local quadratic, above 1 it is not."""
    return float(lr) * float(sharpness) / 2.0


def stability_threshold(lr: float, momentum: float = 0.0) -> float:
    r"""The critical sharpness :math:`2(1+\beta)/\eta` (heavy-ball momentum :math:`\beta`; plain GD: :math:`2/\eta`)."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    return 2.0 * (1.0 + momentum) / float(lr)


def gd_is_stable(lr: float, sharpness: float, momentum: float = 0.0) -> bool:
    r"""Whether (heavy-ball) GD with step ``lr`` is stable on a quadratic of curvature ``sharpness``:
    :math:`\eta\lambda_{\max} < 2(1+\beta)` (strict; at equality the iteration oscillates without decaying)."""
    return float(lr) * float(sharpness) < 2.0 * (1.0 + momentum)
