r"""Curvature blocks: one per layer, applying an approximate inverse curvature to the layer gradient.

A block sees the layer's gradient as one matrix :math:`M = [\nabla W \mid \nabla b]`
(``d_g × d_a``) and returns the preconditioned matrix :math:`P(M)`; the optimizer steps along
:math:`-\alpha P(M)`. Every block can also

* materialize :math:`P` as a dense matrix acting on :math:`\operatorname{vec}_c(M)` (column-major
  vec, so that :math:`(H_a \otimes H_g)\operatorname{vec}_c(M) = \operatorname{vec}_c(H_g M H_a)`),
* report the extreme eigenvalues of :math:`P` (for a Kronecker block the products of the factors'),
* round-trip its state through ``state_dict``/``load_state_dict``.

The statistics of one batch, from the captured rows (see :mod:`curvature.adapters` for the
convention): :math:`A_k = \frac cR\sum\bar a\bar a^\top` and :math:`G_k = \frac1R\sum gg^\top`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from curvature.adapters import LayerAdapter
from curvature.capture import LayerRecord
from curvature.damping import DampingPolicy
from curvature.protocols import FactorProtocol, declares
from curvature.inverter import BatchedInverter
from curvature.linalg import accumulate_gram, gram, read_scalars, symmetric_eigenvalue_bounds
from curvature.update_batch import UpdateBatch


APPROXIMATIONS = ("expand", "reduce")


def revert_state(obj: Any) -> dict[str, Any]:
    """``obj.revert_state()`` (a state for undoing a step, which may reference the tensors a step only
    replaces; see :meth:`curvature.factors.Factor.revert_state`) when ``obj`` has one, else ``obj.state_dict()``."""
    method = getattr(obj, "revert_state", None)
    return method() if method is not None else obj.state_dict()


def check_approx(approx: str) -> str:
    """``approx`` if it is "expand" or "reduce", else a ValueError."""
    if approx not in APPROXIMATIONS:
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    return approx


def a_rows_and_scale(record: LayerRecord, approx: str = "expand") -> tuple[torch.Tensor, float]:
    r"""The rows of the A statistic and its scale: :math:`A = \text{scale}\cdot\sum \bar a\bar a^\top`.

    expand: every row, scale :math:`1/N` (N samples; A sums over the rows of one sample, KFC);
    reduce: the per-group mean rows :math:`\hat a_n`, scale :math:`1/N_g` (N_g groups).
    """
    rows = _required(record.input_rows, "a")
    if check_approx(approx) == "expand":
        return rows, 1.0 / record.batch_size
    return record.group_mean(rows), 1.0 / record.groups


def g_rows_and_scale(record: LayerRecord, approx: str = "expand") -> tuple[torch.Tensor, float]:
    r"""The rows of the G statistic (autograd's raw rows, or their per-group sums) and its scale.

    expand: :math:`G = \frac{s^2}{R}\sum_{\text{rows}} r r^\top` with the per-sample scale
    :math:`s` (N for a mean loss); reduce: :math:`G = \frac{s_g^2}{N_g}\sum_n \hat r_n\hat r_n^\top`
    with :math:`\hat r_n = \sum_{\text{rows of group } n} r` and :math:`s_g` (N_g for a mean loss).
    """
    rows = _required(record.grad_rows, "g")
    if check_approx(approx) == "expand":
        return rows, record.grad_scale**2 / rows.shape[0]
    return record.group_sum(rows), record.reduce_scale**2 / record.groups


def a_statistic(record: LayerRecord, adapter: LayerAdapter | None = None, approx: str = "expand") -> torch.Tensor:
    r"""The batch's :math:`A` (see :func:`a_rows_and_scale`), with the homogeneous coordinate; for a
    one-hot input (indices) the vector of its diagonal (``adapter`` gives the vocabulary size)."""
    rows, scale = a_rows_and_scale(record, approx)
    if not rows.is_floating_point():  # one-hot input given as indices (embedding): the diagonal only
        dim = adapter.a_dim if adapter is not None else int(rows.max()) + 1
        return torch.bincount(rows.reshape(-1), minlength=dim).double() * scale
    d = rows.shape[1] + int(record.has_bias)
    out = rows.new_zeros(d, d)
    accumulate_gram(out, rows, record.has_bias, scale, 0.0)
    return out


def g_statistic(record: LayerRecord, approx: str = "expand") -> torch.Tensor:
    r"""The batch's :math:`G` (see :func:`g_rows_and_scale`)."""
    rows, scale = g_rows_and_scale(record, approx)
    return gram(rows) * scale


def _required(rows: torch.Tensor | None, what: str) -> torch.Tensor:
    if rows is None:
        raise RuntimeError(
            f"no captured '{what}' rows for this layer: run forward and backward (or pass a closure) "
            "before step(), with gradients enabled"
        )
    return rows


def vec_c(matrix: torch.Tensor) -> torch.Tensor:
    """Column-major vectorization (the math convention)."""
    return matrix.T.reshape(-1)


def batch_argument(obj: object, updates: UpdateBatch) -> dict[str, UpdateBatch]:
    """``{"updates": updates}`` for a factor or block that declares ``joins_update_batch``, else nothing."""
    return {"updates": updates} if declares(obj, "joins_update_batch") else {}


def prepared_with_batch(scalars: list[torch.Tensor], finish: Callable[[list[float]], None], updates: UpdateBatch
                        ) -> tuple[list[torch.Tensor], Callable[[list[float]], None]]:
    """Prepare ``updates`` (whose members' ``finish`` is part of ``finish``) and append its scalars: the
    returned ``finish(values)`` hands the batch its values, then calls ``finish`` with the others."""
    n = len(scalars)
    extra = updates.prepare()

    def finish_all(values: list[float]) -> None:
        updates.receive(values[n:])
        finish(values[:n])

    return scalars + extra, finish_all


def chain_finishers(parts: list[tuple[int, Callable[[list[float]], Any]]]) -> Callable[[list[float]], None]:
    """One ``finish(values)`` for several prepared updates: part ``i``, which asked for ``n_i`` scalars,
    gets its slice of ``values`` (in order), so all their decisions can be read at once."""
    def finish(values: list[float]) -> None:
        start = 0
        for n, fin in parts:
            fin(values[start:start + n])
            start += n

    return finish


class CurvatureBlock:
    """Optional base class of a block (see :class:`~curvature.protocols.BlockProtocol`): defaults for every member.

    Class attributes declare what the block consumes: ``needs_a``/``needs_g`` (rows from the normal
    pass), ``needs_second_pass`` (pre-activations and their gradients at the new point on the same
    batch, K-BFGS), ``has_quadratic_form`` (supports the adaptive LM model reduction). ``kind`` is the
    name :meth:`describe` shows (default: the class name).
    """

    needs_a = False
    needs_g = False
    needs_second_pass = False
    has_quadratic_form = False
    applies_cached_inverse = False
    joins_update_batch = False
    kind: str | None = None

    def __init__(self, name: str, adapter: LayerAdapter) -> None:
        self.name = name
        self.adapter = adapter

    @property
    def shape(self) -> tuple[int, int]:
        return (self.adapter.g_dim, self.adapter.a_dim)

    def update_statistics(self, record: LayerRecord, grad: torch.Tensor) -> None:
        """Fold in the current batch (its captured rows and raw gradient matrix)."""

    def warm_start(self, a_stat: torch.Tensor | None, g_stat: torch.Tensor | None) -> None:
        """Set running statistics to full-pass averages (before training)."""

    def request_inverses(self, inverter: BatchedInverter, policy: DampingPolicy) -> None:
        """Ask for whatever (re)inversion the block needs; served in batches by ``inverter``."""

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update_after_step(self, before: LayerRecord, after: LayerRecord) -> None:
        """Consume the second pass (only called when ``needs_second_pass``)."""

    def curvature_quadratic(self, delta: torch.Tensor) -> torch.Tensor:
        r""":math:`\operatorname{vec}(\delta)^\top C \operatorname{vec}(\delta)` for the (undamped) curvature C."""
        raise NotImplementedError(f"{type(self).__name__} has no quadratic model")

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError

    def spectrum_bounds(self) -> tuple[float, float]:
        raise NotImplementedError

    def diagnostics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind or type(self).__name__


class KroneckerBlock(CurvatureBlock):
    r"""Two independent factor strategies: :math:`P(M) = H_g\,M\,H_a`, i.e. :math:`P = H_a\otimes H_g`.

    The factors may be any objects with the members of :class:`~curvature.protocols.FactorProtocol`;
    the block reads their declared capabilities (never their classes) to decide what it consumes:

    * ``needs_a`` when the A factor uses statistics or a matrix action, ``needs_g`` when the G
      factor uses statistics;
    * ``needs_second_pass`` when the G factor uses secant pairs or the A factor a matrix action
      (both are updated after the step, from the pass-1 record and the second pass);
    * ``has_quadratic_form`` when both factors have one (:math:`C = A\otimes G` from their statistics);
    * ``applies_cached_inverse`` when both factors apply only their last requested inverse.

    It always ``joins_update_batch``: :meth:`prepare_after_step` passes a batch on to the factors that join one.

    Secant pairs are defined for the G side only and matrix-action updates for the A side only; a
    factor declaring them on the other side is rejected.
    """

    joins_update_batch = True

    def __init__(self, name: str, adapter: LayerAdapter, a_factor: FactorProtocol, g_factor: FactorProtocol,
                 kind: str = "kronecker", approx: str = "expand") -> None:
        super().__init__(name, adapter)
        self.approx = check_approx(approx)
        if approx == "reduce" and getattr(adapter, "one_hot_input", False):
            raise ValueError(f"layer {name!r}: KFAC-reduce averages one-hot inputs into dense rows; use approx='expand' "
                             "for embeddings")
        for side, factor in (("a_factor", a_factor), ("g_factor", g_factor)):
            if not isinstance(factor, FactorProtocol):
                missing = [m for m in ("dim", "request_inverse", "apply", "to_dense", "state_dict", "load_state_dict")
                           if not hasattr(factor, m)]
                raise TypeError(f"{side} ({type(factor).__name__}) is not a factor: it lacks {missing} "
                                "(see curvature.protocols.FactorProtocol)")
        if a_factor.dim != adapter.a_dim or g_factor.dim != adapter.g_dim:
            raise ValueError(
                f"factor sizes ({a_factor.dim}, {g_factor.dim}) do not match layer {name!r} "
                f"(a_dim={adapter.a_dim}, g_dim={adapter.g_dim})"
            )
        if declares(a_factor, "uses_secant_pairs"):
            raise ValueError(f"{type(a_factor).__name__} uses secant pairs, which exist for the G side only; "
                             "pass it as g_factor")
        if declares(g_factor, "uses_matrix_action"):
            raise ValueError(f"{type(g_factor).__name__} uses a matrix-action update on the mean input, which exists "
                             "for the A side only; pass it as a_factor")
        self.a_factor, self.g_factor, self.kind = a_factor, g_factor, kind
        a_action = declares(a_factor, "uses_matrix_action")
        self.needs_a = declares(a_factor, "uses_statistics") or a_action
        self.needs_g = declares(g_factor, "uses_statistics")
        self.needs_second_pass = declares(g_factor, "uses_secant_pairs") or a_action
        self.has_quadratic_form = declares(a_factor, "has_quadratic_form") and declares(g_factor, "has_quadratic_form")
        self.applies_cached_inverse = (declares(a_factor, "applies_cached_inverse")
                                       and declares(g_factor, "applies_cached_inverse"))

    def _sides(self):
        return (("a", self.a_factor), ("g", self.g_factor))

    def update_statistics(self, record: LayerRecord, grad: torch.Tensor) -> None:
        if declares(self.a_factor, "uses_statistics"):
            rows, scale = a_rows_and_scale(record, self.approx)
            self.a_factor.observe_gram(rows, record.has_bias, scale)
        if declares(self.g_factor, "uses_statistics"):
            rows, scale = g_rows_and_scale(record, self.approx)
            self.g_factor.observe_gram(rows, False, scale)
        if declares(self.a_factor, "uses_gradient"):
            self.a_factor.observe_gradient(grad.T)
        if declares(self.g_factor, "uses_gradient"):
            self.g_factor.observe_gradient(grad)

    def warm_start(self, a_stat, g_stat) -> None:
        if a_stat is not None and declares(self.a_factor, "uses_statistics"):
            self.a_factor.set_statistic(a_stat)
        if g_stat is not None and declares(self.g_factor, "uses_statistics"):
            self.g_factor.set_statistic(g_stat)

    def request_inverses(self, inverter: BatchedInverter, policy: DampingPolicy) -> None:
        lam_a, lam_g = policy.factor_damping(getattr(self.a_factor, "statistic", None),
                                             getattr(self.g_factor, "statistic", None))
        self.a_factor.request_inverse(inverter, lam_a)
        self.g_factor.request_inverse(inverter, lam_g)

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        right = self.a_factor.apply(grad.T).T  # M H_a (H_a symmetric)
        return self.g_factor.apply(right)  # H_g M H_a

    def update_after_step(self, before: LayerRecord, after: LayerRecord) -> None:
        scalars, finish = self.prepare_after_step(before, after)
        finish(read_scalars(scalars))

    def prepare_after_step(self, before: LayerRecord, after: LayerRecord, updates: UpdateBatch | None = None
                           ) -> tuple[list[torch.Tensor], Callable[[list[float]], None]]:
        """:meth:`update_after_step` split at its one host read: the factors' candidates are computed
        on the device and ``(scalars, finish)`` returned; ``finish(values)`` (the scalars' values)
        commits H_g's pair and H_a's Hessian-action update, in that order. Factors without a split
        (``prepare_pair`` / ``prepare_action_update``) update inside ``finish`` with their own reads.

        Factors that declare ``joins_update_batch`` add their candidate inverse-BFGS updates to ``updates``
        (the caller prepares it and hands it its values before ``finish``) or, without one, to a batch of
        the block's own whose scalars follow the factors' and whose values ``finish`` hands back first."""
        own = UpdateBatch() if updates is None else None
        batch = own or updates
        parts: list[tuple[int, Callable[[list[float]], Any]]] = []
        scalars: list[torch.Tensor] = []
        if declares(self.g_factor, "uses_secant_pairs"):
            _required(before.grad_rows, "g"), _required(after.grad_rows, "g")
            _required(after.h_rows, "h"), _required(before.h_rows, "h")
            g_before = before.g_mean(self.approx)
            s = after.h_mean(self.approx) - before.h_mean(self.approx)
            y = after.g_mean(self.approx) - g_before
            if hasattr(self.g_factor, "prepare_pair"):  # reference norm a tensor: read with the pair check
                part, fin = self.g_factor.prepare_pair(s, y, reference_norm=g_before.norm(),
                                                       **batch_argument(self.g_factor, batch))
            else:
                part, fin = [], lambda _, s=s, y=y, r=g_before.norm(): self.g_factor.observe_pair(s, y, reference_norm=r)
            parts.append((len(part), fin))
            scalars += part
        if declares(self.a_factor, "uses_matrix_action"):
            _required(before.input_rows, "a")
            mean = before.a_mean(self.approx)
            if hasattr(self.a_factor, "prepare_action_update"):
                part, fin = self.a_factor.prepare_action_update(mean, **batch_argument(self.a_factor, batch))
            else:
                part, fin = [], lambda _, m=mean: self.a_factor.hessian_action_update(m)
            parts.append((len(part), fin))
            scalars += part
        if own is None:
            return scalars, chain_finishers(parts)
        return prepared_with_batch(scalars, chain_finishers(parts), own)

    def curvature_quadratic(self, delta: torch.Tensor) -> torch.Tensor:
        if not self.has_quadratic_form:
            return super().curvature_quadratic(delta)
        A, G = self.a_factor.statistic, self.g_factor.statistic
        return torch.sum((G @ delta) * (delta @ A))  # tr(δᵀ G δ A) = vec(δ)ᵀ (A⊗G) vec(δ)

    def to_dense(self) -> torch.Tensor:
        return torch.kron(self.a_factor.to_dense().contiguous(), self.g_factor.to_dense().contiguous())

    def spectrum_bounds(self) -> tuple[float, float]:
        a_lo, a_hi = _factor_bounds(self.a_factor)
        g_lo, g_hi = _factor_bounds(self.g_factor)
        products = [a_lo * g_lo, a_lo * g_hi, a_hi * g_lo, a_hi * g_hi]
        return min(products), max(products)

    def diagnostics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for side, factor in self._sides():
            report = getattr(factor, "diagnostics", None)
            for key, value in (report() if report is not None else {}).items():
                out[f"{side}_{key}"] = value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"a": self.a_factor.state_dict(), "g": self.g_factor.state_dict()}

    def revert_state(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to undo a step: each factor's ``revert_state`` (references to
        the tensors a step replaces, copies of those it mutates in place) or, without one, its state_dict."""
        return {"a": revert_state(self.a_factor), "g": revert_state(self.g_factor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a_factor.load_state_dict(state["a"])
        self.g_factor.load_state_dict(state["g"])

    def describe(self) -> str:
        return f"{self.kind}-{self.approx}[A: {type(self.a_factor).__name__}, G: {type(self.g_factor).__name__}]"


def _factor_bounds(factor: FactorProtocol) -> tuple[float, float]:
    bounds = getattr(factor, "eigenvalue_bounds", None)
    return bounds() if bounds is not None else symmetric_eigenvalue_bounds(factor.to_dense())


class DiagonalBlock(CurvatureBlock):
    r"""Diagonal curvature :math:`v` (EMA), applied as :math:`P(M) = M \oslash (v + \lambda)^{p}`.

    ``source="empirical_fisher"``: the batch statistic is the exact diagonal of the empirical Fisher,
    :math:`\frac1N\sum_i (\nabla_i)^{\circ 2}` with the per-sample gradients
    :math:`\nabla_i = \sum_t g_{i,t}\bar a_{i,t}^\top` (power 1 by default).
    ``source="gradient"``: the square of the mini-batch gradient (RMSprop-like, use power 0.5).
    """

    kind = "diagonal"
    has_quadratic_form = True
    applies_cached_inverse = True  # precondition() reads only the scale of the last request_inverses

    def __init__(self, name: str, adapter: LayerAdapter, decay: float = 0.9, power: float = 1.0,
                 source: str = "empirical_fisher", *, dtype=torch.float32, device=None) -> None:
        super().__init__(name, adapter)
        if source not in ("empirical_fisher", "gradient"):
            raise ValueError(f"source must be 'empirical_fisher' or 'gradient', got {source!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power}")
        self.source, self.decay, self.power = source, decay, power
        self.needs_a = self.needs_g = source == "empirical_fisher"
        self.v = torch.zeros(adapter.g_dim, adapter.a_dim, dtype=dtype, device=device)
        self.scale: torch.Tensor | None = None
        self.initialized = False

    def batch_statistic(self, record: LayerRecord, grad: torch.Tensor) -> torch.Tensor:
        if self.source == "gradient":
            return grad * grad
        a, g = _required(record.a_rows, "a"), _required(record.g_rows, "g")
        n, t = record.batch_size, record.rows_per_sample
        if t != 1 and not record.sample_major:
            raise RuntimeError(
                f"layer {self.name!r}: the exact empirical-Fisher diagonal needs each sample's rows together, but this "
                "Linear-like layer was called several times in one forward; use diagonal_block(source='gradient')"
            )
        if t == 1:
            return (g * g).T @ (a * a) / n
        per_sample = torch.einsum("ntg,nta->nga", g.reshape(n, t, -1), a.reshape(n, t, -1))
        return (per_sample * per_sample).mean(0)

    def update_statistics(self, record: LayerRecord, grad: torch.Tensor) -> None:
        self.fold_statistic(self.batch_statistic(record, grad))

    def fold_statistic(self, statistic: torch.Tensor) -> None:
        """Fold one batch statistic into the EMA (the first one initializes it)."""
        stat = statistic.to(self.v)
        if self.initialized:
            self.v.mul_(self.decay).add_(stat, alpha=1.0 - self.decay)
        else:
            self.v.copy_(stat)
            self.initialized = True

    def request_inverses(self, inverter: BatchedInverter, policy: DampingPolicy) -> None:
        self.scale = (self.v + policy.damping).pow(-self.power)

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            raise RuntimeError("DiagonalBlock.precondition called before its damped inverse was computed")
        return grad * self.scale

    def curvature_quadratic(self, delta: torch.Tensor) -> torch.Tensor:
        return torch.sum(self.v * delta * delta)

    def to_dense(self) -> torch.Tensor:
        if self.scale is None:
            raise RuntimeError("DiagonalBlock has no damped inverse yet")
        return torch.diag(vec_c(self.scale))

    def spectrum_bounds(self) -> tuple[float, float]:
        if self.scale is None:
            raise RuntimeError("DiagonalBlock has no damped inverse yet")
        return float(self.scale.min()), float(self.scale.max())

    def state_dict(self) -> dict[str, Any]:
        return {"v": self.v.clone(), "scale": None if self.scale is None else self.scale.clone(),
                "initialized": self.initialized}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.v = state["v"].to(self.v, copy=True)
        self.scale = None if state["scale"] is None else state["scale"].to(self.v, copy=True)
        self.initialized = bool(state["initialized"])

    def describe(self) -> str:
        return f"diagonal[{self.source}, power={self.power}]"
