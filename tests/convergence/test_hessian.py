"""Hessian-/GGN-vector products against independent oracles (theory notes §4.1, §4.7; P23, P24)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from convergence.hessian import (
    GGNOperator,
    HessianOperator,
    MatvecOperator,
    ggn_vector_product,
    hvp_double_backprop,
    hvp_forward_over_reverse,
    make_functional,
)

F64 = torch.float64
EPS = torch.finfo(F64).eps


# ----------------------------------------------------------------------------------- problems
def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(*shape, seed: int, device) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(device)


def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f = ||out - y||^2 / (2N)."""
    return 0.5 * ((out - y) ** 2).sum() / out.shape[0]


def mlp_problem(device, loss: str = "mse"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device=device, dtype=F64)
    x = _randn(7, 3, seed=1, device=device)
    if loss == "mse":
        y = _randn(7, 2, seed=2, device=device)
        return model, half_mse, x, y
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0], device=device)
    return model, nn.functional.cross_entropy, x, y


def lsq_problem(device, n_samples: int = 12, dim: int = 5):
    model = nn.Linear(dim, 1, bias=False).to(device=device, dtype=F64)
    with torch.no_grad():
        model.weight.copy_(_randn(1, dim, seed=3, device=device))
    x = _randn(n_samples, dim, seed=4, device=device)
    y = _randn(n_samples, 1, seed=5, device=device)
    return model, half_mse, x, y


