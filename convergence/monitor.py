r"""Training monitor: what the stochastic quasi-Newton theory needs to see, recorded from a live run.

:class:`TrainingMonitor` attaches to any :class:`~optimizers.driver.CurvatureOptimizer` through its
two public hooks only (``register_precondition_hook`` and ``register_step_hook``); it reads state
and never writes it, so a monitored run is bit-identical to an unmonitored one (tested). Every
``interval`` steps it appends a :class:`StepRecord`:

* the step: :math:`k`, :math:`\alpha_k` (lr times the KL-clip scale), the losses at the two passes,
  skip status, :math:`\|g_k\|` of the raw batch gradient, per-layer norms of the applied step
  :math:`-\alpha_k d_k`, and the descent quantities
  :math:`g^\top P g = \sum_l\langle m_l, d_l\rangle` (``descent_input``, m the preconditioner input)
  and :math:`\sum_l\langle \nabla_l, d_l\rangle` (``descent_raw``, raw batch gradient);
* per block, the spectrum bounds of the operator *actually applied* at step k, computed inside the
  precondition hook (for a Kronecker block :math:`P = H_a\otimes H_g` the extreme products of the
  factors' extreme eigenvalues), and per factor :math:`\lambda_{\min}`, :math:`\lambda_{\max}` (``eigvalsh``
  of the symmetric part in float64), the relative asymmetry :math:`\|H-H^\top\|_F/\|H\|_F`, and
  after a secant update the bounds of :math:`H^+`;
* per secant factor, the pair consumed after the step with its double damping (which step fired,
  :math:`\theta_1,\theta_2`, :math:`\tilde s^\top\tilde y/\|\tilde s\|^2`,
  :math:`\tilde y^\top H\tilde y/\tilde s^\top\tilde y` with :math:`H` the factor *before* the
  update, raw and damped norms), the damping counters and the :math:`\mu_1,\mu_2` in force; per
  Hessian-action factor its pair :math:`(s_a, y_a = Ms_a)`, :math:`\lambda_A` and
  :math:`\lambda_{\max}(A)`; per covariance factor the damping used at its last inverse refresh;
  per L-BFGS factor the measured :math:`\|y_j\|^2/s_j^\top y_j` and :math:`\|s_j\|^2/s_j^\top y_j`
  of the pairs in memory (what the bounds of :mod:`convergence.bounds` need).

The cost per recorded step is one float64 ``eigvalsh`` per factor (two for factors that were
updated), so the monitor can stay on; ``record_operators=True`` also stores the dense operator of
every block (small nets only).

The module also says what breaks the theory's setting (:func:`theory_mode_violations`), gives the
settings that do not (:func:`theory_mode_kwargs`) and builds an i.i.d. with-replacement loader
(:func:`iid_loader`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Iterable, Mapping

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from curvature.blocks import CurvatureBlock, DiagonalBlock, KroneckerBlock, vec_c
from curvature.factors import BFGSFactor, EMACovarianceFactor, Factor, HessianActionFactor, LBFGSFactor, SecantFactor
from curvature.linalg import symmetric_eigenvalue_bounds

__all__ = [
    "PairRecord",
    "MemoryRecord",
    "FactorRecord",
    "LayerStepRecord",
    "StepRecord",
    "OperatorSnapshot",
    "TrainingMonitor",
    "kappa_observed",
    "theory_mode_violations",
    "theory_mode_kwargs",
    "iid_loader",
    "DD_SKIP_REASONS",
]

#: Skip reasons produced by :class:`~curvature.pair_damping.DoubleDamping` itself (the damping did not
#: complete, so its invariants do not apply); other skip reasons come after a completed damping.
DD_SKIP_REASONS = frozenset({"non-finite pair", "zero pair", "damped s is (numerically) zero", "non-finite damped pair"})


# ============================================================================================ records
@dataclass
class PairRecord:
    r"""One secant pair consumed by a factor after step k, in float64 scalars.

    ``raw_*`` describe the pair after the pair EMA and before damping (:math:`s, y`), the others the
    pair actually offered to the update (:math:`\tilde s, \tilde y`). ``yHy`` and ``raw_yHy`` use
    the factor :math:`H` as it was *before* the update (the matrix the damping used).
    ``damped``: double damping ran to completion on this pair (its invariants apply);
    ``incorporated``: the update was applied (not skipped). With ``keep_pairs`` the vectors are in
    ``vectors`` (float64, CPU): ``s``, ``y`` (damped) and ``raw_s``, ``raw_y``.
    """

    raw_s_norm: float
    raw_y_norm: float
    raw_sy: float
    raw_yHy: float
    s_norm: float
    y_norm: float
    sy: float
    ss: float
    yy: float
    yHy: float
    s1y: float
    Hy_norm: float
    theta1: float = 1.0
    theta2: float = 1.0
    step1_active: bool = False
    step2_active: bool = False
    damped: bool = False
    incorporated: bool = False
    skip_reason: str | None = None
    vectors: dict[str, torch.Tensor] | None = None

    @property
    def sy_over_ss(self) -> float:
        r""":math:`\tilde s^\top\tilde y/\|\tilde s\|^2` (≥ μ2 under double damping)."""
        return _ratio(self.sy, self.ss)

    @property
    def yHy_over_sy(self) -> float:
        r""":math:`\tilde y^\top H\tilde y/\tilde s^\top\tilde y` (≤ 1/μ1 + μ2λmax(H) under double damping)."""
        return _ratio(self.yHy, self.sy)

    @property
    def c_s(self) -> float:
        r""":math:`\|\tilde s\|^2/\tilde s^\top\tilde y`."""
        return _ratio(self.ss, self.sy)

    @property
    def c_y(self) -> float:
        r""":math:`\|\tilde y\|^2/\tilde s^\top\tilde y`."""
        return _ratio(self.yy, self.sy)


@dataclass
class MemoryRecord:
    r"""The L-BFGS memory of a factor when it was applied: :math:`H^{(0)} = h_0 I` and the pairs' ratios."""

    size: int
    capacity: int
    h0: float
    y_ratios: list[float]  # ‖y_j‖²/s_jᵀy_j, oldest first
    s_ratios: list[float]  # ‖s_j‖²/s_jᵀy_j
    min_sy: float  # min_j s_jᵀy_j (must be > 0)


