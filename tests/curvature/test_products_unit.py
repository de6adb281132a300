"""Unit tests of curvature/products.py's bookkeeping: conversions, errors, operators and ``as_matvec``.

The product formulas are checked against dense oracles in ``test_products.py`` and
``tests/convergence/test_hessian.py``; this file pins what those leave open (found by the mutation run
of the module, issue 17): which vectors an operator accepts and how it casts them, the dense and scipy
views, the double-backprop path for parameters whose gradient is constant or absent, the routing of
``HessianOperator``'s two methods and ``as_matvec``'s normalization. Oracles: dense matrices, hand
values and ``torch.func.hessian`` of a hand-written loss. The ``meta`` device (shapes only, no data) is
used where a test must tell "moved to the operator's device" from "left where it was" on a CPU-only
machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature.products import (
    CurvatureOperator,
    GGNOperator,
    HessianOperator,
    MatvecOperator,
    _forward_ad_unsupported,
    as_matvec,
    make_functional,
)

F64 = torch.float64
# a non-symmetric matrix: its columns and rows differ, so A e_j (columns) is told from e_jᵀ A (rows)
M = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 3.0, 4.0], [0.5, 0.0, -2.0]], dtype=F64)


class _Recorder:
    """``v -> M v`` that records the dtype and device of every vector it is given."""

    def __init__(self, matrix: torch.Tensor = M) -> None:
        self.matrix = matrix
        self.seen: list[tuple[torch.dtype, torch.device]] = []

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.seen.append((v.dtype, v.device))
        return self.matrix.to(v) @ v


def _mlp(device, dtype=F64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).to(device=device, dtype=dtype)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    y = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
    return model, x, y


def _tanh_loss(out, t):
    return ((torch.tanh(out) - t) ** 2).sum()


# ---------------------------------------------------------------------------------------- operators
def test_matvec_accepts_a_list_and_a_numpy_vector_and_casts_to_the_operator_dtype():
    rec = _Recorder()
    op = MatvecOperator(rec, 3)  # defaults: float64 on the CPU
    assert op.dtype == F64 and op.device == torch.device("cpu") and op.shape == (3, 3)
    expected = torch.tensor([5.0, 17.0, -5.5], dtype=F64)  # M [1, 2, 3] by hand
    torch.testing.assert_close(op.matvec([1.0, 2.0, 3.0]), expected, rtol=0, atol=0)
    torch.testing.assert_close(op.matvec(np.array([1, 2, 3])), expected, rtol=0, atol=0)
    torch.testing.assert_close(op(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)), expected, rtol=0, atol=0)
    torch.testing.assert_close(op @ torch.tensor([1.0, 2.0, 3.0], dtype=F64), expected, rtol=0, atol=0)
    # a tensor that requires grad is detached, never converted through numpy
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64, requires_grad=True)
    torch.testing.assert_close(op(w), expected, rtol=0, atol=0)
    assert rec.seen == [(F64, torch.device("cpu"))] * 5  # every vector reached the callable as float64


def test_matvec_rejects_a_vector_of_the_wrong_length_or_rank():
    op = MatvecOperator(_Recorder(), 3)
    with pytest.raises(ValueError, match="length n=3"):
        op.matvec(torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="length n=3"):
        op.matvec(torch.ones(3, 1, dtype=F64))


def test_matvec_moves_the_vector_to_the_operator_device():
    rec = _Recorder()
    op = MatvecOperator(rec, 3, dtype=torch.float32, device="meta")
    out = op.matvec(torch.ones(3, dtype=F64))
    assert rec.seen == [(torch.float32, torch.device("meta"))] and out.shape == (3,)


def test_matvec_operator_sizes():
    one = MatvecOperator(lambda v: 3.0 * v, 1)
    torch.testing.assert_close(one.to_dense(), torch.tensor([[3.0]], dtype=F64), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^n must be positive, got 0$"):
        MatvecOperator(lambda v: v, 0)


def test_to_dense_stacks_the_images_of_the_identity_columns():
    op = MatvecOperator(_Recorder(), 3)
    torch.testing.assert_close(op.to_dense(max_n=3), M, rtol=0, atol=0)  # n == max_n is allowed
    with pytest.raises(ValueError, match=r"^to_dense on n=3 > max_n=2; raise max_n if this is intended$"):
        op.to_dense(max_n=2)


def test_to_dense_refuses_more_than_4096_before_any_product():
    def never(v):
        raise AssertionError("to_dense must refuse before applying the operator")

    with pytest.raises(ValueError, match="max_n=4096"):
        MatvecOperator(never, 4097).to_dense()


def test_to_scipy_gives_float64_and_applies_nothing_until_asked():
    rec = _Recorder()
    op = MatvecOperator(rec, 3, dtype=torch.float32)
    lin = op.to_scipy()
    assert rec.seen == [] and lin.dtype == np.float64 and lin.shape == (3, 3)
    x = np.array([1.0, 2.0, 3.0])
    expected = np.array([5.0, 17.0, -5.5])
    for given in (x, x.reshape(3, 1), x.astype(np.longdouble)):  # vector, column, a dtype torch cannot read
        y = lin.matvec(given)
        assert y.dtype == np.float64
        np.testing.assert_array_equal(y.reshape(-1), expected)
    np.testing.assert_array_equal(lin.matmat(np.eye(3)), M.numpy())
    assert all(seen == (torch.float32, torch.device("cpu")) for seen in rec.seen)


# --------------------------------------------------------------------------------- FunctionalLoss
def test_functional_loss_errors():
    model, x, y = _mlp("cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^the model has no parameter with requires_grad=True$"):
        make_functional(model, _tanh_loss, x, y)
    model, x, y = _mlp("cpu")
    model[2].float()  # one float64 layer, one float32 layer
    with pytest.raises(ValueError, match=r"^all trainable parameters must share one dtype and device, got "):
        make_functional(model, _tanh_loss, x, y)
    model, x, y = _mlp("cpu")
    fl = make_functional(model, _tanh_loss, x, y)
    assert fl.split_hvp is False
    with pytest.raises(TypeError, match=r"^expected a torch.Tensor, got list$"):
        fl.check_flat([0.0] * fl.n)
    with pytest.raises(ValueError, match=r"^expected 4 tensors \(one per trainable parameter\), got 3$"):
        fl.flatten([p.detach() for p in model.parameters()][:3])
    wrong = [p.detach() for p in model.parameters()]
    wrong[0] = wrong[0].t()
    with pytest.raises(ValueError, match=r"^tensor for parameter '0.weight' has shape \(3, 2\), expected \(2, 3\)$"):
        fl.flatten(wrong)


def test_products_cast_a_float32_vector_to_the_model_dtype(device):
    model, x, y = _mlp(device)
    fl = make_functional(model, _tanh_loss, x, y)
    v32 = torch.linspace(-1.0, 1.0, fl.n, dtype=torch.float32, device=device)
    v64 = v32.to(F64)
    for product in (fl.hvp_forward_over_reverse, fl.hvp_double_backprop, fl.ggn_vector_product,
                    fl.prepared_product("ggn"), fl.prepared_product("hessian")):
        out = product(v32)
        assert out.dtype == F64
        torch.testing.assert_close(out, product(v64), rtol=0, atol=0)


def test_products_move_a_cpu_vector_to_the_model_device():
    model, x, y = _mlp("meta")
    fl = make_functional(model, _tanh_loss, x, y)
    v = torch.ones(fl.n, dtype=torch.float32)
    for product in (fl.hvp_forward_over_reverse, fl.hvp_double_backprop, fl.ggn_vector_product):
        out = product(v)
        assert out.device == torch.device("meta") and out.dtype == F64 and out.shape == (fl.n,)


class _ConstantUnusedUsed(nn.Module):
    """Parameters in this order: ``c`` enters the loss linearly (its gradient is a constant), ``unused``
    never enters, ``w`` enters nonlinearly; the output is ``(tanh(x w), c)``."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor([0.3, -0.2], dtype=F64))
        self.unused = nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
        self.w = nn.Parameter(torch.tensor([0.4, -0.7, 0.2], dtype=F64))

    def forward(self, x):
        return torch.tanh(x @ self.w), self.c


