r"""Analytic FLOP floors of one training step, per method, for MLPs made of ``nn.Linear`` layers.

A *floor* is the arithmetic a step cannot avoid with the algorithm as specified (spec §3 for
K-BFGS/K-BFGS(L), Martens & Grosse 2015 for KFAC). It is a compute floor: it says nothing about
memory traffic, kernel launches or Python overhead, which is exactly what the measured/floor gap in
:mod:`benchmarks.throughput` exposes. Counting conventions:

* one multiply-add = **2 FLOPs** (so a ``[B, d_in] @ [d_in, d_out]`` GEMM is :math:`2Bd_{in}d_{out}`);
* a layer has ``d_in`` inputs, ``d_out`` outputs and, with a bias, :math:`d_a = d_{in} + 1`
  (the homogeneous coordinate of spec §0); :math:`P_l = d_{out} d_a` parameters;
* terms of order :math:`O(B\,d)` (activations, loss, row means, scaling rows by N) and :math:`O(d)`
  (dot products, axpys on vectors) are **omitted**; :math:`O(d^2)` and :math:`O(P)` terms are kept.

Per layer, with batch :math:`B` (rows), in FLOPs ("K-BFGS*" = K-BFGS and K-BFGS(L)):

* **forward** :math:`2Bd_{in}d_{out} + Bd_{out}` (GEMM + bias add) — all methods;
* **weight gradient** :math:`2Bd_{in}d_{out} + Bd_{out}` (GEMM + the bias gradient's column sum) — all;
* **input gradient** :math:`2Bd_{in}d_{out}`, and **0 for the first layer** (its input is data, so
  autograd skips it) — all;
* **factor statistic** of a :math:`d\times d` covariance :math:`\sum_r x_rx_r^\top`: :math:`B\,d(d+1)`,
  i.e. the :math:`d(d+1)/2` entries of one triangle with :math:`B` multiply-adds each (a symmetric
  rank-B update, BLAS ``syrk``); a plain GEMM ``rows.T @ rows`` does :math:`2Bd^2`, about twice the
  floor — KFAC (A and G, every :math:`T_{cov}`), K-BFGS* (A, every step);
* **factor EMA** :math:`3d^2` (:math:`\beta F + (1-\beta)S`) — KFAC, K-BFGS*;
* **Kronecker preconditioning** :math:`H_gMH_a`: :math:`2d_{out}^2d_a + 2d_{out}d_a^2 = 2d_{out}d_a(d_{out}+d_a)`
  — KFAC, K-BFGS;
* **damped inverse, Cholesky** :math:`c_{chol}d^3` with :math:`c_{chol} = 1`: ``potrf``
  :math:`d^3/3` + ``potri`` (inverse from the factor) :math:`2d^3/3` — KFAC, per factor, every :math:`T_{inv}`;
* **damped inverse, eigh** :math:`c_{eigh}d^3` with :math:`c_{eigh} = 10`: the symmetric
  eigensolver with eigenvectors :math:`\approx 9d^3` (Householder tridiagonalisation + implicit QR,
  Golub & Van Loan §8.3) + the symmetric product :math:`V\Lambda^{-1}V^\top` :math:`\approx d^3` —
  KFAC with ``inverse_method="eigh"``;
* **second pass** (spec §3: same batch, new point, parameters frozen): forward + input gradients,
  no weight gradient, :math:`\approx 4Bd_{in}d_{out}` per layer (the first layer: forward only) — K-BFGS*;
  KFAC's Monte-Carlo Fisher pass costs the same, every :math:`T_{cov}`;
* **H_g update, dense** (K-BFGS): double damping needs :math:`Hy` (:math:`2d_{out}^2`), the inverse
  BFGS update :math:`u = H\tilde y` (:math:`2d_{out}^2`) and the symmetric rank-2 update
  :math:`H + sw^\top + ws^\top` (:math:`4d_{out}^2`): :math:`8d_{out}^2`;
* **H_a Hessian-action update** (K-BFGS*): :math:`s = H\bar{\bar a}`, :math:`y = (A+\lambda_AI)s`,
  :math:`u = Hy` (:math:`3\times 2d_a^2`) + the rank-2 update (:math:`4d_a^2`): :math:`10d_a^2`;
* **L-BFGS apply** :math:`HV` to ``V`` of :math:`n` columns with :math:`p` pairs (K-BFGS(L), compact
  form of Byrd, Nocedal & Schnabel): :math:`S^\top V`, :math:`Y^\top V`, :math:`S\cdot`,
  :math:`Y\cdot` (four thin GEMMs, :math:`4\times 2pd\,n`) + two :math:`p\times p` triangular
  solves and :math:`(Y^\top Y)X` (:math:`4p^2n`): :math:`8pdn + 4p^2n`. A two-loop recursion
  costs the same :math:`8pdn` (two loops of a dot and an axpy per pair and column). So K-BFGS(L)
  preconditions with :math:`MH_a` (:math:`2d_{out}d_a^2`) + the apply with :math:`d = d_{out}`,
  :math:`n = d_a` — :math:`8p\,d_{out}d_a` instead of the dense :math:`2d_{out}^2d_a`, cheaper only
  when :math:`4p < d_{out}`; double damping applies H to one column, and appending a pair costs
  :math:`6pd_{out}` (the new row and column of :math:`S^\top Y` and :math:`Y^\top Y`);
* **diagonal statistic** (exact empirical-Fisher diagonal) :math:`(g\circ g)^\top(\bar a\circ\bar a)`:
  :math:`2Bd_{out}d_a` + the squares :math:`B(d_{out}+d_a)`, EMA :math:`3P_l`; refreshing
  :math:`(v+\lambda)^{-1}` costs :math:`2P_l`, applying it :math:`P_l`;
* **elementwise update** per parameter: SGD-m 7 (weight decay 2, EMA momentum 3, step 2); Adam 16
  (additionally the second moment 4, two bias corrections, sqrt, ε, divide); the curvature
  optimizers apply SGD-m's 7 to the direction.

Amortization: statistics (and KFAC's Monte-Carlo pass) count :math:`1/T_{cov}` per step, inverses
:math:`1/T_{inv}` (the inverse warm-up steps at the start are not steady state and are not counted);
K-BFGS's :math:`H_a` is inverted once and never again (spec §2), so it has no inverse term.

"floor (× SGD)" is a method's floor over SGD-m's floor on the same model and batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal

from torch import nn

METHOD_KINDS = ("sgdm", "adam", "diagonal", "kfac", "kbfgs", "kbfgsl")
MethodKind = Literal["sgdm", "adam", "diagonal", "kfac", "kbfgs", "kbfgsl"]


@dataclass(frozen=True)
class LinearShape:
    """One ``nn.Linear`` layer as the floor sees it.

    ``needs_input_grad`` is False for the first layer of a network (its input is data).
    """

    d_in: int
    d_out: int
    bias: bool = True
    needs_input_grad: bool = True

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def d_a(self) -> int:
        """Width of the homogeneous input :math:`[a; 1]` (the A factor's size)."""
        return self.d_in + int(self.bias)

    @property
    def params(self) -> int:
        return self.d_out * self.d_a


@dataclass(frozen=True)
class FlopConstants:
    """The constants of the floor (see the module docstring for their derivation)."""

    cholesky_inverse: float = 1.0
    eigh_inverse: float = 10.0
    sgdm_update: float = 7.0
    adam_update: float = 16.0

    def __post_init__(self) -> None:
        for name in ("cholesky_inverse", "eigh_inverse", "sgdm_update", "adam_update"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


DEFAULT_CONSTANTS = FlopConstants()


@dataclass(frozen=True)
class MethodSpec:
    """What the floor needs to know about a method: its kind and its schedule.

    ``curvature_update_freq``/``inverse_update_freq`` are T_cov/T_inv (KFAC, diagonal);
    ``fisher="mc"`` adds KFAC's sampled-target pass; ``memory`` is K-BFGS(L)'s p (the number of
    pairs actually stored, which is below the capacity until the memory has filled).
    """

    kind: MethodKind
    curvature_update_freq: int = 1
    inverse_update_freq: int = 1
    fisher: Literal["empirical", "mc"] = "empirical"
    inverse_method: Literal["cholesky", "eigh"] = "cholesky"
    memory: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"kind must be one of {METHOD_KINDS}, got {self.kind!r}")
        for name in ("curvature_update_freq", "inverse_update_freq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.fisher not in ("empirical", "mc"):
            raise ValueError(f"fisher must be 'empirical' or 'mc', got {self.fisher!r}")
        if self.inverse_method not in ("cholesky", "eigh"):
            raise ValueError(f"inverse_method must be 'cholesky' or 'eigh', got {self.inverse_method!r}")
        if self.kind == "kbfgsl":
            if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 0:
                raise ValueError(f"memory must be an integer >= 0 for kbfgsl, got {self.memory!r}")
        elif self.memory is not None:
            raise ValueError(f"memory only applies to kbfgsl, got memory={self.memory!r} for {self.kind!r}")


@dataclass
class FlopBreakdown:
    """FLOPs of one (amortized) step, by component."""

    components: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, flops: float) -> None:
        if flops:
            self.components[name] = self.components.get(name, 0.0) + float(flops)

    @property
    def total(self) -> float:
        return float(sum(self.components.values()))

    def as_dict(self) -> dict[str, float]:
        return dict(sorted(self.components.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------------- per-layer terms
def forward_flops(layer: LinearShape, batch: int) -> float:
    """:math:`2Bd_{in}d_{out}` (+ :math:`Bd_{out}` for the bias)."""
    return 2.0 * batch * layer.d_in * layer.d_out + (batch * layer.d_out if layer.bias else 0)


def weight_grad_flops(layer: LinearShape, batch: int) -> float:
    """:math:`2Bd_{in}d_{out}` (+ :math:`Bd_{out}` for the bias gradient's column sum)."""
    return 2.0 * batch * layer.d_in * layer.d_out + (batch * layer.d_out if layer.bias else 0)


def input_grad_flops(layer: LinearShape, batch: int) -> float:
    """:math:`2Bd_{in}d_{out}`, or 0 when the layer's input needs no gradient (first layer)."""
    return 2.0 * batch * layer.d_in * layer.d_out if layer.needs_input_grad else 0.0


def covariance_flops(dim: int, batch: int) -> float:
    """Symmetric rank-B update :math:`\\sum_r x_r x_r^\\top` of a ``dim × dim`` matrix: :math:`B\\,d(d+1)`."""
    return float(batch) * dim * (dim + 1)


def ema_flops(entries: int) -> float:
    """:math:`\\beta F + (1-\\beta) S` over ``entries`` entries: 3 per entry."""
    return 3.0 * entries


def kron_precondition_flops(d_out: int, d_a: int) -> float:
    """:math:`H_g M H_a` for ``M`` of shape ``d_out × d_a``: :math:`2d_{out}d_a(d_{out}+d_a)`."""
    return 2.0 * d_out * d_a * (d_out + d_a)


def damped_inverse_flops(dim: int, method: str = "cholesky", constants: FlopConstants = DEFAULT_CONSTANTS) -> float:
    """:math:`c\\,d^3` with :math:`c` = 1 (Cholesky: potrf + potri) or 10 (eigh + reconstruction)."""
    if method == "cholesky":
        return constants.cholesky_inverse * dim**3
    if method == "eigh":
        return constants.eigh_inverse * dim**3
    raise ValueError(f"method must be 'cholesky' or 'eigh', got {method!r}")


def bfgs_inverse_update_flops(dim: int) -> float:
    """Inverse BFGS update: :math:`u = Hy` (:math:`2d^2`) + symmetric rank-2 update (:math:`4d^2`)."""
    return 6.0 * dim * dim


def dense_double_damping_flops(dim: int) -> float:
    """Double damping against a dense H: one matrix-vector product :math:`Hy` (:math:`2d^2`)."""
    return 2.0 * dim * dim


def hessian_action_update_flops(dim: int) -> float:
    """:math:`s = H\\bar{\\bar a}`, :math:`y = (A+\\lambda_A I)s`, then the inverse BFGS update: :math:`10d^2`."""
    return 2.0 * dim * dim + 2.0 * dim * dim + bfgs_inverse_update_flops(dim)


def lbfgs_apply_flops(dim: int, columns: int, pairs: int) -> float:
    """Compact L-BFGS :math:`HV` for ``V`` of shape ``dim × columns`` with ``pairs`` pairs: :math:`8pdn + 4p^2n`."""
    if pairs == 0:
        return 0.0
    return 8.0 * pairs * dim * columns + 4.0 * pairs * pairs * columns


def lbfgs_append_flops(dim: int, pairs: int) -> float:
    """New row and column of :math:`S^\\top Y` and :math:`Y^\\top Y`: three products with ``pairs`` rows, :math:`6pd`."""
    return 6.0 * pairs * dim


# ---------------------------------------------------------------------------------- the operation list
#: The kernels an :class:`Op` names (:mod:`benchmarks.kernel_floor` executes each as bare torch calls):
#:
#: * ``linear`` ``(B, d_in, d_out, bias)``: ``[B, d_in] @ [d_in, d_out]`` (+ bias) — forward;
#: * ``weight_grad`` ``(B, d_in, d_out, bias)``: ``[d_out, B] @ [B, d_in]`` (+ the bias column sum);
#: * ``input_grad`` ``(B, d_in, d_out)``: ``[B, d_out] @ [d_out, d_in]``;
#: * ``gram_ema`` ``(B, d, ones)``: :math:`F \leftarrow \beta F + \alpha [X\ 1]^\top [X\ 1]` (``ones``) or
#:   :math:`\beta F + \alpha X^\top X` for ``X`` of shape ``[B, d]`` (the statistic folded into its EMA; counted
#:   as a symmetric rank-B update of the ``d_a × d_a`` (or ``d × d``) matrix plus the EMA);
#: * ``kron`` ``(d_out, d_a)``: :math:`H_g M H_a`;
#: * ``right`` ``(d_out, d_a)``: :math:`M H_a` (K-BFGS(L), whose H_g side is an ``lbfgs_apply``);
#: * ``inverse`` ``(d, method)``: the damped inverse (Cholesky + inverse from the factor, or eigh);
#: * ``bfgs_dense`` ``(d,)``: :math:`Hy` for double damping, :math:`u = H\tilde y`, rank-2 update;
#: * ``hessian_action`` ``(d,)``: :math:`s = H\bar{\bar a}`, :math:`y = Ms`, :math:`u = Hy`, rank-2 update;
#: * ``lbfgs_apply`` ``(d, n, p)``: compact L-BFGS :math:`HV`, ``V`` of shape ``[d, n]``;
#: * ``lbfgs_append`` ``(d, p)``: the new row and column of :math:`S^\top Y` and :math:`Y^\top Y`;
#: * ``diag_stat`` ``(B, d_out, d_a)``: :math:`(g\circ g)^\top(\bar a\circ\bar a)` folded into its EMA;
#: * ``diag_inverse`` ``(d_out, d_a)``: :math:`(v + \lambda)^{-1}`; ``diag_apply``: :math:`M\circ(v+\lambda)^{-1}`;
#: * ``sgdm_update`` / ``adam_update`` ``(d_out, d_a)``: the elementwise parameter update (weight and bias);
#: * ``row_means`` ``(B, d, count)``: ``count`` column means of ``[B, d]`` rows (K-BFGS's pair means;
#:   :math:`O(Bd)`, so 0 counted FLOPs).
KERNELS = ("linear", "weight_grad", "input_grad", "gram_ema", "kron", "right", "inverse", "bfgs_dense",
           "hessian_action", "lbfgs_apply", "lbfgs_append", "diag_stat", "diag_inverse", "diag_apply",
           "sgdm_update", "adam_update", "row_means")
#: When an op runs: every step, on statistics steps (every T_cov) or on inverse steps (every T_inv).
WHEN = ("step", "stats", "inverse")


@dataclass(frozen=True)
class Op:
    """One dense operation of a step: the component it is counted under, the kernel that computes it,
    that kernel's arguments (``dims``), its FLOPs per execution (the counting conventions of the module
    docstring) and how often it runs (``every`` steps; ``when`` says which schedule: ``step``,
    ``stats`` = every T_cov, ``inverse`` = every T_inv). Its amortized FLOPs are ``flops / every``."""

    component: str
    kernel: str
    dims: tuple
    flops: float
    when: str = "step"
    every: int = 1

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.when not in WHEN:
            raise ValueError(f"when must be one of {WHEN}, got {self.when!r}")

    @property
    def amortized_flops(self) -> float:
        return self.flops / self.every


def layer_ops(spec: MethodSpec, layer: LinearShape, batch: int,
              constants: FlopConstants = DEFAULT_CONSTANTS) -> list[Op]:
    """The operations one step of ``spec`` performs on ``layer``, in execution order (module docstring)."""
    B, d_in, d_o, d_a = batch, layer.d_in, layer.d_out, layer.d_a
    t_cov, t_inv = spec.curvature_update_freq, spec.inverse_update_freq
    gemm = (B, d_in, d_o, layer.bias)
    ops = [Op("forward", "linear", gemm, forward_flops(layer, B)),
           Op("backward_weights", "weight_grad", gemm, weight_grad_flops(layer, B))]
    if layer.needs_input_grad:
        ops.append(Op("backward_inputs", "input_grad", (B, d_in, d_o), input_grad_flops(layer, B)))

    def update(kind: str) -> Op:
        per = constants.adam_update if kind == "adam" else constants.sgdm_update
        return Op("update", f"{kind}_update", (d_o, d_a), per * layer.params)

    if spec.kind in ("adam", "sgdm"):
        return ops + [update(spec.kind)]
    if spec.kind == "diagonal":
        stats = 2.0 * B * d_o * d_a + B * (d_o + d_a) + ema_flops(layer.params)
        return ops + [Op("statistics", "diag_stat", (B, d_o, d_a), stats, "stats", t_cov),
                      Op("inverse", "diag_inverse", (d_o, d_a), 2.0 * layer.params, "inverse", t_inv),
                      Op("precondition", "diag_apply", (d_o, d_a), float(layer.params)),
                      update("sgdm")]
    if spec.kind == "kfac":
        ops += [Op("statistics", "gram_ema", (B, d_in, layer.bias), covariance_flops(d_a, B) + ema_flops(d_a * d_a),
                   "stats", t_cov),
                Op("statistics", "gram_ema", (B, d_o, False), covariance_flops(d_o, B) + ema_flops(d_o * d_o), "stats", t_cov)]
        if spec.fisher == "mc":
            ops.append(Op("mc_pass", "linear", gemm, forward_flops(layer, B), "stats", t_cov))
            if layer.needs_input_grad:
                ops.append(Op("mc_pass", "input_grad", (B, d_in, d_o), input_grad_flops(layer, B), "stats", t_cov))
        method = spec.inverse_method
        ops += [Op("inverse", "inverse", (d_a, method), damped_inverse_flops(d_a, method, constants), "inverse", t_inv),
                Op("inverse", "inverse", (d_o, method), damped_inverse_flops(d_o, method, constants), "inverse", t_inv),
                Op("precondition", "kron", (d_o, d_a), kron_precondition_flops(d_o, d_a)),
                update("sgdm")]
        return ops
    # K-BFGS and K-BFGS(L): A statistics every step, the second pass, H_a by Hessian action.
    ops.append(Op("statistics", "gram_ema", (B, d_in, layer.bias), covariance_flops(d_a, B) + ema_flops(d_a * d_a)))
    p = int(spec.memory or 0)
    if spec.kind == "kbfgs":
        ops.append(Op("precondition", "kron", (d_o, d_a), kron_precondition_flops(d_o, d_a)))
    else:
        ops += [Op("precondition", "right", (d_o, d_a), 2.0 * d_o * d_a * d_a),
                Op("precondition", "lbfgs_apply", (d_o, d_a, p), lbfgs_apply_flops(d_o, d_a, p))]
    ops.append(update("sgdm"))
    ops.append(Op("second_pass", "linear", gemm, forward_flops(layer, B)))
    if layer.needs_input_grad:
        ops.append(Op("second_pass", "input_grad", (B, d_in, d_o), input_grad_flops(layer, B)))
    # the pair means (h and g before and after, the mean input): O(B d), not counted
    ops += [Op("pair_means", "row_means", (B, d_o, 4), 0.0), Op("pair_means", "row_means", (B, d_in, 1), 0.0)]
    if spec.kind == "kbfgs":
        ops.append(Op("hg_update", "bfgs_dense", (d_o,), dense_double_damping_flops(d_o) + bfgs_inverse_update_flops(d_o)))
    else:
        ops += [Op("hg_update", "lbfgs_apply", (d_o, 1, p), lbfgs_apply_flops(d_o, 1, p)),
                Op("hg_update", "lbfgs_append", (d_o, p), lbfgs_append_flops(d_o, p))]
    ops.append(Op("ha_update", "hessian_action", (d_a,), hessian_action_update_flops(d_a)))
    return ops


def step_ops(spec: MethodSpec, layers: Iterable[LinearShape], batch: int,
             constants: FlopConstants = DEFAULT_CONSTANTS) -> list[tuple[int, Op]]:
    """``(layer index, op)`` for every operation of one step of ``spec``, layer by layer."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty")
    return [(i, op) for i, layer in enumerate(layers) for op in layer_ops(spec, layer, batch, constants)]


# ---------------------------------------------------------------------------------- per-method floors
def layer_floor(spec: MethodSpec, layer: LinearShape, batch: int,
                constants: FlopConstants = DEFAULT_CONSTANTS) -> FlopBreakdown:
    """The amortized FLOPs one step of ``spec`` spends on ``layer``: its :func:`layer_ops`, by component."""
    out = FlopBreakdown()
    for op in layer_ops(spec, layer, batch, constants):
        out.add(op.component, op.amortized_flops)
    return out


def step_floor(spec: MethodSpec, layers: Iterable[LinearShape], batch: int,
               constants: FlopConstants = DEFAULT_CONSTANTS) -> FlopBreakdown:
    """The amortized FLOP floor of one step of ``spec`` on a network of ``layers`` with ``batch`` rows."""
    total = FlopBreakdown()
    for _, op in step_ops(spec, layers, batch, constants):
        total.add(op.component, op.amortized_flops)
    return total


def floor_ratio(spec: MethodSpec, layers: Iterable[LinearShape], batch: int,
                reference: MethodSpec = MethodSpec("sgdm"), constants: FlopConstants = DEFAULT_CONSTANTS) -> float:
    """``spec``'s floor over ``reference``'s (SGD-m by default): the "floor (× SGD)" column."""
    layers = list(layers)
    return step_floor(spec, layers, batch, constants).total / step_floor(reference, layers, batch, constants).total


def linear_shapes(model: nn.Module) -> list[LinearShape]:
    """The ``nn.Linear`` layers of ``model`` in module order; the first is taken to read the data
    (no input gradient). Other parameterised module types are not counted (their FLOPs would be
    missing from the floor), so a model with any is rejected."""
    shapes: list[LinearShape] = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layer {name!r} ({type(module).__name__}) is not nn.Linear: the floor covers Linear layers only")
        shapes.append(LinearShape(module.in_features, module.out_features, module.bias is not None,
                                  needs_input_grad=bool(shapes)))
    if not shapes:
        raise ValueError("the model has no nn.Linear layers")
    return shapes


def mlp_shapes(widths: Iterable[int], bias: bool = True) -> list[LinearShape]:
    """Shapes of the MLP ``widths[0] → widths[1] → …`` (the first layer reads the data)."""
    w = [int(x) for x in widths]
    if len(w) < 2:
        raise ValueError("an MLP needs at least two widths")
    return [LinearShape(a, b, bias, needs_input_grad=i > 0) for i, (a, b) in enumerate(zip(w, w[1:]))]
