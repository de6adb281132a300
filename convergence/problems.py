r"""Small problems with analytic oracles (theory notes §4.7), as ``(model, loss_fn, dataset)`` bundles.

Every factory returns a :class:`Problem` in float64 by default. Parameters are ordered as in
``model.named_parameters()`` with row-major ``flatten`` (the convention of
:mod:`convergence.hessian`), and :meth:`Problem.hessian` returns the exact Hessian of the
full-data loss :math:`f` in that order, where one is known in closed form.

Linear models :math:`z_i = W x_i + b` (``nn.Linear``): with :math:`J_i = \partial z_i/\partial\theta
= [I_k \otimes x_i^\top,\ I_k]` (row-major W, then b) and the per-example output Hessian
:math:`S_i = \nabla^2_z \ell_i`, the Hessian is exactly :math:`H = \frac1N\sum_i J_i^\top S_i J_i`
(the model is affine in θ, so the Hessian equals the GGN):

* least squares, :math:`\ell = \tfrac12\|z - t\|^2`: :math:`S_i = I`, so
  :math:`H = \bar X^\top\bar X/N \otimes I_k` (up to the ordering), :math:`L = \lambda_{\max}(\bar X^\top\bar X/N)`;
* logistic regression (BCE with logits): :math:`S_i = p_i(1-p_i)\le 1/4`, :math:`L \le \lambda_{\max}/4`;
* softmax regression (cross-entropy): :math:`S_i = \operatorname{diag}(p_i) - p_ip_i^\top`
  (PSD, :math:`\preceq \tfrac12 I`), :math:`L \le \lambda_{\max}/2`; null space :math:`x\otimes 1`;
* prescribed-spectrum quadratic :math:`f(w) = \tfrac12(w-w^\ast)^\top Q(w-w^\ast)` with
  :math:`Q = U\operatorname{diag}(\lambda)U^\top`, realised as least squares with
  :math:`X = \sqrt N\,O\operatorname{diag}(\sqrt\lambda)U^\top` (:math:`O^\top O = I`), so that
  :math:`X^\top X/N = Q` exactly and the data set still gives stochastic gradients.

Here :math:`\bar X = [X, 1]` when the layer has a bias. A small tanh MLP (teacher-student
regression, no closed-form Hessian) completes the set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

__all__ = [
    "Problem",
    "least_squares",
    "logistic_regression",
    "softmax_regression",
    "quadratic",
    "tanh_mlp",
    "half_mse",
    "mean_bce_with_logits",
    "mean_cross_entropy",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def half_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac1N\sum_i \tfrac12\|z_i - t_i\|^2` (sum over outputs, mean over the batch)."""
    return 0.5 * (output - target).pow(2).reshape(output.shape[0], -1).sum(1).mean()


