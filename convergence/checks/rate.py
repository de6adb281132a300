r"""E8 -- the convergence rate of :math:`\mathbb E\|\nabla f(x_k)\|^2` against the theorem.

Inputs are full-gradient norms :math:`\|\nabla f(x_k)\|^2` of :math:`S` independent runs (seeds)
at steps :math:`k` (1-based; every step, or geometric checkpoints), the step sizes
:math:`\alpha_k`, and the constants of the theory measured on the run.

**Running mean.**  :math:`G_N = \frac1N\sum_{k\le N}\|\nabla f(x_k)\|^2` per seed, averaged over
seeds with a Student-t interval.  With checkpoints instead of every step, the sum is the
trapezoid rule plus the end-point correction, :math:`\sum_{k=1}^N v_k \approx \int_1^N v\,dk +
(v_1+v_N)/2` (exact for every step, and for :math:`v` linear between checkpoints).

**General bound** [D, from L2].  With :math:`W_N = \sum_k\alpha_k\|\nabla f_k\|^2/\sum_k\alpha_k`,

.. math::

    \mathbb E W_N \le U_N = \frac{2\,[D_f + (L_{up}\sigma^2\kappa_{hi}^2/(2m))\sum_{k\le N}\alpha_k^2]}
                               {\kappa_{lo}\sum_{k\le N}\alpha_k},

valid when :math:`\alpha_k\le\kappa_{lo}/(L_{up}\kappa_{hi}^2)` for all :math:`k`, with
:math:`D_f = f(x_1) - f^{low}` (:math:`f^{low} = 0` for CE/MSE), observed :math:`\kappa`'s and
:math:`\sigma^2 = \max_k\sigma_1^2(x_k)`.  One-sided t-test over seeds at the last :math:`N`:
reject when the lower confidence bound of :math:`W_N` exceeds :math:`U_N`.  :math:`U_N` is loose,
so a failure is strong evidence of a bug.  When the step-size condition does not hold the bound is
reported as not applicable.

**Shape.**  For :math:`\alpha_k\propto k^{-\beta}` the theorem gives
:math:`G_N = O(N^{\beta-1} + N^{-\beta})`, so the tail slope :math:`s` of :math:`\log G_N` on
:math:`\log N` (OLS over log-spaced checkpoints with :math:`N\ge` ``tail_start``
:math:`\cdot N_{\max}`) should satisfy :math:`s\le s_{\max} = \max(\beta-1, -\beta) + 0.1`
(:math:`\beta = 0`, a constant step, gives :math:`s_{\max} = 0.1`: no growth).  The slope's
standard error comes from a bootstrap over seeds; the upper confidence bound
:math:`\hat s + z\,\widehat{se}\le s_{\max}` is "consistent", a lower bound above
:math:`s_{\max}` is "decisively slower".  Faster decay is never a failure.  The shape rule is
asymptotic: a run with small steps can show a flat :math:`G_N` for a long time while staying far
below the theorem's envelope.  So by default (``shape_rule="auto"``) a decisively slower slope is a
FAIL only when the constants for :math:`U_N` are not given (then it is the only evidence); when
:math:`U_N` is evaluated, the sound bound decides and the slope is reported (PASS if consistent,
INCONCLUSIVE otherwise).

**liminf proxy** (informational): :math:`\min_{j\le k}\|\nabla f(x_j)\|` per seed should keep
decreasing; the report gives it at the checkpoints and whether it decreased over the second half.

p-value: :math:`\min(1, 2\min(p_{bound}, p_{slope}))` over the applicable parts (Bonferroni);
FAIL iff :math:`p\le\alpha`, PASS if not rejected and the slope is consistent, INCONCLUSIVE
otherwise.  When the step sizes are known to violate :math:`\alpha_k\le\kappa_{lo}/(L_{up}\kappa_{hi}^2)`
neither part can fail (the theorem then promises nothing; E7a reports the violation): both are
reported, and an inconsistent slope gives INCONCLUSIVE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from convergence.results import CheckResult, Verdict

__all__ = [
    "RateConfig",
    "cumulative_sums",
    "running_average",
    "weighted_average",
    "general_bound",
    "rate_exponent",
    "tail_points",
    "check_rate",
    "check_plateau_ratio",
]


@dataclass(frozen=True)
class RateConfig:
    """Settings of :func:`check_rate`: test level, bootstrap size, where the tail starts (a fraction of
    :math:`N_{\\max}`), how many log-spaced tail points, the slack added to the theoretical slope."""

    alpha: float = 0.01
    bootstrap: int = 2000
    tail_start: float = 0.1
    tail_points: int = 30
    slope_slack: float = 0.1
    shape_rule: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shape_rule not in ("auto", "fail", "report"):
            raise ValueError(f"shape_rule must be 'auto', 'fail' or 'report', got {self.shape_rule!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.bootstrap < 100:
            raise ValueError(f"bootstrap must be >= 100, got {self.bootstrap}")
        if not 0.0 < self.tail_start < 1.0:
            raise ValueError(f"tail_start must be in (0, 1), got {self.tail_start}")
        if self.tail_points < 2:
            raise ValueError(f"tail_points must be >= 2, got {self.tail_points}")
        if not self.slope_slack >= 0:
            raise ValueError(f"slope_slack must be >= 0, got {self.slope_slack}")


def _check_steps(steps: np.ndarray) -> None:
    if steps.ndim != 1 or steps.size < 1:
        raise ValueError("steps must be a non-empty 1-D sequence")
    if steps[0] < 1 or np.any(np.diff(steps) <= 0) or np.any(steps != np.round(steps)):
        raise ValueError("steps must be strictly increasing integers >= 1 (1-based step numbers)")


def cumulative_sums(steps: Sequence[int] | np.ndarray, values: np.ndarray) -> np.ndarray:
    r""":math:`\sum_{k=1}^{N_j} v_k` at every checkpoint :math:`N_j` (last axis of ``values``).

    Exact when ``steps`` is :math:`1,2,\dots`; otherwise :math:`v` is interpolated linearly
    between checkpoints (trapezoid rule plus the end-point correction :math:`(v_1+v_N)/2`), with
    :math:`v_k = v_{N_1}` for :math:`k < N_1`.
    """
    steps = np.asarray(steps, dtype=np.float64)
    _check_steps(steps)
    v = np.asarray(values, dtype=np.float64)
    if v.shape[-1] != steps.size:
        raise ValueError(f"values has {v.shape[-1]} checkpoints, steps has {steps.size}")
    if np.all(steps == np.arange(1, steps.size + 1)):
        return np.cumsum(v, axis=-1)
    head = v[..., :1] * steps[0]  # k = 1..N_1 at the first value
    widths = np.diff(steps)
    # sum over k in (N_j, N_{j+1}] of the linear interpolant: trapezoid + (v_{j+1} - v_j)/2
    pieces = 0.5 * (v[..., 1:] + v[..., :-1]) * widths + 0.5 * (v[..., 1:] - v[..., :-1])
    return np.concatenate([head, head + np.cumsum(pieces, axis=-1)], axis=-1)


def running_average(steps: Sequence[int] | np.ndarray, values: np.ndarray) -> np.ndarray:
    r""":math:`G_N = \frac1N\sum_{k\le N} v_k` at every checkpoint (see :func:`cumulative_sums`)."""
    steps_arr = np.asarray(steps, dtype=np.float64)
    return cumulative_sums(steps_arr, values) / steps_arr


def weighted_average(steps: Sequence[int] | np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    r""":math:`W_N = \sum_{k\le N}\alpha_k v_k / \sum_{k\le N}\alpha_k` at every checkpoint."""
    w = np.asarray(weights, dtype=np.float64)
    return cumulative_sums(steps, np.asarray(values, dtype=np.float64) * w) / cumulative_sums(steps, w)


def general_bound(
    sum_alpha: np.ndarray | float,
    sum_alpha_sq: np.ndarray | float,
    *,
    f_gap: float,
    lipschitz_upper: float,
    sigma2: float,
    kappa_lo: float,
    kappa_hi: float,
    batch_size: int,
) -> np.ndarray | float:
    r""":math:`U_N = 2[D_f + (L\sigma^2\kappa_{hi}^2/(2m))\sum\alpha_k^2]/(\kappa_{lo}\sum\alpha_k)`."""
    noise = lipschitz_upper * sigma2 * kappa_hi**2 / (2.0 * batch_size)
    return 2.0 * (f_gap + noise * np.asarray(sum_alpha_sq)) / (kappa_lo * np.asarray(sum_alpha))


def rate_exponent(beta: float) -> float:
    r"""The theorem's exponent of :math:`G_N` for :math:`\alpha_k\propto k^{-\beta}`: :math:`\max(\beta-1, -\beta)`."""
    return max(beta - 1.0, -beta)


