r"""The extension points of the framework, as typed Protocols: factors, blocks and layer adapters.

A researcher's own class plugs in by having the members below; subclassing :class:`~curvature.factors.Factor`,
:class:`~curvature.blocks.CurvatureBlock` or :class:`~curvature.adapters.LayerAdapter` is optional (they
only supply defaults). Nothing in the library checks for *our* classes: it reads the declared
**capabilities**, plain boolean class attributes, and calls the optional members they announce.

Factor capabilities (read by :class:`~curvature.blocks.KroneckerBlock`; a missing attribute means False):

=========================  ==========================================================================
``uses_statistics``        consumes the batch statistic :math:`S = \text{scale}\cdot\sum \bar a\bar a^\top`
                           (or :math:`gg^\top`) through ``observe_gram(rows, with_ones, scale)``, keeps it
                           as ``statistic`` and accepts ``set_statistic(S)`` (warm start).
``uses_gradient``          consumes the layer's raw gradient matrix through ``observe_gradient(V)``,
                           oriented so that ``V`` has ``dim`` rows (``M`` on the G side, ``Mᵀ`` on the A side).
``uses_secant_pairs``      (G side) consumes the pair :math:`s = \bar h_{k+1}-\bar h_k`,
                           :math:`y = \bar g_{k+1}-\bar g_k` from a second pass on the same batch through
                           ``observe_pair(s, y, reference_norm)``.
``uses_matrix_action``     (A side) after each step, ``hessian_action_update(mean_activation)`` with the
                           batch's mean homogeneous input :math:`\bar{\bar a}` (pairs :math:`y = Ms` from
                           a matrix action, K-BFGS's :math:`H_a`).
``has_quadratic_form``     ``statistic`` is the undamped curvature the factor inverts, so a block of two
                           such factors can evaluate the quadratic model (adaptive Levenberg–Marquardt).
``has_eigenbasis``         ``eigenbasis()`` returns ``(eigenvalues, eigenvectors)`` of ``statistic``.
``applies_cached_inverse`` ``apply`` reads only what the last ``request_inverse`` computed (never the running
                           statistic), so folding in a batch between refreshes does not change the direction.
``joins_update_batch``     its split second-pass update (``prepare_pair(s, y, reference_norm, updates=...)``
                           or ``prepare_action_update(mean, updates=...)``) accepts a
                           :class:`~curvature.update_batch.UpdateBatch` batch and adds its damping and its candidate
                           inverse-BFGS update (or, for L-BFGS, its pair check) to it, so the updates of all layers
                           are computed together.
=========================  ==========================================================================

Block capabilities (read by the optimizer driver): ``needs_a`` / ``needs_g`` (input rows / output
gradient rows of the normal pass), ``needs_second_pass`` (the closure is called again on the same
batch at the new point, and ``update_after_step(before, after)`` receives both records),
``has_quadratic_form`` (``curvature_quadratic`` is implemented), ``applies_cached_inverse``
(``precondition`` reads only what ``request_inverses`` computed: the driver may then fold in the
batch's statistics after the update on steps without a refresh, and check the step with one host
read; see the README's GPU-ready step), ``joins_update_batch`` (``prepare_after_step(before, after,
updates=...)`` passes a :class:`~curvature.update_batch.UpdateBatch` batch on to its factors).

The conventions shared by all three: a layer's gradient is the matrix :math:`M = [\nabla W\mid\nabla b]`
of shape ``g_dim × a_dim`` with :math:`M = \sum_{\text{rows}} g\,\bar a^\top`; a Kronecker block applies
:math:`P(M) = H_g M H_a`; dense forms act on the column-major :math:`\operatorname{vec}_c(M)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from curvature.capture import LayerRecord
    from curvature.damping import DampingPolicy
    from curvature.inverter import BatchedInverter

#: The factor capabilities, in the order they are documented above.
FACTOR_CAPABILITIES = ("uses_statistics", "uses_gradient", "uses_secant_pairs", "uses_matrix_action",
                       "has_quadratic_form", "has_eigenbasis", "applies_cached_inverse", "joins_update_batch")
#: The block capabilities the driver reads.
BLOCK_CAPABILITIES = ("needs_a", "needs_g", "needs_second_pass", "has_quadratic_form", "applies_cached_inverse",
                      "joins_update_batch")


def declares(obj: object, capability: str) -> bool:
    """Whether ``obj`` declares ``capability`` (a missing attribute counts as not declared)."""
    return bool(getattr(obj, capability, False))


@runtime_checkable
class FactorProtocol(Protocol):
    r"""One side of a Kronecker block: an approximation :math:`H` of the inverse of a ``dim × dim`` factor.

    Required members are listed here; the optional ones (``observe_gram``, ``set_statistic``,
    ``statistic``, ``observe_gradient``, ``observe_pair``, ``hessian_action_update``,
    ``eigenbasis``) are called only when the matching capability is declared. Also optional:
    ``eigenvalue_bounds() -> (lo, hi)`` (default: from :meth:`to_dense`) and
    ``diagnostics() -> dict`` (reported by the block with an ``a_``/``g_`` prefix).
    """

    dim: int

    def request_inverse(self, inverter: "BatchedInverter", damping: float) -> None:
        r"""Refresh :math:`H` (every ``T_inv`` steps) with the damping :math:`\lambda` the policy gives this
        side; either compute it directly or ask ``inverter.request(matrix, damping, callback)`` for a
        batched :math:`(F+\lambda I)^{-1}`. May do nothing (secant strategies)."""

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for a ``dim × k`` matrix ``V`` (``H`` symmetric)."""

    def to_dense(self) -> torch.Tensor:
        """``H`` as a dense ``dim × dim`` matrix."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; tensors are copies."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` without aliasing ``state``'s tensors."""