def mean_bce_with_logits(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, summed over outputs and averaged over the batch."""
    per = F.binary_cross_entropy_with_logits(output, target, reduction="none")
    return per.reshape(output.shape[0], -1).sum(1).mean()


def mean_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy with integer labels, averaged over the batch."""
    return F.cross_entropy(output, target)


@dataclass
class Problem:
    """A model, a loss, a finite data set (f is the mean loss over all of it) and known oracles.

    Attributes:
        name: short identifier.
        model: the module (its current parameters are the point x).
        loss_fn: ``loss_fn(model(inputs), targets)``, a batch mean.
        dataset: a ``TensorDataset(inputs, targets)`` (or any map-style data set of pairs); f is the
            loss over the whole set.
        lipschitz: a global upper bound L on ‖∇²f‖ (exact for quadratics), or None if unknown.
        minimizer: flat parameters of a minimizer of f when known in closed form, else None.
        hessian_fn: ``hessian_fn(problem)`` -> the exact Hessian of f at the current parameters,
            or None when there is no closed form.
    """

    name: str
    model: nn.Module
    loss_fn: LossFn
    dataset: TensorDataset
    lipschitz: float | None = None
    minimizer: torch.Tensor | None = None
    hessian_fn: Callable[["Problem"], torch.Tensor] | None = None

    @property
    def inputs(self) -> torch.Tensor:
        return self.full_batch[0]

    @property
    def targets(self) -> torch.Tensor:
        return self.full_batch[1]

    @property
    def full_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of the whole data set (a ``TensorDataset``'s tensors, or every item
        of any other map-style data set collated once with ``default_collate``)."""
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is not None and len(tensors) == 2:
            return tensors[0], tensors[1]
        cached = self.__dict__.get("_full_batch")
        if cached is None:
            from torch.utils.data import default_collate

            items = default_collate([self.dataset[i] for i in range(len(self.dataset))])
            if not isinstance(items, (tuple, list)) or len(items) != 2:
                raise ValueError("every item of the data set must be an (input, target) pair")
            cached = self.__dict__["_full_batch"] = (items[0], items[1])
        return cached

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def parameters_flat(self) -> torch.Tensor:
        """The current point as one flat vector (``named_parameters`` order, row-major)."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters() if p.requires_grad])

    def set_parameters_flat(self, theta: torch.Tensor) -> None:
        """Overwrite the parameters from a flat vector (inverse of :meth:`parameters_flat`)."""
        offset = 0
        with torch.no_grad():
            for p in self.model.parameters():
                if p.requires_grad:
                    p.copy_(theta[offset:offset + p.numel()].reshape(p.shape))
                    offset += p.numel()

    def loss(self, batch: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """f at the current point (no graph), or the loss on ``batch``."""
        x, y = self.full_batch if batch is None else batch
        with torch.no_grad():
            return self.loss_fn(self.model(x), y)

    def gradient(self, batch: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        r"""Flat :math:`\nabla f` (or the gradient on ``batch``) at the current point, by autograd."""
        x, y = self.full_batch if batch is None else batch
        params = [p for p in self.model.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), y)
            grads = torch.autograd.grad(loss, params)
        return torch.cat([g.reshape(-1) for g in grads])

    def hessian(self) -> torch.Tensor:
        """The exact Hessian of f at the current point (closed form); raises if there is none."""
        if self.hessian_fn is None:
            raise NotImplementedError(f"problem {self.name!r} has no closed-form Hessian")
        return self.hessian_fn(self)

    def make_closure(self, optimizer: torch.optim.Optimizer) -> Callable[[Sequence[torch.Tensor]], Callable[[], torch.Tensor]]:
        """``make_closure(batch)`` -> a closure that zeroes gradients, runs forward/backward on ``batch``."""

        def make(batch: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor]:
            x, y = batch

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
                return loss

            return closure

        return make


# ---------------------------------------------------------------------------------------- helpers
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _linear_jacobian_gram(x: torch.Tensor, weights: torch.Tensor, has_bias: bool) -> torch.Tensor:
    r""":math:`\frac1N\sum_i J_i^\top S_i J_i` for an affine layer, parameters (W row-major, then b).

    ``weights`` holds the output Hessians :math:`S_i` as ``[N, k, k]``. With
    :math:`\bar x_i = [x_i; 1]`, the entry for :math:`(W_{cj}, W_{c'j'})` is
    :math:`\frac1N\sum_i S_{i,cc'}\bar x_{ij}\bar x_{ij'}`; the bias plays the role of the last column.
    """
    n, d = x.shape
    k = weights.shape[1]
    xb = torch.cat([x, x.new_ones(n, 1)], 1) if has_bias else x
    da = xb.shape[1]
    # block[c, j, c', j'] = mean_i S_i[c, c'] xb_i[j] xb_i[j']
    block = torch.einsum("ncd,nj,nl->cjdl", weights, xb, xb) / n
    full = block.reshape(k * da, k * da)  # index (c, j) of the matrix [W | b]
    if not has_bias:
        return full
    # reorder (c, j) over [W | b] into (W row-major, b)
    w_idx = [c * da + j for c in range(k) for j in range(d)]
    b_idx = [c * da + d for c in range(k)]
    order = torch.tensor(w_idx + b_idx, device=x.device)
    return full[order][:, order]


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> nn.Linear:
    """PyTorch's default ``nn.Linear`` initialisation (U(±1/√fan_in)) drawn from ``generator``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.empty(p.shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator))
    return layer


def _linear(d: int, k: int, bias: bool, dtype, device, seed: int) -> nn.Linear:
    layer = _init_linear(nn.Linear(d, k, bias=bias, dtype=torch.float64), _generator(seed + 7919))
    return layer.to(dtype=dtype, device=device)


def _mlp(d: int, hidden: int, outputs: int, generator: torch.Generator) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(d, hidden, dtype=torch.float64), nn.Tanh(), nn.Linear(hidden, outputs, dtype=torch.float64))
    _init_linear(net[0], generator)
    _init_linear(net[2], generator)
    return net


def _gram_lmax(x: torch.Tensor, bias: bool) -> float:
    xb = torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if bias else x
    gram = (xb.T @ xb).double() / x.shape[0]
    return float(torch.linalg.eigvalsh(gram)[-1])


# ---------------------------------------------------------------------------------------- problems
def least_squares(
    n: int = 256, d: int = 5, outputs: int = 1, *, noise: float = 0.1, bias: bool = True, seed: int = 0,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> Problem:
    r"""Linear least squares :math:`f = \frac1{2N}\|\bar X\bar W^\top - T\|_F^2` with Gaussian features.

    Oracles: :math:`H = \bar X^\top\bar X/N` per output (constant), :math:`L = \lambda_{\max}(H)`
    exactly, the minimizer from the normal equations.
    """
    _check_sizes(n=n, d=d, outputs=outputs)
    g = _generator(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    w_true = torch.randn(outputs, d, generator=g, dtype=torch.float64)
    t = x @ w_true.T + 0.5 + noise * torch.randn(n, outputs, generator=g, dtype=torch.float64)
    x, t = x.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)
    model = _linear(d, outputs, bias, dtype, device, seed)

    xb = torch.cat([x, x.new_ones(n, 1)], 1) if bias else x
    sol = torch.linalg.lstsq(xb.double().cpu(), t.double().cpu()).solution.T  # [outputs, d_a]
    minimizer = torch.cat([sol[:, :d].reshape(-1), sol[:, d]]) if bias else sol.reshape(-1)

    def hessian(problem: Problem) -> torch.Tensor:
        eye = torch.eye(outputs, dtype=x.dtype, device=x.device).expand(n, outputs, outputs)
        return _linear_jacobian_gram(x, eye, bias)

    return Problem("least_squares", model, half_mse, TensorDataset(x, t), _gram_lmax(x, bias),
                   minimizer.to(dtype=dtype, device=device), hessian)


def logistic_regression(
    n: int = 256, d: int = 5, *, bias: bool = True, seed: int = 0,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> Problem:
    r"""Binary logistic regression (BCE with logits, labels drawn from a logistic teacher).

    :math:`H = \frac1N\sum_i p_i(1-p_i)\bar x_i\bar x_i^\top` (= GGN = Fisher), :math:`L = \lambda_{\max}(\bar X^\top\bar X/N)/4`.
    """
    _check_sizes(n=n, d=d)
    g = _generator(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    p = torch.sigmoid(x @ w_true)
    t = (torch.rand(n, generator=g, dtype=torch.float64) < p).double().unsqueeze(1)
    x, t = x.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)
    model = _linear(d, 1, bias, dtype, device, seed)

    def hessian(problem: Problem) -> torch.Tensor:
        with torch.no_grad():
            q = torch.sigmoid(problem.model(x))  # [N, 1]
        return _linear_jacobian_gram(x, (q * (1 - q)).unsqueeze(-1), bias)

    return Problem("logistic_regression", model, mean_bce_with_logits, TensorDataset(x, t),
                   _gram_lmax(x, bias) / 4.0, None, hessian)


def softmax_regression(
    n: int = 256, d: int = 5, classes: int = 3, *, bias: bool = True, seed: int = 0,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> Problem:
    r"""Multinomial logistic regression (cross-entropy, labels from a softmax teacher).

    :math:`H = \frac1N\sum_i J_i^\top(\operatorname{diag}p_i - p_ip_i^\top)J_i`, PSD with the null
    space :math:`\bar x\otimes 1` (adding a constant to every logit changes nothing), and
    :math:`L \le \lambda_{\max}(\bar X^\top\bar X/N)/2`.
    """
    _check_sizes(n=n, d=d, classes=classes)
    g = _generator(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(classes, d, generator=g, dtype=torch.float64)
    probs = torch.softmax(x @ w_true.T, 1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    x, labels = x.to(dtype=dtype, device=device), labels.to(device=device)
    model = _linear(d, classes, bias, dtype, device, seed)

    def hessian(problem: Problem) -> torch.Tensor:
        with torch.no_grad():
            q = torch.softmax(problem.model(x), 1)
        s = torch.diag_embed(q) - q.unsqueeze(2) * q.unsqueeze(1)
        return _linear_jacobian_gram(x, s, bias)

    return Problem("softmax_regression", model, mean_cross_entropy, TensorDataset(x, labels),
                   _gram_lmax(x, bias) / 2.0, None, hessian)


def quadratic(
    eigenvalues: Sequence[float] | torch.Tensor, *, samples_per_dim: int = 32, noise: float = 0.1, seed: int = 0,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> Problem:
    r"""The quadratic :math:`f(w) = \tfrac12 (w - w^\ast)^\top Q (w - w^\ast) + c` with prescribed spectrum.

    ``Q = U diag(eigenvalues) Uᵀ`` with a random orthogonal U. Realised as least squares without
    bias on ``N = samples_per_dim·n`` rows :math:`X = \sqrt N\,O\operatorname{diag}(\sqrt\lambda)U^\top`
    (so :math:`X^\top X/N = Q` exactly) with noisy targets; the minimizer :math:`w^\ast` is the
    least-squares solution and the model is ``nn.Linear(n, 1, bias=False)``. Eigenvalues must be > 0.
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1)
    if lam.numel() < 1 or not bool((lam > 0).all()) or not bool(torch.isfinite(lam).all()):
        raise ValueError("eigenvalues must be a non-empty sequence of finite numbers > 0")
    _check_sizes(samples_per_dim=samples_per_dim)
    dim = lam.numel()
    big_n = samples_per_dim * dim
    g = _generator(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    o, _ = torch.linalg.qr(torch.randn(big_n, dim, generator=g, dtype=torch.float64))
    x = math.sqrt(big_n) * o @ torch.diag(lam.sqrt()) @ u.T
    w_true = torch.randn(dim, generator=g, dtype=torch.float64)
    t = (x @ w_true + noise * torch.randn(big_n, generator=g, dtype=torch.float64)).unsqueeze(1)
    minimizer = torch.linalg.lstsq(x, t).solution.reshape(-1)
    q_matrix = u @ torch.diag(lam) @ u.T
    x, t = x.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)
    model = _linear(dim, 1, False, dtype, device, seed)
    q_out = q_matrix.to(dtype=dtype, device=device)

    return Problem("quadratic", model, half_mse, TensorDataset(x, t), float(lam.max()),
                   minimizer.to(dtype=dtype, device=device), lambda problem: q_out.clone())


def tanh_mlp(
    n: int = 256, d: int = 4, hidden: int = 6, outputs: int = 2, *, seed: int = 0, noise: float = 0.05,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> Problem:
    """Teacher-student regression with a one-hidden-layer tanh MLP and half-MSE (smooth, nonconvex).

    No closed-form Hessian (use :mod:`convergence.hessian`); bounded activations (|tanh| ≤ 1), so the
    second layer's homogeneous inputs satisfy ‖ā‖² ≤ hidden + 1.
    """
    _check_sizes(n=n, d=d, hidden=hidden, outputs=outputs)
    g = _generator(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    teacher = _mlp(d, hidden, outputs, _generator(seed + 1))
    with torch.no_grad():
        teacher[0].weight.mul_(3.0)  # a teacher in the nonlinear regime of tanh
        t = teacher(x) + noise * torch.randn(n, outputs, generator=g, dtype=torch.float64)
    model = _mlp(d, hidden, outputs, _generator(seed + 7919)).to(dtype=dtype, device=device)
    return Problem("tanh_mlp", model, half_mse, TensorDataset(x.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)))