def flat_oracle(model, loss_fn, x, y):
    """An independent f(theta) on a flat vector (own splitting, own functional_call)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def f(t):
        out, i = {}, 0
        for name, p in zip(names, params):
            out[name] = t[i : i + p.numel()].view_as(p)
            i += p.numel()
        return loss_fn(functional_call(model, out, (x,)), y)

    return f, theta


PROBLEMS = {"mlp_tanh": mlp_problem, "least_squares": lsq_problem}


# ---------------------------------------------------------------------------------------- P23
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_p23_hvp_agreement(device, problem):
    model, loss_fn, x, y = PROBLEMS[problem](device)
    f, theta = flat_oracle(model, loss_fn, x, y)
    n = theta.numel()
    dense = torch.func.hessian(f)(theta)
    gradf = torch.func.grad(f)
    for seed in range(3):
        v = _randn(n, seed=10 + seed, device=device) * 10.0 ** (seed - 1)
        hv_oracle = dense @ v
        hv_for = hvp_forward_over_reverse(model, loss_fn, x, y, v)
        hv_db = hvp_double_backprop(model, loss_fn, x, y, v)
        scale = torch.linalg.matrix_norm(dense, 2) * torch.linalg.vector_norm(v)
        assert hv_for.shape == (n,) and hv_for.device.type == device.type
        assert torch.linalg.vector_norm(hv_for - hv_oracle) <= 1e-12 * scale
        assert torch.linalg.vector_norm(hv_db - hv_oracle) <= 1e-12 * scale
        # central finite differences of the gradient, h = eps^(1/3) ||x|| / ||v||: error O(h^2)
        h = EPS ** (1 / 3) * max(float(torch.linalg.vector_norm(theta)), 1.0) / float(torch.linalg.vector_norm(v))
        fd = (gradf(theta + h * v) - gradf(theta - h * v)) / (2 * h)
        assert torch.linalg.vector_norm(fd - hv_oracle) <= 1e-8 * scale
    # symmetry u^T (H v) = v^T (H u)
    u, v = _randn(n, seed=20, device=device), _randn(n, seed=21, device=device)
    uhv = torch.dot(u, hvp_forward_over_reverse(model, loss_fn, x, y, v))
    vhu = torch.dot(v, hvp_forward_over_reverse(model, loss_fn, x, y, u))
    norm_h = torch.linalg.matrix_norm(dense, 2)
    assert abs(float(uhv - vhu)) <= 1e-12 * float(norm_h * u.norm() * v.norm())


def test_fd_oracle_detects_a_wrong_product(device):
    """Negative control: the FD tolerance used above is far tighter than a plausible bug (H v vs G v)."""
    model, loss_fn, x, y = mlp_problem(device)
    f, theta = flat_oracle(model, loss_fn, x, y)
    v = _randn(theta.numel(), seed=11, device=device)
    gradf = torch.func.grad(f)
    h = EPS ** (1 / 3) * float(theta.norm()) / float(v.norm())
    fd = (gradf(theta + h * v) - gradf(theta - h * v)) / (2 * h)
    gv = ggn_vector_product(model, loss_fn, x, y, v)
    scale = float(torch.linalg.matrix_norm(torch.func.hessian(f)(theta), 2) * v.norm())
    assert float(torch.linalg.vector_norm(fd - gv)) > 1e-3 * scale


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-4, 4))
def test_p23_fd_any_vector_scale(device, seed, log_scale):
    """FD with h ∝ 1/||v|| agrees with forward-over-reverse for ||v|| over 8 decades."""
    model, loss_fn, x, y = mlp_problem(device)
    f, theta = flat_oracle(model, loss_fn, x, y)
    v = _randn(theta.numel(), seed=seed, device=device) * 10.0**log_scale
    hv = hvp_forward_over_reverse(model, loss_fn, x, y, v)
    gradf = torch.func.grad(f)
    h = EPS ** (1 / 3) * float(theta.norm()) / float(v.norm())
    fd = (gradf(theta + h * v) - gradf(theta - h * v)) / (2 * h)
    assert float((fd - hv).norm()) <= 1e-7 * float(hv.norm() + v.norm())


def test_list_and_dict_forms_match_flat(device):
    model, loss_fn, x, y = mlp_problem(device, loss="ce")
    fl = make_functional(model, loss_fn, x, y)
    v = _randn(fl.n, seed=7, device=device)
    v_list = list(fl.unflatten(v).values())
    for fn in (hvp_forward_over_reverse, hvp_double_backprop, ggn_vector_product):
        flat = fn(model, loss_fn, x, y, v)
        as_list = fn(model, loss_fn, x, y, v_list)
        as_dict = fn(model, loss_fn, x, y, fl.unflatten(v))
        assert isinstance(as_list, list)
        assert [t.shape for t in as_list] == [p.shape for p in model.parameters()]
        torch.testing.assert_close(torch.cat([t.reshape(-1) for t in as_list]), flat, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(fl.flatten(as_dict), flat, rtol=1e-13, atol=1e-15)
    assert torch.equal(fl.theta, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(fl.loss_flat(fl.theta), loss_fn(model(x), y), rtol=0, atol=0)


def test_mismatched_vector_raises(device):
    model, loss_fn, x, y = mlp_problem(device)
    n = make_functional(model, loss_fn, x, y).n
    bad = torch.zeros(n + 1, dtype=F64, device=device)
    for fn in (hvp_forward_over_reverse, hvp_double_backprop, ggn_vector_product):
        with pytest.raises(ValueError, match="length"):
            fn(model, loss_fn, x, y, bad)
    with pytest.raises(ValueError):
        hvp_forward_over_reverse(model, loss_fn, x, y, [torch.zeros(2, device=device)])
    for op in (HessianOperator(model, loss_fn, x, y), GGNOperator(model, loss_fn, x, y)):
        with pytest.raises(ValueError, match="length"):
            op.matvec(torch.zeros(n - 1, dtype=F64, device=device))
        with pytest.raises(ValueError):
            op.matvec(torch.zeros(n, 1, dtype=F64, device=device))


def test_operators_dense_scipy_and_metadata(device):
    model, loss_fn, x, y = mlp_problem(device, loss="ce")
    f, theta = flat_oracle(model, loss_fn, x, y)
    dense = torch.func.hessian(f)(theta)
    for method in ("forward_over_reverse", "double_backprop"):
        op = HessianOperator(model, loss_fn, x, y, method=method)
        assert op.n == theta.numel() and op.shape == (op.n, op.n)
        assert op.dtype == F64 and op.device.type == device.type
        torch.testing.assert_close(op.to_dense(), dense, rtol=1e-12, atol=1e-13)
        lin = op.to_scipy()
        assert lin.shape == (op.n, op.n) and lin.dtype == np.float64
        v = np.random.default_rng(0).standard_normal(op.n)
        np.testing.assert_allclose(lin.matvec(v), dense.cpu().numpy() @ v, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(lin.rmatvec(v), dense.cpu().numpy() @ v, rtol=1e-11, atol=1e-13)
    wrapped = MatvecOperator(lambda v: 2.0 * v, 3, device=device)
    torch.testing.assert_close(wrapped.to_dense(), 2.0 * torch.eye(3, dtype=F64, device=device))
    with pytest.raises(ValueError):
        HessianOperator(model, loss_fn, x, y, method="finite_differences")


def test_frozen_parameters_are_constants(device):
    model, loss_fn, x, y = mlp_problem(device)
    model[0].weight.requires_grad_(False)
    fl = make_functional(model, loss_fn, x, y)
    assert fl.names == ("0.bias", "2.weight", "2.bias") and fl.n == 4 + 8 + 2
    f, theta = flat_oracle(model, loss_fn, x, y)
    dense = torch.func.hessian(f)(theta)
    v = _randn(fl.n, seed=3, device=device)
    torch.testing.assert_close(hvp_forward_over_reverse(model, loss_fn, x, y, v), dense @ v, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(hvp_double_backprop(model, loss_fn, x, y, v), dense @ v, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------- analytic oracles §4.7
def test_least_squares_oracle(device):
    model, loss_fn, x, y = lsq_problem(device)
    n_samples = x.shape[0]
    h_true = x.T @ x / n_samples
    for op in (HessianOperator(model, loss_fn, x, y), HessianOperator(model, loss_fn, x, y, method="double_backprop"),
               GGNOperator(model, loss_fn, x, y)):
        dense = op.to_dense()
        torch.testing.assert_close(dense, h_true, rtol=1e-13, atol=1e-14)
        assert math.isclose(float(torch.trace(dense)), float((x**2).sum()) / n_samples, rel_tol=1e-13)


def test_logistic_regression_oracle(device):
    dim, n_samples = 4, 15
    model = nn.Linear(dim, 1, bias=False).to(device=device, dtype=F64)
    with torch.no_grad():
        model.weight.copy_(_randn(1, dim, seed=6, device=device))
    x = _randn(n_samples, dim, seed=7, device=device)
    y = (torch.rand(n_samples, 1, generator=_gen(8), dtype=F64) > 0.5).to(device=device, dtype=F64)
    loss_fn = nn.functional.binary_cross_entropy_with_logits
    p = torch.sigmoid(x @ model.weight.detach().T).reshape(-1)
    h_true = (x * (p * (1 - p))[:, None]).T @ x / n_samples
    torch.testing.assert_close(HessianOperator(model, loss_fn, x, y).to_dense(), h_true, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(GGNOperator(model, loss_fn, x, y).to_dense(), h_true, rtol=1e-12, atol=1e-14)


def softmax_problem(device, dim: int = 4, classes: int = 3, n_samples: int = 10):
    model = nn.Linear(dim, classes, bias=False).to(device=device, dtype=F64)
    with torch.no_grad():
        model.weight.copy_(_randn(classes, dim, seed=9, device=device))
    x = _randn(n_samples, dim, seed=10, device=device)
    y = torch.randint(0, classes, (n_samples,), generator=_gen(11)).to(device)
    return model, nn.functional.cross_entropy, x, y


def test_softmax_regression_oracle_and_null_space(device):
    dim, classes = 4, 3
    model, loss_fn, x, y = softmax_problem(device, dim, classes)
    n_samples = x.shape[0]
    probs = torch.softmax(x @ model.weight.detach().T, dim=1)
    # column-major oracle: H_c = (1/N) sum_i (x_i x_i^T) ⊗ (diag p_i - p_i p_i^T) for vec_c(W)
    h_c = sum(
        torch.kron(torch.outer(x[i], x[i]), torch.diag(probs[i]) - torch.outer(probs[i], probs[i]))
        for i in range(n_samples)
    ) / n_samples
    # torch flattens W (classes x dim) row-major: flat index c*dim + j  <->  vec_c index j*classes + c
    perm = torch.tensor([j * classes + c for c in range(classes) for j in range(dim)], device=device)
    for op in (HessianOperator(model, loss_fn, x, y), GGNOperator(model, loss_fn, x, y)):
        dense_r = op.to_dense()
        torch.testing.assert_close(dense_r, h_c[perm][:, perm], rtol=1e-12, atol=1e-14)
        # null space x ⊗ 1: exactly `dim` zero eigenvalues, the rest positive
        a = _randn(dim, seed=12, device=device)
        null_c = torch.kron(a, torch.ones(classes, dtype=F64, device=device))
        assert float(op.matvec(null_c[perm]).norm()) <= 1e-14 * float(null_c.norm())
        eig = torch.linalg.eigvalsh(dense_r)
        top = float(eig[-1])
        assert (eig.abs() <= 1e-13 * top).sum() == dim
        assert float(eig[dim]) > 1e-4 * top


# ---------------------------------------------------------------------------------------- P24
def ggn_oracle(model, loss_fn, x, y):
    """G = J^T H_ell J with J = d out/d theta (jacrev) and H_ell = d^2 loss/d out^2 (hessian), dense."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def out_flat(t):
        d, i = {}, 0
        for name, p in zip(names, params):
            d[name] = t[i : i + p.numel()].view_as(p)
            i += p.numel()
        return functional_call(model, d, (x,)).reshape(-1)

    out = out_flat(theta)
    jac = torch.func.jacrev(out_flat)(theta)
    out_shape = functional_call(model, {n: p.detach() for n, p in zip(names, params)}, (x,)).shape
    h_ell = torch.func.hessian(lambda o: loss_fn(o.reshape(out_shape), y))(out)
    return jac.T @ h_ell @ jac


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_p24_ggn_matches_oracle_and_is_psd(device, loss):
    model, loss_fn, x, y = mlp_problem(device, loss=loss)
    op = GGNOperator(model, loss_fn, x, y)
    dense = op.to_dense()
    torch.testing.assert_close(dense, ggn_oracle(model, loss_fn, x, y), rtol=1e-11, atol=1e-13)
    eig = torch.linalg.eigvalsh(0.5 * (dense + dense.T))
    norm_g = float(eig.abs().max())
    tau = 100 * op.n * EPS
    assert float(eig[0]) >= -tau * norm_g
    for seed in range(5):
        v = _randn(op.n, seed=30 + seed, device=device)
        assert float(torch.dot(v, op.matvec(v))) >= -tau * norm_g * float(v.norm()) ** 2
    # negative control: this network's Hessian is indefinite and differs from the GGN
    hess = HessianOperator(model, loss_fn, x, y).to_dense()
    heig = torch.linalg.eigvalsh(hess)
    assert float(heig[0]) < -1e-4 * float(heig.abs().max())
    assert float((hess - dense).norm()) > 1e-3 * float(dense.norm())


class RandomFeatures(nn.Module):
    """out = W tanh(Phi x) + b: nonlinear in x but linear in the trainable (W, b); Phi is frozen."""

    def __init__(self, dim: int, width: int, classes: int) -> None:
        super().__init__()
        self.phi = nn.Parameter(torch.randn(width, dim), requires_grad=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.phi.T))


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_p24_ggn_equals_hessian_for_linear_in_parameters(device, loss):
    torch.manual_seed(1)
    model = RandomFeatures(3, 5, 4).to(device=device, dtype=F64)
    x = _randn(9, 3, seed=40, device=device)
    if loss == "mse":
        loss_fn, y = half_mse, _randn(9, 4, seed=41, device=device)
    else:
        loss_fn, y = nn.functional.cross_entropy, torch.randint(0, 4, (9,), generator=_gen(42)).to(device)
    g = GGNOperator(model, loss_fn, x, y)
    h = HessianOperator(model, loss_fn, x, y)
    assert g.n == 5 * 4 + 4
    torch.testing.assert_close(g.to_dense(), h.to_dense(), rtol=1e-12, atol=1e-14)