@dataclass
class FactorRecord:
    """One Kronecker factor at step k.

    Attributes:
        side, kind, dim, dtype, eps: "a"/"g"; "ema_covariance" (KFAC), "hessian_action" (K-BFGS
            H_a), "bfgs", "lbfgs" or "other"; size; the factor's dtype and its machine epsilon.
        lmin, lmax, asymmetry, finite: spectrum bounds (float64 ``eigvalsh`` of the symmetric part)
            of the H that was applied at step k, ``‖H − Hᵀ‖_F/‖H‖_F``, and whether H was finite.
        updates: incorporated updates before step k; ``updated``: H changed after the step, with
            ``lmin_after``/``lmax_after``/``asymmetry_after`` of the new H.
        mu1, mu2, variant, powell_sign: the double damping in force (secant factors).
        lambda_a: λ_A (Hessian-action factors); ``stat_lmax_at_update``: λmax(A) when the
            Hessian-action update ran (so λmax(M) = that + λ_A).
        h0: H⁽⁰⁾ = h0·I of an L-BFGS factor (γ), or of a dense BFGS factor still at its initial value.
        inverse_damping, inverse_stat_lmax, inverse_step, refreshed: for damped inverses, the damping
            and λmax of the statistic used at the last refresh seen by the monitor, its step, and
            whether it happened at this step; for a Hessian-action factor the same for its single
            initial inversion, with ``initial`` = H is still exactly (A + λ_A I)⁻¹.
        initial: H is the factor's initial matrix (no update yet).
        memory, memory_full_before: the L-BFGS memory at step k (see :class:`MemoryRecord`) and
            whether it was full (then the next pair evicts the oldest).
        pair: the pair consumed after step k (:class:`PairRecord`), or None.
        counters: the factor's damping counters after the step.
        dense: the factor's dense H at step k (float64), with ``record_operators`` only.
    """

    side: str
    kind: str  # "ema_covariance" | "hessian_action" | "bfgs" | "lbfgs" | "other"
    dim: int
    dtype: str
    eps: float
    lmin: float
    lmax: float
    asymmetry: float
    finite: bool
    updates: int = 0
    lmin_after: float | None = None
    lmax_after: float | None = None
    asymmetry_after: float | None = None
    updated: bool = False
    # constants in force
    mu1: float | None = None
    mu2: float | None = None
    variant: str | None = None
    powell_sign: int | None = None
    lambda_a: float | None = None
    h0: float | None = None
    # statistics / refreshes
    stat_lmax_at_update: float | None = None
    inverse_damping: float | None = None
    inverse_stat_lmax: float | None = None
    inverse_step: int | None = None
    refreshed: bool = False
    initial: bool = False
    memory: MemoryRecord | None = None
    memory_full_before: bool | None = None
    pair: PairRecord | None = None
    counters: dict[str, Any] | None = None
    dense: torch.Tensor | None = None


@dataclass
class LayerStepRecord:
    """One layer (block) at step k."""

    name: str
    block_kind: str
    lmin: float
    lmax: float
    dim: int = 0
    eps: float = float(torch.finfo(torch.float64).eps)
    a: FactorRecord | None = None
    g: FactorRecord | None = None
    diagonal: dict[str, Any] | None = None
    grad_norm: float = math.nan
    input_norm: float = math.nan
    direction_norm: float = math.nan
    step_norm: float = math.nan
    descent_input: float = math.nan
    descent_raw: float = math.nan
    batch_size: int | None = None
    phi2: float | None = None
    operator: torch.Tensor | None = None
    applied: dict[str, Any] | None = None  # probes of block.precondition (convergence.applied), when due

    def factors(self) -> list[FactorRecord]:
        return [f for f in (self.a, self.g) if f is not None]


