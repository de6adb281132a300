"""Matrix-free curvature products for every loss a user trains with, against dense oracles.

The oracles are reverse-over-reverse only (``jacrev(jacrev(.))``), so they do not depend on the
forward-mode derivatives whose absence made ``F.mse_loss`` and ``F.huber_loss`` crash
(``ZeroTensors are immutable`` / ``NotImplementedError``) before the products were fixed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from curvature.products import (
    GGNOperator,
    HessianOperator,
    ModelCall,
    ProductCounter,
    ggn_vector_product,
    hvp_double_backprop,
    hvp_forward_over_reverse,
    make_functional,
)

F64 = torch.float64
N, D_IN, D_OUT = 6, 3, 3


def _targets(loss: str, device):
    g = torch.Generator().manual_seed(5)
    if loss in ("mse", "mse_module", "mse_sum", "huber", "smooth_l1"):
        return torch.randn(N, D_OUT, generator=g, dtype=F64).to(device)
    if loss == "bce_logits":
        return torch.rand(N, D_OUT, generator=g, dtype=F64).to(device)
    return torch.randint(0, D_OUT, (N,), generator=g).to(device)


LOSSES = {
    "mse": F.mse_loss,
    "mse_module": nn.MSELoss(),
    "mse_sum": lambda out, y: F.mse_loss(out, y, reduction="sum"),
    "huber": lambda out, y: F.huber_loss(out, y, delta=0.5),
    "smooth_l1": F.smooth_l1_loss,
    "bce_logits": F.binary_cross_entropy_with_logits,
    "cross_entropy": F.cross_entropy,
    "nll_log_softmax": lambda out, y: F.nll_loss(F.log_softmax(out, dim=1), y),
}


def _problem(loss: str, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 4), nn.Tanh(), nn.Linear(4, D_OUT)).to(device=device, dtype=F64)
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(4), dtype=F64).to(device)
    return model, LOSSES[loss], x, _targets(loss, device)


def _dense_oracles(model, loss_fn, x, y):
    """(H, G) dense, by reverse-mode only: H = jacrev(jacrev(f)), G = J^T H_ell J."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            k = shape.numel()
            out[name] = t[i : i + k].view(shape)
            i += k
        return out

    def out_flat(t):
        return functional_call(model, unflat(t), (x,)).reshape(-1)

    def f(t):
        return loss_fn(functional_call(model, unflat(t), (x,)), y)

    hess = jacrev(jacrev(f))(theta)
    out = out_flat(theta).detach()
    jac = jacrev(out_flat)(theta)
    h_ell = jacrev(jacrev(lambda o: loss_fn(o.reshape(N, D_OUT), y)))(out)
    return hess, jac.T @ h_ell @ jac


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_products_work_for_every_training_loss(device, loss):
    model, loss_fn, x, y = _problem(loss, device)
    hess, ggn = _dense_oracles(model, loss_fn, x, y)
    scale_h = float(torch.linalg.matrix_norm(hess, 2)) + 1e-300
    scale_g = float(torch.linalg.matrix_norm(ggn, 2)) + 1e-300
    fl = make_functional(model, loss_fn, x, y)
    prepared_h, prepared_g = fl.prepared_product("hessian"), fl.prepared_product("ggn")
    for seed in range(2):
        v = torch.randn(fl.n, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device)
        tol_h, tol_g = 1e-11 * scale_h * float(v.norm()), 1e-11 * scale_g * float(v.norm())
        assert float((hvp_forward_over_reverse(model, loss_fn, x, y, v) - hess @ v).norm()) <= tol_h
        assert float((hvp_double_backprop(model, loss_fn, x, y, v) - hess @ v).norm()) <= tol_h
        assert float((prepared_h(v) - hess @ v).norm()) <= tol_h
        assert float((ggn_vector_product(model, loss_fn, x, y, v) - ggn @ v).norm()) <= tol_g
        assert float((prepared_g(v) - ggn @ v).norm()) <= tol_g
    # the operators agree with the oracles column by column too
    torch.testing.assert_close(HessianOperator(model, loss_fn, x, y).to_dense(), hess, rtol=1e-10, atol=1e-12 * scale_h)
    torch.testing.assert_close(GGNOperator(model, loss_fn, x, y).to_dense(), ggn, rtol=1e-10, atol=1e-12 * scale_g)


@pytest.mark.parametrize("loss", ["mse", "mse_module", "huber"])
def test_losses_without_forward_ad_use_the_split_hvp(device, loss):
    """These losses are exactly the ones whose plain jvp(grad(f)) raises; the split form is recorded."""
    model, loss_fn, x, y = _problem(loss, device)
    fl = make_functional(model, loss_fn, x, y)
    assert not fl.split_hvp
    fl.hvp_forward_over_reverse(torch.ones(fl.n, dtype=F64, device=device))
    assert fl.split_hvp


