r"""E1 -- smoothness (AS.1): empirical Lipschitz constants and mean-value consistency.

AS.1 asks for a global :math:`L` with :math:`\|\nabla f(u)-\nabla f(v)\|\le L\|u-v\|`.  Two
measurable quantities are both **lower bounds** on :math:`L`, so AS.1 can never be "passed":

* :math:`\hat L = \max_{(u,v)} \|\nabla f(u)-\nabla f(v)\|/\|u-v\|` over pairs of
  consecutive iterates :math:`(x_k, x_{k+1})` and perturbation pairs :math:`(x_k, x_k + r\zeta)`
  with :math:`\zeta` a random unit vector or a filter-normalized direction (Li et al. 2018) scaled
  to unit norm, at radii :math:`r\in\{10^{-3},10^{-2},10^{-1},1\}\cdot\|x_k\|`;
* :math:`L_H = \max_k \|\nabla^2 f(x_k)\|_2 = \max_k\max(|\lambda_{\max}|, |\lambda_{\min}|)`
  from Lanczos on full-batch Hessian-vector products of a :class:`convergence.hessian.HessianOperator`
  (:func:`hessian_norm`: torch Lanczos on the device, stopped by the Ritz residual bound of the
  largest-magnitude end, or ``eigvalsh`` of the materialized operator for small models).

Minimum separation: a pair is used only if :math:`\|u-v\|\ge s\,\|u\|` with :math:`s = 10^{-6}` in
float64 and :math:`10^{-3}` in float32; below that the difference quotient is dominated by rounding
(about :math:`\varepsilon\|\nabla f\|\sqrt n`).

What *can* fail is (a) **mean-value consistency**.  For a :math:`C^2` function, with
:math:`M = \max_{t\in[0,1]} \|\nabla^2 f(v + t(u-v))\|` and :math:`\Delta = u - v`,

.. math::

    \|\nabla f(u) - \nabla f(v)\| \le M\|\Delta\|
    \qquad\text{and}\qquad
    |f(u) - f(v) - \nabla f(v)^\top\Delta| \le \tfrac12 M\|\Delta\|^2

(the mean-value inequality for :math:`\nabla f`, and Taylor's theorem with integral remainder).
Both are checked with :math:`M` taken on a :math:`t`-grid and tolerance 1.05, plus rounding
allowances :math:`10\sqrt n\,\varepsilon(\|\nabla f(u)\|+\|\nabla f(v)\|)` and
:math:`10^3\varepsilon(|f(u)|+|f(v)|+|\nabla f(v)^\top\Delta|)`.  The first compares the
gradient code with the Hessian-vector products; the second ties both to the loss *values* of the
forward pass, so it also catches a gradient that is wrong by a constant factor (a custom backward
scaling by 2 makes HVPs -- derivatives of that gradient -- scale by 2 as well, which the first
inequality alone cannot see).  Because the grid can miss a peak of :math:`\|\nabla^2 f\|` between
nodes, a violating pair is re-checked on successively bisected grids and only counted when it still
violates on the finest one.  A violation means the gradient is not the derivative of :math:`f` that
the Hessian-vector products see (a wrong custom backward, a gradient scaled by mistake) or that
:math:`f` is not smooth there (ReLU kinks).

The gradient under test is by default the live-module autograd gradient of ``loss_fn`` (the
optimizer's path); the Hessian is by default from ``hessian_loss_fn`` (``loss_fn`` unless given), so
a trusted reference loss can be checked against a training loss with a custom backward.

Cost.  Showing that a pair is *consistent* only needs a lower bound on :math:`M`, and the extreme
Ritz values of a short Lanczos run (:func:`convergence.spectrum.lanczos`) are such lower bounds
(:math:`|\theta|\le\|\nabla^2 f\|`).  So each pair first tries the cached norms at its end points,
then cheap Lanczos bounds along the grid; only when these do not suffice are accurate norms
(converged Lanczos) computed and the grid refined.  The verdict is the same as with accurate norms
everywhere.

Verdict: FAIL iff some pair violates (a) (deterministic; no p-value); otherwise PASS
("consistent": :math:`\hat L` and :math:`L_H` are reported, together with :math:`\hat L` against
:math:`\|x_k\|` -- growth of :math:`\hat L` with :math:`\|x\|` is informative for deep nets, which are
not globally smooth); INCONCLUSIVE when no pair met the minimum separation.
:math:`L_{up} = 2\max(\hat L, L_H)` is recorded for the descent, step-size and rate checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from convergence.checks.variance import flat_parameters, full_gradient, loaded_parameters, trainable_parameters
from convergence.hessian import HessianOperator
from convergence.landscape import random_direction
from convergence.results import CheckResult, Verdict
from convergence.spectrum import lanczos

__all__ = ["SmoothnessConfig", "hessian_norm", "hessian_norm_lower_bound", "check_smoothness"]

LossFn = Callable[[Any, Any], torch.Tensor]
GradientFn = Callable[[torch.Tensor], torch.Tensor]
NormFn = Callable[[torch.Tensor], float]


@dataclass(frozen=True)
class SmoothnessConfig:
    """Settings of :func:`check_smoothness`.

    ``radii`` are relative to :math:`\\|x_k\\|` (to 1 when :math:`x_k = 0`); per radius and center
    ``num_random`` random unit directions and, if ``filter_normalized``, one filter-normalized
    direction.  ``t_points`` is the initial size of the uniform grid on :math:`[0, 1]`, refined
    ``refine`` times (bisection) for pairs that still look violating.  ``min_separation`` defaults to
    1e-6 (float64) or 1e-3 (float32).  ``eig_tol`` is ARPACK's relative tolerance for accurate
    norms (operators of size up to ``dense_threshold`` are materialized); ``lower_steps`` Lanczos
    steps give the cheap lower bounds.  After ``max_violations`` confirmed violations, further pairs
    are only screened with cached norms and lower bounds (unconfirmed ones are counted, not
    refined), which bounds the cost of a failing run.  ``chunk_size`` evaluates :math:`f` and :math:`\\nabla f` in
    chunks of examples.
    """

    radii: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    num_random: int = 1
    filter_normalized: bool = True
    t_points: int = 5
    refine: int = 2
    tolerance: float = 1.05
    min_separation: float | None = None
    eig_tol: float = 1e-6
    dense_threshold: int = 64
    lower_steps: int = 12
    max_violations: int = 3
    chunk_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if any(not (r > 0 and math.isfinite(r)) for r in self.radii):
            raise ValueError(f"radii must be positive and finite, got {self.radii!r}")
        if self.num_random < 0:
            raise ValueError(f"num_random must be >= 0, got {self.num_random}")
        if self.t_points < 2:
            raise ValueError(f"t_points must be >= 2 (the grid includes t=0 and t=1), got {self.t_points}")
        if self.refine < 0:
            raise ValueError(f"refine must be >= 0, got {self.refine}")
        if not self.tolerance >= 1.0:
            raise ValueError(f"tolerance must be >= 1, got {self.tolerance}")
        if self.min_separation is not None and not self.min_separation >= 0:
            raise ValueError(f"min_separation must be >= 0, got {self.min_separation}")
        if not self.eig_tol >= 0:
            raise ValueError(f"eig_tol must be >= 0, got {self.eig_tol}")
        if self.max_violations < 1:
            raise ValueError(f"max_violations must be >= 1, got {self.max_violations}")
        if self.lower_steps < 1:
            raise ValueError(f"lower_steps must be >= 1, got {self.lower_steps}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


def hessian_norm(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    theta: torch.Tensor | None = None,
    *,
    tol: float = 1e-6,
    dense_threshold: int = 64,
    seed: int = 0,
    max_steps: int | None = None,
) -> float:
    r""":math:`\|\nabla^2 f(\theta)\|_2 = \max_i|\lambda_i|` of the full-batch Hessian at ``theta``
    (the current parameters if None).

    Torch Lanczos on the forward-over-reverse HVPs of a :class:`~convergence.hessian.HessianOperator`,
    on the parameters' device (:func:`~convergence.spectrum.lanczos_extremes`, ``which="magnitude"``:
    the Ritz value of largest magnitude with residual bound :math:`\le` ``tol`` times it; the device
    is read once every 10 products, not per product); for ``n <= dense_threshold`` the operator is
    materialized and ``torch.linalg.eigvalsh`` takes both ends on the device. The magnitude end
    rather than both algebraic ends: the smallest end of a singular Hessian (softmax regression's
    null space, pixels that are always zero) converges slowly and the norm does not need it.
    ``max_steps`` (default ``min(n, 1000)``): an estimate still unconverged there raises
    ``RuntimeError`` (an under-estimated norm could turn a consistent pair into a false FAIL).
    """
    from convergence.spectrum import lanczos_extremes

    with loaded_parameters(model, theta):
        op = HessianOperator(model, loss_fn, inputs, targets)
        if op.n <= max(dense_threshold, 2):
            dense = op.to_dense(max_n=max(op.n, 1)).detach()
            vals = torch.linalg.eigvalsh(0.5 * (dense + dense.T))
            return float(vals.abs().max())
        steps = min(op.n, 1000) if max_steps is None else max_steps
        res = lanczos_extremes(op, op.n, which="magnitude", tol=tol, max_steps=steps, seed=seed)
    if not res.converged:
        raise RuntimeError(f"the Hessian norm did not converge in {res.steps} Lanczos steps (residual "
                           f"{max(res.residual_min, res.residual_max):.3g}); raise max_steps")
    return res.norm


def hessian_norm_lower_bound(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    theta: torch.Tensor | None = None,
    *,
    num_steps: int = 12,
    seed: int = 0,
) -> float:
    r"""A lower bound on :math:`\|\nabla^2 f(\theta)\|_2`: the largest :math:`|\theta_j|` of the Ritz values
    after ``num_steps`` Lanczos steps (Ritz values lie in :math:`[\lambda_{\min}, \lambda_{\max}]`)."""
    with loaded_parameters(model, theta):
        op = HessianOperator(model, loss_fn, inputs, targets)
        res = lanczos(op, op.n, num_steps, seed=seed, check_every=None)  # reads the device once
        ritz, _ = res.ritz()
    return float(ritz.abs().max())


def _num_examples(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    raise TypeError("chunk_size needs the inputs as one tensor")


def _unit(v: torch.Tensor) -> torch.Tensor | None:
    norm = torch.linalg.vector_norm(v)
    return v / norm if norm > 0 else None


class _NormOracle:
    """Cached accurate norms and cheap lower bounds of :math:`\\|\\nabla^2 f\\|` at keyed points."""

    def __init__(self, exact: NormFn, lower: NormFn | None) -> None:
        self._exact_fn, self._lower_fn = exact, lower
        self.exact_cache: dict[Any, float] = {}
        self.lower_cache: dict[Any, float] = {}
        self.exact_calls = 0
        self.lower_calls = 0

    def known(self, key: Any) -> float:
        """The best value computed so far (0 when none)."""
        return max(self.exact_cache.get(key, 0.0), self.lower_cache.get(key, 0.0))

    def lower(self, key: Any, theta: torch.Tensor) -> float:
        if key in self.exact_cache:
            return self.exact_cache[key]
        if self._lower_fn is None:
            return self.exact(key, theta)
        if key not in self.lower_cache:
            self.lower_calls += 1
            self.lower_cache[key] = float(self._lower_fn(theta))
        return self.lower_cache[key]

    def exact(self, key: Any, theta: torch.Tensor) -> float:
        if key not in self.exact_cache:
            self.exact_calls += 1
            self.exact_cache[key] = float(self._exact_fn(theta))
        return self.exact_cache[key]


def _grid(points: int) -> list[float]:
    """Uniform grid on [0, 1], end points first, then the interior in bisection order."""
    ts = [j / (points - 1) for j in range(points)]
    interior = sorted(ts[1:-1], key=lambda t: (_depth(t), t))
    return [0.0, 1.0] + interior


def _depth(t: float) -> int:
    depth = 0
    while t != int(t) and depth < 60:
        t *= 2.0
        depth += 1
    return depth


def check_smoothness(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    iterates: Sequence[torch.Tensor] | None = None,
    *,
    centers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    iterate_pairs: Sequence[tuple[int, int]] | None = None,
    gradient_fn: GradientFn | None = None,
    hessian_loss_fn: LossFn | None = None,
    hessian_norm_fn: NormFn | None = None,
    config: SmoothnessConfig | None = None,
    **kwargs: Any,
) -> CheckResult:
    r"""E1 over a trajectory (see the module docstring).

    ``iterates``: flat parameter vectors :math:`x_k` in the order visited (``None``: the model's
    current parameters only); consecutive entries form the iterate pairs, so pass
    ``[x_k, x_{k+1}, ...]`` as recorded, or name the pairs with ``iterate_pairs`` (index pairs
    ``(i, j)`` meaning :math:`(x_i, x_j)` are consecutive iterates).  ``centers``: indices into ``iterates`` around which
    perturbation pairs are drawn and :math:`\|\nabla^2 f\|` is measured accurately (default:
    first, middle, last); ``steps``: the step number of each iterate, for the report.
    ``gradient_fn(theta)`` overrides the gradient under test (default: autograd of ``loss_fn`` on
    the live module); ``hessian_loss_fn`` is the loss whose values and Hessian are the reference
    (default ``loss_fn``); ``hessian_norm_fn(theta)`` overrides the spectral-norm oracle (then no
    Lanczos lower bounds are used).  The model's parameters are restored on return.  Keyword
    arguments build a :class:`SmoothnessConfig` when ``config`` is not given.
    """
    if config is not None and kwargs:
        raise ValueError("pass either config or keyword settings, not both")
    cfg = config if config is not None else SmoothnessConfig(**kwargs)
    named = trainable_parameters(model)
    dtype = named[0][1].dtype
    eps = torch.finfo(dtype).eps
    sep = cfg.min_separation if cfg.min_separation is not None else (1e-6 if dtype == torch.float64 else 1e-3)
    pts = [t.detach().reshape(-1).to(dtype) for t in iterates] if iterates is not None else [flat_parameters(model)]
    if not pts:
        raise ValueError("iterates is empty")
    n = pts[0].numel()
    if any(p.numel() != n for p in pts):
        raise ValueError("all iterates must have the number of trainable parameters")
    if steps is not None and len(steps) != len(pts):
        raise ValueError(f"steps has {len(steps)} entries for {len(pts)} iterates")
    step_of = [int(k) for k in steps] if steps is not None else list(range(len(pts)))
    if centers is None:
        centers = sorted({0, len(pts) // 2, len(pts) - 1})
    centers = [int(c) for c in centers]
    if any(not 0 <= c < len(pts) for c in centers):
        raise ValueError(f"centers must index iterates (0..{len(pts) - 1}), got {centers}")

    h_loss = hessian_loss_fn if hessian_loss_fn is not None else loss_fn
    if gradient_fn is None:
        def gradient_fn(theta: torch.Tensor) -> torch.Tensor:
            with loaded_parameters(model, theta):
                return full_gradient(model, loss_fn, inputs, targets, chunk_size=cfg.chunk_size)[1]

    lower_fn: NormFn | None = None
    if hessian_norm_fn is None:
        def hessian_norm_fn(theta: torch.Tensor) -> float:
            return hessian_norm(model, h_loss, inputs, targets, theta, tol=cfg.eig_tol,
                                dense_threshold=cfg.dense_threshold, seed=cfg.seed)

        def lower_fn(theta: torch.Tensor) -> float:
            return hessian_norm_lower_bound(model, h_loss, inputs, targets, theta,
                                            num_steps=min(cfg.lower_steps, n), seed=cfg.seed)

        if n <= min(cfg.lower_steps, cfg.dense_threshold):
            lower_fn = None  # the accurate norm costs no more products than the bound: compute it once

    oracle = _NormOracle(hessian_norm_fn, lower_fn)

    def value_fn(theta: torch.Tensor) -> float:
        with loaded_parameters(model, theta), torch.no_grad():
            if cfg.chunk_size is None:
                return float(h_loss(model(inputs), targets))
            n_ex = _num_examples(inputs)
            total = 0.0
            for start in range(0, n_ex, cfg.chunk_size):
                sl = slice(start, min(n_ex, start + cfg.chunk_size))
                total += float(h_loss(model(inputs[sl]), targets[sl])) * (sl.stop - sl.start) / n_ex
            return total

    evaluated: dict[int, tuple[float, torch.Tensor]] = {}

    def at_iterate(i: int) -> tuple[float, torch.Tensor]:
        if i not in evaluated:
            evaluated[i] = (value_fn(pts[i]), gradient_fn(pts[i]).detach().reshape(-1))
        return evaluated[i]

    # ------------------------------------------------------------------- candidate pairs (u, v)
    if iterate_pairs is None:
        iterate_pairs = [(i, i + 1) for i in range(len(pts) - 1)]
    iterate_pairs = [(int(i), int(j)) for i, j in iterate_pairs]
    if any(not (0 <= i < len(pts) and 0 <= j < len(pts)) for i, j in iterate_pairs):
        raise ValueError(f"iterate_pairs must index iterates (0..{len(pts) - 1}), got {iterate_pairs}")
    pairs: list[dict[str, Any]] = []
    for i, j in iterate_pairs:
        pairs.append({"kind": "iterates", "u": pts[j], "v": pts[i], "v_index": i, "u_index": j})
    gen = torch.Generator(device="cpu")
    gen.manual_seed(cfg.seed)
    for c in centers:
        x = pts[c]
        xnorm = float(torch.linalg.vector_norm(x))
        base = xnorm if xnorm > 0 else 1.0
        for r_rel in cfg.radii:
            deltas: list[tuple[str, torch.Tensor]] = []
            for _ in range(cfg.num_random):
                z = _unit(torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=x.dtype, device=x.device))
                if z is not None:
                    deltas.append((f"random r={r_rel:g}", z))
            if cfg.filter_normalized:
                with loaded_parameters(model, x):
                    d = random_direction(model, generator=gen, include_low_dim=True)
                flat = torch.cat([d[name].reshape(-1) for name, _ in named]).to(x.dtype)
                z = _unit(flat)
                if z is not None:
                    deltas.append((f"filter r={r_rel:g}", z))
            for label, z in deltas:
                pairs.append({"kind": label, "u": x + (r_rel * base) * z, "v": x, "v_index": c, "u_index": None})

    # ----------------------------------------------------------------------- evaluate each pair
    def point_key(pid: int, pair: dict[str, Any], t: float) -> tuple[Any, torch.Tensor]:
        if t == 0.0:
            return ("x", pair["v_index"]), pair["v"]
        if t == 1.0 and pair["u_index"] is not None:
            return ("x", pair["u_index"]), pair["u"]
        return ("p", pid, t), pair["v"] + t * (pair["u"] - pair["v"])

    rows: list[dict[str, Any]] = []
    skipped = 0
    for pid, pair in enumerate(pairs):
        u, v = pair["u"], pair["v"]
        dist = float(torch.linalg.vector_norm(u - v))
        if dist == 0.0 or dist < sep * float(torch.linalg.vector_norm(u)):
            skipped += 1
            continue
        fv, gv = at_iterate(pair["v_index"])
        if pair["u_index"] is not None:
            fu, gu = at_iterate(pair["u_index"])
        else:
            fu, gu = value_fn(u), gradient_fn(u).detach().reshape(-1)
        diff = float(torch.linalg.vector_norm(gu - gv))
        slack = 10.0 * math.sqrt(n) * eps * (float(torch.linalg.vector_norm(gu)) + float(torch.linalg.vector_norm(gv)))
        linear = float(gv.dot(u - v))
        remainder = abs(fu - fv - linear)
        f_slack = 1e3 * eps * (abs(fu) + abs(fv) + abs(linear))
        # the smallest M that makes both inequalities hold
        needed = max((diff - slack) / (cfg.tolerance * dist), (remainder - f_slack) / (cfg.tolerance * 0.5 * dist**2), 0.0)

        points = cfg.t_points
        h_max = 0.0
        consistent = needed == 0.0
        saturated = len([r for r in rows if r["violated"]]) >= cfg.max_violations
        for level in range(cfg.refine + 1):
            if consistent or (saturated and level):
                break
            if level:
                points = 2 * points - 1
            grid = _grid(points)
            for t in grid:  # cached values first, then cheap lower bounds
                key, theta = point_key(pid, pair, t)
                h_max = max(h_max, oracle.known(key))
            for t in grid:
                if h_max >= needed:
                    break
                key, theta = point_key(pid, pair, t)
                h_max = max(h_max, oracle.lower(key, theta))
            for t in grid:  # accurate norms only where the bounds were not enough
                if h_max >= needed or saturated:
                    break
                key, theta = point_key(pid, pair, t)
                h_max = max(h_max, oracle.exact(key, theta))
            consistent = h_max >= needed
        violated: bool | None = not consistent
        if violated and saturated:
            violated = None  # not confirmed: enough violations were confirmed already
        gradient_violated = violated and diff > cfg.tolerance * h_max * dist + slack
        taylor_violated = violated and remainder > cfg.tolerance * 0.5 * h_max * dist**2 + f_slack
        rows.append({
            "kind": pair["kind"], "center_step": step_of[pair["v_index"]], "distance": dist,
            "grad_diff": diff, "quotient": diff / dist, "taylor_remainder": remainder,
            "hessian_norm_needed": needed, "hessian_norm_found": h_max, "grid_points": points,
            "gradient_violated": gradient_violated, "taylor_violated": taylor_violated, "violated": violated,
        })

    center_norms = {c: oracle.exact(("x", c), pts[c]) for c in centers}
    L_H = max(center_norms.values())
    L_hat = max((row["quotient"] for row in rows), default=math.nan)
    per_center = []
    for c in centers:
        qs = [row["quotient"] for row in rows if row["center_step"] == step_of[c]]
        per_center.append({"step": step_of[c], "x_norm": float(torch.linalg.vector_norm(pts[c])),
                           "L_hat": max(qs, default=math.nan), "hessian_norm": center_norms[c]})
    violations = [row for row in rows if row["violated"]]
    unconfirmed = sum(row["violated"] is None for row in rows)
    notes: list[str] = []
    if unconfirmed:
        notes.append(f"{unconfirmed} further suspicious pair(s) were not confirmed: the check stops confirming "
                     f"after {cfg.max_violations} violations")
    if skipped:
        notes.append(f"{skipped} pair(s) below the minimum separation {sep:g}·|u| were skipped")
    if violations:
        verdict = Verdict.FAIL
        kinds = sorted({k for row in violations for k, flag in (("gradient", row["gradient_violated"]),
                                                                 ("Taylor", row["taylor_violated"])) if flag})
        notes.append(f"{len(violations)} mean-value violation(s) ({', '.join(kinds)} form) beyond "
                     f"{cfg.tolerance}·max_t|H| on t-grids of up to {max(row['grid_points'] for row in violations)} points: the gradient is not "
                     "the derivative the loss values / HVPs imply, or f is not smooth (ReLU kinks)")
    elif rows:
        verdict = Verdict.PASS
        notes.append("L_hat and L_H are lower bounds on L: PASS means consistent, not proven")
    else:
        verdict = Verdict.NOT_APPLICABLE
        notes.insert(0, f"no pair of points was at least {sep:g}·|u| apart: below that, rounding dominates the "
                        "gradient differences and the mean-value rule cannot discriminate")
    ratios = [row["hessian_norm_needed"] / row["hessian_norm_found"] if row["hessian_norm_found"] > 0
              else (math.inf if row["hessian_norm_needed"] > 0 else 0.0) for row in rows]
    finite = [x for x in (L_hat, L_H) if math.isfinite(x)]
    evidence = {
        "L_hat": L_hat,
        "L_H": L_H,
        "L_up": 2.0 * max(finite) if finite else math.nan,
        "tolerance": cfg.tolerance,
        "min_separation": sep,
        "num_pairs": len(rows),
        "num_skipped": skipped,
        "num_violations": len(violations),
        "num_unconfirmed": unconfirmed,
        "worst_needed_over_found": max(ratios, default=math.nan),
        "per_center": per_center,
        "pairs": rows,
        "hessian_norm_evaluations": {"accurate": oracle.exact_calls, "lanczos_lower_bounds": oracle.lower_calls},
        "deterministic_fail": bool(violations),
    }
    expected = f"|Δg| <= {cfg.tolerance}·max_t|H|·|Δx| and Taylor remainder <= {cfg.tolerance}·max_t|H|·|Δx|²/2 (L_H = {L_H:.4g})"
    if verdict is Verdict.NOT_APPLICABLE:
        evidence["not_applicable"] = notes[0]
    return CheckResult("E1", "AS.1 L-smooth gradient", L_hat, expected, 1.0, verdict, evidence, notes)