@dataclass
class StepRecord:
    """Everything recorded at one step; ``lambda_min``/``lambda_max`` span all blocks (and the identity
    of an SGD fallback, if any layer uses one)."""

    step: int
    lr: float
    step_scale: float
    loss: float | None
    loss_after: float | None
    skipped: bool
    skip_reason: str | None
    reduction_ratio: float | None
    grad_norm: float
    descent_input: float
    descent_raw: float
    step_norm: float
    batch_size: int | None
    damping: float
    momentum: float
    weight_decay: float
    lag_factors: bool
    lambda_min: float
    lambda_max: float
    fallback: str | None
    layers: dict[str, LayerStepRecord] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)

    @property
    def alpha(self) -> float:
        r""":math:`\alpha_k`: the learning rate times the KL-clip scale (the step is :math:`-\alpha_k d_k`)."""
        return self.lr * self.step_scale


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return math.inf if a > 0 else (-math.inf if a < 0 else math.nan)
    return a / b


def _f(x: torch.Tensor) -> float:
    return float(x.detach())


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else float(torch.finfo(torch.float64).eps)


def _bounds_and_asymmetry(dense: torch.Tensor) -> tuple[float, float, float, bool]:
    """(λmin, λmax) of the symmetric part in float64, ‖M − Mᵀ‖_F/‖M‖_F, finiteness."""
    m = dense.detach().to(torch.float64)
    if not bool(torch.isfinite(m).all()):
        return math.nan, math.nan, math.nan, False
    norm = float(torch.linalg.matrix_norm(m))
    asym = float(torch.linalg.matrix_norm(m - m.T)) / norm if norm > 0 else 0.0
    lo, hi = symmetric_eigenvalue_bounds(m)
    return lo, hi, asym, True


def _factor_kind(factor: Factor) -> str:
    if isinstance(factor, EMACovarianceFactor):
        return "ema_covariance"
    if isinstance(factor, HessianActionFactor):
        return "hessian_action"
    if isinstance(factor, LBFGSFactor):
        return "lbfgs"
    if isinstance(factor, BFGSFactor):
        return "bfgs"
    return "other"


def _factor_dtype(factor: Factor) -> torch.dtype:
    for name in ("F", "H", "s_avg"):
        value = getattr(factor, name, None)
        if isinstance(value, torch.Tensor):
            return value.dtype
    if isinstance(factor, HessianActionFactor):
        return factor.covariance.F.dtype
    return torch.float64


def _lmax_sym(matrix: torch.Tensor) -> float:
    return symmetric_eigenvalue_bounds(matrix)[1]


# ====================================================================================== operator copy
@dataclass
class OperatorSnapshot:
    r"""A float64 copy of the operator a block applied, usable after the block has changed.

    Kronecker blocks keep :math:`H_a, H_g` (``P(M) = H_g M H_a^\top``, exactly as
    :meth:`KroneckerBlock.precondition` composes the factors), diagonal blocks their scale, and any
    other block its dense matrix on :math:`\operatorname{vec}_c(M)`.
    """

    shape: tuple[int, int]
    a: torch.Tensor | None = None
    g: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @classmethod
    def from_block(cls, block: CurvatureBlock) -> "OperatorSnapshot":
        shape = tuple(block.shape)
        if isinstance(block, KroneckerBlock):
            return cls(shape, a=block.a_factor.to_dense().detach().to(torch.float64, copy=True),
                       g=block.g_factor.to_dense().detach().to(torch.float64, copy=True))
        if isinstance(block, DiagonalBlock) and block.scale is not None:
            return cls(shape, scale=block.scale.detach().to(torch.float64, copy=True))
        return cls(shape, dense=block.to_dense().detach().to(torch.float64, copy=True))

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """``P(M)`` in float64 for a gradient-shaped matrix ``M`` (``d_g × d_a``)."""
        m = matrix.detach().to(torch.float64)
        if self.a is not None:
            return self.g.to(m.device) @ m @ self.a.to(m.device).T
        if self.scale is not None:
            return m * self.scale.to(m.device)
        out = self.dense.to(m.device) @ vec_c(m)
        return out.reshape(self.shape[1], self.shape[0]).T

    def to_dense(self) -> torch.Tensor:
        r"""The dense operator on :math:`\operatorname{vec}_c(M)`."""
        if self.a is not None:
            return torch.kron(self.a, self.g)
        if self.scale is not None:
            return torch.diag(vec_c(self.scale))
        return self.dense

    def bounds(self) -> tuple[float, float]:
        """(λmin, λmax) of the symmetric part (Kronecker: extreme products of the factors' bounds)."""
        if self.a is not None:
            a_lo, a_hi = symmetric_eigenvalue_bounds(self.a)
            g_lo, g_hi = symmetric_eigenvalue_bounds(self.g)
            products = [a_lo * g_lo, a_lo * g_hi, a_hi * g_lo, a_hi * g_hi]
            return min(products), max(products)
        if self.scale is not None:
            return float(self.scale.min()), float(self.scale.max())
        return symmetric_eigenvalue_bounds(self.dense)


# ============================================================================================ monitor
@dataclass
class _PendingFactor:
    record: FactorRecord
    factor: Factor
    h_before: torch.Tensor | None
    events_before: int
    updates_before: int


