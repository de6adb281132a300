r"""E2 -- unbiasedness of the minibatch gradient (AS.2a), tested through the real data loader.

At a snapshot :math:`x` the exact :math:`\nabla f(x)` (mean loss over the whole evaluation set)
is computed once; then :math:`R` minibatches are drawn **through the DataLoader used for training**
(its sampler, ``drop_last``, collation and transforms are all part of what is tested) and
:math:`d_r = g_r - \nabla f(x)`.  Under AS.2a, :math:`\mathbb E d_r = 0`.

(a) Projection t-tests.  :math:`K\le 20` unit directions :math:`u_j` are fixed *before* sampling:
:math:`\nabla f/\|\nabla f\|`, the gradient restricted to each layer (normalized), and seeded
Gaussian directions.  With :math:`p_{rj} = u_j^\top d_r`,

.. math::

    t_j = \sqrt R\,\bar p_j / s_j \sim t_{R-1}\ \text{under } H_0,\qquad
    \text{reject if } \max_j |t_j| > t_{R-1,\,1-\alpha/(2K)} \ \text{(Bonferroni)}.

The p-value is :math:`\min(1, K\cdot 2\,P(t_{R-1} > \max_j|t_j|))`.

(b) Bias norm.  With :math:`\bar d` the mean and :math:`\hat V = \sum_r\|d_r-\bar d\|^2/(R-1)`,

.. math::

    \hat B = \|\bar d\|^2 - \hat V/R,\qquad \mathbb E\hat B = \|b\|^2

exactly (:math:`b` the bias), because :math:`\mathbb E\|\bar d\|^2 = \|b\|^2 + \operatorname{tr}\Sigma/R`
and :math:`\mathbb E\hat V = \operatorname{tr}\Sigma`.  A percentile bootstrap (2000 resamples of
the :math:`R` draws) gives a one-sided :math:`1-\alpha_{eq}` upper bound (:math:`\alpha_{eq} = 0.05`,
the TOST convention) on
:math:`\|b\|/\|\nabla f\| = \sqrt{\max(\hat B, 0)}/\|\nabla f\|`; every resample only needs the
Gram matrix :math:`DD^\top` (:math:`\bar d^{*\top}\bar d^* = w^\top G w/R^2` for resample counts
:math:`w`), so the :math:`R\times n` draws are not copied.

Verdict: FAIL if (a) rejects; PASS ("equivalence shown") if (a) does not reject and the upper
bound is below :math:`\delta = 0.05`; INCONCLUSIVE otherwise (not enough draws to bound the bias).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from convergence.checks.variance import batch_gradient, full_gradient, trainable_parameters
from convergence.results import CheckResult, Verdict

__all__ = ["UnbiasednessConfig", "projection_directions", "bias_norm_estimate", "check_unbiasedness"]

LossFn = Callable[[Any, Any], torch.Tensor]
MAX_DIRECTIONS = 20


@dataclass(frozen=True)
class UnbiasednessConfig:
    """Settings of :func:`check_unbiasedness`: ``num_batches`` is :math:`R`, ``alpha`` the level of the
    projection t-tests, ``delta`` the equivalence margin and ``equivalence_alpha`` the one-sided level of
    the bootstrap upper bound compared with it (TOST convention, 5%).  ``max_elements`` bounds the
    :math:`R\times n` differences kept in memory (an error names the limit when it is exceeded)."""

    num_batches: int = 500
    num_directions: int = 20
    alpha: float = 0.01
    delta: float = 0.05
    equivalence_alpha: float = 0.05
    bootstrap: int = 2000
    seed: int = 0
    chunk_size: int | None = None
    max_elements: int = 100_000_000

    def __post_init__(self) -> None:
        if self.num_batches < 3:
            raise ValueError(f"num_batches must be >= 3, got {self.num_batches}")
        if not 1 <= self.num_directions <= MAX_DIRECTIONS:
            raise ValueError(f"num_directions must be in [1, {MAX_DIRECTIONS}], got {self.num_directions}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 < self.equivalence_alpha < 1.0:
            raise ValueError(f"equivalence_alpha must be in (0, 1), got {self.equivalence_alpha}")
        if not self.delta > 0:
            raise ValueError(f"delta must be > 0, got {self.delta}")
        if self.bootstrap < 100:
            raise ValueError(f"bootstrap must be >= 100, got {self.bootstrap}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


def projection_directions(
    gradient: torch.Tensor,
    blocks: list[tuple[str, int]],
    num_directions: int,
    *,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str]]:
    r"""``K × n`` unit directions (rows) and their labels, fixed before any batch is drawn.

    Order: :math:`\nabla f/\|\nabla f\|`; then :math:`\nabla f` restricted to each block
    (``blocks`` = ``[(label, size), ...]`` in parameter order), normalized, up to half of the
    budget; the rest seeded Gaussian directions.  Zero gradient pieces are skipped.
    """
    n = gradient.numel()
    rows: list[torch.Tensor] = []
    labels: list[str] = []
    norm = torch.linalg.vector_norm(gradient)
    if norm > 0:
        rows.append(gradient / norm)
        labels.append("grad")
    budget_blocks = max(0, (num_directions - len(rows)) // 2) if len(blocks) > 1 else 0
    offset = 0
    for label, size in blocks:
        if len([lbl for lbl in labels if lbl.startswith("block:")]) >= budget_blocks:
            break
        piece = torch.zeros_like(gradient)
        piece[offset : offset + size] = gradient[offset : offset + size]
        pn = torch.linalg.vector_norm(piece)
        if pn > 0:
            rows.append(piece / pn)
            labels.append(f"block:{label}")
        offset += size
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    while len(rows) < num_directions:
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=gradient.dtype, device=gradient.device)
        rows.append(v / torch.linalg.vector_norm(v))
        labels.append(f"random:{len(labels)}")
    return torch.stack(rows[:num_directions]), labels[:num_directions]


def bias_norm_estimate(gram: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    r""":math:`\hat B = \|\bar d\|^2 - \hat V/R` from the Gram matrix :math:`G = DD^\top` of the draws.

    ``weights``: ``B × R`` resample counts (each row sums to :math:`R`); ``None`` means the sample
    itself.  With :math:`\bar d = Dw/R`: :math:`\|\bar d\|^2 = w^\top G w/R^2` and
    :math:`\hat V = (\sum_r w_r G_{rr} - R\|\bar d\|^2)/(R-1)`.
    """
    R = gram.shape[0]
    w = np.ones((1, R)) if weights is None else np.asarray(weights, dtype=np.float64)
    mean_sq = np.einsum("br,rs,bs->b", w, gram, w) / R**2
    v_hat = (w @ np.diag(gram) - R * mean_sq) / (R - 1)
    return mean_sq - v_hat / R


def _batches(loader: Iterable) -> Any:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yielded no batch")


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError("each batch must be an (inputs, targets) pair")


def _to(data: Any, device: torch.device) -> Any:
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, (tuple, list)):
        return type(data)(_to(d, device) for d in data)
    return data


def check_unbiasedness(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    loader: Iterable,
    *,
    config: UnbiasednessConfig | None = None,
    **kwargs: Any,
) -> CheckResult:
    r"""E2 at the model's current parameters (see the module docstring).

    ``(inputs, targets)`` is the whole evaluation set defining :math:`f`; ``loader`` yields
    ``(inputs, targets)`` batches exactly as in training (it is re-iterated when exhausted; pass a
    dedicated loader so the training loader's RNG is not consumed).  The model's train/eval mode is
    left as it is: it is part of what is tested.  ``loss_fn`` must be a mean over the batch.
    Keyword arguments build an :class:`UnbiasednessConfig` when ``config`` is not given.
    """
    if config is not None and kwargs:
        raise ValueError("pass either config or keyword settings, not both")
    cfg = config if config is not None else UnbiasednessConfig(**kwargs)
    from scipy import stats

    named = trainable_parameters(model)
    device = named[0][1].device
    _, grad_f = full_gradient(model, loss_fn, inputs, targets, chunk_size=cfg.chunk_size)
    grad_norm = float(torch.linalg.vector_norm(grad_f))
    layer_sizes: dict[str, int] = {}
    for name, p in named:
        layer = name.rsplit(".", 1)[0] if "." in name else name
        layer_sizes[layer] = layer_sizes.get(layer, 0) + p.numel()
    dirs, labels = projection_directions(grad_f, list(layer_sizes.items()), cfg.num_directions, seed=cfg.seed)
    K = dirs.shape[0]

    R = cfg.num_batches
    if R * grad_f.numel() > cfg.max_elements:
        raise ValueError(f"E2 keeps the R x n = {R} x {grad_f.numel()} gradient differences (for the Gram matrix of the "
                         f"bias bootstrap), more than max_elements={cfg.max_elements}: lower num_batches or raise "
                         "max_elements")
    diffs = torch.empty(R, grad_f.numel(), dtype=grad_f.dtype, device=grad_f.device)
    batch_sizes = set()
    stream = _batches(loader)
    for r in range(R):
        x, y = _split(next(stream))
        x, y = _to(x, device), _to(y, device)
        batch_sizes.add(int(x.shape[0]) if isinstance(x, torch.Tensor) else -1)
        _, g = batch_gradient(model, loss_fn, x, y)
        diffs[r] = g - grad_f

    proj = (diffs @ dirs.T).double().cpu().numpy()  # R × K
    mean = proj.mean(axis=0)
    sd = proj.std(axis=0, ddof=1)
    scale = np.abs(proj).max(axis=0) + 1e-300
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sd > 1e-12 * scale, math.sqrt(R) * mean / sd, np.where(np.abs(mean) > 1e-12 * scale, np.inf, 0.0))
    t_max = float(np.max(np.abs(t)))
    threshold = float(stats.t.ppf(1.0 - cfg.alpha / (2.0 * K), R - 1))
    p_value = min(1.0, K * 2.0 * float(stats.t.sf(t_max, R - 1))) if math.isfinite(t_max) else 0.0
    rejected = t_max > threshold

    gram = (diffs @ diffs.T).double().cpu().numpy()
    b_hat = float(bias_norm_estimate(gram)[0])
    rng = np.random.default_rng(cfg.seed)
    counts = np.stack([np.bincount(rng.integers(0, R, R), minlength=R) for _ in range(cfg.bootstrap)])
    b_boot = bias_norm_estimate(gram, counts)
    ratio = math.sqrt(max(b_hat, 0.0)) / grad_norm if grad_norm > 0 else math.inf
    boot_ratio = np.sqrt(np.maximum(b_boot, 0.0)) / grad_norm if grad_norm > 0 else np.full(cfg.bootstrap, np.inf)
    upper = float(np.quantile(boot_ratio, 1.0 - cfg.equivalence_alpha))
    equivalent = upper < cfg.delta

    notes: list[str] = []
    if len(batch_sizes) > 1:
        notes.append(f"the loader yields batches of different sizes {sorted(batch_sizes)}")
    if model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        notes.append("BatchNorm in train mode: f_i is not deterministic (a known breaker of AS.2a)")
    if not grad_norm > 0:
        notes.append("grad f = 0: the relative bias bound is undefined")
    if rejected:
        verdict = Verdict.FAIL
    elif equivalent:
        verdict = Verdict.PASS
    else:
        verdict = Verdict.INCONCLUSIVE
        notes.append(f"no bias detected, but the {1 - cfg.equivalence_alpha:.0%} upper bound {upper:.3g} on "
                     f"|b|/|grad f| is not < {cfg.delta}")
    evidence = {
        "p_value": p_value,
        "verdict_if_not_rejected": (Verdict.PASS if equivalent else Verdict.INCONCLUSIVE).value,
        "t_statistics": {label: float(v) for label, v in zip(labels, t)},
        "t_threshold": threshold,
        "num_directions": K,
        "num_batches": R,
        "batch_sizes": sorted(batch_sizes),
        "bias_norm_sq_estimate": b_hat,
        "relative_bias": ratio,
        "relative_bias_upper": upper,
        "delta": cfg.delta,
        "gradient_norm": grad_norm,
        "noise_variance": float(np.trace(gram) - gram.sum() / R) / (R - 1),
    }
    expected = f"max|t| <= t_(R-1,1-a/2K) = {threshold:.3g}; |b|/|grad f| upper < {cfg.delta}"
    return CheckResult("E2", "AS.2a unbiased gradient", t_max, expected, 1.0 - cfg.alpha, verdict, evidence, notes)


def check_unbiasedness_along_run(
    gradients: list[torch.Tensor],
    full_gradients: list[torch.Tensor],
    *,
    steps: list[int] | None = None,
    blocks: list[tuple[str, int]] | None = None,
    num_directions: int = 12,
    alpha: float = 0.01,
    delta: float = 0.05,
    equivalence_alpha: float = 0.05,
    bootstrap: int = 2000,
    seed: int = 0,
    min_steps: int = 10,
) -> CheckResult:
    r"""E2 on the gradients the optimizer actually received during training.

    ``gradients[r]`` is the gradient the optimizer got at step :math:`k_r` (recorded by
    :class:`convergence.harness.GradientTap`: the training closure's gradient, as reported by the
    optimizer's step hook), ``full_gradients[r]`` is :math:`\nabla f(x_{k_r})` on the full data. Under
    AS.2a, :math:`d_r = g_r - \nabla f(x_{k_r})` is a martingale difference sequence:
    :math:`\mathbb E[d_r\mid\mathcal F_{k_r-1}] = 0`. Hence for directions :math:`u_{rj}` fixed
    before step :math:`k_r`'s batch is drawn (:math:`\nabla f(x_{k_r})/\|\nabla f(x_{k_r})\|`, its
    restriction to each layer, and seeded random directions) the projections
    :math:`p_{rj} = u_{rj}^\top d_r` have mean 0, and the projection t-tests and the bias-norm estimator
    :math:`\hat B = \|\bar d\|^2 - \hat V/R` (unbiased for :math:`\|\bar b\|^2`, :math:`\bar b` the mean
    bias, also for independent differences of unequal variances) apply as in :func:`check_unbiasedness`.
    The relative bias is :math:`\|\bar b\|/\sqrt{\overline{\|\nabla f\|^2}}`.

    Verdict: FAIL if a projection t-test rejects (Bonferroni over directions); PASS if not and the
    bootstrap upper bound of the relative bias is below ``delta``; INCONCLUSIVE otherwise;
    NOT_APPLICABLE with fewer than ``min_steps`` steps or :math:`\nabla f = 0` throughout.
    """
    from scipy import stats

    from convergence.results import not_applicable

    assumption = "AS.2a unbiased gradient (the optimizer's own)"
    if len(gradients) != len(full_gradients):
        raise ValueError("gradients and full_gradients must have the same length")
    R = len(gradients)
    if R < min_steps:
        return not_applicable("E2", assumption, f"only {R} steps with both the optimizer's gradient and grad f "
                              f"(needs >= {min_steps})")
    G = torch.stack([g.to(torch.float64) for g in gradients])
    F = torch.stack([g.to(torch.float64).to(G.device) for g in full_gradients])
    norms = torch.linalg.vector_norm(F, dim=1)
    if not bool((norms > 0).any()):
        return not_applicable("E2", assumption, "grad f = 0 at every recorded step: the relative bias is undefined")
    D = G - F
    n = D.shape[1]
    K = max(1, min(num_directions, MAX_DIRECTIONS))
    # per-step directions, each a function of x_k only (fixed before the batch of step k is drawn)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_random = max(1, K - 1 - min(len(blocks or []), (K - 1) // 2))
    random_dirs = torch.randn(n_random, n, generator=gen, dtype=torch.float64).to(D.device)
    random_dirs = random_dirs / torch.linalg.vector_norm(random_dirs, dim=1, keepdim=True)
    cols, labels = [], []
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cols.append((D * F).sum(1) / safe)
    labels.append("grad")
    offset = 0
    for label, size in (blocks or [])[: (K - 1) // 2] if blocks and len(blocks) > 1 else []:
        piece = F[:, offset:offset + size]
        pn = torch.linalg.vector_norm(piece, dim=1)
        cols.append(torch.where(pn > 0, (D[:, offset:offset + size] * piece).sum(1) / torch.where(pn > 0, pn, 1.0),
                                torch.zeros_like(pn)))
        labels.append(f"block:{label}")
        offset += size
    for j in range(random_dirs.shape[0]):
        cols.append(D @ random_dirs[j])
        labels.append(f"random:{j}")
    proj = torch.stack(cols, 1).cpu().numpy()
    K = proj.shape[1]
    mean = proj.mean(axis=0)
    sd = proj.std(axis=0, ddof=1)
    scale = np.abs(proj).max(axis=0) + 1e-300
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sd > 1e-12 * scale, math.sqrt(R) * mean / sd, np.where(np.abs(mean) > 1e-12 * scale, np.inf, 0.0))
    t_max = float(np.max(np.abs(t)))
    threshold = float(stats.t.ppf(1.0 - alpha / (2.0 * K), R - 1))
    p_value = min(1.0, K * 2.0 * float(stats.t.sf(t_max, R - 1))) if math.isfinite(t_max) else 0.0
    rejected = t_max > threshold

    gram = (D @ D.T).cpu().numpy()
    b_hat = float(bias_norm_estimate(gram)[0])
    ref = float(torch.sqrt((norms ** 2).mean()))
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, R, R), minlength=R) for _ in range(bootstrap)])
    boot_ratio = np.sqrt(np.maximum(bias_norm_estimate(gram, counts), 0.0)) / ref
    upper = float(np.quantile(boot_ratio, 1.0 - equivalence_alpha))
    ratio = math.sqrt(max(b_hat, 0.0)) / ref
    equivalent = upper < delta
    notes: list[str] = []
    if rejected:
        verdict = Verdict.FAIL
        notes.append(f"the optimizer's gradient is biased: max|t| = {t_max:.3g} > {threshold:.3g}; estimated "
                     f"|b|/|grad f| = {ratio:.3g}")
    elif equivalent:
        verdict = Verdict.PASS
    else:
        verdict = Verdict.INCONCLUSIVE
        notes.append(f"no bias detected, but the {1 - equivalence_alpha:.0%} upper bound {upper:.3g} on "
                     f"|b|/|grad f| is not < {delta} (more steps or larger batches would decide)")
    evidence = {
        "p_value": p_value, "verdict_if_not_rejected": (Verdict.PASS if equivalent else Verdict.INCONCLUSIVE).value,
        "t_statistics": {label: float(v) for label, v in zip(labels, t)}, "t_threshold": threshold,
        "num_directions": K, "num_steps": R, "steps": list(steps) if steps is not None else None,
        "bias_norm_sq_estimate": b_hat, "relative_bias": ratio, "relative_bias_upper": upper, "delta": delta,
        "gradient_norm_rms": ref, "source": "the optimizer's gradient at each training step (step hook / closure)",
    }
    expected = f"max|t| <= {threshold:.3g}; |b|/|grad f| upper < {delta}"
    return CheckResult("E2", assumption, t_max, expected, 1.0 - alpha, verdict, evidence, notes)