@runtime_checkable
class BlockProtocol(Protocol):
    r"""One layer's curvature approximation, applied to the gradient matrix ``M`` (``g_dim × a_dim``).

    The driver calls, at each step: ``update_statistics`` (every ``T_cov`` steps), ``request_inverses``
    (every ``T_inv`` steps), ``precondition``, then ``update_after_step`` when ``needs_second_pass``.
    ``curvature_quadratic(delta)`` is needed only with ``has_quadratic_form``; ``warm_start``,
    ``diagnostics``, ``spectrum_bounds`` and ``to_dense`` serve warm starts, the convergence harness
    and tests (:class:`~curvature.blocks.CurvatureBlock` has defaults for all optional members).
    """

    name: str
    needs_a: bool
    needs_g: bool
    needs_second_pass: bool
    has_quadratic_form: bool

    def update_statistics(self, record: "LayerRecord", grad: torch.Tensor) -> None:
        """Fold in the batch: its captured rows (``record``) and raw gradient matrix ``grad``."""

    def request_inverses(self, inverter: "BatchedInverter", policy: "DampingPolicy") -> None:
        """Refresh whatever inverse the block keeps; ``policy.damping`` is the current λ."""

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """The direction :math:`P(M)`, same shape as ``grad``; must not modify ``grad``."""

    def update_after_step(self, before: "LayerRecord", after: "LayerRecord") -> None:
        """Consume the records of pass 1 and of the second pass at the new point."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> str:
        """A short name for tables (``CurvatureOptimizer.describe``)."""


@runtime_checkable
class AdapterProtocol(Protocol):
    r"""What curvature needs from one module type (register it with :func:`~curvature.adapters.register_adapter`).

    ``input_rows(x)``: ``R × d_in`` rows of the module input (without the homogeneous 1, which the
    capture appends when ``has_bias``); ``output_rows(h)``: ``R × g_dim`` rows of the output or of its
    gradient, with the same row order, so that :math:`M = \sum_{\text{rows}} g\,\bar a^\top`.
    Optional: ``num_samples(x)`` and ``num_groups(x)`` (samples and weight-sharing groups of one
    call's input; default the leading dimension, so the rows of one sample are its locations and
    :math:`A` sums over them, KFC), ``hook_module``/``functional_weight`` (rows from ``F.linear`` calls
    inside another module's forward), ``one_hot_input`` (indices as input rows, diagonal A).
    ``parameters()``: the parameters the gradient matrix covers; ``to_matrix(weight_like, bias_like)``,
    ``split_matrix(M)``, ``grad_matrix()`` and ``weight_matrix()`` convert between them and ``M``.
    """

    module: nn.Module
    has_bias: bool

    @property
    def a_dim(self) -> int: ...

    @property
    def g_dim(self) -> int: ...

    def input_rows(self, x: torch.Tensor) -> torch.Tensor: ...

    def output_rows(self, h: torch.Tensor) -> torch.Tensor: ...

    def parameters(self) -> list[nn.Parameter]: ...

    def grad_matrix(self) -> torch.Tensor: ...

    def weight_matrix(self) -> torch.Tensor: ...

    def split_matrix(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...