@dataclass
class _PendingLayer:
    record: LayerStepRecord
    factors: list[_PendingFactor]


class TrainingMonitor:
    """Record the quantities of the SQN theory at every ``interval``-th step of a curvature optimizer.

    Args:
        optimizer: any :class:`~optimizers.driver.CurvatureOptimizer` (KFAC, K-BFGS, K-BFGS(L), custom
            recipes). Only its public hooks are used.
        interval: record steps ``k`` with ``k % interval == 0``.
        record_operators: also store every block's dense operator (float64, ``vec_c`` convention) and
            every factor's dense matrix; for small nets only.
        keep_pairs: store the secant-pair vectors (float64, CPU) in each :class:`PairRecord`; the
            scalar statistics are always kept.
        probes: every ``probe_interval`` recorded steps, probe the operator each block *applies*
            (``block.precondition``) with this many Rademacher matrices against its ``to_dense()``, and
            measure the applied map's spectrum (exact on small layers, Lanczos otherwise); stored in
            ``LayerStepRecord.applied`` (:func:`convergence.applied.probe_applied_operator`). 0 disables.

    Use as a context manager, or call :meth:`detach` to remove the hooks. ``records`` is the list of
    :class:`StepRecord`; :meth:`spectrum_series`, :meth:`pair_series`, :meth:`kappa_observed` and
    :meth:`to_json` summarise it.
    """

    def __init__(self, optimizer, *, interval: int = 1, record_operators: bool = False, keep_pairs: bool = True,
                 probes: int = 0, probe_interval: int = 1, probe_seed: int = 0) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        if not hasattr(optimizer, "register_precondition_hook") or not hasattr(optimizer, "register_step_hook"):
            raise TypeError("TrainingMonitor needs a CurvatureOptimizer (register_precondition_hook/register_step_hook)")
        self.optimizer = optimizer
        self.interval = interval
        self.record_operators = bool(record_operators)
        self.keep_pairs = bool(keep_pairs)
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 0:
            raise ValueError(f"probes must be an integer >= 0, got {probes!r}")
        if isinstance(probe_interval, bool) or not isinstance(probe_interval, int) or probe_interval < 1:
            raise ValueError(f"probe_interval must be an integer >= 1, got {probe_interval!r}")
        self.probes, self.probe_interval = probes, probe_interval
        self._probe_generator = torch.Generator().manual_seed(int(probe_seed))
        self.records: list[StepRecord] = []
        self._pending: dict[str, _PendingLayer] = {}
        self._pending_step: int | None = None
        # identity of the last inverse / H / scale seen per (layer, side): detects refreshes
        self._seen: dict[tuple[str, str], Any] = {}
        self._refresh: dict[tuple[str, str], tuple[float, float, int]] = {}
        self._fresh_init: set[tuple[str, str]] = set()
        for name, block in optimizer.blocks.items():
            for side, obj in self._tracked(block):
                self._seen[(name, side)] = obj
        self._handles = [
            optimizer.register_precondition_hook(self._on_precondition),
            optimizer.register_step_hook(self._on_step),
        ]

    # ------------------------------------------------------------------ lifecycle
    def detach(self) -> None:
        """Remove both hooks (the records stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "TrainingMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    # ------------------------------------------------------------------ refresh tracking
    @staticmethod
    def _tracked(block: CurvatureBlock) -> list[tuple[str, Any]]:
        if isinstance(block, KroneckerBlock):
            out = []
            for side, factor in (("a", block.a_factor), ("g", block.g_factor)):
                if isinstance(factor, EMACovarianceFactor):
                    out.append((side, factor.inverse))
                elif isinstance(factor, HessianActionFactor):
                    out.append((side, factor.H))
            return out
        if isinstance(block, DiagonalBlock):
            return [("diag", block.scale)]
        return []

    def _track_refreshes(self, step: int, name: str, block: CurvatureBlock) -> None:
        """Note inverse refreshes (new inverse objects) and the damping and statistic they used.

        At the precondition hook of a refresh step the statistics are exactly those inverted
        (refreshes happen after the statistics update, or before it with lagged factors).
        """
        for side, obj in self._tracked(block):
            key = (name, side)
            if obj is None or obj is self._seen.get(key):
                continue
            self._seen[key] = obj
            if side == "diag":
                v = block.v.detach().to(torch.float64)
                self._refresh[key] = (float(self.optimizer.damping.damping), float(v.max()), step)
                continue
            factor = block.a_factor if side == "a" else block.g_factor
            if isinstance(factor, EMACovarianceFactor):
                # the damping this inverse was computed with (the factor records it, boost after a failed
                # inversion included); the policy's value only for a factor that does not record it
                used = getattr(factor, "inverse_damping", None)
                if used is None:
                    lam_a, lam_g = self.optimizer.damping.factor_damping(block.a_factor.statistic,
                                                                         block.g_factor.statistic)
                    used = lam_a if side == "a" else lam_g
                self._refresh[key] = (float(used), _lmax_sym(factor.F), step)
            elif isinstance(factor, HessianActionFactor) and factor.updates == 0:
                self._refresh[key] = (factor.damping, _lmax_sym(factor.covariance.F), step)
                self._fresh_init.add(key)
            else:  # H replaced by a Hessian-action update
                self._fresh_init.discard(key)

    # ------------------------------------------------------------------ hooks
    def _on_precondition(self, step: int, name: str, block: CurvatureBlock, inputs: torch.Tensor, direction: torch.Tensor) -> None:
        self._track_refreshes(step, name, block)
        if not self.due(step):
            return
        if self._pending_step != step:
            self._pending, self._pending_step = {}, step
        self._pending[name] = self._capture_layer(step, name, block)

    def _capture_layer(self, step: int, name: str, block: CurvatureBlock) -> _PendingLayer:
        pending: list[_PendingFactor] = []
        diagonal = None
        if isinstance(block, KroneckerBlock):
            recs = {}
            for side, factor in (("a", block.a_factor), ("g", block.g_factor)):
                pf = self._capture_factor(step, name, side, factor)
                pending.append(pf)
                recs[side] = pf.record
            a, g = recs["a"], recs["g"]
            products = [a.lmin * g.lmin, a.lmin * g.lmax, a.lmax * g.lmin, a.lmax * g.lmax]
            lmin, lmax = (min(products), max(products)) if a.finite and g.finite else (math.nan, math.nan)
            layer = LayerStepRecord(name, block.kind, lmin, lmax, dim=a.dim * g.dim, eps=max(a.eps, g.eps), a=a, g=g)
        else:
            dim = block.shape[0] * block.shape[1]
            eps = _eps(torch.float64)
            if isinstance(block, DiagonalBlock) and block.scale is not None:
                eps = _eps(block.scale.dtype)
                finite = bool(torch.isfinite(block.scale).all())
                lmin, lmax = block.spectrum_bounds() if finite else (math.nan, math.nan)
                ref = self._refresh.get((name, "diag"))
                diagonal = {"power": block.power, "damping": None if ref is None else ref[0],
                            "v_max": None if ref is None else ref[1], "refresh_step": None if ref is None else ref[2],
                            "dim": dim, "eps": eps, "finite": finite}
            else:
                dense = block.to_dense()
                eps = _eps(dense.dtype)
                lmin, lmax, _, _ = _bounds_and_asymmetry(dense)
            layer = LayerStepRecord(name, block.kind, lmin, lmax, dim=dim, eps=eps, diagonal=diagonal)
        if self.record_operators:
            layer.operator = block.to_dense().detach().to(torch.float64, copy=True)
        if self.probes and step % self.probe_interval == 0:
            from convergence.applied import probe_applied_operator

            layer.applied = probe_applied_operator(block, probes=self.probes, generator=self._probe_generator)
        return _PendingLayer(layer, pending)

    def _capture_factor(self, step: int, name: str, side: str, factor: Factor) -> _PendingFactor:
        dtype = _factor_dtype(factor)
        dense = factor.to_dense().detach()
        lmin, lmax, asym, finite = _bounds_and_asymmetry(dense)
        rec = FactorRecord(side=side, kind=_factor_kind(factor), dim=factor.dim, dtype=str(dtype).replace("torch.", ""),
                           eps=_eps(dtype), lmin=lmin, lmax=lmax, asymmetry=asym, finite=finite)
        if self.record_operators:
            rec.dense = dense.to(torch.float64, copy=True)
        key = (name, side)
        h_before, events, updates = None, 0, 0
        if isinstance(factor, EMACovarianceFactor):
            rec.updates = factor.updates
            ref = self._refresh.get(key)
            if ref is not None:
                rec.inverse_damping, rec.inverse_stat_lmax, rec.inverse_step = ref
                rec.refreshed = ref[2] == step
        elif isinstance(factor, HessianActionFactor):
            h_before = dense.to(torch.float64, copy=True)
            rec.updates = updates = factor.updates
            events = factor.updates + sum(factor.skips.values())
            rec.lambda_a = factor.damping
            ref = self._refresh.get(key)
            if key in self._fresh_init and ref is not None:
                rec.initial = True
                rec.inverse_damping, rec.inverse_stat_lmax, rec.inverse_step = ref
                rec.refreshed = ref[2] == step
        elif isinstance(factor, SecantFactor):
            h_before = dense.to(torch.float64, copy=True)
            rec.updates = updates = factor.updates
            events = factor.counters.pairs
            rec.counters = factor.counters.as_dict()
            if factor.damping is not None:
                rec.mu1, rec.mu2 = float(factor.damping.mu1), float(factor.damping.mu2)
                rec.variant, rec.powell_sign = factor.damping.variant, int(factor.damping.powell_sign)
            if isinstance(factor, LBFGSFactor):
                rec.memory = self._memory(factor)
                rec.h0 = factor.lbfgs.gamma
                rec.memory_full_before = factor.lbfgs.size >= factor.lbfgs.memory
            elif factor.updates == 0:
                rec.h0 = float(torch.diagonal(dense).to(torch.float64).mean())
            rec.initial = factor.updates == 0
        return _PendingFactor(rec, factor, h_before, events, updates)

    @staticmethod
    def _memory(factor: LBFGSFactor) -> MemoryRecord:
        lb = factor.lbfgs
        S, Y = lb.S.detach().to(torch.float64), lb.Y.detach().to(torch.float64)
        if lb.size == 0:
            return MemoryRecord(0, lb.memory, lb.gamma, [], [], math.inf)
        sy = (S * Y).sum(1)
        return MemoryRecord(lb.size, lb.memory, lb.gamma, ((Y * Y).sum(1) / sy).tolist(),
                            ((S * S).sum(1) / sy).tolist(), float(sy.min()))

    def _on_step(self, info) -> None:
        pending = self._pending if self._pending_step == info.step else {}
        self._pending, self._pending_step = {}, None
        if not self.due(info.step):
            return
        opt = self.optimizer
        layers: dict[str, LayerStepRecord] = {}
        for name, pl in pending.items():
            for pf in pl.factors:
                self._finish_factor(pf)
            layers[name] = pl.record
        grad_sq = 0.0
        dot_in = dot_raw = step_sq = 0.0
        scale = info.lr * info.step_scale
        batch = None
        for name, layer in layers.items():
            g, m, d = info.grads.get(name), info.inputs.get(name), info.directions.get(name)
            if g is None or m is None or d is None:
                continue
            g64, m64, d64 = g.detach().double(), m.detach().double(), d.detach().double()
            layer.grad_norm = float(g64.norm())
            layer.input_norm = float(m64.norm())
            layer.direction_norm = float(d64.norm())
            layer.step_norm = abs(scale) * layer.direction_norm
            layer.descent_input = float((m64 * d64).sum())
            layer.descent_raw = float((g64 * d64).sum())
            grad_sq += layer.grad_norm ** 2
            step_sq += layer.step_norm ** 2
            dot_in += layer.descent_input
            dot_raw += layer.descent_raw
            rec = info.records.get(name)
            if rec is not None:
                layer.batch_size = int(rec.batch_size)
                batch = batch if batch is not None else layer.batch_size
                if rec.a_rows is not None and rec.a_rows.numel():
                    layer.phi2 = float(rec.a_rows.detach().double().pow(2).sum(1).max())
        fallback = opt.fallback if getattr(opt, "fallback_modules", None) else None
        lmins = [l.lmin for l in layers.values()]
        lmaxs = [l.lmax for l in layers.values()]
        if fallback == "sgd":
            lmins.append(1.0)
            lmaxs.append(1.0)
        counters = dict(opt.counters)
        counters["skip_reasons"] = dict(counters.get("skip_reasons", {}))
        self.records.append(StepRecord(
            step=info.step, lr=float(info.lr), step_scale=float(info.step_scale), loss=info.loss,
            loss_after=info.loss_after, skipped=bool(info.skipped), skip_reason=info.skip_reason,
            reduction_ratio=info.reduction_ratio, grad_norm=math.sqrt(grad_sq) if layers else math.nan,
            descent_input=dot_in if layers else math.nan, descent_raw=dot_raw if layers else math.nan,
            step_norm=math.sqrt(step_sq) if layers else math.nan, batch_size=batch,
            damping=float(opt.damping.damping), momentum=float(opt.momentum), weight_decay=float(opt.weight_decay),
            lag_factors=bool(opt.lag_factors),
            lambda_min=min(lmins) if lmins else math.nan, lambda_max=max(lmaxs) if lmaxs else math.nan,
            fallback=fallback, layers=layers, counters=counters,
        ))

    def _finish_factor(self, pf: _PendingFactor) -> None:
        factor, rec = pf.factor, pf.record
        if isinstance(factor, SecantFactor):
            rec.counters = factor.counters.as_dict()
            if factor.counters.pairs > pf.events_before and factor.last_pair is not None:
                rec.pair = self._secant_pair(factor, pf.h_before)
        elif isinstance(factor, HessianActionFactor):
            if factor.updates + sum(factor.skips.values()) > pf.events_before and factor.last_pair is not None:
                rec.stat_lmax_at_update = _lmax_sym(factor.covariance.F)
                s, y = factor.last_pair
                rec.pair = self._pair(s, y, s, y, pf.h_before, damped=False,
                                      incorporated=factor.updates > pf.updates_before, skip_reason=None)
                if not rec.pair.incorporated:
                    rec.pair.skip_reason = "skipped"
        else:
            return
        if factor.updates > pf.updates_before:
            rec.updated = True
            rec.lmin_after, rec.lmax_after, rec.asymmetry_after, _ = _bounds_and_asymmetry(factor.to_dense())

    def _secant_pair(self, factor: SecantFactor, h_before: torch.Tensor | None) -> PairRecord:
        pair = factor.last_pair
        reason = pair.skip_reason
        dd_ran = factor.damping is not None and reason not in DD_SKIP_REASONS
        raw = factor.last_raw_pair if reason != "non-finite pair" and factor.last_raw_pair is not None else (pair.s, pair.y)
        rec = self._pair(raw[0], raw[1], pair.s, pair.y, h_before, damped=dd_ran,
                         incorporated=reason is None, skip_reason=reason)
        rec.theta1, rec.theta2 = float(pair.theta1), float(pair.theta2)
        rec.step1_active, rec.step2_active = bool(pair.step1_active), bool(pair.step2_active)
        return rec

    def _pair(self, raw_s, raw_y, s, y, h_before, *, damped: bool, incorporated: bool, skip_reason) -> PairRecord:
        rs, ry = raw_s.detach().to(torch.float64), raw_y.detach().to(torch.float64)
        s64, y64 = s.detach().to(torch.float64), y.detach().to(torch.float64)
        H = h_before.to(s64.device) if h_before is not None else None
        hy = H @ y64 if H is not None else torch.full_like(y64, math.nan)
        hry = H @ ry if H is not None else torch.full_like(ry, math.nan)
        rec = PairRecord(
            raw_s_norm=_f(rs.norm()), raw_y_norm=_f(ry.norm()), raw_sy=_f(rs @ ry), raw_yHy=_f(ry @ hry),
            s_norm=_f(s64.norm()), y_norm=_f(y64.norm()), sy=_f(s64 @ y64), ss=_f(s64 @ s64), yy=_f(y64 @ y64),
            yHy=_f(y64 @ hy), s1y=_f(s64 @ ry), Hy_norm=_f(hy.norm()), damped=damped, incorporated=incorporated,
            skip_reason=skip_reason,
        )
        if self.keep_pairs:
            rec.vectors = {"s": s64.cpu().clone(), "y": y64.cpu().clone(), "raw_s": rs.cpu().clone(), "raw_y": ry.cpu().clone()}
        return rec

    # ------------------------------------------------------------------ accessors
    def spectrum_series(self) -> dict[str, Any]:
        """Per recorded step: κ_lo, κ_hi of the applied operator, and per layer/factor λmin, λmax.

        Returns ``{"step": [...], "alpha": [...], "kappa_lo": [...], "kappa_hi": [...],
        "layers": {name: {"lmin": [...], "lmax": [...], "a_lmin": ..., "a_lmax": ..., "g_lmin": ...,
        "g_lmax": ...}}}`` (NaN where a layer was not recorded at that step).
        """
        out: dict[str, Any] = {"step": [], "alpha": [], "kappa_lo": [], "kappa_hi": [], "layers": {}}
        names = []
        for r in self.records:
            for n in r.layers:
                if n not in names:
                    names.append(n)
        for n in names:
            out["layers"][n] = {k: [] for k in ("lmin", "lmax", "a_lmin", "a_lmax", "g_lmin", "g_lmax")}
        for r in self.records:
            out["step"].append(r.step)
            out["alpha"].append(r.alpha)
            out["kappa_lo"].append(r.lambda_min)
            out["kappa_hi"].append(r.lambda_max)
            for n in names:
                layer = r.layers.get(n)
                series = out["layers"][n]
                series["lmin"].append(layer.lmin if layer else math.nan)
                series["lmax"].append(layer.lmax if layer else math.nan)
                for side in ("a", "g"):
                    f = getattr(layer, side) if layer else None
                    series[f"{side}_lmin"].append(f.lmin if f else math.nan)
                    series[f"{side}_lmax"].append(f.lmax if f else math.nan)
        return out

    def pair_series(self, layer: str, side: str = "g") -> list[tuple[int, PairRecord]]:
        """``[(step, PairRecord), ...]`` for one factor (``side`` "a" or "g")."""
        out = []
        for r in self.records:
            lr = r.layers.get(layer)
            f = getattr(lr, side, None) if lr is not None else None
            if f is not None and f.pair is not None:
                out.append((r.step, f.pair))
        return out

    def kappa_observed(self) -> tuple[float, float]:
        """(min_k λmin(H_k), max_k λmax(H_k)) over the recorded, finite steps (NaN if none)."""
        return kappa_observed(self.records)

    def to_json(self, include_tensors: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict (``{"config": ..., "records": [...]}``); tensors only if asked."""
        config = {"interval": self.interval, "record_operators": self.record_operators, "keep_pairs": self.keep_pairs,
                  "optimizer": type(self.optimizer).__name__,
                  "theory_mode_violations": theory_mode_violations(self.optimizer)}
        return {"config": config, "records": [_jsonable(r, include_tensors) for r in self.records]}


