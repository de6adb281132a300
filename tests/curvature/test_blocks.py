"""Curvature blocks against exact float64 oracles on tiny layers (P15, P17, P18, orientation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from curvature.adapters import Conv2dAdapter, LinearAdapter
from curvature.blocks import DiagonalBlock, KroneckerBlock, a_statistic, g_statistic, vec_c
from curvature.capture import LayerCapture
from curvature.damping import FactoredPi, Tikhonov
from curvature.factors import BFGSFactor, EMACovarianceFactor, HessianActionFactor
from curvature.inverter import BatchedInverter
from curvature.pair_damping import DoubleDamping

D = torch.float64


def _capture_linear(lin, x, loss_fn, reduction="mean"):
    adapter = LinearAdapter(lin)
    cap = LayerCapture({"l": adapter}, reduction)
    cap.set(a=True, h=True, g=True)
    lin.zero_grad()
    loss_fn(lin(x)).backward()
    cap.remove()
    return adapter, cap.records["l"]


def _loss_of_weight_matrix(lin, x, loss_fn):
    """Loss as a function of vec_c([W | b]) (column-major), for torch.func.hessian."""
    d_out, d_in = lin.weight.shape

    def f(theta):
        mat = theta.reshape(d_in + 1, d_out).T
        params = {"weight": mat[:, :-1].contiguous(), "bias": mat[:, -1].contiguous()}
        return loss_fn(functional_call(lin, params, (x,)))

    return f, vec_c(LinearAdapter(lin).weight_matrix())


def test_p17_single_example_kfac_block_is_exact_fisher_and_hessian(device):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).to(D).to(device)
    x = torch.randn(1, 3, dtype=D, device=device)
    target = torch.randn(1, 2, dtype=D, device=device)

    def loss_fn(out):  # softplus-type loss with a non-trivial Hessian in h
        return torch.nn.functional.softplus(out - target).pow(2).sum()

    adapter, rec = _capture_linear(lin, x, loss_fn)
    A, G = a_statistic(rec, adapter), g_statistic(rec)
    grad = vec_c(adapter.grad_matrix())
    torch.testing.assert_close(torch.kron(A, G), torch.outer(grad, grad))  # empirical Fisher block
    f, theta = _loss_of_weight_matrix(lin, x, loss_fn)
    h = lin(x).detach()[0]
    d2h = hessian(lambda hh: torch.nn.functional.softplus(hh - target[0]).pow(2).sum())(h)
    abar = torch.cat([x[0], torch.ones(1, dtype=D, device=device)])
    torch.testing.assert_close(hessian(f)(theta), torch.kron(torch.outer(abar, abar), d2h.contiguous()))


def test_p17_negative_control_batch_average_is_not_kronecker(device):
    torch.manual_seed(1)
    lin = nn.Linear(3, 2).to(D).to(device)
    x = torch.randn(5, 3, dtype=D, device=device)
    adapter, rec = _capture_linear(lin, x, lambda out: (out.sin() ** 2).sum(1).mean())
    a, g = rec.a_rows, rec.g_rows
    exact = sum(torch.kron(torch.outer(a[i], a[i]), torch.outer(g[i], g[i])) for i in range(5)) / 5
    kfac = torch.kron(a_statistic(rec, adapter), g_statistic(rec))
    assert (exact - kfac).norm() > 1e-3 * exact.norm()


@pytest.mark.parametrize("n", [1, 4, 9])
def test_p18_linear_mse_ggn_is_abar_kron_identity(device, n):
    torch.manual_seed(n)
    lin = nn.Linear(4, 3).to(D).to(device)
    x = torch.randn(n, 4, dtype=D, device=device)
    y = torch.randn(n, 3, dtype=D, device=device)

    def loss_fn(out):
        return 0.5 * ((out - y) ** 2).sum(1).mean()

    adapter, rec = _capture_linear(lin, x, loss_fn)
    f, theta = _loss_of_weight_matrix(lin, x, loss_fn)
    eye = torch.eye(3, dtype=D, device=device)
    torch.testing.assert_close(hessian(f)(theta), torch.kron(a_statistic(rec, adapter), eye))


def _kfac_block(adapter, device, dtype=D):
    kw = {"dtype": dtype, "device": device}
    return KroneckerBlock("l", adapter, EMACovarianceFactor(adapter.a_dim, 0.9, **kw),
                          EMACovarianceFactor(adapter.g_dim, 0.9, **kw))


@pytest.mark.parametrize("policy", [Tikhonov(0.3), FactoredPi(0.3)])
def test_kfac_block_applies_damped_kronecker_inverse(device, policy):
    torch.manual_seed(3)
    lin = nn.Linear(4, 3).to(D).to(device)
    x = torch.randn(8, 4, dtype=D, device=device)
    adapter, rec = _capture_linear(lin, x, lambda out: (out.tanh() ** 2).sum(1).mean())
    block = _kfac_block(adapter, device)
    grad = adapter.grad_matrix()
    block.update_statistics(rec, grad)
    inverter = BatchedInverter()
    block.request_inverses(inverter, policy)
    inverter.run()
    A, G = a_statistic(rec, adapter), g_statistic(rec)
    lam_a, lam_g = policy.factor_damping(A, G)
    dense = torch.kron(torch.linalg.inv(A + lam_a * torch.eye(5, dtype=D, device=device)),
                       torch.linalg.inv(G + lam_g * torch.eye(3, dtype=D, device=device)))
    torch.testing.assert_close(block.to_dense(), dense)
    # orientation (P3): P(M) = H_g M H_a equals the dense Kronecker solve on vec_c(M)
    direction = block.precondition(grad)
    torch.testing.assert_close(vec_c(direction), dense @ vec_c(grad))
    lo, hi = block.spectrum_bounds()
    ev = torch.linalg.eigvalsh(dense)
    assert lo == pytest.approx(float(ev[0]), rel=1e-9) and hi == pytest.approx(float(ev[-1]), rel=1e-9)
    # quadratic model: vec(δ)ᵀ (A ⊗ G) vec(δ)
    delta = torch.randn_like(grad)
    torch.testing.assert_close(block.curvature_quadratic(delta), vec_c(delta) @ torch.kron(A, G) @ vec_c(delta))


def _per_sample_grads(module, x, per_sample_loss):
    grads = []
    for i in range(x.shape[0]):
        module.zero_grad()
        per_sample_loss(module(x[i : i + 1])).backward()
        adapter = LinearAdapter(module) if isinstance(module, nn.Linear) else Conv2dAdapter(module)
        grads.append(adapter.grad_matrix().clone())
    module.zero_grad()
    return torch.stack(grads)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_diagonal_block_is_exact_empirical_fisher_diagonal(device, layer):
    torch.manual_seed(4)
    if layer == "linear":
        module = nn.Linear(4, 3).to(D).to(device)
        x = torch.randn(6, 4, dtype=D, device=device)
        adapter = LinearAdapter(module)
    else:
        module = nn.Conv2d(2, 3, 2).to(D).to(device)
        x = torch.randn(5, 2, 4, 4, dtype=D, device=device)
        adapter = Conv2dAdapter(module)

    def per_sample_loss(out):
        return (out.sin() ** 2).sum()

    per_sample = _per_sample_grads(module, x, per_sample_loss)
    cap = LayerCapture({"l": adapter}, "mean")
    cap.set(a=True, g=True)
    (module(x).sin() ** 2).flatten(1).sum(1).mean().backward()  # one batched pass, mean of per-sample losses
    rec = cap.records["l"]
    block = DiagonalBlock("l", adapter, decay=0.9, power=1.0, dtype=D, device=device)
    block.update_statistics(rec, adapter.grad_matrix())
    torch.testing.assert_close(block.v, (per_sample**2).mean(0))
    block.request_inverses(BatchedInverter(), Tikhonov(0.1))
    torch.testing.assert_close(block.to_dense(), torch.diag(vec_c(1.0 / ((per_sample**2).mean(0) + 0.1))))
    g = adapter.grad_matrix()
    torch.testing.assert_close(vec_c(block.precondition(g)), block.to_dense() @ vec_c(g))


def _trained_kbfgs_block(device, dtype=D):
    torch.manual_seed(5)
    lin = nn.Linear(3, 4).to(dtype).to(device)
    adapter = LinearAdapter(lin)
    kw = {"dtype": dtype, "device": device}
    block = KroneckerBlock("l", adapter, HessianActionFactor(4, 0.5, **kw),
                           BFGSFactor(4, DoubleDamping(0.2, 0.5), 0.9, **kw), kind="kbfgs")
    for _ in range(6):
        x = torch.randn(10, 3, dtype=dtype, device=device)
        adapter_rec = _capture_linear(lin, x, lambda out: (out.tanh() ** 2).sum(1).mean())[1]
        block.update_statistics(adapter_rec, adapter.grad_matrix())
        inv = BatchedInverter()
        block.request_inverses(inv, Tikhonov(0.25))
        inv.run()
        after = _capture_linear(lin, x + 0.1, lambda out: (out.tanh() ** 2).sum(1).mean())[1]
        block.update_after_step(adapter_rec, after)
    return block


def _block_ready_to_precondition(make: str, device):
    """A KFAC, K-BFGS or diagonal block with statistics and inverses from a real tiny layer."""
    if make == "kbfgs":
        return _trained_kbfgs_block(device)
    lin = nn.Linear(3, 4).to(D).to(device)
    adapter, rec = _capture_linear(lin, torch.randn(7, 3, dtype=D, device=device),
                                   lambda out: (out.cos() ** 2).sum(1).mean())
    block = _kfac_block(adapter, device) if make == "kfac" else DiagonalBlock("l", adapter, dtype=D, device=device)
    block.update_statistics(rec, adapter.grad_matrix())
    inverter = BatchedInverter()
    block.request_inverses(inverter, Tikhonov(0.05))
    inverter.run()
    return block


@pytest.mark.parametrize("make", ["kfac", "kbfgs", "diagonal"])
def test_p15_every_block_gives_a_descent_direction_within_its_spectrum(device, make):
    torch.manual_seed(6)
    block = _block_ready_to_precondition(make, device)
    lo, hi = block.spectrum_bounds()
    ev = torch.linalg.eigvalsh(block.to_dense())
    assert lo > 0
    assert lo == pytest.approx(float(ev[0]), rel=1e-8, abs=1e-12) and hi == pytest.approx(float(ev[-1]), rel=1e-8)
    for _ in range(20):
        g = torch.randn(block.shape, dtype=D, device=device)
        pg = block.precondition(g)
        assert float((g * pg).sum()) >= lo * float((g * g).sum()) * (1 - 1e-10)
        assert float(pg.norm()) <= hi * float(g.norm()) * (1 + 1e-10)


def test_kronecker_block_rejects_mismatched_factor_sizes():
    adapter = LinearAdapter(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="do not match"):
        KroneckerBlock("l", adapter, EMACovarianceFactor(3), EMACovarianceFactor(2))


def test_block_state_dict_round_trip(device):
    block = _trained_kbfgs_block(device)
    clone = KroneckerBlock("l", block.adapter, HessianActionFactor(4, 0.5, dtype=D, device=device),
                           BFGSFactor(4, DoubleDamping(0.2, 0.5), 0.9, dtype=D, device=device))
    clone.load_state_dict(block.state_dict())
    assert torch.equal(clone.to_dense(), block.to_dense())
    assert clone.diagnostics() == block.diagnostics()


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-4, 4), make=st.sampled_from(["kfac", "kbfgs", "diagonal"]))
def test_p15_property_descent_direction_for_any_gradient(device, seed, log_scale, make):
    """P15 for ANY gradient (hypothesis): gᵀPg ≥ λmin‖g‖² > 0 and ‖Pg‖ ≤ λmax‖g‖."""
    torch.manual_seed(seed % 1000)
    block = _block_ready_to_precondition(make, device)
    lo, hi = block.spectrum_bounds()
    g = torch.randn(block.shape, dtype=D, generator=torch.Generator().manual_seed(seed)).to(device) * 10.0**log_scale
    pg = block.precondition(g)
    gg = float((g * g).sum())
    assert lo > 0
    assert float((g * pg).sum()) >= lo * gg * (1 - 1e-9)
    assert float(pg.norm()) <= hi * gg**0.5 * (1 + 1e-9)


def test_hessian_action_factor_with_a_torch_func_hessian_vector_product(device):
    """The H_a strategy accepts any action: here the exact Hessian-vector product of f(w) = ½wᵀMw computed by
    torch.func forward-over-reverse; Hessian-action BFGS then converges to M⁻¹."""
    from torch.func import grad, jvp

    torch.manual_seed(0)
    q = torch.randn(5, 5, dtype=D, device=device)
    M = q @ q.T + 0.5 * torch.eye(5, dtype=D, device=device)

    def f(w):
        return 0.5 * w @ M @ w

    def hvp(v):
        return jvp(grad(f), (torch.zeros(5, dtype=D, device=device),), (v,))[1]

    factor = HessianActionFactor(5, damping=0.5, action=hvp, dtype=D, device=device)
    factor.H = torch.eye(5, dtype=D, device=device)
    for _ in range(200):
        factor.hessian_action_update(torch.randn(5, dtype=D, device=device))
    torch.testing.assert_close(factor.H, torch.linalg.inv(M), atol=1e-6, rtol=1e-6)
    s, y = factor.last_pair
    torch.testing.assert_close(y, M @ s)
