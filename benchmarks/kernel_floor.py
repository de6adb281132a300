r"""A *measured* floor: the dense kernels a step requires, run as bare torch calls, against the library's step.

Usage::

    python -m benchmarks.kernel_floor --model curves --threads 1 --clock thread --steps 8 --repeats 2 --out runs/kf
    python -m benchmarks.kernel_floor --model mnist  --threads 1 --clock thread --steps 8 --repeats 2 --out runs/kf

Three numbers per method and what separates them:

* **measured step**: the library's ``optimizer.step(closure)`` (:class:`benchmarks.throughput.OptimizerCandidate`,
  same model, batch, loss and settings as the throughput table);
* **kernel floor**: the operation list of :func:`benchmarks.flops.step_ops` (the one the analytic floor
  counts: forward and backward GEMMs, factor statistics, inverses, Kronecker products, BFGS / L-BFGS
  updates, the second pass, the elementwise updates), each executed as the plain torch kernel(s) that
  compute it on preallocated tensors of the right shapes (:class:`KernelPlan`), plus the model's
  :math:`O(Bd)` elementwise work the analytic count omits (ReLU and its backward, the loss value and its
  gradient, K-BFGS's pair means). No library code runs, nothing is allocated that the kernel does not return,
  no host read, no check, no copy, no Python bookkeeping beyond one loop over closures;
* **FLOP floor**: the analytic count (:func:`benchmarks.flops.step_floor`) divided by this machine's
  measured GEMM rate (the best of square ``mm`` of sizes 256, 512, 1024, :func:`gemm_rate`).

The split: *library overhead* = measured − kernel floor (Python, small ops, checks, copies, allocation,
host reads); *BLAS efficiency* = kernel floor − FLOP floor (these shapes run below the square-GEMM
rate, non-GEMM kernels such as Cholesky and triangular solves, the factor statistic, which the count
takes as a symmetric ``syrk`` and torch runs as GEMMs: one full ``XᵀX``, or on the CPU for large
statistics the library's upper-triangle panels (:func:`curvature.linalg.gram`, up to 62.5% of the
full GEMM's work), memory-bound elementwise passes).

``--stages`` also times the library's step by stage (:func:`library_stages`: the passes, statistics,
preconditioning, pair updates, snapshot, checks, the rest), to set beside the plan's stages.

Both the library step and the kernel plan are timed interleaved, one step each in turn, with the
clock of :mod:`benchmarks.timing` (``--clock thread``: the step thread's CPU time), phases weighted
as in :mod:`benchmarks.throughput` (KFAC's inverse and statistics steps). Every kernel plan is also
timed per component (``components`` in the JSON). Tests never assert times; they check that the plan
runs exactly the analytic op list (``tests/benchmarks/test_kernel_floor.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.flops import LinearShape, MethodSpec, Op, step_floor, step_ops
from benchmarks.throughput import (BASELINE, METHODS, Workload, make_candidate, periodic_schedule, plan_phases,
                                   Schedule)
from benchmarks import timing
from curvature.linalg import gram_panels
from benchmarks.timing import (make_timer, paired_ratios, phase_weighted, run_interleaved, select, set_cpu_clock,
                               summarize, synchronize)

DEFAULT_METHODS = ("sgdm", "adam", "kfac", "kfac-10-100", "kbfgs", "kbfgsl")
#: the order in which a step runs the components of :func:`benchmarks.flops.layer_ops`
STAGES = ("forward", "backward", "statistics", "mc_pass", "inverse", "precondition", "update", "second_pass",
          "pair_means", "hg_update", "ha_update")
_EMA, _LR, _WD, _DAMP = 0.9, 1e-3, 1e-5, 0.3


def activations_of(model: nn.Module) -> list[bool]:
    """For each ``nn.Linear`` of ``model`` (module order): whether a ``nn.ReLU`` follows it."""
    modules = [m for m in model.modules() if not list(m.children())]
    out = []
    for i, m in enumerate(modules):
        if isinstance(m, nn.Linear):
            out.append(i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU))
    return out


def _spd(d: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    x = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    return (x @ x.T + torch.eye(d, dtype=torch.float64)).to(dtype=dtype, device=device)


class _Layer:
    """The tensors of one layer of the plan (weights, activations, gradients, factors). Every buffer holds finite
    values from the start (zeros or random): uninitialized memory could hold NaNs or denormals and time them."""

    def __init__(self, shape: LinearShape, batch: int, gen: torch.Generator, dtype, device) -> None:
        kw = {"dtype": dtype, "device": device}
        d_in, d_o, d_a = shape.d_in, shape.d_out, shape.d_a
        self.shape = shape
        self.W = (torch.randn(d_o, d_in, generator=gen) / math.sqrt(d_in)).to(**kw)
        self.b = (torch.randn(d_o, generator=gen) * 0.01).to(**kw) if shape.bias else None
        self.X: torch.Tensor | None = None  # the input rows: set by the plan (previous layer's output)
        self.H = torch.zeros(batch, d_o, **kw)  # pre-activation (ReLU applied in place when there is one)
        self.G: torch.Tensor | None = None  # gradient w.r.t. the pre-activation: set by the plan
        self.GX = torch.zeros(batch, d_in, **kw) if shape.needs_input_grad else None
        self.gW = torch.zeros(d_o, d_in, **kw)
        self.gb = torch.zeros(d_o, **kw) if shape.bias else None
        self.grad = (torch.randn(d_o, d_a, generator=gen) * 1e-2).to(**kw)  # [∇W | ∇b] as the blocks see it
        self.P = torch.zeros(d_o, d_a, **kw)  # the preconditioned direction
        self.Tt = torch.zeros(d_a, d_o, **kw)  # (M H_a)ᵀ = H_a Mᵀ
        self.rows_a = torch.rand(batch, d_a, generator=gen).to(**kw)  # [a 1] rows (the diagonal statistic)
        self.gen = gen


class KernelPlan:
    r"""The bare-kernel sequence of one step of ``spec`` on an MLP of ``shapes`` with ``batch`` rows.

    ``ops`` is :func:`benchmarks.flops.step_ops` (the analytic floor's list) arranged in execution
    order (:data:`STAGES`); each op is one closure of plain torch calls. ``activations[i]``: a ReLU
    follows layer ``i``; the loss is a summed binary cross-entropy with logits on the last layer's
    output (its value, and its gradient :math:`(\sigma(z) - x)/B`), in every pass. :meth:`run` executes the
    ops of one phase
    (``"steady"``: every op; otherwise the every-step ops plus those whose ``when`` is in the phase).
    """

    def __init__(self, spec: MethodSpec, shapes: Sequence[LinearShape], batch: int,
                 activations: Sequence[bool] | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.spec, self.shapes, self.batch = spec, list(shapes), batch
        self.activations = list(activations) if activations is not None else [False] * len(self.shapes)
        if len(self.activations) != len(self.shapes):
            raise ValueError(f"{len(self.activations)} activation flags for {len(self.shapes)} layers")
        self.device, self.dtype = torch.device(device), dtype
        gen = torch.Generator().manual_seed(seed)
        self.layers = [_Layer(s, batch, gen, dtype, self.device) for s in self.shapes]
        kw = {"dtype": dtype, "device": self.device}
        self.x = torch.rand(batch, self.shapes[0].d_in, generator=gen).to(**kw)
        self.target = torch.rand(batch, self.shapes[-1].d_out, generator=gen).to(**kw)
        for i, layer in enumerate(self.layers):  # chain the buffers: layer i reads layer i-1's output
            layer.X = self.x if i == 0 else self.layers[i - 1].H
        self.dz = torch.zeros(batch, self.shapes[-1].d_out, **kw)
        for i in reversed(range(len(self.layers))):  # layer i's pre-activation gradient
            layer = self.layers[i]
            if i == len(self.layers) - 1:
                layer.G = self.dz
            elif self.activations[i]:
                layer.G = torch.zeros(batch, layer.shape.d_out, **kw)
            else:
                layer.G = self.layers[i + 1].GX
        self.t_cov, self.t_inv = spec.curvature_update_freq, spec.inverse_update_freq
        self.schedule = periodic_schedule(self.t_cov, self.t_inv, 0)
        self.ops: list[tuple[int, Op]] = step_ops(spec, self.shapes, batch)
        self.steps: list[tuple[str, str, Callable[[], Any]]] = []  # (stage, when, closure)
        self._state: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self._build()

    # ------------------------------------------------------------------ arrangement
    def _by(self, component: str, layer: int | None = None) -> list[tuple[int, Op]]:
        return [(i, op) for i, op in self.ops if op.component == component and (layer is None or i == layer)]

    def _add(self, stage: str, i: int, op: Op) -> None:
        self.steps.append((stage, op.when, self._kernel(i, op)))
        self._scheduled.append((i, op))
        self.stage_flops[stage] = self.stage_flops.get(stage, 0.0) + op.amortized_flops

    def _model(self, stage: str, when: str, fn: Callable[[], Any]) -> None:
        self.steps.append((stage, when, fn))

    def _pass(self, stage: str, component: str, weight_grads: bool) -> None:
        """Forward over the layers, the loss gradient, backward in reverse (the ``component`` ops)."""
        n = len(self.layers)
        when = next((op.when for _, op in self._by(component)), "step")
        fwd = {i: op for i, op in self._by(component) if op.kernel == "linear"}
        for i in range(n):
            if component == "forward":
                self._add(stage, i, fwd[i])
            elif i in fwd:
                self._add(stage, i, fwd[i])
            if self.activations[i]:
                h = self.layers[i].H
                self._model(stage, when, lambda h=h: torch.relu_(h))
        z, target, dz, scale = self.layers[-1].H, self.target, self.dz, 1.0 / self.batch

        def loss():  # the loss value (the step returns and checks it) and its gradient (σ(z) − x)/B
            F.binary_cross_entropy_with_logits(z, target, reduction="sum")
            torch.sigmoid(z, out=dz).sub_(target).mul_(scale)
        self._model(stage, when, loss)
        back = "backward_inputs" if component == "forward" else component
        back_stage = "backward" if component == "forward" else stage
        for i in reversed(range(n)):
            if weight_grads:
                for _, op in self._by("backward_weights", i):
                    self._add("backward", i, op)
            for _, op in self._by(back, i):
                if op.kernel == "input_grad":
                    self._add(back_stage, i, op)
            if i > 0 and self.activations[i - 1]:
                prev, gx = self.layers[i - 1], self.layers[i].GX
                self._model(back_stage, when, lambda g=prev.G, gx=gx, h=prev.H: torch.ops.aten.threshold_backward.grad_input(
                    gx, h, 0, grad_input=g))

    def _build(self) -> None:
        self._scheduled: list[tuple[int, Op]] = []
        self.stage_flops: dict[str, float] = {}  # analytic amortized FLOPs per stage
        self._pass("forward", "forward", weight_grads=True)
        for comp in ("statistics",):
            for i, op in self._by(comp):
                self._add("statistics", i, op)
        if self._by("mc_pass"):
            self._pass("mc_pass", "mc_pass", weight_grads=False)
        for comp in ("inverse", "precondition", "update"):
            for i, op in self._by(comp):
                self._add(comp, i, op)
        if self._by("second_pass"):
            self._pass("second_pass", "second_pass", weight_grads=False)
        for comp in ("pair_means", "hg_update", "ha_update"):
            for i, op in self._by(comp):
                self._add(comp, i, op)
        if sorted(map(repr, self._scheduled)) != sorted(map(repr, self.ops)):
            missing = [o for o in self.ops if o not in self._scheduled]
            raise AssertionError(f"the plan does not run the op list exactly once: missing {missing}")

    @property
    def scheduled_ops(self) -> list[tuple[int, Op]]:
        """The ``(layer, op)`` pairs the plan runs, in execution order."""
        return list(self._scheduled)

    # ------------------------------------------------------------------ kernels
    def _kernel(self, i: int, op: Op) -> Callable[[], Any]:
        L = self.layers[i]
        kw = {"dtype": self.dtype, "device": self.device}
        gen = L.gen
        k = op.kernel
        if k == "linear":
            if L.b is not None:
                return lambda: torch.addmm(L.b, L.X, L.W.T, out=L.H)
            return lambda: torch.mm(L.X, L.W.T, out=L.H)
        if k == "weight_grad":
            def weight_grad():
                torch.mm(L.G.T, L.X, out=L.gW)
                if L.gb is not None:
                    torch.sum(L.G, 0, out=L.gb)
            return weight_grad
        if k == "input_grad":
            return lambda: torch.mm(L.G, L.W, out=L.GX)
        if k == "gram_ema":
            # the homogeneous coordinate is never materialized: the d × d block is one GEMM into a contiguous
            # buffer (leading dimension d: BLAS at full speed; a (d+1)-strided slice runs up to 1.5x slower at
            # d = 784, 1000) and the ones row/column is the rows' column sum
            b, d, ones = op.dims
            rows = L.X if ones else L.G
            Fm, Fn, col = _spd(d, gen, **kw), torch.empty(d, d, **kw), torch.empty(d, **kw)
            panels = min(gram_panels(b, d, rows.device), d)
            if panels > 1:
                # the library's layout (curvature.linalg.gram): the upper triangle by block rows, one GEMM each
                # into a contiguous buffer, copied into place and mirrored, then the EMA in two passes
                edges = [d * i // panels for i in range(panels + 1)]
                spans = list(zip(edges[:-1], edges[1:]))
                bufs = [torch.empty(e - a, d - a, **kw) for a, e in spans]

                def gram():
                    for (a, e), buf in zip(spans, bufs):
                        torch.mm(rows[:, a:e].T, rows[:, a:], out=buf)
                        Fn[a:e, a:].copy_(buf)
                        Fn[e:, a:e].copy_(buf[:, e - a:].T)
                    Fn.mul_((1 - _EMA) / b).add_(Fm, alpha=_EMA)  # out of place: F stays bounded
                    if ones:
                        torch.sum(rows, 0, out=col)
                return gram

            def gram():
                torch.addmm(Fm, rows.T, rows, beta=_EMA, alpha=(1 - _EMA) / b, out=Fn)  # out of place: F stays bounded
                if ones:
                    torch.sum(rows, 0, out=col)
            return gram
        if k in ("kron", "right"):
            # M H_a as (H_a Mᵀ)ᵀ, then H_g times that transposed view: the fastest of the three orders on this
            # CPU at the autoencoders' shapes (10-20% faster than (H_g M) H_a at 400x785 and 1000x785)
            d_o, d_a = op.dims
            Ha = self._factor(i, "a", d_a)
            if k == "right":
                return lambda: torch.mm(Ha, L.grad.T, out=L.Tt)
            Hg = self._factor(i, "g", d_o)

            def kron():
                torch.mm(Ha, L.grad.T, out=L.Tt)
                torch.mm(Hg, L.Tt.T, out=L.P)
            return kron
        if k == "inverse":
            d, method = op.dims
            M = _spd(d, gen, **kw)
            if method == "cholesky":
                return lambda: torch.cholesky_inverse(torch.linalg.cholesky(M))

            def eigh_inverse():
                evals, vecs = torch.linalg.eigh(M)
                return (vecs * (evals + _DAMP).reciprocal_()) @ vecs.T
            return eigh_inverse
        if k in ("bfgs_dense", "hessian_action"):
            (d,) = op.dims
            H = self._factor(i, "g" if k == "bfgs_dense" else "a", d)
            A = _spd(d, gen, **kw) if k == "hessian_action" else None
            v = torch.randn(d, 1, generator=gen).to(**kw)
            y = torch.randn(d, 1, generator=gen).to(**kw)
            Hn, LR, RR = torch.empty(d, d, **kw), torch.empty(d, 2, **kw), torch.empty(2, d, **kw)
            return lambda: _bfgs(H, Hn, LR, RR, v, y, A)
        if k == "lbfgs_apply":
            d, n, p = op.dims
            mem = self._memory(i, d, p)
            V = L.Tt.T if n > 1 else torch.randn(d, 1, generator=gen).to(**kw)
            out = L.P if n > 1 else torch.empty(d, 1, **kw)
            if p == 0:
                return lambda: None
            return lambda: _lbfgs_apply(mem, V, out)
        if k == "lbfgs_append":
            d, p = op.dims
            mem = self._memory(i, d, p)
            s, y = torch.randn(d, 1, generator=gen).to(**kw), torch.randn(d, 1, generator=gen).to(**kw)
            if p == 0:
                return lambda: None
            cols = torch.empty(p, 3, **kw)

            def append():
                torch.mm(mem["S"], y, out=cols[:, 0:1])
                torch.mm(mem["Y"], s, out=cols[:, 1:2])
                torch.mm(mem["Y"], y, out=cols[:, 2:3])
                mem["S"][0].copy_(s[:, 0])
                mem["Y"][0].copy_(y[:, 0])
            return append
        if k == "diag_stat":
            b, d_o, d_a = op.dims
            v = torch.rand(d_o, d_a, generator=gen).to(**kw)
            vn = torch.empty_like(v)
            a = L.rows_a

            def diag_stat():
                torch.addmm(v, (L.G * L.G).T, a * a, beta=_EMA, alpha=(1 - _EMA) / b, out=vn)
            self._state[(i, "diag")] = {"v": v, "scale": torch.empty_like(v)}
            return diag_stat
        if k == "diag_inverse":
            st = self._state[(i, "diag")]
            return lambda: torch.add(st["v"], _DAMP, out=st["scale"]).reciprocal_()
        if k == "diag_apply":
            st = self._state[(i, "diag")]
            return lambda: torch.mul(L.grad, st["scale"], out=L.P)
        if k in ("sgdm_update", "adam_update"):
            first_order = self.spec.kind in ("sgdm", "adam")
            params = [L.W] + ([L.b] if L.b is not None else [])
            d_in = L.shape.d_in
            dirs = [L.gW, L.gb] if first_order else [L.P[:, :d_in], L.P[:, d_in]]
            dirs = [t for t in dirs if t is not None][:len(params)]
            m = [torch.zeros_like(p) for p in params]
            if k == "sgdm_update":
                def sgdm():
                    for p, g, mm in zip(params, dirs, m):
                        g.add_(p, alpha=_WD)
                        mm.mul_(_EMA).add_(g, alpha=1 - _EMA)
                        p.add_(mm, alpha=-_LR)
                return sgdm
            vv = [torch.zeros_like(p) for p in params]

            def adam():
                for p, g, mm, v in zip(params, dirs, m, vv):
                    g.add_(p, alpha=_WD)
                    mm.lerp_(g, 1 - _EMA)
                    v.mul_(_EMA).addcmul_(g, g, value=1 - _EMA)
                    denom = (v.sqrt() / 0.5).add_(1e-4)
                    p.addcdiv_(mm, denom, value=-_LR / 0.5)
            return adam
        if k == "row_means":
            # K-BFGS reads four different row sets of [B, d_out] (h and g before and after the step) and the
            # input rows once: distinct buffers, so no mean reads rows another one just brought into cache
            b, d, count = op.dims
            if d == L.shape.d_out and count == 4:
                sets = [L.H, L.G, torch.zeros(b, d, **kw), torch.zeros(b, d, **kw)]
            else:
                sets = [L.H if d == L.shape.d_out else L.X] * count
            out = torch.empty(d, **kw)

            def means():
                for rows in sets:
                    torch.mean(rows, 0, out=out)
            return means
        raise ValueError(f"no kernel for {k!r}")

    def _factor(self, i: int, side: str, d: int) -> torch.Tensor:
        """Layer ``i``'s ``side`` factor (one tensor shared by the ops that use it, as in the library)."""
        st = self._state.setdefault((i, side), {})
        if "H" not in st:
            st["H"] = _spd(d, self.layers[i].gen, self.dtype, self.device)
        return st["H"]

    def _memory(self, i: int, d: int, p: int) -> dict[str, torch.Tensor]:
        st = self._state.setdefault((i, "lbfgs"), {})
        if not st and p:
            gen, kw = self.layers[i].gen, {"dtype": self.dtype, "device": self.device}
            S = torch.randn(p, d, generator=gen).to(**kw)
            Y = (S + 0.1 * torch.randn(p, d, generator=gen).to(**kw))
            SY = S @ Y.T
            st.update(S=S, Y=Y, R=torch.triu(SY) + d * torch.eye(p, **kw), D=torch.diagonal(SY).clone(),
                      YY=Y @ Y.T)
        return st

    # ------------------------------------------------------------------ running
    def run(self, phase: str = "steady") -> None:
        """Execute the ops of one step of ``phase`` (see the class docstring)."""
        parts = set(phase.split("+"))
        for _, when, fn in self.steps:
            if when == "step" or phase == "steady" or when in parts:
                fn()

    def run_timed(self, phase: str = "steady") -> dict[str, float]:
        """:meth:`run`, returning the thread CPU seconds spent in each stage."""
        parts = set(phase.split("+"))
        out: dict[str, float] = {}
        for stage, when, fn in self.steps:
            if when == "step" or phase == "steady" or when in parts:
                t0 = time.thread_time()
                fn()
                out[stage] = out.get(stage, 0.0) + time.thread_time() - t0
        return out


def _bfgs(H, Hn, LR, RR, v, y, A) -> None:
    """One BFGS inverse update's kernels: (Hessian action: s = Hv, y = Ms;) Hy, u = Hy, the rank-2 update."""
    if A is not None:  # H_a: s = H ā, y = (A + λI) s
        s = H @ v
        y = torch.addmm(s, A, s, beta=_DAMP)
    else:  # H_g: double damping's Hy, then the pair (s, ỹ) with ỹ = y here
        s = v
        H @ y
    u = H @ y
    sy = torch.dot(s[:, 0], y[:, 0])
    yu = torch.dot(y[:, 0], u[:, 0])
    rho = sy.reciprocal()
    w = torch.addcmul(s * (0.5 * rho * rho * yu + 0.5 * rho), u, -rho)  # w = (a/2) s − ρ u
    torch.cat([s, w], 1, out=LR)
    torch.cat([w.T, s.T], 0, out=RR)
    torch.addmm(H, LR, RR, out=Hn)  # H + s wᵀ + w sᵀ


def _lbfgs_apply(mem: dict[str, torch.Tensor], V: torch.Tensor, out: torch.Tensor) -> None:
    """The compact L-BFGS product :math:`HV` (H0 = I): four thin GEMMs, (YᵀY)X and two triangular solves."""
    S, Y, R = mem["S"], mem["Y"], mem["R"]
    StV = S @ V
    YtV = Y @ V
    X1 = torch.linalg.solve_triangular(R, StV, upper=True)
    inner = torch.addmm(mem["D"].unsqueeze(1) * X1, mem["YY"], X1).sub_(YtV)
    top = torch.linalg.solve_triangular(R.T, inner, upper=False)
    torch.addmm(V, S.T, top, out=out)
    torch.addmm(out, Y.T, X1, alpha=-1.0, out=out)


# ---------------------------------------------------------------------------------- measurement
def gemm_rate(device: torch.device | str = "cpu", sizes: Sequence[int] = (256, 512, 1024), repeats: int = 5,
              dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """FLOP/s of a square ``mm`` at each size (median of ``repeats``, the clock of :func:`make_timer`), and the best."""
    timer = make_timer(device)
    out: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        c = torch.empty(n, n, dtype=dtype, device=device)
        torch.mm(a, b, out=c)
        reps = max(repeats, int(2e9 // (2 * n**3)))  # at least ~2 GFLOP per size
        times = [timer.time(lambda: torch.mm(a, b, out=c)) for _ in range(reps)]
        out[str(n)] = 2.0 * n**3 / max(summarize(times).median, 1e-12)
    out["best"] = max(out.values())
    return out


class KernelCandidate:
    """A :class:`KernelPlan` as a candidate of :func:`benchmarks.timing.run_interleaved` (phases as the plan's schedule)."""

    def __init__(self, kernels: KernelPlan) -> None:
        self.kernels = kernels
        self.schedule: Schedule = kernels.schedule
        self._phase = "steady"

    def plan(self, rounds: int) -> list[str]:
        return plan_phases(self.schedule, rounds)

    def prepare(self, phase: str) -> None:
        self._phase = phase

    def step(self) -> None:
        self.kernels.run(self._phase)

    def after_step(self) -> dict[str, Any]:
        return {}


def _amortized_ms(samples, name: str, schedule: Schedule):
    weights = schedule.weights
    times = {p: [s.seconds for s in select(samples, name, phase=p)] for p in weights}
    return phase_weighted(times, weights).scaled(1000.0)


def _weighted_ratio(samples, name: str, baseline: str, schedule: Schedule) -> float:
    """Phase-weighted median of ``name``'s per-round ratios to ``baseline`` (as the throughput table's × Adam)."""
    pairs = paired_ratios(samples, name, baseline)
    weights = schedule.weights
    return phase_weighted({p: [r for s, r in pairs if s.phase == p] for p in weights}, weights).median


def component_ms(plan: KernelPlan, repeats: int = 3) -> dict[str, float]:
    """Amortized ms per stage of the plan (median of ``repeats`` runs of every phase)."""
    weights = plan.schedule.weights
    out: dict[str, float] = {}
    for phase, w in weights.items():
        runs = [plan.run_timed(phase) for _ in range(repeats)]
        for stage in runs[0]:
            out[stage] = out.get(stage, 0.0) + w * 1000.0 * summarize([r.get(stage, 0.0) for r in runs]).median
    return out


#: library functions timed by :func:`library_stages` (owner import path, attribute, stage)
LIBRARY_STAGES = (
    ("curvature.blocks:KroneckerBlock", "update_statistics", "statistics"),
    ("curvature.blocks:KroneckerBlock", "precondition", "precondition"),
    ("optimizers.data_parallel:DataParallel", "second_pass", "pair updates"),
    ("optimizers.data_parallel:DataParallel", "prepare_second_pass", "pair updates"),  # returns (scalars, finish)
    ("optimizers.driver:CurvatureOptimizer", "_snapshot", "snapshot"),
    ("optimizers.driver:CurvatureOptimizer", "_refresh_inverses", "inverses"),
    ("optimizers.driver:CurvatureOptimizer", "_monte_carlo_fisher_pass", "mc_pass"),
    ("optimizers.driver:CurvatureOptimizer", "_nonfinite_reason", "checks"),
    ("optimizers.driver", "finite_flag", "checks"),
    ("optimizers.driver", "all_finite", "checks"),
)


def library_stages(candidate: Any, steps: int = 3) -> dict[str, float]:
    """Thread CPU ms per step of the library's step by stage, measured by wrapping the functions of
    :data:`LIBRARY_STAGES` (and the ``finish`` callable a wrapped function returns in a ``(values, finish)``
    pair, charged to the same stage) and the candidate's closure (first call of a step: ``first pass``, second:
    ``second pass``) with ``time.thread_time`` accumulators, each exclusive of the wrapped calls nested in
    it; ``rest`` is the remainder of the step (update, copies, hooks, Python). No profiler tracing: the
    wrappers add about a microsecond per call. Everything is restored on return."""
    import importlib

    acc: dict[str, float] = {}
    stack: list[float] = []

    def timed(fn: Callable[..., Any], label: Callable[[], str] | str) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            stack.append(0.0)
            try:
                result = fn(*args, **kwargs)
                if isinstance(result, tuple) and len(result) == 2 and callable(result[1]):  # a deferred finish
                    result = (result[0], timed(result[1], label))
                return result
            finally:
                elapsed = time.thread_time() - t0
                nested = stack.pop()
                name = label() if callable(label) else label
                acc[name] = acc.get(name, 0.0) + elapsed - nested
                if stack:
                    stack[-1] += elapsed
        return inner

    patched: list[tuple[Any, str, Any]] = []
    for target, attr, label in LIBRARY_STAGES:
        module, _, cls = target.partition(":")
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        if attr in vars(owner):
            patched.append((owner, attr, vars(owner)[attr]))
            setattr(owner, attr, timed(getattr(owner, attr), label))
    calls = [0]
    closure = candidate.closure

    def pass_label() -> str:
        return "first pass" if calls[0] == 1 else "second pass"

    def counted() -> Any:
        calls[0] += 1
        return closure()

    candidate.closure = timed(counted, pass_label)
    total = 0.0
    try:
        for _ in range(steps):
            calls[0] = 0
            t0 = time.thread_time()
            candidate.step()
            total += time.thread_time() - t0
    finally:
        candidate.closure = closure
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)
    out = {k: 1000.0 * v / steps for k, v in acc.items()}
    out["rest"] = 1000.0 * total / steps - sum(out.values())
    out["step"] = 1000.0 * total / steps
    return out


@dataclass
class FloorResult:
    rows: list[dict[str, Any]]
    rate: dict[str, float]
    workload: str


def run_floor(model: str, methods: Sequence[str], *, batch: int = 1000, device: str = "cpu", steps: int = 8,
              warmup: int = 2, repeats: int = 2, seed: int = 0, stages: bool = False,
              log: Callable[[str], None] = print) -> FloorResult:
    """Time every method's library step and its kernel plan interleaved; see the module docstring."""
    dev = torch.device(device)
    workload = Workload.autoencoder(model, batch)
    shapes = workload.shapes()
    acts = activations_of(workload.build_model(seed, torch.device("cpu")))
    methods = list(methods)
    if BASELINE not in methods:
        methods.insert(0, BASELINE)
    cands: dict[str, Any] = {}
    plans: dict[str, KernelPlan] = {}
    for name in methods:
        lib = make_candidate(name, workload, dev, seed)
        cands[name] = lib
        plans[name] = KernelPlan(lib.floor_spec(), shapes, batch, acts, device=dev, seed=seed)
        cands[f"{name}:kernels"] = KernelCandidate(plans[name])
    log(f"[{model} B={batch} {device}] warm-up: {warmup} step(s) x {len(cands)} candidates")
    for _ in range(warmup):
        for name, cand in cands.items():
            cand.step()
            synchronize(dev)
    for name in methods:
        cands[name].after_step()
    rate = gemm_rate(dev)
    log(f"  GEMM rate: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rate.items()) + " GFLOP/s")
    start = time.perf_counter()
    samples = run_interleaved(cands, repeats=repeats, rounds=steps, timer=make_timer(dev),
                              on_round=lambda r, i: log(f"  repeat {r + 1}/{repeats} done "
                                                        f"({time.perf_counter() - start:.0f} s)") if i == steps - 1 else None)
    rows = []
    for name in methods:
        lib = cands[name]
        spec = lib.floor_spec()
        measured = _amortized_ms(samples, name, lib.schedule)
        kernels = _amortized_ms(samples, f"{name}:kernels", plans[name].schedule)
        flops = step_floor(spec, shapes, batch)
        flop_ms = 1000.0 * flops.total / rate["best"]
        rows.append({
            "method": name, "label": METHODS[name].label, "floor_spec": repr(spec),
            "step_ms": measured.median, "step_ms_q25": measured.q25, "step_ms_q75": measured.q75,
            "kernel_ms": kernels.median, "kernel_ms_q25": kernels.q25, "kernel_ms_q75": kernels.q75,
            "flop_gflop": flops.total / 1e9, "flop_ms": flop_ms,
            "overhead_ms": measured.median - kernels.median,
            "overhead_frac": (measured.median - kernels.median) / kernels.median,
            "blas_ms": kernels.median - flop_ms,
            "step_x_adam": _weighted_ratio(samples, name, BASELINE, lib.schedule),
            "kernel_x_adam": _weighted_ratio(samples, f"{name}:kernels", f"{BASELINE}:kernels", plans[name].schedule),
            "components_ms": component_ms(plans[name]),
            "library_stages_ms": library_stages(lib, repeats) if stages else None,
            "stage_gflop": {k: v / 1e9 for k, v in plans[name].stage_flops.items()},  # counted, per step
        })
    return FloorResult(rows, rate, f"{model} batch {batch} {device}")


def format_rows(result: FloorResult) -> str:
    head = ("method", "step ms [IQR]", "kernels ms [IQR]", "FLOP floor ms", "overhead", "BLAS gap",
            "step x Adam", "kernels x Adam")
    lines = [head]
    for r in result.rows:
        lines.append((r["label"], f"{r['step_ms']:.1f} [{r['step_ms_q25']:.1f}-{r['step_ms_q75']:.1f}]",
                      f"{r['kernel_ms']:.1f} [{r['kernel_ms_q25']:.1f}-{r['kernel_ms_q75']:.1f}]",
                      f"{r['flop_ms']:.1f} ({r['flop_gflop']:.2f} GFLOP)",
                      f"{r['overhead_ms']:.1f} ms ({100 * r['overhead_frac']:.0f}%)",
                      f"{r['blas_ms']:.1f} ms", f"{r['step_x_adam']:.2f}", f"{r['kernel_x_adam']:.2f}"))
    widths = [max(len(str(line[c])) for line in lines) for c in range(len(head))]
    text = [f"{result.workload}; GEMM rate {result.rate['best'] / 1e9:.1f} GFLOP/s (best square mm)"]
    for j, line in enumerate(lines):
        text.append("  ".join(str(v).ljust(w) for v, w in zip(line, widths)))
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    text.append("  overhead = step - kernels (library: Python, small ops, checks, copies); BLAS gap = kernels - "
                "FLOP floor at the GEMM rate; x Adam: medians of per-round ratios")
    for r in result.rows:
        flops = r["stage_gflop"]
        comps = ", ".join(f"{k} {v:.1f}" + (f" ({1000.0 * flops[k] / v:.0f})" if flops.get(k) and v > 0 else "")
                          for k, v in sorted(r["components_ms"].items(), key=lambda kv: -kv[1]))
        text.append(f"  {r['label']} kernels by stage, ms (counted GFLOP/s): {comps}")
        if r.get("library_stages_ms"):
            lib = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["library_stages_ms"].items(), key=lambda kv: -kv[1])
                            if k != "step")
            text.append(f"  {r['label']} library step {r['library_stages_ms']['step']:.1f} ms by stage: {lib}")
    return "\n".join(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("mnist", "curves", "faces", "tiny"), default="curves")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--steps", type=int, default=8, help="timed rounds per repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=("wall", "thread"), default="wall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", action="store_true", help="also time the library's step by stage (library_stages)")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS or METHODS[m].peer_of is not None or m in ("hf", "sfn", "lm")]
    if unknown:
        raise SystemExit(f"unknown or unsupported methods {unknown}; choose from {list(DEFAULT_METHODS) + ['diagonal', 'kfac-mc']}")
    previous = timing.CPU_CLOCK
    set_cpu_clock(args.clock)
    try:
        result = run_floor(args.model, methods, batch=args.batch, device=args.device, steps=args.steps,
                           warmup=args.warmup, repeats=args.repeats, seed=args.seed, stages=args.stages)
    finally:
        set_cpu_clock(previous)
    text = format_rows(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_floor.txt").write_text(text + "\n")
        (args.out / "kernel_floor.json").write_text(json.dumps(
            {"workload": result.workload, "rate": result.rate, "rows": result.rows,
             "clock": args.clock, "threads": args.threads, "torch": torch.__version__}, indent=1))
        print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