K = torch.tensor([2.0, -1.0], dtype=F64)


def _odd_loss(out, t):
    z, c = out
    return ((z - t) ** 2).sum() + (K.to(c) * c).sum()


def test_double_backprop_with_a_constant_gradient_first_and_an_unused_parameter(device):
    """The c and unused blocks of H are zero; the w block is the Hessian of the hand-written loss in w."""
    model = _ConstantUnusedUsed()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    t = torch.randn(6, generator=torch.Generator().manual_seed(4), dtype=F64)
    h_w = torch.func.hessian(lambda w: ((torch.tanh(x @ w) - t) ** 2).sum())(model.w.detach())  # on the CPU
    dense = torch.zeros(8, 8, dtype=F64)
    dense[5:, 5:] = h_w
    model.to(device)
    x, t = x.to(device), t.to(device)
    fl = make_functional(model, _odd_loss, x, t)
    assert fl.names == ("c", "unused", "w") and fl.n == 8
    v = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.7, -0.3, 1.1], dtype=F64)
    torch.testing.assert_close(fl.hvp_double_backprop(v.to(device)).cpu(), dense @ v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fl.hvp_forward_over_reverse(v.to(device)).cpu(), dense @ v, rtol=1e-12, atol=1e-14)
    hv = HessianOperator(model, _odd_loss, x, t, method="double_backprop").to_dense()
    torch.testing.assert_close(hv.cpu(), dense, rtol=1e-12, atol=1e-14)


def test_double_backprop_of_a_loss_linear_in_every_parameter_is_zero():
    """Every gradient is constant (no graph to differentiate): H v = 0, a float64 vector of length n."""
    for device in ("cpu", "meta"):
        model = nn.Linear(3, 2).to(device=device, dtype=F64)
        x = torch.ones(4, 3, dtype=F64, device=device)
        fl = make_functional(model, lambda out, t: out.sum(), x, None)
        out = fl.hvp_double_backprop(torch.ones(fl.n, dtype=torch.float32))
        assert out.shape == (8,) and out.dtype == F64 and out.device == torch.device(device)
        if device == "cpu":
            assert torch.equal(out, torch.zeros(8, dtype=F64))