def tail_points(steps: np.ndarray, start_fraction: float, count: int) -> np.ndarray:
    """Indices of up to ``count`` distinct checkpoints, log-spaced in ``[start_fraction·N_max, N_max]``."""
    steps = np.asarray(steps, dtype=np.float64)
    lo = max(steps[0], start_fraction * steps[-1])
    eligible = np.nonzero(steps >= lo)[0]
    if eligible.size <= count:
        return eligible
    targets = np.geomspace(steps[eligible[0]], steps[-1], count)
    idx = {int(eligible[np.argmin(np.abs(np.log(steps[eligible]) - math.log(t)))]) for t in targets}
    return np.array(sorted(idx))


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _ols_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Slopes of the rows of ``y`` on ``x``."""
    xc = x - x.mean()
    return (y - y.mean(axis=-1, keepdims=True)) @ xc / (xc @ xc)


def check_rate(
    grad_norm_sq: Sequence[Sequence[float]] | np.ndarray,
    steps: Sequence[int] | None = None,
    *,
    beta: float,
    step_sizes: Sequence[float] | np.ndarray | None = None,
    f_initial: float | Sequence[float] | None = None,
    f_low: float = 0.0,
    lipschitz: float | None = None,
    lipschitz_is_upper: bool = False,
    sigma2: float | None = None,
    kappa: tuple[float, float] | None = None,
    batch_size: int | None = None,
    config: RateConfig | None = None,
    **kwargs: Any,
) -> CheckResult:
    r"""E8 (see the module docstring).

    Args:
        grad_norm_sq: ``S × K`` array of :math:`\|\nabla f(x_k)\|^2` (one row per seed).
        steps: the ``K`` 1-based step numbers (default ``1..K``).
        beta: exponent of the schedule :math:`\alpha_k\propto k^{-\beta}` (0 for a constant step).
        step_sizes: :math:`\alpha_k` at the ``K`` steps (same for every seed), or ``S × K``.
        f_initial: :math:`f(x_1)` (scalar or one per seed; the largest gap is used).
        f_low: a lower bound on :math:`f` (0 for CE/MSE).
        lipschitz: :math:`\max(\hat L, L_H)` from E1 (doubled to :math:`L_{up}`), or an upper bound
            with ``lipschitz_is_upper=True``.
        sigma2: :math:`\max_k\sigma_1^2(x_k)`; kappa: :math:`(\kappa_{lo}, \kappa_{hi})` observed
            (E4); batch_size: :math:`m`.
        The general bound is evaluated only when ``step_sizes``, ``f_initial``, ``lipschitz``,
        ``sigma2``, ``kappa`` and ``batch_size`` are all given.  Keyword arguments build a
        :class:`RateConfig` when ``config`` is not given.
    """
    if config is not None and kwargs:
        raise ValueError("pass either config or keyword settings, not both")
    cfg = config if config is not None else RateConfig(**kwargs)
    from scipy import stats

    g = np.atleast_2d(np.asarray(grad_norm_sq, dtype=np.float64))
    if g.ndim != 2 or g.shape[1] < 2:
        raise ValueError("grad_norm_sq must be S × K with K >= 2 checkpoints")
    if not np.all(np.isfinite(g)) or np.any(g < 0):
        raise ValueError("grad_norm_sq must be finite and non-negative")
    S, K = g.shape
    steps_arr = np.arange(1, K + 1, dtype=np.float64) if steps is None else np.asarray(steps, dtype=np.float64)
    _check_steps(steps_arr)
    if steps_arr.size != K:
        raise ValueError(f"steps has {steps_arr.size} entries, grad_norm_sq has {K} checkpoints")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")

    notes: list[str] = []
    evidence: dict[str, Any] = {"seeds": S, "checkpoints": K, "N": int(steps_arr[-1]), "beta": beta}
    G = running_average(steps_arr, g)  # S × K
    G_mean = G.mean(axis=0)
    t_two = float(stats.t.ppf(1.0 - cfg.alpha / 2.0, S - 1)) if S > 1 else math.inf
    G_sd = G.std(axis=0, ddof=1) if S > 1 else np.full(K, math.inf)
    half = t_two * G_sd / math.sqrt(S)
    evidence["G_N"] = {"steps": steps_arr.astype(int).tolist(), "mean": G_mean.tolist(),
                       "ci_low": (G_mean - half).tolist(), "ci_high": (G_mean + half).tolist(),
                       "level": 1.0 - cfg.alpha}
    if S < 2:
        notes.append("one seed only: no confidence intervals (E8 needs S >= 8 for a meaningful test)")
    elif S < 8:
        notes.append(f"only {S} seeds (the protocol asks for S >= 8)")

    p_parts: dict[str, float] = {}
    theorem_applies: bool | None = None  # the step-size condition, when it can be evaluated
    # ------------------------------------------------------------------------- general bound
    needed = {"step_sizes": step_sizes, "f_initial": f_initial, "lipschitz": lipschitz, "sigma2": sigma2,
              "kappa": kappa, "batch_size": batch_size}
    missing = [k for k, v in needed.items() if v is None]
    if missing:
        evidence["bound"] = {"applies": False, "reason": f"not evaluated: {', '.join(missing)} not given"}
    else:
        a = np.asarray(step_sizes, dtype=np.float64)
        a = np.broadcast_to(a, g.shape) if a.ndim == 1 else a
        if a.shape != g.shape:
            raise ValueError(f"step_sizes must have {K} entries or shape {g.shape}")
        if np.any(a <= 0):
            raise ValueError("step_sizes must be > 0")
        k_lo, k_hi = (float(x) for x in kappa)  # type: ignore[union-attr]
        l_up = float(lipschitz) if lipschitz_is_upper else 2.0 * float(lipschitz)  # type: ignore[arg-type]
        f_gap = float(np.max(np.asarray(f_initial, dtype=np.float64))) - f_low
        if not (k_lo > 0 and k_hi >= k_lo and l_up > 0 and sigma2 >= 0 and batch_size >= 1):  # type: ignore[operator]
            raise ValueError("need kappa_lo > 0, kappa_hi >= kappa_lo, lipschitz > 0, sigma2 >= 0, batch_size >= 1")
        limit = k_lo / (l_up * k_hi**2)
        applies = bool(np.all(a <= limit * (1.0 + 1e-12)))
        theorem_applies = applies
        sum_a = cumulative_sums(steps_arr, a)
        sum_a2 = cumulative_sums(steps_arr, a * a)
        W = weighted_average(steps_arr, g, a)
        U = general_bound(sum_a.min(axis=0), sum_a2.max(axis=0), f_gap=max(f_gap, 0.0), lipschitz_upper=l_up,
                          sigma2=float(sigma2), kappa_lo=k_lo, kappa_hi=k_hi, batch_size=int(batch_size))  # type: ignore[arg-type]
        W_last = W[:, -1]
        W_mean = float(W_last.mean())
        W_sd = float(W_last.std(ddof=1)) if S > 1 else math.inf
        t_one = float(stats.t.ppf(1.0 - cfg.alpha, S - 1)) if S > 1 else math.inf
        W_lcb = W_mean - t_one * W_sd / math.sqrt(S)
        U_last = float(np.asarray(U)[-1])
        if S > 1 and W_sd > 0:
            p_bound = float(stats.t.sf((W_mean - U_last) / (W_sd / math.sqrt(S)), S - 1))
        else:
            p_bound = 0.0 if W_mean > U_last and S > 1 else 1.0
        evidence["bound"] = {
            "applies": applies, "W_N_mean": W_mean, "W_N_sd": W_sd, "W_N_lcb": W_lcb, "U_N": U_last,
            "p_value": p_bound,
            "step_size_limit": limit, "max_step_size": float(a.max()), "L_up": l_up, "D_f": f_gap,
            "sigma2": float(sigma2), "kappa": [k_lo, k_hi], "batch_size": int(batch_size),  # type: ignore[arg-type]
            "W_N_curve": W.mean(axis=0).tolist(), "U_N_curve": np.asarray(U).tolist(),
        }
        if applies:
            p_parts["bound"] = p_bound
        else:
            notes.append(f"alpha_k up to {float(a.max()):.3g} exceeds kappa_lo/(L_up kappa_hi^2) = {limit:.3g}: "
                         "the general bound U_N does not apply (reported only)")

    # ------------------------------------------------------------------------------- shape
    s_max = rate_exponent(beta) + cfg.slope_slack
    idx = tail_points(steps_arr, cfg.tail_start, cfg.tail_points)
    slope_info: dict[str, Any] = {"s_max": s_max, "theorem_exponent": rate_exponent(beta),
                                  "tail_steps": steps_arr[idx].astype(int).tolist()}
    consistent = False
    if idx.size >= 2 and np.all(G_mean[idx] > 0):
        x = np.log(steps_arr[idx])
        slope = float(_ols_slope(x, np.log(G_mean[idx])[None, :])[0])
        slope_info["slope"] = slope
        if S > 1:
            rng = np.random.default_rng(cfg.seed)
            picks = rng.integers(0, S, size=(cfg.bootstrap, S))
            boot_curves = G[:, idx][picks].mean(axis=1)  # B × T
            boot = _ols_slope(x, np.log(np.maximum(boot_curves, 1e-300)))
            se = float(boot.std(ddof=1))
            z = float(stats.norm.ppf(1.0 - cfg.alpha / 2.0))
            upper, lower = slope + z * se, slope - z * se
            if se > 0:
                p_slope = _normal_sf((slope - s_max) / se)
            else:
                p_slope = 0.0 if slope > s_max else 1.0
            slope_info.update({"se": se, "upper": upper, "lower": lower, "level": 1.0 - cfg.alpha / 2.0,
                               "percentile_ci": np.percentile(boot, [100 * cfg.alpha / 2, 100 * (1 - cfg.alpha / 2)]).tolist(),
                               "p_value": p_slope})
            shape_fails = cfg.shape_rule == "fail" or (cfg.shape_rule == "auto" and "bound" not in p_parts
                                                        and theorem_applies is None)
            slope_info["can_fail"] = bool(shape_fails and theorem_applies is not False)
            if slope_info["can_fail"]:
                p_parts["slope"] = p_slope
            consistent = upper <= s_max
        else:
            notes.append("one seed: no confidence bound on the slope, so consistency cannot be shown")
    else:
        notes.append("the tail has fewer than 2 checkpoints with G_N > 0: no slope fit")
    evidence["slope"] = slope_info

    # ------------------------------------------------------------------------ liminf proxy
    running_min = np.minimum.accumulate(np.sqrt(g), axis=1)
    half_idx = int(np.searchsorted(steps_arr, steps_arr[-1] / 2.0))
    evidence["liminf_proxy"] = {
        "steps": steps_arr[idx].astype(int).tolist() if idx.size else [],
        "min_grad_norm_mean": running_min.mean(axis=0)[idx].tolist() if idx.size else [],
        "decreased_in_second_half": float(np.mean(running_min[:, -1] < running_min[:, min(half_idx, K - 1)])),
    }

    if p_parts:
        p = min(1.0, len(p_parts) * min(p_parts.values()))
    else:
        p = 1.0
    evidence["p_value"] = p
    evidence["p_parts"] = p_parts
    if "bound" in evidence and "W_N_mean" in evidence["bound"]:
        evidence["bound"]["rejected"] = "bound" in p_parts and len(p_parts) * p_parts["bound"] <= cfg.alpha
    if "p_value" in slope_info:
        slope_info["rejected"] = "slope" in p_parts and len(p_parts) * slope_info["p_value"] <= cfg.alpha
        slope_info["rejected_if_tested"] = slope_info["p_value"] <= cfg.alpha
    # PASS only when a part that could fail was tested: the bound U_N (when the step-size condition
    # holds), or a slope rule that can fail; a consistent slope alone under a violated step-size
    # condition proves nothing the theorem promises (NOT_APPLICABLE, below)
    bound_tested = "bound" in p_parts
    slope_can_fail = bool(slope_info.get("can_fail"))
    if bound_tested or slope_can_fail:
        not_rejected = Verdict.PASS if (consistent or bound_tested) else Verdict.INCONCLUSIVE
    else:
        not_rejected = Verdict.NOT_APPLICABLE
    evidence["verdict_if_not_rejected"] = not_rejected.value
    if p <= cfg.alpha:
        verdict = Verdict.FAIL
        reasons = []
        if "bound" in p_parts and p_parts["bound"] * len(p_parts) <= cfg.alpha:
            reasons.append("W_N exceeds the general bound U_N")
        if "slope" in p_parts and p_parts["slope"] * len(p_parts) <= cfg.alpha:
            reasons.append(f"G_N decays slower than N^{s_max:.3g}")
        notes.append("rate violated: " + "; ".join(reasons))
    else:
        verdict = not_rejected
        if not consistent and theorem_applies is False and "p_value" in slope_info:
            notes.append(f"the tail slope is not shown to be <= {s_max:.3g}, but the step-size condition fails, so "
                         "the theorem guarantees no rate here (shape reported only; see E7a)")
        elif not consistent and slope_info.get("rejected_if_tested") and "bound" in p_parts:
            notes.append(f"G_N decays slower than N^{s_max:.3g} over the tail, but stays within the general bound "
                         "U_N (the shape rule is asymptotic; the sound bound decides: run longer to see the rate)")
        elif not consistent and slope_info.get("rejected_if_tested"):
            notes.append(f"G_N decays slower than N^{s_max:.3g} over the tail (reported only: shape_rule='report')")
        elif not consistent:
            notes.append(f"the tail slope is not shown to be <= {s_max:.3g} (upper bound too high or too few seeds)")
    if verdict is Verdict.NOT_APPLICABLE:
        reason = ("the theorem promises no rate on this run: "
                  + ("the step-size condition alpha_k <= kappa_lo/(L_up kappa_hi^2) fails (see E7a)"
                     if theorem_applies is False else "the general bound could not be evaluated and the slope rule "
                     "cannot fail here") + (" and a constant step gives no decay exponent" if beta == 0 else ""))
        evidence["not_applicable"] = reason
        notes.insert(0, reason)
    statistic = float(slope_info.get("slope", math.nan))
    expected = f"tail slope <= max(beta-1, -beta) + {cfg.slope_slack:g} = {s_max:.3g}; W_N <= U_N"
    return CheckResult("E8", "rate of E|grad f|^2 (Wang et al. 2017)", statistic, expected, 1.0 - cfg.alpha,
                       verdict, evidence, notes)


def check_plateau_ratio(
    small: np.ndarray,
    large: np.ndarray,
    steps: Sequence[int],
    *,
    ratio: float = 4.0,
    margin: float = 1.5,
    alpha: float = 0.01,
    tail_fraction: float = 1.0 / 3.0,
    plateau_drop: float = 1.25,
    min_decrease: float = 4.0,
) -> CheckResult:
    r"""E8p -- the constant-step noise floor scales as :math:`1/m`: runs at :math:`m` and :math:`4m`.

    ``small`` and ``large`` are ``S × K`` arrays of :math:`\|\nabla f(x_k)\|^2` (one row per seed) at
    the 1-based ``steps``, for batch sizes :math:`m` and :math:`\text{ratio}\cdot m` with the same
    constant step. Each seed's plateau level is the mean over the last ``tail_fraction`` of the steps;
    :math:`\hat\rho = \bar P(m)/\bar P(4m)`, with a :math:`1-\alpha` t-interval on
    :math:`\log\hat\rho` (delta method over seeds, :math:`2S-2` degrees of freedom). When the noise
    dominates the floor, :math:`\rho = 4`.

    Verdict: FAIL if the interval misses :math:`[\text{ratio}/\text{margin}, \text{ratio}\cdot\text{margin}]`
    (the floor does not shrink as :math:`1/m`: e.g. batches that are not i.i.d. draws); PASS otherwise;
    NOT_APPLICABLE when a run has not reached its plateau, or the floor is at rounding level
    (:math:`\le 10^{-20}`: interpolation, no noise), or fewer than 2 seeds.

    Plateau rule (both must hold, else NOT_APPLICABLE): (a) for :math:`m` and for :math:`4m`, the mean
    over seeds of the first half of the tail is at most ``plateau_drop`` times that of the second half;
    (b) the run at :math:`m` fell by at least ``min_decrease`` from its first checkpoint to its tail
    level. (a) alone is not enough: a run whose transient decays slowly (a step far below the limit)
    looks flat over a short tail while both batch sizes are still at the same transient level, which
    would read as a ratio of 1, a false FAIL. For a geometric transient
    :math:`v_k = F + Tr^k` that dominates the floor, the tail drop is about the overall decrease to the
    power :math:`(1/6)/(5/6) = 1/5`, so (a) and (b) together exclude it whenever
    ``min_decrease`` :math:`>` ``plateau_drop``:math:`^5` (3.05 for the defaults). A transient that
    decays sublinearly cannot be excluded from the curve alone: run long enough that it has.
    """
    from scipy import stats

    from convergence.results import not_applicable

    assumption = "constant-step noise floor ~ 1/m (plateau ratio m vs 4m)"
    a, b = np.atleast_2d(np.asarray(small, dtype=np.float64)), np.atleast_2d(np.asarray(large, dtype=np.float64))
    steps_arr = np.asarray(steps, dtype=np.float64)
    if a.shape[1] != steps_arr.size or b.shape[1] != steps_arr.size:
        raise ValueError("small, large and steps must have the same number of checkpoints")
    S = min(a.shape[0], b.shape[0])
    if S < 2:
        return not_applicable("E8p", assumption, "fewer than 2 seeds per batch size")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return not_applicable("E8p", assumption, "a run diverged (non-finite gradient norms)")
    n_max = steps_arr[-1]
    tail = steps_arr >= (1.0 - tail_fraction) * n_max
    if tail.sum() < 4:
        return not_applicable("E8p", assumption, "fewer than 4 checkpoints in the tail")
    idx = np.flatnonzero(tail)
    first, second = idx[: idx.size // 2], idx[idx.size // 2:]
    drop = float(a[:, first].mean() / max(a[:, second].mean(), 1e-300))
    drop_b = float(b[:, first].mean() / max(b[:, second].mean(), 1e-300))
    level_a, level_b = a[:, tail].mean(axis=1), b[:, tail].mean(axis=1)
    decrease = float(a[:, 0].mean() / max(level_a.mean(), 1e-300))
    evidence = {"seeds": S, "tail_steps": steps_arr[tail].astype(int).tolist(), "plateau_m": level_a.tolist(),
                "plateau_4m": level_b.tolist(), "tail_drop_m": drop, "tail_drop_4m": drop_b,
                "decrease_m": decrease, "min_decrease": min_decrease, "ratio_expected": ratio, "margin": margin}
    for label, d in (("m", drop), ("4m", drop_b)):
        if d > plateau_drop:
            return not_applicable("E8p", assumption, f"the run at {label} has not reached its noise floor (|grad f|^2 "
                                  f"still fell {d:.3g}x within the tail): run more steps", evidence=evidence,
                                  expected=ratio)
    if decrease < min_decrease:
        return not_applicable("E8p", assumption, f"the run at m fell only {decrease:.3g}x from its first checkpoint "
                              f"(< {min_decrease:g}x): a slowly decaying transient is not excluded, so the tail "
                              "is not known to be the noise floor: run more steps or a larger step",
                              evidence=evidence, expected=ratio)
    if level_a.mean() <= 1e-20 or level_b.mean() <= 1e-20:
        return not_applicable("E8p", assumption, "the floor is at rounding level: no gradient noise to scale",
                              evidence=evidence, expected=ratio)
    rho = float(level_a.mean() / level_b.mean())
    se = math.sqrt(level_a.var(ddof=1) / (S * level_a.mean() ** 2) + level_b.var(ddof=1) / (S * level_b.mean() ** 2))
    t = float(stats.t.ppf(1.0 - alpha / 2.0, 2 * S - 2))
    lo, hi = rho * math.exp(-t * se), rho * math.exp(t * se)
    evidence.update({"ratio": rho, "ratio_ci": [lo, hi], "level": 1.0 - alpha})
    ok = lo <= ratio * margin and hi >= ratio / margin
    notes = [] if ok else [f"plateau ratio {rho:.3g} (CI [{lo:.3g}, {hi:.3g}]) misses [{ratio / margin:.3g}, "
                           f"{ratio * margin:.3g}]: the noise floor does not shrink as 1/m"]
    return CheckResult("E8p", assumption, rho, f"CI meets [{ratio / margin:.3g}, {ratio * margin:.3g}]", 1.0 - alpha,
                       Verdict.PASS if ok else Verdict.FAIL, evidence, notes)