def kappa_observed(records: Iterable[StepRecord]) -> tuple[float, float]:
    """(min λmin, max λmax) of the applied operator over records with finite bounds."""
    lo = [r.lambda_min for r in records if math.isfinite(r.lambda_min)]
    hi = [r.lambda_max for r in records if math.isfinite(r.lambda_max)]
    return (min(lo) if lo else math.nan, max(hi) if hi else math.nan)


def _jsonable(value: Any, include_tensors: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist() if include_tensors else None
    if is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _jsonable(getattr(value, f.name), include_tensors) for f in fields(value)}
        return out
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, include_tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, include_tensors) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ====================================================================================== theory mode
def theory_mode_kwargs() -> dict[str, Any]:
    """The optimizer settings of the theory's setting: ``momentum=0, weight_decay=0, lag_factors=True``."""
    return {"momentum": 0.0, "weight_decay": 0.0, "lag_factors": True}


def iid_loader(dataset: Dataset, batch_size: int, generator: torch.Generator | None = None, *,
               num_samples: int | None = None, **loader_kwargs) -> DataLoader:
    """A ``DataLoader`` drawing i.i.d. uniform examples *with replacement* (AS.2's independence).

    ``RandomSampler(replacement=True, num_samples=num_samples or len(dataset))`` and
    ``drop_last=True``, so every batch has exactly ``batch_size`` examples.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = len(dataset) if num_samples is None else num_samples
    if isinstance(n, bool) or not isinstance(n, int) or n < batch_size:
        raise ValueError(f"num_samples must be an integer >= batch_size, got {n!r}")
    sampler = RandomSampler(dataset, replacement=True, num_samples=n, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **loader_kwargs)


def _sampler_violations(source: Any) -> list[str]:
    out: list[str] = []
    sampler, batch_size, drop_last = source, None, True
    if isinstance(source, DataLoader):
        if isinstance(source.dataset, IterableDataset):
            return ["the loader iterates an IterableDataset: i.i.d. sampling with replacement cannot be verified"]
        bs = source.batch_sampler
        if bs is not None and not isinstance(bs, BatchSampler):
            return [f"custom batch sampler {type(bs).__name__}: i.i.d. sampling with replacement cannot be verified"]
        sampler, batch_size, drop_last = source.sampler, source.batch_size, source.drop_last
    elif isinstance(source, BatchSampler):
        sampler, batch_size, drop_last = source.sampler, source.batch_size, source.drop_last
    if isinstance(sampler, RandomSampler):
        if not sampler.replacement:
            out.append("RandomSampler(replacement=False) (shuffled epochs, random reshuffling): the batch at step k is "
                       "drawn from the examples left in the epoch, so E[g_k | past] != grad f(x_k) (AS.2)")
        n = sampler.num_samples
    elif isinstance(sampler, SequentialSampler):
        out.append("SequentialSampler (shuffle=False): batches are deterministic, not i.i.d. draws (AS.2)")
        n = len(sampler)
    elif isinstance(sampler, SubsetRandomSampler):
        out.append("SubsetRandomSampler draws without replacement (random reshuffling of a subset) (AS.2)")
        n = len(sampler)
    elif isinstance(sampler, WeightedRandomSampler):
        w = torch.as_tensor(sampler.weights, dtype=torch.float64)
        if w.numel() and not bool(torch.all(w == w[0])):
            out.append("WeightedRandomSampler with non-uniform weights: g_k is unbiased for a reweighted f, not f (AS.2a)")
        if not sampler.replacement:
            out.append("WeightedRandomSampler(replacement=False) draws without replacement (AS.2)")
        n = sampler.num_samples
    else:
        return [f"sampler {type(sampler).__name__}: i.i.d. sampling with replacement cannot be verified"]
    if batch_size is not None and not drop_last and n % batch_size:
        out.append(f"drop_last=False with {n} samples per epoch and batch size {batch_size}: the last batch is "
                   "smaller (the batch size m_k is not constant)")
    return out


def theory_mode_violations(optimizer, sampler: Any = None, *, weight_decay_in_objective: bool = False) -> list[str]:
    """What in this run breaks the setting of the SQN theory (empty list: nothing found).

    Checks: momentum > 0 (the step is not −α H_k g_k), weight decay that is not part of f (pass
    ``weight_decay_in_objective=True`` when f includes ½τ‖θ‖²), ``lag_factors=False`` (statistics
    of batch k enter before d_k is formed, AS.4), KL clipping (a batch-dependent step scale), an
    Adam fallback (a preconditioner built from the current gradient), and, given a ``DataLoader``,
    ``BatchSampler`` or sampler, whether batches are i.i.d. uniform draws with replacement
    (``RandomSampler(replacement=False)``/``shuffle=True``, ``SequentialSampler``,
    ``SubsetRandomSampler`` and non-uniform ``WeightedRandomSampler`` are flagged, as is a last
    batch of a different size).
    """
    out: list[str] = []
    momentum = float(getattr(optimizer, "momentum", 0.0) or 0.0)
    if momentum > 0:
        out.append(f"momentum={momentum:g} > 0: the step uses an average of past gradients, not -alpha*H_k*g_k")
    wd = float(getattr(optimizer, "weight_decay", 0.0) or 0.0)
    if wd > 0 and not weight_decay_in_objective:
        out.append(f"weight_decay={wd:g} > 0 is not part of f: g_k is not an unbiased gradient of f")
    if not bool(getattr(optimizer, "lag_factors", True)):
        out.append("lag_factors=False: statistics of batch k are folded in before d_k is formed (AS.4)")
    if getattr(optimizer, "kl_clip", None) is not None:
        out.append("kl_clip is set: the step is rescaled by a factor that depends on the current batch")
    if getattr(optimizer, "fallback_modules", None) and getattr(optimizer, "fallback", "sgd") != "sgd":
        out.append(f"fallback={optimizer.fallback!r} for layers without a block: a diagonal preconditioner built from "
                   "the current gradient (AS.4)")
    if sampler is not None:
        out.extend(_sampler_violations(sampler))
    return out