def test_forward_ad_unsupported_recognizes_only_the_forward_mode_messages():
    assert _forward_ad_unsupported(RuntimeError("ZeroTensors are immutable. Please use ..."))
    assert _forward_ad_unsupported(NotImplementedError("Trying to use forward AD with huber_loss that does not support it"))
    assert _forward_ad_unsupported(RuntimeError("this op has no forward-mode derivative"))
    assert not _forward_ad_unsupported(RuntimeError("mat1 and mat2 shapes cannot be multiplied (5x3 and 2x2)"))


def test_hessian_operator_routes_its_two_methods(device):
    """Only forward-over-reverse tries ``jvp`` and records the split form for ``F.mse_loss``; both give H v."""
    model, x, y = _mlp(device)
    v = torch.linspace(-1.0, 1.0, 14, dtype=F64, device=device)  # n = 3*2 + 2 + 2*2 + 2
    fwd = HessianOperator(model, F.mse_loss, x, y)
    bwd = HessianOperator(model, F.mse_loss, x, y, method="double_backprop")
    assert (fwd.method, bwd.method) == ("forward_over_reverse", "double_backprop")
    torch.testing.assert_close(fwd.matvec(v), bwd.matvec(v), rtol=1e-12, atol=1e-14)
    assert fwd.functional.split_hvp is True and bwd.functional.split_hvp is False
    with pytest.raises(ValueError, match=r"^unknown method 'exact'; use 'forward_over_reverse' or 'double_backprop'$"):
        HessianOperator(model, F.mse_loss, x, y, method="exact")


def test_operators_take_the_model_dtype_and_device(device):
    model, x, y = _mlp(device, dtype=torch.float32)
    for op in (HessianOperator(model, _tanh_loss, x, y), GGNOperator(model, _tanh_loss, x, y)):
        assert (op.n, op.dtype, op.device.type) == (14, torch.float32, torch.device(device).type)


# ------------------------------------------------------------------------------------- as_matvec
def test_as_matvec_returns_an_operator_unchanged_when_nothing_differs():
    op = MatvecOperator(_Recorder(), 3)
    assert as_matvec(op, 3) is op
    assert as_matvec(op, 3, dtype=F64) is op
    assert as_matvec(op, 3, device="cpu") is op
    assert as_matvec(op, 3, dtype=F64, device=torch.device("cpu")) is op
    with pytest.raises(ValueError, match=r"^operator has n=3, but n=4 was given$"):
        as_matvec(op, 4)


def test_as_matvec_rewraps_an_operator_for_another_dtype_or_device():
    op = MatvecOperator(_Recorder(), 3)
    v = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    single = as_matvec(op, 3, dtype=torch.float32)
    assert isinstance(single, CurvatureOperator) and single is not op
    assert (single.n, single.dtype, single.device) == (3, torch.float32, torch.device("cpu"))
    # the wrapper casts to float32, the wrapped operator back to float64
    torch.testing.assert_close(single.matvec(v), M @ v.float().double(), rtol=0, atol=0)
    moved = as_matvec(op, 3, device="meta")
    assert (moved.n, moved.dtype, moved.device) == (3, F64, torch.device("meta"))


def test_as_matvec_wraps_a_callable_with_its_own_or_the_default_dtype_and_device():
    rec = _Recorder()
    plain = as_matvec(rec, 3)
    assert isinstance(plain, MatvecOperator) and (plain.n, plain.dtype, plain.device) == (3, F64, torch.device("cpu"))
    torch.testing.assert_close(plain.matvec(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([5.0, 17.0, -5.5], dtype=F64),
                               rtol=0, atol=0)
    given = as_matvec(rec, 3, dtype=torch.float32, device="meta")
    assert (given.dtype, given.device) == (torch.float32, torch.device("meta"))

    class HasMatvec:
        """Not callable itself: as_matvec must use its ``matvec``; carries its own dtype and device."""

        dtype = torch.float32
        device = "meta"

        def __init__(self) -> None:
            self.calls = 0

        def matvec(self, v):
            self.calls += 1
            return 2.0 * v

    obj = HasMatvec()
    wrapped = as_matvec(obj, 3)
    assert (wrapped.n, wrapped.dtype, wrapped.device) == (3, torch.float32, torch.device("meta"))
    out = wrapped.matvec(torch.ones(3, dtype=F64))
    assert obj.calls == 1 and out.device == torch.device("meta") and out.dtype == torch.float32
    explicit = as_matvec(obj, 3, dtype=F64, device="cpu")
    assert (explicit.dtype, explicit.device) == (F64, torch.device("cpu"))
    torch.testing.assert_close(explicit.matvec(torch.ones(3)), torch.full((3,), 2.0, dtype=F64), rtol=0, atol=0)
