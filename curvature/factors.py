r"""Kronecker factor strategies: each is one side (input ``a`` or output ``g``) of a Kronecker block.

A factor holds an approximation :math:`H` of the inverse of one Kronecker factor and applies it
to the rows of a matrix (``apply(V) = H V``). Strategies:

* :class:`EMACovarianceFactor`: :math:`F \leftarrow \beta F + (1-\beta) S_k` from batch statistics
  :math:`S_k`, inverted as :math:`(F + \lambda I)^{-1}` every ``T_inv`` steps (KFAC's factor).
* :class:`BFGSFactor`: dense inverse-BFGS matrix on damped secant pairs (K-BFGS's :math:`H_g`).
* :class:`LBFGSFactor`: the same pairs in a limited memory, compact form (K-BFGS(L)'s :math:`H_g`).
* :class:`HessianActionFactor`: inverse-BFGS with pairs from the exact action of a matrix,
  :math:`y = M s` (K-BFGS's :math:`H_a` with :math:`M = A + \lambda_A I` and
  :math:`s = H_a \bar{\bar a}`); any action callable may replace :math:`M`.

The secant factors share :class:`SecantFactor`: an EMA of the raw pairs (decay 0.9 in the authors'
code, starting at zero with no bias correction), then double damping against the current
:math:`H`, then the strategy's own update. Every skipped pair is counted.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

from curvature.bfgs import (DEFAULT_CURVATURE_THRESHOLD, check_pair, finish_guarded_update, guarded_bfgs_inverse_update,
                            pair_reason, pair_values)
from curvature.inverter import BatchedInverter
from curvature.lbfgs import CompactLBFGS
from curvature.linalg import (accumulate_gram, add_to_diagonal, all_finite, finite_flag, read_scalars,
                              symmetric_eigenvalue_bounds, symmetrize)
from curvature.pair_damping import DampedPair, DampingCounters, DampingDraft, DoubleDamping
from curvature.protocols import declares
from curvature.update_batch import PendingCheck, PendingUpdate, UpdateBatch

_Request = TypeVar("_Request", PendingUpdate, PendingCheck)


class Factor:
    """Optional base class of a Kronecker factor strategy of dimension ``dim`` (see :class:`~curvature.protocols.FactorProtocol`).

    It declares no capability and supplies the optional members' defaults; a strategy sets the
    capability attributes (documented in :mod:`curvature.protocols`) for what it consumes.
    """

    uses_statistics: bool = False
    uses_gradient: bool = False
    uses_secant_pairs: bool = False
    uses_matrix_action: bool = False
    has_quadratic_form: bool = False
    has_eigenbasis: bool = False
    applies_cached_inverse: bool = False
    joins_update_batch: bool = False

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def observe(self, statistic: torch.Tensor) -> None:
        """Fold in the current batch statistic (a ``dim × dim`` matrix). Default: ignored."""

    def observe_gram(self, rows: torch.Tensor, with_ones: bool, scale: float) -> None:
        r""":meth:`observe` the statistic :math:`\text{scale}\cdot[X\ 1]^\top[X\ 1]` (or :math:`X^\top X`)
        given its rows; strategies that keep an EMA fold it in without forming the statistic."""
        d = rows.shape[1] + int(with_ones)
        statistic = rows.new_zeros(d, d)
        accumulate_gram(statistic, rows, with_ones, scale, 0.0)
        self.observe(statistic)

    def set_statistic(self, statistic: torch.Tensor) -> None:
        """Overwrite the running statistic (warm start). Default: ignored."""

    @property
    def statistic(self) -> torch.Tensor | None:
        """The running (undamped) statistic, if the strategy keeps one."""
        return None

    def request_inverse(self, inverter: BatchedInverter, damping: float) -> None:
        """Ask ``inverter`` to (re)compute the damped inverse, if this strategy uses one."""

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError

    def eigenvalue_bounds(self) -> tuple[float, float]:
        return symmetric_eigenvalue_bounds(self.to_dense())

    def diagnostics(self) -> dict[str, Any]:
        """Counters worth reporting (the block prefixes the keys with ``a_`` / ``g_``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def revert_state(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to undo a step (the optimizer's revert snapshot). It may hold
        references instead of copies to the tensors that a step *replaces* (assigns a new tensor to) and
        never mutates in place, since :meth:`load_state_dict` copies what it loads; every tensor that a
        step mutates in place must be a copy. Default: :meth:`state_dict` (copies of everything)."""
        return self.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


def _splits(cls: type) -> bool:
    """Whether ``cls``'s :meth:`SecantFactor._prepare_incorporate` is the split of *its*
    ``_incorporate`` (a subclass that overrides only ``_incorporate`` keeps the sequential path)."""
    def owner(name: str) -> type:
        return next(k for k in cls.__mro__ if name in k.__dict__)

    return owner("_prepare_incorporate") is owner("_incorporate")


def _tensor_state(obj: object, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: (v.clone() if isinstance(v := getattr(obj, n), torch.Tensor) else v) for n in names}


class EMACovarianceFactor(Factor):
    r"""EMA of batch covariance statistics with a damped inverse refreshed on request.

    The first statistic observed initializes :math:`F` (no bias toward zero); after that
    :math:`F \leftarrow \beta F + (1-\beta) S`.

    Recovery (see :class:`~curvature.inverter.BatchedInverter`): when :math:`F + \lambda I` cannot be
    inverted even in float64, the previous inverse is kept (or, before the first inverse, the
    inversion is retried at once with more damping), the factor's damping multiplier
    ``damping_boost`` is multiplied by :data:`BOOST` for the following refreshes and relaxes back by
    :data:`RELAX` per successful refresh, and the failure is counted in ``inversion_failures``. A
    non-finite :math:`F` is dropped (the next batch re-initializes it), counted in ``statistic_resets``.
    """

    #: damping multiplier after a failed inversion, and its relaxation per successful refresh
    BOOST, RELAX = 10.0, 0.5

    uses_statistics = True
    has_quadratic_form = True
    has_eigenbasis = True
    applies_cached_inverse = True

    def __init__(self, dim: int, decay: float = 0.9, *, dtype=torch.float32, device=None) -> None:
        super().__init__(dim)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.F = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.inverse: torch.Tensor | None = None
        self.inverse_damping: float | None = None  # the damping of the current inverse
        self.refreshes = 0  # how many times the inverse was recomputed
        self.initialized = False
        self.updates = 0
        self.damping_boost = 1.0
        self.inversion_failures = 0
        self.statistic_resets = 0

    @property
    def statistic(self) -> torch.Tensor:
        return self.F

    def observe(self, statistic: torch.Tensor) -> None:
        if self.initialized:
            self.F.mul_(self.decay).add_(statistic.to(self.F), alpha=1.0 - self.decay)
        else:
            self.F.copy_(statistic)
            self.initialized = True
        self.updates += 1

    def observe_gram(self, rows: torch.Tensor, with_ones: bool, scale: float) -> None:
        r""":meth:`observe` of the statistic :math:`S = \text{scale}\cdot[X\ 1]^\top[X\ 1]`, folded
        into the EMA by one in-place ``addmm`` (S is never formed)."""
        if self.initialized:
            accumulate_gram(self.F, rows.to(self.F), with_ones, (1.0 - self.decay) * scale, self.decay)
        else:
            accumulate_gram(self.F, rows.to(self.F), with_ones, scale, 0.0)
            self.initialized = True
        self.updates += 1

    def set_statistic(self, statistic: torch.Tensor) -> None:
        self.F.copy_(statistic)
        self.initialized = True

    def request_inverse(self, inverter: BatchedInverter, damping: float) -> None:
        used = [float(damping) * self.damping_boost]
        inverter.request(self.F, used[0], lambda inverse: self._set_inverse(inverse, used[0]),
                         lambda failed: self._inversion_failed(failed, used))

    def eigenbasis(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(eigenvalues, eigenvectors)`` of :math:`F = Q\,\mathrm{diag}(e)\,Q^\top`, ascending.

        Computed in float64 (on the symmetric part) and returned in ``F``'s dtype.
        """
        if not all_finite(self.F):
            raise RuntimeError("EMACovarianceFactor.eigenbasis: the statistic contains NaN or inf")
        evals, evecs = torch.linalg.eigh(symmetrize(self.F.double()))
        return evals.to(self.F.dtype), evecs.to(self.F.dtype)

    def _set_inverse(self, inverse: torch.Tensor, damping: float) -> None:
        self.inverse, self.inverse_damping = inverse, float(damping)
        self.refreshes += 1
        self.damping_boost = max(1.0, self.damping_boost * self.RELAX)

    def _inversion_failed(self, damping: float, used: list[float]) -> float | None:
        """Count the failure, raise the damping; keep the previous inverse, or retry with more damping."""
        self.inversion_failures += 1
        self.damping_boost *= self.BOOST
        if not all_finite(self.F):
            self.F.zero_()
            self.initialized = False
            self.statistic_resets += 1
        if self.inverse is not None:
            return None
        used[0] = damping * self.BOOST
        return used[0]

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        if self.inverse is None:
            raise RuntimeError("EMACovarianceFactor.apply called before its inverse was computed")
        return self.inverse @ V

    def to_dense(self) -> torch.Tensor:
        if self.inverse is None:
            raise RuntimeError("EMACovarianceFactor has no inverse yet")
        return self.inverse

    _STATE = ("F", "inverse", "initialized", "updates", "decay", "inverse_damping", "refreshes", "damping_boost",
              "inversion_failures", "statistic_resets")

    def state_dict(self) -> dict[str, Any]:
        return _tensor_state(self, self._STATE)

    def revert_state(self) -> dict[str, Any]:
        """:meth:`state_dict` with the inverse by reference: it is only ever replaced (``_set_inverse``,
        :meth:`load_state_dict`), while ``F`` is updated in place (copied)."""
        state = _tensor_state(self, self._STATE[:1] + self._STATE[2:])
        state["inverse"] = self.inverse
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.F = state["F"].to(self.F, copy=True)
        inv = state["inverse"]
        self.inverse = None if inv is None else inv.to(self.F, copy=True)
        self.initialized, self.updates, self.decay = bool(state["initialized"]), int(state["updates"]), float(state["decay"])
        self.inverse_damping, self.refreshes = state.get("inverse_damping"), int(state.get("refreshes", 0))
        self.damping_boost = float(state.get("damping_boost", 1.0))
        self.inversion_failures = int(state.get("inversion_failures", 0))
        self.statistic_resets = int(state.get("statistic_resets", 0))


class OneHotCountFactor(Factor):
    r"""The A factor of a layer whose input is one-hot (an embedding): :math:`A` is diagonal.

    With one-hot rows :math:`e_{t}` (given as the integer indices ``t``, one column), the statistic
    :math:`\text{scale}\sum e_te_t^\top` is the diagonal of scaled token counts; it is kept as a vector
    :math:`c` (EMA like :class:`EMACovarianceFactor`, first observation initializes it) and inverted
    elementwise, :math:`H = \operatorname{diag}(1/(c + \lambda))`. No ``dim × dim`` matrix is ever
    formed except by :meth:`to_dense` (tests). ``statistic`` is None, so π-damping uses the √λ split.
    """

    uses_statistics = True
    applies_cached_inverse = True

    def __init__(self, dim: int, decay: float = 0.9, *, dtype=torch.float32, device=None) -> None:
        super().__init__(dim)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.counts = torch.zeros(dim, dtype=dtype, device=device)
        self.inverse: torch.Tensor | None = None
        self.initialized = False
        self.updates = 0

    def _counts(self, rows: torch.Tensor, with_ones: bool, scale: float) -> torch.Tensor:
        if with_ones:
            raise ValueError("a one-hot input has no homogeneous coordinate (embeddings have no bias)")
        index = rows.reshape(-1).long()
        return torch.bincount(index, minlength=self.dim).to(self.counts) * scale

    def observe_gram(self, rows: torch.Tensor, with_ones: bool, scale: float) -> None:
        r"""Fold in :math:`\text{scale}\cdot` the token counts of the index column ``rows``."""
        self.observe_diagonal(self._counts(rows, with_ones, scale))

    def observe_diagonal(self, diagonal: torch.Tensor) -> None:
        if self.initialized:
            self.counts.mul_(self.decay).add_(diagonal.to(self.counts), alpha=1.0 - self.decay)
        else:
            self.counts.copy_(diagonal)
            self.initialized = True
        self.updates += 1

    def set_statistic(self, statistic: torch.Tensor) -> None:
        """Warm start from the diagonal (a vector) or a diagonal matrix."""
        self.counts.copy_(statistic if statistic.dim() == 1 else torch.diagonal(statistic))
        self.initialized = True

    def request_inverse(self, inverter: BatchedInverter, damping: float) -> None:
        self.inverse = 1.0 / (self.counts + damping)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        if self.inverse is None:
            raise RuntimeError("OneHotCountFactor.apply called before its inverse was computed")
        return V * self.inverse.unsqueeze(1).to(V)

    def to_dense(self) -> torch.Tensor:
        if self.inverse is None:
            raise RuntimeError("OneHotCountFactor has no inverse yet")
        return torch.diag(self.inverse)

    def eigenvalue_bounds(self) -> tuple[float, float]:
        if self.inverse is None:
            raise RuntimeError("OneHotCountFactor has no inverse yet")
        return float(self.inverse.min()), float(self.inverse.max())

    def state_dict(self) -> dict[str, Any]:
        return _tensor_state(self, ("counts", "inverse", "initialized", "updates", "decay"))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = state["counts"].to(self.counts, copy=True)
        self.inverse = None if state["inverse"] is None else state["inverse"].to(self.counts, copy=True)
        self.initialized, self.updates, self.decay = bool(state["initialized"]), int(state["updates"]), float(state["decay"])


class SecantFactor(Factor):
    r"""Common part of the quasi-Newton factors: pair EMA, double damping, skip counting.

    Args:
        dim: factor size.
        damping: the double-damping policy (None: pairs are used undamped, skip rules only).
        pair_decay: EMA decay of the raw pairs (0 disables the EMA).
        curvature_threshold: the reference code's relative skip threshold on sᵀy.
    """

    uses_secant_pairs = True
    joins_update_batch = True
    #: whether :meth:`_prepare_incorporate` accepts ``updates`` (an :class:`~curvature.update_batch.UpdateBatch`)
    _incorporates_in_batch = False

    def __init__(self, dim: int, damping: DoubleDamping | None, pair_decay: float = 0.9,
                 curvature_threshold: float = DEFAULT_CURVATURE_THRESHOLD, *, dtype=torch.float32, device=None) -> None:
        super().__init__(dim)
        if not 0.0 <= pair_decay < 1.0:
            raise ValueError(f"pair_decay must be in [0, 1), got {pair_decay}")
        self.damping = damping
        self.pair_decay = pair_decay
        self.curvature_threshold = curvature_threshold
        self.s_avg = torch.zeros(dim, dtype=dtype, device=device)
        self.y_avg = torch.zeros(dim, dtype=dtype, device=device)
        self.counters = DampingCounters()
        self.updates = 0
        self.last_pair: DampedPair | None = None
        self.last_raw_pair: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe_pair(self, s: torch.Tensor, y: torch.Tensor, reference_norm: torch.Tensor | float | None = None) -> DampedPair:
        """EMA the raw pair, damp it against the current H, and update H (or count a skip).

        With :class:`~curvature.pair_damping.DoubleDamping` (or no damping) and a strategy that
        splits its update (:meth:`_prepare_incorporate`), every candidate (pair EMA, damped pair,
        updated H) is computed on the device first and all decisions are read with ONE host
        synchronization; the committed results are those of the sequential rules.
        """
        scalars, finish = self.prepare_pair(s, y, reference_norm)
        return finish(read_scalars(scalars))

    def prepare_pair(self, s: torch.Tensor, y: torch.Tensor, reference_norm: torch.Tensor | float | None = None,
                     updates: UpdateBatch | None = None) -> tuple[list[torch.Tensor], Callable[[list[float]], DampedPair]]:
        """:meth:`observe_pair` split at its one host read: ``(scalars, finish)``, nothing committed
        until ``finish(values)`` is called with the scalars' values (then it returns the pair).

        With ``updates`` (a :class:`~curvature.update_batch.UpdateBatch`), the double damping and the
        factor's candidate update join the batch instead of being computed here: the caller prepares the
        batch and hands it its values (:meth:`~curvature.update_batch.UpdateBatch.receive`) before calling
        ``finish``; their scalars are then the batch's, not among this method's.
        """
        s, y = s.to(self.s_avg), y.to(self.y_avg)
        if self.pair_decay > 0:  # candidates; committed only when the raw pair is finite
            s_ema = (self.s_avg * self.pair_decay).add_(s, alpha=1.0 - self.pair_decay)
            y_ema = (self.y_avg * self.pair_decay).add_(y, alpha=1.0 - self.pair_decay)
        else:
            s_ema, y_ema = s, y
        if updates is not None and type(self.damping) is DoubleDamping:
            return self._prepare_pair_in_batch(s, y, s_ema, y_ema, reference_norm, updates)
        draft = self.damping.prepare(s_ema, y_ema, self.apply) if isinstance(self.damping, DoubleDamping) else None
        splittable = draft is not None or self.damping is None
        candidate = (draft.s1, draft.y2) if draft is not None else (s_ema, y_ema)
        batched = {"updates": updates} if updates is not None and self._incorporates_in_batch else {}
        inc = self._prepare_incorporate(*candidate, reference_norm, **batched) if splittable and _splits(type(self)) else None
        scalars = [finite_flag(s, y)] + (draft.scalars if draft is not None else []) + (inc[0] if inc else [])

        def finish(values: list[float]) -> DampedPair:
            return self._finish_pair(s, y, s_ema, y_ema, draft, candidate, inc, values, reference_norm)

        return scalars, finish

    def _prepare_pair_in_batch(self, s, y, s_ema, y_ema, reference_norm, updates: UpdateBatch):
        """:meth:`prepare_pair` with the damping (and the update, when the factor's :meth:`_prepare_incorporate`
        joins batches) in ``updates``: the same decisions from the same scalars, read through the batch."""
        prepared: dict[str, Any] = {}

        def then(draft: DampingDraft) -> list[torch.Tensor]:
            batched = {"updates": updates} if self._incorporates_in_batch else {}
            inc = self._prepare_incorporate(draft.s1, draft.y2, reference_norm, **batched) if _splits(type(self)) else None
            prepared["inc"] = inc
            return inc[0] if inc else []

        pending = updates.add_damping(self.damping, s_ema, y_ema, self.apply(y_ema), then)

        def finish(values: list[float]) -> DampedPair:
            draft = pending.draft
            return self._finish_pair(s, y, s_ema, y_ema, draft, (draft.s1, draft.y2), prepared["inc"],
                                     [values[0]] + pending.values, reference_norm)

        return [finite_flag(s, y)], finish

    def _finish_pair(self, s, y, s_ema, y_ema, draft, candidate, inc, values, reference_norm) -> DampedPair:
        """The decisions of :meth:`prepare_pair` from the values read on the host, committed and counted."""
        if not values[0] and not all_finite(s, y):
            self.counters.pairs += 1
            self.counters.skip("non-finite pair")
            self.last_pair = DampedPair(s, y, skip_reason="non-finite pair")
            return self.last_pair
        if self.pair_decay > 0:
            self.s_avg.copy_(s_ema)
            self.y_avg.copy_(y_ema)
        self.last_raw_pair = (s_ema, y_ema)
        offset = 1
        if draft is not None:
            pair = self.damping.finish(draft, values[1:1 + len(draft.scalars)], self.counters)
            offset += len(draft.scalars)
        elif self.damping is not None:
            pair = self.damping(s_ema, y_ema, self.apply, self.counters)
        else:
            self.counters.pairs += 1
            pair = DampedPair(s_ema, y_ema)
        if not pair.skipped:
            if inc is not None and pair.s is candidate[0] and pair.y is candidate[1]:
                reason = inc[1](values[offset:])
            else:
                reason = self._incorporate(pair.s, pair.y, reference_norm)
            if reason is not None:
                self.counters.skip(reason)
                pair = DampedPair(pair.s, pair.y, pair.theta1, pair.theta2, pair.step1_active,
                                  pair.step2_active, skip_reason=reason)
            else:
                self.updates += 1
        self.last_pair = pair
        return pair

    def _prepare_incorporate(self, s: torch.Tensor, y: torch.Tensor, reference_norm: torch.Tensor | float | None
                             ) -> tuple[list[torch.Tensor], Callable[[list[float]], str | None]] | None:
        """Optionally split :meth:`_incorporate`: ``(scalars, finish)`` where ``scalars`` are 0-dim
        tensors computed without a synchronization and ``finish(values)`` (their values on the host)
        applies the update and returns the skip reason. Default None: :meth:`_incorporate` is called."""
        return None

    def _incorporate(self, s: torch.Tensor, y: torch.Tensor, reference_norm: torch.Tensor | float | None) -> str | None:
        raise NotImplementedError

    def reset_secant_memory(self) -> None:
        """Forget the pairs: H back to its initial matrix and the pair EMA to zero (recovery after a fault)."""
        self.s_avg.zero_()
        self.y_avg.zero_()
        self._reset_h()

    def _reset_h(self) -> None:
        raise NotImplementedError

    def diagnostics(self) -> dict[str, Any]:
        return {"damping": self.counters.as_dict(), "updates": self.updates}

    def _secant_state(self) -> dict[str, Any]:
        return {"s_avg": self.s_avg.clone(), "y_avg": self.y_avg.clone(), "updates": self.updates,
                "counters": self.counters.as_dict()}

    def _load_secant_state(self, state: dict[str, Any]) -> None:
        self.s_avg, self.y_avg = state["s_avg"].to(self.s_avg, copy=True), state["y_avg"].to(self.y_avg, copy=True)
        self.updates = int(state["updates"])
        c = state["counters"]
        self.counters = DampingCounters(c["pairs"], c["step1"], c["step2"], c["step2_guard"], c["skipped"],
                                        dict(c["skip_reasons"]))


class BFGSFactor(SecantFactor):
    """Dense inverse-BFGS factor, starting at ``init_scale · I`` (K-BFGS's H_g starts at I)."""

    _incorporates_in_batch = True

    def __init__(self, dim: int, damping: DoubleDamping | None, pair_decay: float = 0.9, init_scale: float = 1.0,
                 curvature_threshold: float = DEFAULT_CURVATURE_THRESHOLD, *, dtype=torch.float32, device=None) -> None:
        super().__init__(dim, damping, pair_decay, curvature_threshold, dtype=dtype, device=device)
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.init_scale = float(init_scale)
        self.H = init_scale * torch.eye(dim, dtype=dtype, device=device)

    def _incorporate(self, s, y, reference_norm):
        self.H, reason = guarded_bfgs_inverse_update(self.H, s, y, reference_norm, self.curvature_threshold)
        return reason

    def _prepare_incorporate(self, s, y, reference_norm, updates: UpdateBatch | None = None):
        scalars, pending, own = _join_batch(updates, lambda batch: batch.add_update(self.H, s, y, reference_norm))

        def finish(values: list[float]) -> str | None:
            if own is not None:
                own.receive(values)
            self.H, reason = finish_guarded_update(self.H, pending.updated, s, y, pending.values, reference_norm,
                                                   self.curvature_threshold)
            return reason

        return scalars, finish

    def _reset_h(self) -> None:
        self.H = self.init_scale * torch.eye(self.dim, dtype=self.H.dtype, device=self.H.device)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return self.H @ V

    def to_dense(self) -> torch.Tensor:
        return self.H

    def state_dict(self) -> dict[str, Any]:
        return {"H": self.H.clone(), **self._secant_state()}

    def revert_state(self) -> dict[str, Any]:
        """:meth:`state_dict` with ``H`` by reference: the BFGS update and :meth:`_reset_h` replace it
        (never in place); the pair EMA is copied (updated in place)."""
        return {"H": self.H, **self._secant_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.H = state["H"].to(self.H, copy=True)
        self._load_secant_state(state)


class LBFGSFactor(SecantFactor):
    """Limited-memory factor: ``memory`` damped pairs in compact form, ``H0 = gamma · I`` (γ = 1 as coded)."""

    _incorporates_in_batch = True

    def __init__(self, dim: int, damping: DoubleDamping | None, pair_decay: float = 0.9, memory: int = 100,
                 gamma: float = 1.0, curvature_threshold: float = DEFAULT_CURVATURE_THRESHOLD, *,
                 dtype=torch.float32, device=None) -> None:
        super().__init__(dim, damping, pair_decay, curvature_threshold, dtype=dtype, device=device)
        self.lbfgs = CompactLBFGS(dim, memory, gamma, dtype=dtype, device=device)

    def _incorporate(self, s, y, reference_norm):
        check = check_pair(s, y, reference_norm, self.curvature_threshold)
        if not check.ok:
            return check.reason
        self.lbfgs.append(s, y)
        return None

    def _prepare_incorporate(self, s, y, reference_norm, updates: UpdateBatch | None = None):
        scalars, check, own = _join_batch(updates, lambda batch: batch.add_check(s, y, reference_norm))

        def finish(values: list[float]) -> str | None:
            if own is not None:
                own.receive(values)
            reason = pair_reason(s, y, pair_values(check.values, reference_norm), self.curvature_threshold)
            if reason is None:
                self.lbfgs.append(s, y)
            return reason

        return scalars, finish

    def _reset_h(self) -> None:
        old = self.lbfgs
        self.lbfgs = CompactLBFGS(self.dim, old.memory, old.gamma, dtype=old.S.dtype, device=old.S.device)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return self.lbfgs.apply(V)

    def to_dense(self) -> torch.Tensor:
        return self.lbfgs.to_dense()

    def state_dict(self) -> dict[str, Any]:
        return {"lbfgs": self.lbfgs.state_dict(), **self._secant_state()}

    def revert_state(self) -> dict[str, Any]:
        """:meth:`state_dict` with the pair memory by reference (:meth:`CompactLBFGS.revert_state`)."""
        return {"lbfgs": self.lbfgs.revert_state(), **self._secant_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lbfgs.load_state_dict(state["lbfgs"])
        self._load_secant_state(state)


def _join_batch(updates: UpdateBatch | None, add: Callable[[UpdateBatch], _Request]
                ) -> tuple[list[torch.Tensor], _Request, UpdateBatch | None]:
    """Register a request with ``add(batch)`` in ``updates``, or in a batch of its own that is prepared at once.

    Returns ``(scalars, pending, own)``: with a batch of its own (``own``), ``scalars`` are the request's and
    its finish hands their values to ``own``; in the caller's batch, ``scalars`` is empty and ``own`` None."""
    own = UpdateBatch() if updates is None else None
    pending = add(own or updates)
    return (own.prepare() if own is not None else []), pending, own


class HessianActionFactor(Factor):
    r"""Inverse-BFGS on pairs from the exact action of a matrix: :math:`y = M s`.

    For K-BFGS's :math:`H_a`: the factor keeps :math:`A` (EMA of :math:`\bar a\bar a^\top`, first
    observation initializes it), :math:`M = A + \lambda_A I`; it is initialized once as
    :math:`H = M^{-1}` (on the first :meth:`request_inverse`), and after each step
    :meth:`hessian_action_update` uses :math:`s = H\bar{\bar a}`, :math:`y = Ms` and the undamped
    BFGS update (skip rules apply; :math:`s^\top y \ge \lambda_A\|s\|^2` so they never fire in
    exact arithmetic). ``action`` replaces :math:`v \mapsto Mv` with any symmetric positive
    definite action (e.g. an exact Hessian- or GGN-vector product of a small layer).

    Step 0 as in the authors' code (spec §2.1-2.3): after a warm start (:meth:`set_statistic`),
    statistics observed before the initial inversion are *not* folded in, so
    :math:`H = (A_\text{warm} + \lambda_A I)^{-1}`; the EMA of :math:`A` starts with the next
    batch. Without a warm start the first batch's statistic is :math:`A` (it is the only data seen
    before the first inversion), folded in once.
    """

    uses_statistics = True
    uses_matrix_action = True
    joins_update_batch = True

    def __init__(self, dim: int, damping: float, decay: float = 0.9,
                 action: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 curvature_threshold: float | None = DEFAULT_CURVATURE_THRESHOLD, *, dtype=torch.float32, device=None) -> None:
        super().__init__(dim)
        if not damping > 0:
            raise ValueError(f"damping (lambda_A) must be > 0, got {damping}")
        self.covariance = EMACovarianceFactor(dim, decay, dtype=dtype, device=device)
        self.damping = float(damping)
        self.action = action
        self.curvature_threshold = curvature_threshold
        self.H: torch.Tensor | None = None
        self.warm_started = False
        self.inversion_failures = 0
        self.updates = 0
        self.skips: dict[str, int] = {}
        self.last_pair: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def statistic(self) -> torch.Tensor:
        return self.covariance.F

    def _folds(self) -> bool:
        """False between a warm start and the initial inversion: A is not updated at k = 0."""
        return self.H is not None or not self.warm_started

    def observe(self, statistic: torch.Tensor) -> None:
        if self._folds():
            self.covariance.observe(statistic)

    def observe_gram(self, rows: torch.Tensor, with_ones: bool, scale: float) -> None:
        if self._folds():
            self.covariance.observe_gram(rows, with_ones, scale)

    def set_statistic(self, statistic: torch.Tensor) -> None:
        self.covariance.set_statistic(statistic)
        self.warm_started = True

    def damped_matrix(self) -> torch.Tensor:
        r""":math:`M = A + \lambda_A I`."""
        return add_to_diagonal(self.covariance.F, self.damping)

    def matrix_action(self, v: torch.Tensor) -> torch.Tensor:
        if self.action is not None:
            return self.action(v)
        return self.covariance.F @ v + self.damping * v

    def request_inverse(self, inverter: BatchedInverter, damping: float | None = None) -> None:
        r"""Initialize ``H = (A + λ_A I)^{-1}`` once; later calls do nothing (H_a is never re-inverted).

        If that inversion fails even in float64 it is retried with ten times the damping (a
        non-finite A is dropped first); the Hessian-action updates then pull H toward
        :math:`(A + \lambda_A I)^{-1}`. Counted in ``inversion_failures``.
        """
        if self.H is None:
            inverter.request(self.covariance.F, self.damping, self._set_inverse, self._inversion_failed)

    def _inversion_failed(self, damping: float) -> float:
        self.inversion_failures += 1
        if not all_finite(self.covariance.F):
            self.covariance.F.zero_()
            self.covariance.initialized = False
            self.covariance.statistic_resets += 1
        return damping * EMACovarianceFactor.BOOST

    def _set_inverse(self, inverse: torch.Tensor) -> None:
        self.H = inverse

    def hessian_action_update(self, mean_activation: torch.Tensor) -> str | None:
        r"""One Hessian-action BFGS update with :math:`s = H\bar{\bar a}`, :math:`y = Ms`; returns a skip reason or None."""
        scalars, finish = self.prepare_action_update(mean_activation)
        return finish(read_scalars(scalars))

    def prepare_action_update(self, mean_activation: torch.Tensor, updates: UpdateBatch | None = None
                              ) -> tuple[list[torch.Tensor], Callable[[list[float]], str | None]]:
        """:meth:`hessian_action_update` split at its one host read: ``(scalars, finish)``; ``finish(values)``
        with the scalars' values applies (or skips) the update and returns the skip reason. With ``updates``
        the candidate joins that batch, as in :meth:`SecantFactor.prepare_pair`."""
        if self.H is None:
            raise RuntimeError("HessianActionFactor.hessian_action_update called before H was initialized")
        v = mean_activation.to(self.H)
        s = self.H @ v
        y = self.matrix_action(s)
        self.last_pair = (s, y)
        ref = None if self.curvature_threshold is None else v.norm()
        scalars, pending, own = _join_batch(updates, lambda batch: batch.add_update(self.H, s, y, ref))

        def finish(values: list[float]) -> str | None:
            if own is not None:
                own.receive(values)
            self.H, reason = finish_guarded_update(self.H, pending.updated, s, y, pending.values, ref,
                                                   self.curvature_threshold or 0.0)
            if reason is None:
                self.updates += 1
            else:
                self.skips[reason] = self.skips.get(reason, 0) + 1
            return reason

        return scalars, finish

    def diagnostics(self) -> dict[str, Any]:
        return {"hessian_action_updates": self.updates, "hessian_action_skips": dict(self.skips)}

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        if self.H is None:
            raise RuntimeError("HessianActionFactor.apply called before H was initialized")
        return self.H @ V

    def to_dense(self) -> torch.Tensor:
        if self.H is None:
            raise RuntimeError("HessianActionFactor has no H yet")
        return self.H

    def state_dict(self) -> dict[str, Any]:
        return {"covariance": self.covariance.state_dict(), "H": None if self.H is None else self.H.clone(),
                **self._scalar_state()}

    def revert_state(self) -> dict[str, Any]:
        """:meth:`state_dict` with ``H`` by reference (the initial inversion and the Hessian-action update
        replace it, never in place) and the covariance's :meth:`EMACovarianceFactor.revert_state`."""
        return {"covariance": self.covariance.revert_state(), "H": self.H, **self._scalar_state()}

    def _scalar_state(self) -> dict[str, Any]:
        return {"damping": self.damping, "updates": self.updates, "skips": dict(self.skips),
                "warm_started": self.warm_started, "inversion_failures": self.inversion_failures}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.covariance.load_state_dict(state["covariance"])
        self.H = None if state["H"] is None else state["H"].to(self.covariance.F, copy=True)
        self.damping, self.updates, self.skips = float(state["damping"]), int(state["updates"]), dict(state["skips"])
        self.warm_started = bool(state.get("warm_started", False))
        self.inversion_failures = int(state.get("inversion_failures", 0))
