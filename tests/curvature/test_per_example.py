"""Per-example gradients and the diagonals built from them, against explicit float64 oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from curvature.per_example import gauss_newton_diagonal, per_example_gradients, squared_gradient_diagonal
from curvature.products import make_functional
from tests.curvature.oracles import loop_gradients

F64 = torch.float64


def _mlp(device, outputs=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs)).to(device=device, dtype=F64)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_per_example_gradients_and_squared_diagonal_match_the_loop(device, loss):
    model = _mlp(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, 4, generator=gen, dtype=F64).to(device)
    if loss == "cross_entropy":
        loss_fn, y = F.cross_entropy, torch.randint(0, 3, (11,), generator=gen).to(device)
    else:
        loss_fn, y = F.mse_loss, torch.randn(11, 3, generator=gen, dtype=F64).to(device)
    oracle = loop_gradients(model, loss_fn, x, y)
    fl = make_functional(model, loss_fn, x, y)
    torch.testing.assert_close(per_example_gradients(fl, chunk=4), oracle, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(squared_gradient_diagonal(fl, chunk=4), oracle.pow(2).sum(0) / 11, rtol=1e-12,
                               atol=1e-15)
    # the mean of the per-example gradients is the batch gradient of a mean loss
    _, g = fl.gradient()
    torch.testing.assert_close(oracle.mean(0), g, rtol=1e-10, atol=1e-13)


def _dense_jacobian(model, x):
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def out(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,)).reshape(-1)

    jac = jacrev(out, argnums=tuple(range(len(params))))(*params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)  # (N*O, n)


def test_exact_gauss_newton_diagonal_is_the_dense_jtj_diagonal(device):
    model = _mlp(device)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(3), dtype=F64).to(device)
    fl = make_functional(model, F.mse_loss, x, torch.zeros(9, 3, dtype=F64, device=device))
    j = _dense_jacobian(model, x)
    torch.testing.assert_close(gauss_newton_diagonal(fl, chunk=4), torch.diagonal(j.T @ j) / 9, rtol=1e-12,
                               atol=1e-15)


def test_monte_carlo_diagonal_is_exact_for_one_output_and_unbiased_otherwise(device):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(4), dtype=F64).to(device)
    one = _mlp(device, outputs=1)
    fl1 = make_functional(one, F.mse_loss, x, torch.zeros(8, 1, dtype=F64, device=device))
    exact1 = gauss_newton_diagonal(fl1)
    # with one output (J^T v)^2 = J^2 for v = +-1: every Monte-Carlo draw is exact
    torch.testing.assert_close(gauss_newton_diagonal(fl1, samples=1, generator=torch.Generator().manual_seed(0)),
                               exact1, rtol=1e-12, atol=1e-15)
    three = _mlp(device, outputs=3)
    fl3 = make_functional(three, F.mse_loss, x, torch.zeros(8, 3, dtype=F64, device=device))
    exact3 = gauss_newton_diagonal(fl3)
    mc = gauss_newton_diagonal(fl3, samples=400, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(mc, exact3, rtol=1e-6)  # it is an estimate ...
    torch.testing.assert_close(mc, exact3, rtol=0.2, atol=1e-3 * float(exact3.max()))  # ... of the exact diagonal


def test_bad_arguments_raise(device):
    model = _mlp(device)
    x = torch.randn(5, 4, dtype=F64, device=device)
    fl = make_functional(model, F.mse_loss, x, torch.zeros(4, 3, dtype=F64, device=device))
    with pytest.raises(ValueError, match="batch size"):
        squared_gradient_diagonal(fl)
    fl = make_functional(model, F.mse_loss, x, torch.zeros(5, 3, dtype=F64, device=device))
    with pytest.raises(ValueError, match="samples"):
        gauss_newton_diagonal(fl, samples=0)
    with pytest.raises(ValueError, match="chunk"):
        per_example_gradients(fl, chunk=0)


# ------------------------------------------------------------------------------ mutation run of per_example.py at 1b39dc0
def _loop_oracle(model, loss_fn, x, t):
    """Per-example gradients by an explicit loop of autograd calls on batches of one example."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), t), list(model.parameters()))
        rows.append(torch.cat([gi.reshape(-1) for gi in g]))
    return torch.stack(rows)


@pytest.mark.parametrize("chunk", [1, 4])
def test_non_tensor_targets_are_passed_whole_and_chunk_one_is_valid(device, chunk):
    """Targets that are not a tensor (a Python float here) reach every example's loss unchanged (not
    sliced, not unsqueezed, not vmapped); chunk = 1 is a valid chunk size."""
    model = _mlp(device)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=F64).to(device)

    def loss_fn(out, t):
        return t * 0.5 * out.pow(2).sum()

    oracle = _loop_oracle(model, loss_fn, x, 2.5)
    fl = make_functional(model, loss_fn, x, 2.5)
    torch.testing.assert_close(per_example_gradients(fl, chunk=chunk), oracle, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(squared_gradient_diagonal(fl, chunk=chunk), oracle.pow(2).sum(0) / 6, rtol=1e-12,
                               atol=1e-15)


def test_monte_carlo_diagonal_exact_against_the_same_rademacher_draws(device):
    """samples = k: the mean over k draws v in {+-1}^O of (J_i^T v)^2, averaged over the examples, with
    the draws taken from ``generator`` chunk by chunk (k draws of shape (chunk, O) per chunk). The
    oracle replays those draws on dense per-example Jacobians; 7 examples in chunks of 3 (last chunk 1)."""
    model = _mlp(device)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(6), dtype=F64).to(device)
    fl = make_functional(model, F.mse_loss, x, torch.zeros(7, 3, dtype=F64, device=device))
    J = _dense_jacobian(model, x).reshape(7, 3, -1)  # (N, O, n)
    replay = torch.Generator().manual_seed(11)
    expected = torch.zeros(J.shape[2], dtype=F64, device=device)
    for start in range(0, 7, 3):
        Jc = J[start:start + 3]
        for _ in range(2):
            v = (torch.randint(0, 2, (Jc.shape[0], 3), generator=replay) * 2 - 1).to(device=device, dtype=F64)
            expected += torch.einsum("co,con->cn", v, Jc).pow(2).sum(0) / 2
    expected /= 7
    got = gauss_newton_diagonal(fl, samples=2, generator=torch.Generator().manual_seed(11), chunk=3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_bad_inputs_and_flags_raise_exact_messages(device):
    """A non-tensor or 0-dim input batch raises TypeError naming its type; a bool chunk or samples is
    rejected like any non-integer."""
    model = _mlp(device)
    x = torch.randn(5, 4, dtype=F64, device=device)
    fl = make_functional(model, F.mse_loss, x, torch.zeros(5, 3, dtype=F64, device=device))
    msg = r"^per-example gradients need a single tensor input batch \(examples along dim 0\), got "
    with pytest.raises(TypeError, match=msg + "tuple$"):
        per_example_gradients(make_functional(model, F.mse_loss, (x,), torch.zeros(5, 3, dtype=F64, device=device)))
    with pytest.raises(TypeError, match=msg + "Tensor$"):
        per_example_gradients(make_functional(model, F.mse_loss, torch.tensor(1.0, dtype=F64, device=device), None))
    with pytest.raises(ValueError, match=r"^chunk must be an integer >= 1, got True$"):
        per_example_gradients(fl, chunk=True)
    with pytest.raises(ValueError, match=r"^samples must be None \(exact\) or an integer >= 1, got True$"):
        gauss_newton_diagonal(fl, samples=True)
