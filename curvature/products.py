r"""Hessian-vector and GGN-vector products for any ``nn.Module`` + loss (CPU or CUDA).

This is the one implementation of the matrix-free curvature products; the optimizers
(:mod:`optimizers.hessian_free`, :mod:`optimizers.saddle_free`, :mod:`optimizers.levenberg_marquardt`)
and the convergence harness (:mod:`convergence.hessian` re-exports it) both use it.

Notation.  Let :math:`\theta\in\mathbb R^n` be the concatenation (in ``model.named_parameters()``
order, row-major ``flatten`` of each tensor) of every parameter with ``requires_grad=True``,
:math:`z(\theta) = \text{model}(X;\theta)` the model output and
:math:`f(\theta) = \ell(z(\theta), Y)` the (scalar) loss.  Then

* Hessian :math:`H = \nabla^2_\theta f(\theta)\in\mathbb R^{n\times n}` (symmetric);
* Jacobian :math:`J = \partial z/\partial\theta` and loss-output Hessian
  :math:`H_\ell = \nabla^2_z \ell(z, Y)`;
* generalized Gauss–Newton :math:`G = J^\top H_\ell J`, i.e. :math:`H` with the term
  :math:`\sum_k (\partial\ell/\partial z_k)\nabla^2_\theta z_k` dropped.  :math:`G\succeq 0` whenever
  :math:`\ell` is convex in :math:`z`, and :math:`G = H` when :math:`z` is linear (affine) in
  :math:`\theta`.

Three products are provided:

* :func:`hvp_forward_over_reverse`: :math:`Hv = \frac{d}{dt}\nabla f(\theta + tv)\big|_{t=0}`, a
  forward-mode ``jvp`` of the reverse-mode ``grad`` (``torch.func``);
* :func:`hvp_double_backprop`: :math:`Hv = \nabla_\theta\big(\nabla f(\theta)^\top v\big)`, reverse
  over reverse with ``torch.autograd.grad(..., create_graph=True)`` on the live parameters;
* :func:`ggn_vector_product`: :math:`Gv = J^\top\big(H_\ell (Jv)\big)` -- an R-op (``jvp`` through
  the model), a Hessian-vector product of the loss with respect to the *output*, then an L-op
  (``vjp``).

**Losses without forward-mode AD.**  Some losses of ``torch.nn.functional`` have no (or a broken)
forward-mode derivative of their backward: ``F.mse_loss``/``nn.MSELoss`` with mean reduction raise
``RuntimeError: ZeroTensors are immutable`` and ``F.huber_loss`` raises ``NotImplementedError``.
So the output-space product :math:`H_\ell u` is always computed reverse over reverse
(:math:`H_\ell u = \nabla_z(\nabla_z\ell^\top u)`, a ``vjp`` of ``grad``; :math:`H_\ell` is
symmetric), which every differentiable loss supports, and forward-over-reverse :math:`Hv` uses the
exact split

.. math::  Hv = \frac{d}{dt}\Big[J(\theta+tv)^\top r\Big]_{t=0} + J^\top H_\ell J v,
           \qquad r = \nabla_z\ell(z(\theta), Y)\ \text{held fixed},

(forward-over-reverse through the model only, the loss reverse over reverse) whenever the plain
``jvp(grad(f))`` fails for that reason; :attr:`FunctionalLoss.split_hvp` records that it did.

**Prepared products.**  An optimizer applies many products at one point (a CG or Lanczos run).
:meth:`FunctionalLoss.prepared_product` linearizes once (the forward pass, the ``vjp`` closures)
and returns ``v -> Av`` that reuses them; :class:`ProductCounter` counts products for the
per-step cost tables.

Vectors are either flat 1-D tensors of length :math:`n` or sequences of tensors shaped like the
trainable parameters; the result has the same form as the input.

Pitfalls (theory notes §4.1): put BatchNorm in eval mode and switch dropout off before measuring
curvature (this module does not change ``model.training``), and avoid in-place operations that
forward-mode AD does not support.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

__all__ = [
    "ModelCall",
    "FunctionalLoss",
    "make_functional",
    "hvp_forward_over_reverse",
    "hvp_double_backprop",
    "ggn_vector_product",
    "CurvatureOperator",
    "MatvecOperator",
    "HessianOperator",
    "GGNOperator",
    "as_matvec",
    "ProductCounter",
]

LossFn = Callable[[Any, Any], torch.Tensor]
VectorLike = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class ModelCall:
    """The arguments of a model call that is not ``model(X)``: ``model(*args, **kwargs)``.

    Pass one as ``inputs`` wherever this module takes the batch inputs, for a model with several
    inputs or keyword inputs (e.g. ``ModelCall((tokens, mask))`` or ``ModelCall((x,), {"mask": m})``);
    any other ``inputs`` value is the model's single positional argument.
    """

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.args, tuple):
            raise TypeError(f"ModelCall.args must be a tuple, got {type(self.args).__name__}")
        if not isinstance(self.kwargs, Mapping):
            raise TypeError(f"ModelCall.kwargs must be a mapping, got {type(self.kwargs).__name__}")


def _call_arguments(inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of the model call that ``inputs`` stands for (see :class:`ModelCall`)."""
    if isinstance(inputs, ModelCall):
        return inputs.args, dict(inputs.kwargs)
    return (inputs,), {}