def test_plain_forward_over_reverse_kept_when_supported(device):
    model, loss_fn, x, y = _problem("cross_entropy", device)
    fl = make_functional(model, loss_fn, x, y)
    fl.hvp_forward_over_reverse(torch.ones(fl.n, dtype=F64, device=device))
    assert not fl.split_hvp


def test_prepared_product_is_frozen_at_its_point(device):
    """A prepared product keeps measuring where it was built, even after the module moves."""
    model, loss_fn, x, y = _problem("mse", device)
    fl = make_functional(model, loss_fn, x, y)
    hess, ggn = _dense_oracles(model, loss_fn, x, y)
    prepared_h, prepared_g = fl.prepared_product("hessian"), fl.prepared_product("ggn")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    v = torch.randn(fl.n, generator=torch.Generator().manual_seed(9), dtype=F64).to(device)
    torch.testing.assert_close(prepared_h(v), hess @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(prepared_g(v), ggn @ v, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="kind"):
        fl.prepared_product("fisher")


def test_gradient_and_loss_at_match_autograd(device):
    model, loss_fn, x, y = _problem("huber", device)
    fl = make_functional(model, loss_fn, x, y)
    loss, g = fl.gradient()
    ref = loss_fn(model(x), y)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in model.parameters()]), rtol=1e-13, atol=1e-15)
    step = torch.full((fl.n,), 0.1, dtype=F64, device=device)
    with torch.no_grad():
        shifted = [p + 0.1 for p in model.parameters()]
        expected = loss_fn(functional_call(model, dict(zip(fl.names, shifted)), (x,)), y)
    torch.testing.assert_close(fl.loss_at(fl.theta + step), expected, rtol=1e-14, atol=0)


def test_product_counter_counts():
    counter = ProductCounter(lambda v: 2 * v)
    assert counter.count == 0
    torch.testing.assert_close(counter(torch.ones(3)), torch.full((3,), 2.0))
    counter(torch.ones(3))
    assert counter.count == 2


class _TwoInputs(nn.Module):
    """model(x, z, *, scale) = scale · W₂ tanh(W₁ x + V z): two positional inputs and a keyword one."""

    def __init__(self):
        super().__init__()
        self.first, self.side, self.out = nn.Linear(D_IN, 4), nn.Linear(2, 4, bias=False), nn.Linear(4, D_OUT)

    def forward(self, x, z, *, scale):
        return scale * self.out(torch.tanh(self.first(x) + self.side(z)))


def test_products_of_a_model_called_with_several_and_keyword_inputs(device):
    torch.manual_seed(0)
    model = _TwoInputs().to(device=device, dtype=F64)
    g = torch.Generator().manual_seed(4)
    x, z = torch.randn(N, D_IN, generator=g, dtype=F64).to(device), torch.randn(N, 2, generator=g, dtype=F64).to(device)
    y, scale = torch.randn(N, D_OUT, generator=g, dtype=F64).to(device), 1.5
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        return dict(zip(names, (piece.view(s) for piece, s in zip(torch.split(t, [s.numel() for s in shapes]), shapes))))

    def out_flat(t):
        return functional_call(model, unflat(t), (x, z), {"scale": scale}).reshape(-1)

    hess = jacrev(jacrev(lambda t: F.mse_loss(out_flat(t).reshape(N, D_OUT), y)))(theta)
    jac = jacrev(out_flat)(theta)
    h_ell = jacrev(jacrev(lambda o: F.mse_loss(o.reshape(N, D_OUT), y)))(out_flat(theta).detach())
    ggn = jac.T @ h_ell @ jac
    call = ModelCall((x, z), {"scale": scale})
    fl = make_functional(model, F.mse_loss, call, y)
    assert float(fl.loss_flat(theta).detach()) == float(F.mse_loss(model(x, z, scale=scale), y).detach())
    v = torch.randn(fl.n, generator=g, dtype=F64).to(device)
    tol = 1e-11 * float(v.norm()) * (float(torch.linalg.matrix_norm(hess, 2)) + 1e-300)
    assert float((hvp_forward_over_reverse(model, F.mse_loss, call, y, v) - hess @ v).norm()) <= tol
    assert float((hvp_double_backprop(model, F.mse_loss, call, y, v) - hess @ v).norm()) <= tol
    assert float((ggn_vector_product(model, F.mse_loss, call, y, v) - ggn @ v).norm()) <= tol


def test_model_call_rejects_arguments_of_the_wrong_kind():
    with pytest.raises(TypeError, match=r"^ModelCall\.args must be a tuple, got list$"):
        ModelCall([1, 2])
    with pytest.raises(TypeError, match=r"^ModelCall\.kwargs must be a mapping, got tuple$"):
        ModelCall((1,), (("scale", 2),))
