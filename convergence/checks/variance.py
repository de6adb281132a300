r"""E3 -- variance of the minibatch gradient and its :math:`1/m` scaling (AS.2b), plus the
gradient utilities shared by E1-E3.

Setting (theory notes §3, E3).  :math:`f(x) = \frac1N\sum_{i=1}^N f_i(x)` is the finite-sum loss
on a fixed evaluation set, with ``loss_fn`` the *mean* over the batch dimension of per-example
losses :math:`f_i` (deterministic: eval-mode BatchNorm, no dropout).  From exact per-example
gradients (``torch.func.vmap(grad)`` over all :math:`N`)

.. math::

    \sigma_1^2(x) = \frac1N\sum_i \|\nabla f_i(x) - \nabla f(x)\|^2 .

A minibatch gradient :math:`g_m = \frac1m\sum_{j\le m}\nabla f_{i_j}` has

.. math::

    V(m) = \mathbb E\|g_m - \nabla f\|^2 =
    \begin{cases} \sigma_1^2/m & \text{i.i.d. uniform draws (with replacement)}\\
                  \frac{\sigma_1^2}{m}\,\frac{N-m}{N-1} & \text{uniform subset (without replacement).}
    \end{cases}

Empirically :math:`\hat V(m) = \frac1R\sum_r \|g^{(m)}_r - \nabla f\|^2` for
:math:`m\in\{1,2,4,\dots\}` with :math:`R` draws per :math:`m`.

Decision rules (the check's level :math:`\alpha` is split equally between (a) and (b)):

* (a) ratio :math:`r(m) = \hat V(m)/V(m)`.  For every :math:`m` a two-sided
  :math:`1-\alpha_a/M` interval for :math:`r(m)` must meet :math:`[1-\delta, 1+\delta]`,
  :math:`\delta = 0.05`; for a symmetric interval :math:`\hat r\pm h` this is exactly
  :math:`|\hat r - 1|\le h + \delta`.  The interval is :math:`\hat r\exp(\pm z\,\widehat{se})` with
  :math:`\widehat{se}` the *bootstrap* standard error of :math:`\log\hat r` (resampling the
  :math:`R` draws; nonparametric, so heavy tails of :math:`\|d\|^2` widen it) -- on the log scale
  the sampling distribution of a mean of positive, skewed terms is close to normal, which keeps the
  tail probabilities honest at the Bonferroni level.  Percentile-bootstrap intervals are reported in
  the evidence as well.
* (b) the OLS slope of :math:`\log(\hat V(m)/c_m)` on :math:`\log m`, with :math:`c_m` the
  finite-population correction (1 with replacement), has a :math:`1-\alpha_b` confidence interval
  containing :math:`-1`; its standard error is bootstrapped by resampling the draws within each
  :math:`m`.
* (c) informational: a history of :math:`\sigma_1^2(x_k)` is summarized (max and log-trend), since
  the theory needs :math:`\sup_k\sigma_1^2(x_k) < \infty`.

The p-value is the Bonferroni combination :math:`p = \min(1, 2\min(p_a, p_b))`, where
:math:`p_a = \min(1, M\min_m p_m)`; the verdict is FAIL iff :math:`p\le\alpha` (PASS otherwise:
"not rejected").  :func:`convergence.multiple.holm_adjust` can re-decide it inside a family.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from convergence.results import CheckResult, Verdict

__all__ = [
    "trainable_parameters",
    "flat_parameters",
    "loaded_parameters",
    "batch_gradient",
    "full_gradient",
    "per_example_gradients",
    "GradientNoise",
    "gradient_noise",
    "IndexSampler",
    "iid_indices",
    "subset_indices",
    "expected_variance",
    "VarianceConfig",
    "check_variance",
]

LossFn = Callable[[Any, Any], torch.Tensor]
#: ``sampler(N, m, generator) -> LongTensor of m indices into the evaluation set``.
IndexSampler = Callable[[int, int, torch.Generator], torch.Tensor]


# ==================================================================================== utilities
def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad=True`` (module order)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter with requires_grad=True")
    return named


def flat_parameters(model: nn.Module) -> torch.Tensor:
    r"""The trainable parameters as one flat detached vector :math:`x` (row-major ``flatten`` of each)."""
    return torch.cat([p.detach().reshape(-1) for _, p in trainable_parameters(model)]).clone()


@contextlib.contextmanager
def loaded_parameters(model: nn.Module, theta: torch.Tensor | None) -> Iterator[nn.Module]:
    """Temporarily copy the flat vector ``theta`` into the trainable parameters (restored on exit).

    ``theta=None`` leaves the parameters as they are.
    """
    if theta is None:
        yield model
        return
    params = [p for _, p in trainable_parameters(model)]
    n = sum(p.numel() for p in params)
    if theta.dim() != 1 or theta.numel() != n:
        raise ValueError(f"theta has shape {tuple(theta.shape)}, expected a flat vector of length {n}")
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, piece in zip(params, torch.split(theta.detach(), [p.numel() for p in params])):
                p.copy_(piece.reshape(p.shape))
        yield model
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


def batch_gradient(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any) -> tuple[float, torch.Tensor]:
    r"""``(loss, flat gradient)`` of ``loss_fn(model(inputs), targets)`` by reverse-mode autograd.

    This is the gradient path the optimizer uses (live module, ``torch.autograd.grad``); ``.grad``
    fields are not touched.
    """
    params = [p for _, p in trainable_parameters(model)]
    with torch.enable_grad():
        loss = loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat(
        [(g if g is not None else torch.zeros_like(p)).detach().reshape(-1) for g, p in zip(grads, params)]
    )
    return float(loss.detach()), flat


def _length(data: Any) -> int:
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    if isinstance(data, (tuple, list)):
        return _length(data[0])
    raise TypeError(f"cannot infer the number of examples of a {type(data).__name__}")


def _index(data: Any, idx: torch.Tensor | slice) -> Any:
    if isinstance(data, torch.Tensor):
        if isinstance(idx, torch.Tensor):
            idx = idx.to(data.device)
        return data[idx]
    if isinstance(data, (tuple, list)):
        return type(data)(_index(d, idx) for d in data)
    raise TypeError(f"cannot index a {type(data).__name__}")


def full_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    *,
    chunk_size: int | None = None,
) -> tuple[float, torch.Tensor]:
    r"""``(f(x), \nabla f(x))`` of the mean loss over all :math:`N` examples.

    With ``chunk_size`` the examples are processed in chunks and combined with weights
    :math:`|C|/N`, which is exact for a mean-reduction ``loss_fn``.
    """
    n = _length(inputs)
    if chunk_size is None or chunk_size >= n:
        return batch_gradient(model, loss_fn, inputs, targets)
    total_loss, total = 0.0, None
    for start in range(0, n, chunk_size):
        sl = slice(start, min(n, start + chunk_size))
        loss, g = batch_gradient(model, loss_fn, _index(inputs, sl), _index(targets, sl))
        w = (sl.stop - sl.start) / n
        total_loss += w * loss
        total = w * g if total is None else total + w * g
    assert total is not None
    return total_loss, total


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 256,
) -> torch.Tensor:
    r"""The ``N × n`` matrix of exact per-example gradients :math:`\nabla f_i(x)`.

    ``torch.func.vmap(grad(f_i))`` over chunks of ``chunk_size`` examples, where
    :math:`f_i = ` ``loss_fn(model(x_i[None]), y_i[None])`` (buffers and frozen parameters are
    taken from the module).  Rows are flattened in ``named_parameters`` order.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    named = trainable_parameters(model)
    params = {name: p.detach() for name, p in named}

    def single(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_example = vmap(grad(single), in_dims=(None, 0, 0))
    n = int(inputs.shape[0])
    rows = []
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        g = per_example(params, inputs[start:stop], targets[start:stop])
        rows.append(torch.cat([g[name].reshape(stop - start, -1) for name, _ in named], dim=1).detach())
    return torch.cat(rows, dim=0)


@dataclass(frozen=True)
class GradientNoise:
    r"""``gradient`` :math:`=\nabla f(x)`, ``sigma1_sq`` :math:`=\sigma_1^2(x)`, ``num_examples`` :math:`N`;
    ``table`` the per-example gradients when they were kept."""

    gradient: torch.Tensor
    sigma1_sq: float
    num_examples: int
    table: torch.Tensor | None = field(default=None, repr=False)


def gradient_noise(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 256,
    keep_table: bool = False,
) -> GradientNoise:
    r""":math:`\nabla f` and :math:`\sigma_1^2` from exact per-example gradients, in one streaming pass.

    Chunks are merged with the parallel-variance formula
    :math:`M_2 = M_2^a + M_2^b + \|\mu_b-\mu_a\|^2 n_a n_b/(n_a+n_b)`, so the ``N × n`` table is
    never needed (it is returned when ``keep_table``).
    """
    n = int(inputs.shape[0])
    if n < 1:
        raise ValueError("the evaluation set is empty")
    mean: torch.Tensor | None = None
    m2 = 0.0
    count = 0
    kept = []
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        block = per_example_gradients(model, loss_fn, inputs[start:stop], targets[start:stop], chunk_size=chunk_size)
        if keep_table:
            kept.append(block)
        nb = stop - start
        mu_b = block.mean(dim=0)
        m2_b = float(((block - mu_b) ** 2).sum())
        if mean is None:
            mean, m2, count = mu_b, m2_b, nb
            continue
        delta = mu_b - mean
        total = count + nb
        m2 = m2 + m2_b + float(delta.dot(delta)) * count * nb / total
        mean = mean + delta * (nb / total)
        count = total
    assert mean is not None
    table = torch.cat(kept, dim=0) if keep_table else None
    return GradientNoise(gradient=mean, sigma1_sq=m2 / n, num_examples=n, table=table)


# ===================================================================================== samplers
def iid_indices(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """``m`` i.i.d. uniform indices in ``[0, n)`` (with replacement)."""
    return torch.randint(0, n, (m,), generator=generator)


def subset_indices(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """A uniform random subset of ``m`` distinct indices in ``[0, n)`` (without replacement)."""
    if m > n:
        raise ValueError(f"cannot draw {m} distinct indices out of {n}")
    return torch.randperm(n, generator=generator)[:m]


def expected_variance(sigma1_sq: float, m: int, n: int, replacement: bool) -> float:
    r""":math:`V(m) = \sigma_1^2/m`, times :math:`(N-m)/(N-1)` without replacement."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    v = sigma1_sq / m
    if not replacement:
        v *= (n - m) / (n - 1) if n > 1 else 0.0
    return v


# ======================================================================================= check
@dataclass(frozen=True)
class VarianceConfig:
    """Settings of :func:`check_variance`.

    ``batch_sizes`` defaults to the powers of two up to ``min(512, N)`` (``N // 2`` without
    replacement); ``num_batches`` is :math:`R` per batch size; ``margin`` is the
    :math:`\\delta = 0.05` of rule (a); ``table_limit`` bounds ``N·n`` for keeping the per-example
    gradient table (otherwise minibatch gradients are computed by autograd on the batch).
    """

    batch_sizes: tuple[int, ...] | None = None
    num_batches: int = 200
    replacement: bool = True
    alpha: float = 0.01
    margin: float = 0.05
    bootstrap: int = 2000
    seed: int = 0
    chunk_size: int = 256
    table_limit: int = 20_000_000

    def __post_init__(self) -> None:
        if self.batch_sizes is not None:
            sizes = tuple(self.batch_sizes)
            if not sizes or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in sizes):
                raise ValueError(f"batch_sizes must be positive integers, got {self.batch_sizes!r}")
            if len(set(sizes)) != len(sizes):
                raise ValueError(f"batch_sizes must be distinct, got {self.batch_sizes!r}")
            object.__setattr__(self, "batch_sizes", tuple(sorted(sizes)))
        if self.num_batches < 2:
            raise ValueError(f"num_batches must be >= 2, got {self.num_batches}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if self.bootstrap < 100:
            raise ValueError(f"bootstrap must be >= 100, got {self.bootstrap}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.table_limit < 0:
            raise ValueError(f"table_limit must be >= 0, got {self.table_limit}")


def _default_sizes(n: int, replacement: bool) -> tuple[int, ...]:
    cap = min(512, n if replacement else n // 2)
    sizes, m = [], 1
    while m <= cap:
        sizes.append(m)
        m *= 2
    return tuple(sizes) or (1,)


def _bootstrap_means(values: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, values.shape[0], size=(draws, values.shape[0]))
    return values[idx].mean(axis=1)


def _normal_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


def _normal_quantile(p: float) -> float:
    from scipy import stats

    return float(stats.norm.ppf(p))


def _ratio_p_value(log_r: float, se: float, margin: float) -> float:
    """Smallest level at which ``exp(log_r ± z·se)`` misses ``[1 - margin, 1 + margin]``."""
    hi, lo = math.log1p(margin), math.log1p(-margin) if margin < 1 else -math.inf
    if lo <= log_r <= hi:
        return 1.0
    gap = log_r - hi if log_r > hi else lo - log_r
    if se <= 0:
        return 0.0
    return _normal_two_sided(gap / se)


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def sigma_trend(history: Sequence[tuple[int, float]]) -> dict[str, Any]:
    r"""Summary of :math:`\sigma_1^2(x_k)` over steps: max, last, and the OLS slope of :math:`\log\sigma_1^2` on :math:`k`."""
    steps = np.array([float(k) for k, _ in history])
    values = np.array([float(v) for _, v in history])
    out: dict[str, Any] = {"steps": steps.tolist(), "sigma1_sq": values.tolist()}
    if values.size:
        out["max"] = float(values.max())
        out["last"] = float(values[-1])
    positive = values > 0
    if positive.sum() >= 2 and np.ptp(steps[positive]) > 0:
        out["log_slope_per_step"] = _slope(steps[positive], np.log(values[positive]))
    return out


def check_variance(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    sampler: IndexSampler | None = None,
    config: VarianceConfig | None = None,
    sigma_history: Sequence[tuple[int, float]] | None = None,
    **kwargs: Any,
) -> CheckResult:
    r"""E3 at the model's current parameters; see the module docstring for the rules.

    ``sampler(N, m, generator)`` draws the indices of one minibatch; the default is
    :func:`iid_indices` (or :func:`subset_indices` when ``replacement=False``).  The prediction
    :math:`V(m)` always assumes the *declared* scheme (``config.replacement``), so a sampler that
    does not implement it (e.g. one example repeated :math:`m` times) is what the check detects.
    Keyword arguments build a :class:`VarianceConfig` when ``config`` is not given.
    """
    if config is not None and kwargs:
        raise ValueError("pass either config or keyword settings, not both")
    cfg = config if config is not None else VarianceConfig(**kwargs)
    n = int(inputs.shape[0])
    if n < 2:
        raise ValueError(f"the variance check needs at least 2 examples, got {n}")
    sizes = cfg.batch_sizes or _default_sizes(n, cfg.replacement)
    if not cfg.replacement and max(sizes) >= n:
        raise ValueError(f"without replacement every batch size must be < N={n}, got {max(sizes)}")
    if sampler is None:
        sampler = iid_indices if cfg.replacement else subset_indices
    n_params = sum(p.numel() for _, p in trainable_parameters(model))
    keep = n * n_params <= cfg.table_limit
    noise = gradient_noise(model, loss_fn, inputs, targets, chunk_size=cfg.chunk_size, keep_table=keep)
    grad_f, sigma1_sq = noise.gradient, noise.sigma1_sq

    gen = torch.Generator(device="cpu")
    gen.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    R = cfg.num_batches
    draws: dict[int, np.ndarray] = {}
    for m in sizes:
        sq = np.empty(R, dtype=np.float64)
        for r in range(R):
            idx = sampler(n, m, gen).to(torch.long).reshape(-1)
            if idx.numel() == 0:
                raise ValueError("the sampler returned an empty batch")
            if noise.table is not None:
                g = noise.table[idx.to(noise.table.device)].mean(dim=0)
            else:
                _, g = batch_gradient(model, loss_fn, _index(inputs, idx), _index(targets, idx))
            d = g - grad_f
            sq[r] = float(d.dot(d))
        draws[m] = sq

    return _decide_variance(draws, sizes, sigma1_sq, n, cfg, grad_f, sigma_history)


def _decide_variance(draws: dict[int, np.ndarray], sizes: Sequence[int], sigma1_sq: float, n: int, cfg: VarianceConfig,
                     grad_f: torch.Tensor, sigma_history: Sequence[tuple[int, float]] | None,
                     source: str = "index sampler") -> CheckResult:
    """Rules (a) and (b) on the squared deviations ``draws[m]`` (see the module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    R = max(len(v) for v in draws.values())
    notes: list[str] = []
    evidence: dict[str, Any] = {
        "sigma1_sq": sigma1_sq,
        "num_examples": n,
        "num_batches": {str(m): int(len(draws[m])) for m in sizes},
        "source": source,
        "batch_sizes": list(sizes),
        "replacement": cfg.replacement,
        "margin": cfg.margin,
        "gradient_norm": float(torch.linalg.vector_norm(grad_f)),
    }
    if sigma_history:
        evidence["sigma_history"] = sigma_trend(sigma_history)
    eps = float(torch.finfo(grad_f.dtype).eps) if grad_f.dtype.is_floating_point else 2.2e-16
    grad_sq = float(grad_f.double().pow(2).sum())
    if sigma1_sq <= (1e3 * eps) ** 2 * max(grad_sq, 1e-300):  # zero up to rounding of the per-example gradients
        sigma1_sq = 0.0
    if not sigma1_sq > 0:
        worst = max(float(v.mean()) for v in draws.values())
        if worst <= (1e3 * eps) ** 2 * max(grad_sq, 1e-300):
            worst = 0.0
        evidence["V_hat"] = {str(m): float(draws[m].mean()) for m in sizes}
        if worst > 1e-20:
            notes.append("sigma_1^2 = 0, yet minibatch gradients differ from grad f")
            return CheckResult("E3", "AS.2b variance sigma^2/m", worst, 0.0, 1.0 - cfg.alpha, Verdict.FAIL, evidence,
                               notes)
        from convergence.results import not_applicable

        return not_applicable("E3", "AS.2b variance sigma^2/m", "sigma_1^2 = 0: every per-example gradient equals "
                              "grad f, so no batch size can be told from another (ratios undefined)",
                              evidence=evidence, expected=0.0)

    alpha_a = alpha_b = cfg.alpha / 2.0
    M = len(sizes)
    z_a = _normal_quantile(1.0 - alpha_a / (2.0 * M))
    q_lo, q_hi = 100.0 * alpha_a / (2.0 * M), 100.0 * (1.0 - alpha_a / (2.0 * M))
    rows = []
    boot_logv = {}
    p_ms = []
    for m in sizes:
        v_pred = expected_variance(sigma1_sq, m, n, cfg.replacement)
        v_hat = float(draws[m].mean())
        boot = _bootstrap_means(draws[m], cfg.bootstrap, rng)
        ratio = v_hat / v_pred
        with np.errstate(divide="ignore"):
            log_boot = np.log(boot)
        finite = np.isfinite(log_boot)
        se_log = float(log_boot[finite].std(ddof=1)) if finite.sum() > 1 else math.inf
        log_r = math.log(ratio) if ratio > 0 else -math.inf
        p_m = _ratio_p_value(log_r, se_log, cfg.margin) if math.isfinite(log_r) else 0.0
        p_ms.append(p_m)
        boot_logv[m] = log_boot
        lo = ratio * math.exp(-z_a * se_log) if math.isfinite(se_log) else 0.0
        hi = ratio * math.exp(z_a * se_log) if math.isfinite(se_log) else math.inf
        pct = np.percentile(boot / v_pred, [q_lo, q_hi])
        rows.append({
            "m": m, "V_hat": v_hat, "V_pred": v_pred, "ratio": ratio, "ratio_ci": [lo, hi],
            "ratio_percentile_ci": [float(pct[0]), float(pct[1])], "se_log_ratio": se_log,
            "half_width": 0.5 * (hi - lo), "p_value": p_m,
            "pass": p_m > alpha_a / M,
        })
    p_a = min(1.0, M * min(p_ms))
    evidence["per_batch_size"] = rows
    evidence["rule_a"] = {"p_value": p_a, "level": 1.0 - alpha_a / M, "rejected": p_a <= alpha_a}

    p_b = 1.0
    if M >= 2:
        x = np.log(np.array(sizes, dtype=np.float64))
        fpc = np.array([expected_variance(1.0, m, n, cfg.replacement) * m for m in sizes])
        with np.errstate(divide="ignore"):
            y = np.array([math.log(draws[m].mean()) if draws[m].mean() > 0 else -math.inf for m in sizes]) - np.log(fpc)
        if np.all(np.isfinite(y)):
            slope = _slope(x, y)
            boot_y = np.stack([boot_logv[m] for m in sizes], axis=1) - np.log(fpc)[None, :]
            ok = np.all(np.isfinite(boot_y), axis=1)
            xc = x - x.mean()
            boot_slopes = (boot_y[ok] - boot_y[ok].mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
            se = float(boot_slopes.std(ddof=1)) if boot_slopes.size > 1 else math.inf
            if se > 0 and math.isfinite(se):
                p_b = _normal_two_sided((slope + 1.0) / se)
            elif se == 0:
                p_b = 1.0 if slope == -1.0 else 0.0
            z_b = _normal_quantile(1.0 - alpha_b / 2.0)
            rule_b: dict[str, Any] = {
                "slope": slope, "se": se, "ci": [slope - z_b * se, slope + z_b * se],
                "level": 1.0 - alpha_b, "p_value": p_b, "rejected": p_b <= alpha_b,
            }
            if M >= 3:
                from scipy import stats

                resid = y - (y.mean() + slope * (x - x.mean()))
                se_ols = math.sqrt(float((resid**2).sum()) / (M - 2) / float((xc**2).sum()))
                t = float(stats.t.ppf(1.0 - alpha_b / 2.0, M - 2))
                rule_b["ols_residual_ci"] = [slope - t * se_ols, slope + t * se_ols]
            evidence["rule_b"] = rule_b
        else:
            p_b = 0.0
            evidence["rule_b"] = {"slope": None, "p_value": 0.0, "rejected": True}
            notes.append("V_hat(m) = 0 for some m: the log-log slope is undefined")
    else:
        notes.append("one batch size only: the slope rule (b) was not applied")

    p = min(1.0, 2.0 * min(p_a, p_b))
    worst = max(abs(row["ratio"] - 1.0) for row in rows)
    evidence["p_value"] = p
    evidence["verdict_if_not_rejected"] = Verdict.PASS.value
    verdict = Verdict.FAIL if p <= cfg.alpha else Verdict.PASS
    expected = f"|r(m)-1| <= half-width + {cfg.margin:g} for all m; slope CI contains -1"
    return CheckResult("E3", "AS.2b variance sigma^2/m", worst, expected, 1.0 - cfg.alpha, verdict, evidence, notes)


def check_variance_of_batches(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batches: Sequence[Any],
    *,
    replacement: bool = True,
    alpha: float = 0.01,
    margin: float = 0.05,
    bootstrap: int = 2000,
    seed: int = 0,
    sigma_history: Sequence[tuple[int, float]] | None = None,
    min_draws: int = 4,
) -> CheckResult:
    r"""E3 on the batches the optimizer actually got (the training loader's own output), at the
    model's current parameters.

    ``batches`` are the ``(inputs, targets)`` minibatches fed to the optimizer, all of size
    :math:`m`. Under AS.2 (i.i.d. draws) each is an independent draw, whatever the point; so are
    its halves and quarters (batch sizes :math:`m/2, m/4`) and the concatenations of 2 or 4
    consecutive batches (:math:`2m, 4m`). For each size :math:`m'` the squared deviations
    :math:`\|g^{(m')}_r - 
abla f\|^2` are computed from exact per-example gradients of the recorded
    examples, then rules (a) and (b) of :func:`check_variance` apply with
    :math:`V(m') = \sigma_1^2/m'` (with replacement) or the finite-population form. A loader that
    does not deliver i.i.d. draws (e.g. every batch one example repeated :math:`m` times) gives
    :math:`\hat V(m')pprox\sigma_1^2` and FAILs.

    NOT_APPLICABLE when :math:`\sigma_1^2 = 0`, or when fewer than ``min_draws`` batches were recorded.
    """
    from convergence.results import not_applicable

    assumption = "AS.2b variance sigma^2/m"
    cfg = VarianceConfig(num_batches=max(2, min_draws), replacement=replacement, alpha=alpha, margin=margin,
                         bootstrap=bootstrap, seed=seed)
    usable = [b for b in batches if isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], torch.Tensor)]
    sizes_seen = sorted({int(b[0].shape[0]) for b in usable})
    if len(usable) < min_draws:
        return not_applicable("E3", assumption, f"only {len(usable)} training batches were recorded (needs >= {min_draws})")
    m = max(set(int(b[0].shape[0]) for b in usable), key=[int(b[0].shape[0]) for b in usable].count)
    usable = [b for b in usable if int(b[0].shape[0]) == m]
    n = int(inputs.shape[0])
    noise = gradient_noise(model, loss_fn, inputs, targets, chunk_size=cfg.chunk_size)
    grad_f, sigma1_sq = noise.gradient, noise.sigma1_sq
    xs = torch.cat([b[0] for b in usable])
    ys = torch.cat([b[1] for b in usable])
    table = per_example_gradients(model, loss_fn, xs, ys, chunk_size=cfg.chunk_size)  # (B*m) x n
    per_batch = table.reshape(len(usable), m, -1)
    draws: dict[int, np.ndarray] = {}
    for div in (4, 2):
        if m % div == 0 and m // div >= 1:
            sub = per_batch.reshape(len(usable), div, m // div, -1).mean(2).reshape(len(usable) * div, -1)
            draws[m // div] = ((sub - grad_f) ** 2).sum(1).double().cpu().numpy()
    draws[m] = ((per_batch.mean(1) - grad_f) ** 2).sum(1).double().cpu().numpy()
    for mult in (2, 4):
        count = len(usable) // mult
        if count >= min_draws and (replacement or mult * m < n):
            big = per_batch[: count * mult].reshape(count, mult * m, -1).mean(1)
            draws[mult * m] = ((big - grad_f) ** 2).sum(1).double().cpu().numpy()
    if not replacement:
        draws = {k: v for k, v in draws.items() if k < n}
    sizes = sorted(draws)
    res = _decide_variance(draws, sizes, sigma1_sq, n, cfg, grad_f, sigma_history,
                           source=f"{len(usable)} training batches of size {m} (halves, quarters and concatenations)")
    if len(sizes_seen) > 1:
        res.notes.append(f"the loader produced batches of sizes {sizes_seen[:10]}; only those of size {m} were used")
    return res