class FunctionalLoss:
    r"""A model + loss + batch viewed as a function of its trainable parameters.

    Built with :func:`torch.func.functional_call`; only parameters with ``requires_grad=True``
    are arguments (frozen parameters and buffers are taken from the module as they are).

    Attributes
    ----------
    names, shapes, numels:
        Name, shape and size of each trainable parameter (``named_parameters()`` order).
    params:
        ``{name: detached parameter}`` -- the point :math:`\theta` at which curvature is measured.
    n, dtype, device:
        Total number of trainable scalars, their common dtype and device.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True")
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"all trainable parameters must share one dtype and device, got {dtypes} / {devices}"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.targets = targets
        self.names: tuple[str, ...] = tuple(name for name, _ in named)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for _, p in named)
        self.numels: tuple[int, ...] = tuple(p.numel() for _, p in named)
        self.n: int = int(sum(self.numels))
        self.dtype: torch.dtype = dtypes.pop()
        self.device: torch.device = devices.pop()
        self.params: dict[str, torch.Tensor] = {name: p.detach() for name, p in named}
        #: True once forward-over-reverse fell back to the split form (loss without forward-mode AD).
        self.split_hvp: bool = False

    # ----------------------------------------------------------------------------- conversions
    def flatten(self, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate parameter-shaped tensors (dict keyed by name, or list in order) into one 1-D vector."""
        if isinstance(tensors, Mapping):
            tensors = [tensors[name] for name in self.names]
        tensors = list(tensors)
        if len(tensors) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors (one per trainable parameter), got {len(tensors)}")
        for t, shape, name in zip(tensors, self.shapes, self.names):
            if t.shape != shape:
                raise ValueError(f"tensor for parameter {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector of length ``n`` into ``{name: tensor shaped like the parameter}``."""
        self.check_flat(vector)
        pieces = torch.split(vector, list(self.numels))
        return {name: piece.reshape(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def check_flat(self, vector: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``vector`` is 1-D of length ``n``."""
        if not isinstance(vector, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(vector).__name__}")
        if vector.dim() != 1 or vector.shape[0] != self.n:
            raise ValueError(
                f"vector has shape {tuple(vector.shape)}, expected a 1-D vector of length n_params={self.n}"
            )

    @property
    def theta(self) -> torch.Tensor:
        """The current parameters as one flat (detached) vector."""
        return self.flatten(self.params)

    # ------------------------------------------------------------------------------- functions
    def output_dict(self, params: Mapping[str, torch.Tensor]) -> Any:
        r""":math:`z(\theta)`: the model output with the trainable parameters replaced by ``params``."""
        args, kwargs = _call_arguments(self.inputs)
        return functional_call(self.model, dict(params), args, kwargs)

    def loss_of_output(self, output: Any) -> torch.Tensor:
        r""":math:`\ell(z, Y)` as a function of the model output :math:`z`."""
        return self.loss_fn(output, self.targets)

    def loss_dict(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r""":math:`f(\theta)` with :math:`\theta` given as ``{name: tensor}``."""
        return self.loss_of_output(self.output_dict(params))

    def loss_flat(self, theta: torch.Tensor) -> torch.Tensor:
        r""":math:`f(\theta)` with :math:`\theta` given as one flat vector of length ``n``."""
        return self.loss_dict(self.unflatten(theta))

    # -------------------------------------------------------------------------------- products
    def hvp_forward_over_reverse(self, v: torch.Tensor) -> torch.Tensor:
        r"""Flat :math:`Hv` as ``jvp(grad(f), (theta,), (v,))``.

        When the loss has no forward-mode derivative of its gradient (``F.mse_loss``,
        ``F.huber_loss``), the split form of the module docstring is used from then on
        (:attr:`split_hvp` becomes True); the result is the same :math:`Hv`.
        """
        v_dict = self.unflatten(self._cast(v))
        if not self.split_hvp:
            try:
                _, hv = jvp(grad(self.loss_dict), (self.params,), (v_dict,))
                return self.flatten(hv)
            except (RuntimeError, NotImplementedError) as exc:
                if not _forward_ad_unsupported(exc):
                    raise
                self.split_hvp = True
        return self.flatten(self._split_hvp(v_dict))

    def _split_hvp(self, v_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r""":math:`Hv = \partial_t[J(\theta+tv)^\top r] + J^\top H_\ell Jv` with :math:`r=\nabla_z\ell` fixed."""
        output = self.output_dict(self.params)
        residual = _detach_tree(grad(self.loss_of_output)(_detach_tree(output)))

        def pullback(params):
            _, fn = vjp(self.output_dict, params)
            return fn(residual)[0]

        _, curvature_of_model = jvp(pullback, (self.params,), (v_dict,))
        gauss_newton = self._ggn_dict(v_dict)
        return {k: curvature_of_model[k] + gauss_newton[k] for k in self.names}

    def hvp_double_backprop(self, v: torch.Tensor) -> torch.Tensor:
        r"""Flat :math:`Hv = \nabla_\theta(\nabla f^\top v)` by double backprop on the live parameters."""
        v_list = list(self.unflatten(self._cast(v)).values())
        live = dict(self.model.named_parameters())
        params = [live[name] for name in self.names]
        with torch.enable_grad():
            args, kwargs = _call_arguments(self.inputs)
            loss = self.loss_fn(self.model(*args, **kwargs), self.targets)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            dot = None
            for g, vi in zip(grads, v_list):
                if g is None or not g.requires_grad:
                    continue  # gradient independent of every parameter: this block of H is zero
                term = (g * vi).sum()
                dot = term if dot is None else dot + term
            if dot is None:
                return torch.zeros(self.n, dtype=self.dtype, device=self.device)
            hv = torch.autograd.grad(dot, params, allow_unused=True)
        return torch.cat(
            [(h if h is not None else torch.zeros_like(p)).detach().reshape(-1) for h, p in zip(hv, params)]
        )

    def ggn_vector_product(self, v: torch.Tensor) -> torch.Tensor:
        r"""Flat :math:`Gv = J^\top H_\ell J v`: R-op, output-space Hessian-vector product, L-op."""
        return self.flatten(self._ggn_dict(self.unflatten(self._cast(v))))

    def _ggn_dict(self, v_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        output, jv = jvp(self.output_dict, (self.params,), (dict(v_dict),))  # R-op: J v
        hl_jv = self._output_hessian(_detach_tree(output))(_detach_tree(jv))  # H_ell (J v)
        _, vjp_fn = vjp(self.output_dict, self.params)
        (gv,) = vjp_fn(hl_jv)  # L-op: J^T (H_ell J v)
        return gv

    def _output_hessian(self, output: Any) -> Callable[[Any], Any]:
        r"""``u -> H_ell u`` at ``output``, reverse over reverse (a ``vjp`` of ``grad``; :math:`H_\ell` symmetric)."""
        _, fn = vjp(grad(self.loss_of_output), output)
        return lambda u: fn(u)[0]

    def gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(f(theta), flat grad f(theta))``, functionally (the module's ``.grad`` is not touched)."""
        g, loss = torch.func.grad_and_value(self.loss_dict)(self.params)
        return loss.detach(), self.flatten(g).detach()

    def loss_at(self, theta: torch.Tensor) -> torch.Tensor:
        r""":math:`f(\theta)` at a flat point (no graph)."""
        with torch.no_grad():
            return self.loss_flat(self._cast(theta)).detach()

    def prepared_product(self, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        r"""``v -> Av`` at the current point for ``kind`` in ``{"ggn", "hessian"}``, linearized once.

        * ``"ggn"``: the model output, its ``vjp`` closure and the output-space Hessian closure are
          built once; each product is one ``jvp`` through the model, one output-space product and
          one reuse of the ``vjp`` closure.
        * ``"hessian"``: ``vjp`` of ``grad(f)`` (reverse over reverse, works for every loss); the
          gradient's graph is built once and each product is one backward through it.

        The point is frozen: the returned function keeps measuring at the parameters of the moment
        it was built (the tensors are cloned), whatever later happens to the module.
        """
        params = {k: p.clone() for k, p in self.params.items()}
        if kind == "ggn":
            output, vjp_fn = vjp(self.output_dict, params)
            h_ell = self._output_hessian(_detach_tree(output))

            def ggn(v: torch.Tensor) -> torch.Tensor:
                _, jv = jvp(self.output_dict, (params,), (self.unflatten(self._cast(v)),))
                (gv,) = vjp_fn(h_ell(_detach_tree(jv)))
                return self.flatten(gv)

            return ggn
        if kind == "hessian":
            _, hvp_fn = vjp(grad(self.loss_dict), params)

            def hessian(v: torch.Tensor) -> torch.Tensor:
                (hv,) = hvp_fn(self.unflatten(self._cast(v)))
                return self.flatten(hv)

            return hessian
        raise ValueError(f"unknown product kind {kind!r}; use 'ggn' or 'hessian'")

    def _cast(self, v: torch.Tensor) -> torch.Tensor:
        self.check_flat(v)
        return v.detach().to(dtype=self.dtype, device=self.device)


def _forward_ad_unsupported(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch saying the loss's backward has no usable forward-mode derivative."""
    text = str(exc)
    return "ZeroTensors are immutable" in text or "forward AD" in text or "forward-mode" in text


def _detach_tree(tree: Any) -> Any:
    """Detach every tensor of a pytree (outputs may be tensors, tuples or dicts)."""
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def make_functional(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any) -> FunctionalLoss:
    r"""Turn ``(model, loss_fn, inputs, targets)`` into :math:`f(\theta)=\ell(\text{model}(X;\theta),Y)`.

    The returned :class:`FunctionalLoss` exposes ``loss_flat(theta)`` (flat vector),
    ``loss_dict(params)`` (``{name: tensor}``), ``output_dict``, ``loss_of_output``,
    ``flatten``/``unflatten`` and the current point ``params``/``theta``.  Only parameters with
    ``requires_grad=True`` are arguments. ``inputs`` is the model's single argument ``X``, or a
    :class:`ModelCall` for ``model(*args, **kwargs)``.
    """
    return FunctionalLoss(model, loss_fn, inputs, targets)


def _apply_flat_or_list(fl: FunctionalLoss, product: Callable[[torch.Tensor], torch.Tensor], v: VectorLike):
    if isinstance(v, torch.Tensor):
        return product(v)
    if isinstance(v, Mapping):
        out = fl.unflatten(product(fl.flatten(v)))
        return out
    flat = fl.flatten([t.to(dtype=fl.dtype, device=fl.device) for t in v])
    return list(fl.unflatten(product(flat)).values())


def hvp_forward_over_reverse(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, v: VectorLike):
    r"""Hessian-vector product :math:`Hv` by forward-over-reverse AD.

    :math:`Hv = \frac{d}{dt}\,\nabla f(\theta + t v)\big|_{t=0}`, computed as
    ``torch.func.jvp(torch.func.grad(f), (theta,), (v,))``.

    ``v`` is a flat tensor of length ``n_params`` (returns a flat tensor), a list of tensors shaped
    like the trainable parameters (returns a list), or a ``{name: tensor}`` dict (returns a dict).
    Raises ``ValueError`` when the length/shapes do not match the trainable parameters.
    """
    fl = make_functional(model, loss_fn, inputs, targets)
    return _apply_flat_or_list(fl, fl.hvp_forward_over_reverse, v)


def hvp_double_backprop(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, v: VectorLike):
    r"""Hessian-vector product :math:`Hv` by double backprop (reverse over reverse).

    :math:`g = \nabla f(\theta)` is built with ``create_graph=True``; then
    :math:`Hv = \nabla_\theta (g^\top v)`, which is :math:`Hv` because :math:`H` is symmetric.
    Same vector conventions as :func:`hvp_forward_over_reverse`.
    """
    fl = make_functional(model, loss_fn, inputs, targets)
    return _apply_flat_or_list(fl, fl.hvp_double_backprop, v)


def ggn_vector_product(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, v: VectorLike):
    r"""Generalized Gauss–Newton product :math:`Gv = J^\top H_\ell J v`.

    :math:`Jv` by ``jvp`` through the model (R-op); :math:`H_\ell u` with
    :math:`H_\ell = \nabla_z^2\ell(z,Y)` reverse over reverse (``vjp`` of ``grad`` of
    :math:`z\mapsto\ell(z,Y)`; so any twice-differentiable loss works, ``F.mse_loss`` and
    ``F.huber_loss`` included, e.g. softmax cross-entropy gives :math:`(\mathrm{diag}\,p - pp^\top)/N` per example
    for a mean loss); :math:`J^\top w` by ``vjp`` (L-op).  Same vector conventions as
    :func:`hvp_forward_over_reverse`.
    """
    fl = make_functional(model, loss_fn, inputs, targets)
    return _apply_flat_or_list(fl, fl.ggn_vector_product, v)


# ======================================================================================== operators
class CurvatureOperator:
    r"""A symmetric linear operator :math:`A\in\mathbb R^{n\times n}` known through ``matvec``.

    Subclasses implement :meth:`_matvec` on flat tensors of the operator's dtype/device.
    """

    n: int
    dtype: torch.dtype
    device: torch.device

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return :math:`Av` for a 1-D tensor ``v`` of length ``n`` (cast to the operator's dtype/device)."""
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(np.asarray(v))
        if v.dim() != 1 or v.shape[0] != self.n:
            raise ValueError(f"vector has shape {tuple(v.shape)}, expected a 1-D vector of length n={self.n}")
        return self._matvec(v.detach().to(dtype=self.dtype, device=self.device))

    __call__ = matvec

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64, symmetric: ``rmatvec = matvec``).

        Each product converts the float64 numpy vector to the operator's dtype/device, applies
        :meth:`matvec` and converts back to a float64 numpy array.
        """
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64).reshape(-1)
            y = self.matvec(torch.from_numpy(x.copy()))
            return y.detach().to(device="cpu", dtype=torch.float64).numpy()

        return LinearOperator(shape=(self.n, self.n), matvec=mv, rmatvec=mv, dtype=np.float64)

    def to_dense(self, max_n: int = 4096) -> torch.Tensor:
        """Dense :math:`A` by ``n`` matvecs against the identity columns (for tiny models only)."""
        if self.n > max_n:
            raise ValueError(f"to_dense on n={self.n} > max_n={max_n}; raise max_n if this is intended")
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(eye[:, j]) for j in range(self.n)], dim=1)


class MatvecOperator(CurvatureOperator):
    """Wrap a plain callable ``v -> A v`` (flat torch tensors) as a :class:`CurvatureOperator`."""

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        n: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        self._fn = matvec
        self.n = int(n)
        self.dtype = dtype
        self.device = torch.device(device)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._fn(v)


class HessianOperator(CurvatureOperator):
    r"""The loss Hessian :math:`H = \nabla^2_\theta f` of ``loss_fn(model(inputs), targets)`` as an operator.

    ``method`` is ``"forward_over_reverse"`` (default, ``torch.func``) or ``"double_backprop"``.
    The point :math:`\theta` is always the module's current parameter values: forward-over-reverse
    uses detached views that share storage with the parameters, double backprop the parameters
    themselves, so in-place updates of the parameters are seen by later products.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: Any,
        targets: Any,
        *,
        method: str = "forward_over_reverse",
    ) -> None:
        if method not in ("forward_over_reverse", "double_backprop"):
            raise ValueError(f"unknown method {method!r}; use 'forward_over_reverse' or 'double_backprop'")
        self.functional = make_functional(model, loss_fn, inputs, targets)
        self.method = method
        self.n = self.functional.n
        self.dtype = self.functional.dtype
        self.device = self.functional.device

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self.method == "forward_over_reverse":
            return self.functional.hvp_forward_over_reverse(v)
        return self.functional.hvp_double_backprop(v)


class GGNOperator(CurvatureOperator):
    r"""The generalized Gauss–Newton matrix :math:`G = J^\top H_\ell J` as an operator.

    Products by :func:`ggn_vector_product` (R-op, output-space Hessian product, L-op).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any) -> None:
        self.functional = make_functional(model, loss_fn, inputs, targets)
        self.n = self.functional.n
        self.dtype = self.functional.dtype
        self.device = self.functional.device

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.functional.ggn_vector_product(v)


def as_matvec(
    matvec: Callable[[torch.Tensor], torch.Tensor] | CurvatureOperator,
    n: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CurvatureOperator:
    """Normalize a callable or an operator to a :class:`CurvatureOperator` of size ``n``.

    For an operator, ``dtype``/``device`` default to its own; for a plain callable to float64/CPU.
    Raises ``ValueError`` when an operator's ``n`` disagrees with ``n``.
    """
    if isinstance(matvec, CurvatureOperator):
        if matvec.n != n:
            raise ValueError(f"operator has n={matvec.n}, but n={n} was given")
        if (dtype is None or dtype == matvec.dtype) and (device is None or torch.device(device) == matvec.device):
            return matvec
        return MatvecOperator(
            matvec.matvec, n, dtype=dtype or matvec.dtype, device=device if device is not None else matvec.device
        )
    fn = matvec.matvec if hasattr(matvec, "matvec") else matvec
    if dtype is None:
        dtype = getattr(matvec, "dtype", torch.float64)
    if device is None:
        device = getattr(matvec, "device", "cpu")
    return MatvecOperator(fn, n, dtype=dtype, device=device)


class ProductCounter:
    """Wrap ``v -> Av`` and count the products (for per-step cost accounting).

    ``counter(v)`` returns ``matvec(v)`` and increments :attr:`count`.
    """

    def __init__(self, matvec: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._fn = matvec
        self.count = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self._fn(v)
