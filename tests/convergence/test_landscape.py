"""Filter-normalized directions and loss slices (theory notes §4.5; P21)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from convergence.landscape import filter_normalize, loss_slice_1d, loss_slice_2d, random_direction

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU -> linear: scale-invariant in each conv filter (batch statistics).

    BatchNorm's eps is made negligible: with the default 1e-5 the invariance only holds up to eps/var.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=1e-14)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def conv_problem(device):
    torch.manual_seed(0)
    model = ConvBN().to(device=device, dtype=F64)
    with torch.no_grad():  # non-trivial BN state so eval-mode and restoration are meaningful
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.8, 1.2)
    x = torch.randn(8, 2, 6, 6, generator=_gen(1), dtype=F64).to(device)
    y = torch.randint(0, 3, (8,), generator=_gen(2)).to(device)
    return model, nn.functional.cross_entropy, x, y


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        [m.training for m in model.modules()],
    )


def assert_bit_identical(model, snap):
    state, flags = snap
    for k, v in model.state_dict(keep_vars=True).items():
        assert v.dtype == state[k].dtype and torch.equal(v.detach(), state[k]), k
    assert [m.training for m in model.modules()] == flags


def test_filter_normalization_norms(device):
    model, *_ = conv_problem(device)
    d = random_direction(model, seed=3)
    params = dict(model.named_parameters())
    assert list(d) == list(params)
    for name, p in params.items():
        assert d[name].shape == p.shape and d[name].device.type == device.type
        if p.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0, name  # ignore='biasbn'
            continue
        dn = d[name].reshape(p.shape[0], -1).norm(dim=1)
        pn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(dn, pn, rtol=1e-9, atol=0)
    d_all = random_direction(model, seed=3, include_low_dim=True)
    for name, p in params.items():
        if p.dim() <= 1:
            assert float(d_all[name].norm()) == pytest.approx(float(p.detach().norm()), rel=1e-9)
        else:
            assert torch.equal(d_all[name], d[name])
    # same seed, same raw draw; the raw draw is not normalized
    raw = random_direction(model, seed=3, normalize=False)
    raw_norms = raw["conv.weight"].flatten(1).norm(dim=1)
    assert not torch.allclose(raw_norms, params["conv.weight"].detach().flatten(1).norm(dim=1))
    for name, t in filter_normalize(raw, model).items():
        assert torch.equal(t, d[name])


def test_filter_normalization_zero_filter_and_list_input(device):
    theta = {"w": torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=F64, device=device)}
    d = filter_normalize([torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=F64, device=device)], theta)
    torch.testing.assert_close(d["w"], torch.tensor([[0.0, 0.0], [0.0, 5.0]], dtype=F64, device=device))
    with pytest.raises(ValueError):
        filter_normalize([torch.ones(3, dtype=F64)], theta)


@pytest.mark.parametrize("eval_mode", [True, False])
def test_slices_restore_model_bit_exactly(device, eval_mode):
    model, loss_fn, x, y = conv_problem(device)
    model.train()
    snap = snapshot(model)
    d1, d2 = random_direction(model, seed=1), random_direction(model, seed=2)
    alphas = np.linspace(-1.0, 1.0, 5)
    s1 = loss_slice_1d(model, loss_fn, (x, y), d1, alphas, eval_mode=eval_mode)
    assert_bit_identical(model, snap)
    s2 = loss_slice_2d(model, loss_fn, (x, y), d1, d2, alphas, alphas[:3], eval_mode=eval_mode)
    assert_bit_identical(model, snap)
    assert s1.shape == (5,) and s2.shape == (5, 3) and s1.dtype == np.float64
    assert np.all(np.isfinite(s2))
    # the 2-D slice at beta = 0 is the 1-D slice (beta = alphas[2] = 0)
    np.testing.assert_allclose(s2[:, 2], s1, rtol=1e-13)
    # alpha = 0 is the loss at theta (in the mode the slice used)
    clone = copy.deepcopy(model).train(not eval_mode)
    with torch.no_grad():
        ref = float(loss_fn(clone(x), y))
    assert s1[2] == pytest.approx(ref, rel=1e-14)
    assert s2[2, 2] == pytest.approx(ref, rel=1e-14)


def test_slices_exact_on_least_squares(device):
    """f(w + a d + b e) for f = ||Xw - y||^2/(2N) is the exact quadratic f + a g.d + b g.e + ½[a b] H [a b]^T."""
    dim, n_samples = 5, 11
    model = nn.Sequential(nn.Linear(dim, 2)).to(device=device, dtype=F64)
    x = torch.randn(n_samples, dim, generator=_gen(4), dtype=F64).to(device)
    y = torch.randn(n_samples, 2, generator=_gen(5), dtype=F64).to(device)

    def loss_fn(out, t):
        return 0.5 * ((out - t) ** 2).sum() / out.shape[0]

    d = random_direction(model, seed=6, include_low_dim=True)
    e = random_direction(model, seed=7, include_low_dim=True)
    xa = torch.cat([x, torch.ones(n_samples, 1, dtype=F64, device=device)], dim=1)  # affine features
    w = torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], dim=1)  # 2 x (dim+1)
    dw = torch.cat([d["0.weight"], d["0.bias"][:, None]], dim=1)
    ew = torch.cat([e["0.weight"], e["0.bias"][:, None]], dim=1)

    def f(wm):
        return float(0.5 * ((xa @ wm.T - y) ** 2).sum() / n_samples)

    resid = xa @ w.T - y
    f0 = f(w)
    gd = float((resid * (xa @ dw.T)).sum()) / n_samples
    ge = float((resid * (xa @ ew.T)).sum()) / n_samples
    hdd = float(((xa @ dw.T) ** 2).sum()) / n_samples
    hee = float(((xa @ ew.T) ** 2).sum()) / n_samples
    hde = float(((xa @ dw.T) * (xa @ ew.T)).sum()) / n_samples
    alphas, betas = np.linspace(-2, 2, 7), np.linspace(-1, 1.5, 4)
    s1 = loss_slice_1d(model, loss_fn, (x, y), d, alphas)
    np.testing.assert_allclose(s1, f0 + alphas * gd + 0.5 * alphas**2 * hdd, rtol=1e-12)
    s2 = loss_slice_2d(model, loss_fn, (x, y), d, e, alphas, betas)
    a, b = np.meshgrid(alphas, betas, indexing="ij")
    oracle = f0 + a * gd + b * ge + 0.5 * (a**2 * hdd + 2 * a * b * hde + b**2 * hee)
    np.testing.assert_allclose(s2, oracle, rtol=1e-12)


def test_p21_per_filter_rescaling_invariance(device):
    """ReLU+BN (batch statistics): theta_i -> c_i theta_i leaves f(theta + alpha d) unchanged (filter-normalized d)."""
    model, loss_fn, x, y = conv_problem(device)
    model.train()
    alphas = np.array([-0.8, -0.3, 0.0, 0.4, 1.0])
    d = random_direction(model, seed=9)
    before = loss_slice_1d(model, loss_fn, (x, y), d, alphas, eval_mode=False)
    raw = random_direction(model, seed=9, normalize=False)
    raw_before = loss_slice_1d(model, loss_fn, (x, y), raw, alphas, eval_mode=False)
    c = torch.tensor([0.1, 3.0, 0.5, 7.0], dtype=F64, device=device)
    with torch.no_grad():
        model.conv.weight.mul_(c[:, None, None, None])
    d_scaled = random_direction(model, seed=9)  # same raw draw, normalized against the rescaled filters
    after = loss_slice_1d(model, loss_fn, (x, y), d_scaled, alphas, eval_mode=False)
    np.testing.assert_allclose(after, before, rtol=1e-8)
    # negative control: an un-normalized direction sees the rescaling
    raw_after = loss_slice_1d(model, loss_fn, (x, y), raw, alphas, eval_mode=False)
    assert np.max(np.abs(raw_after - raw_before)) > 1e-3
