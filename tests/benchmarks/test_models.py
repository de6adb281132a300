"""The three autoencoders and their losses (spec §7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.models import (
    AUTOENCODER_WIDTHS,
    PARAM_COUNTS,
    build_autoencoder,
    half_squared_error,
    likelihood_for,
    loss_for,
    summed_bce_with_logits,
)

SPEC = {
    "mnist": ([784, 1000, 500, 250, 30, 250, 500, 1000, 784], 2_837_314),
    "faces": ([625, 2000, 1000, 500, 30, 500, 1000, 2000, 625], 7_537_655),
    "curves": ([784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784], 842_340),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_architecture_matches_spec(name):
    widths, params = SPEC[name]
    model = build_autoencoder(name, seed=0)
    assert PARAM_COUNTS[name] == params and list(AUTOENCODER_WIDTHS[name]) == widths
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(w_in * w_out + w_out for w_in, w_out in zip(widths, widths[1:])) == params
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert linears == model.linear_layers and len(linears) == len(widths) - 1
    assert [(l.in_features, l.out_features) for l in linears] == list(zip(widths, widths[1:]))
    assert all(l.bias is not None for l in linears)
    # a ReLU after every Linear except the code layer and the output layer
    code = widths.index(min(widths))
    assert code == model.code_index
    kinds = [type(m) for m in model]
    expected = []
    for i in range(1, len(widths)):
        expected.append(nn.Linear)
        if i not in (code, len(widths) - 1):
            expected.append(nn.ReLU)
    assert kinds == expected
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model.modules() if m is not model)


def test_default_init_bounds():
    model = build_autoencoder("curves", seed=123).requires_grad_(False)
    for layer in model.linear_layers:
        bound = 1.0 / math.sqrt(layer.in_features)  # PyTorch's default nn.Linear init is U(-b, b)
        assert float(layer.weight.abs().max()) <= bound and float(layer.bias.abs().max()) <= bound
        assert float(layer.weight.abs().max()) > 0.9 * bound


def test_seed_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_autoencoder("curves", seed=9999)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_autoencoder("CURVES", seed=9999)
    c = build_autoencoder("curves", seed=1)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    d = build_autoencoder("curves", seed=9999, dtype=torch.float64)
    for pa, pd in zip(a.parameters(), d.parameters()):
        assert pd.dtype == torch.float64 and torch.equal(pa.double(), pd)


def test_forward_on_device(device):
    for name in ("mnist", "curves"):
        model = build_autoencoder(name, seed=0, device=device)
        x = torch.rand(3, AUTOENCODER_WIDTHS[name][0], device=device)
        out = model(x)
        assert out.shape == x.shape and out.device.type == device.type
        assert out.min() < 0 < out.max()  # logits, not probabilities
        assert torch.isfinite(loss_for(name)(out, x))
    model = build_autoencoder("faces", seed=0, device=device, dtype=torch.float64)
    assert all(p.device.type == device.type and p.dtype == torch.float64 for p in model.parameters())


def test_code_layer_is_linear():
    model = build_autoencoder("mnist", seed=0, dtype=torch.float64)
    encoder = model[: list(model).index(model.linear_layers[3]) + 1]
    assert type(encoder) is nn.Sequential and isinstance(encoder[-1], nn.Linear) and encoder[-1].out_features == 30
    x = torch.rand(4, 784, dtype=torch.float64)
    code = encoder(x)
    assert code.shape == (4, 30) and (code < 0).any()  # no ReLU on the code


def _np_bce(z, x):
    per = np.maximum(z, 0) - z * x + np.log1p(np.exp(-np.abs(z)))
    return per.reshape(per.shape[0], -1).sum(1).mean()


def test_loss_values_against_explicit_formulas(device):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 13)) * 4
    x = rng.random((5, 13))
    tz = torch.tensor(z, dtype=torch.float64, device=device)
    tx = torch.tensor(x, dtype=torch.float64, device=device)
    bce = summed_bce_with_logits(tz, tx)
    assert bce.dim() == 0
    np.testing.assert_allclose(bce.item(), _np_bce(z, x), rtol=1e-12)
    direct = -(x * np.log(1 / (1 + np.exp(-z))) + (1 - x) * np.log(1 - 1 / (1 + np.exp(-z))))
    np.testing.assert_allclose(bce.item(), direct.sum(1).mean(), rtol=1e-10)
    hse = half_squared_error(tz, tx)
    np.testing.assert_allclose(hse.item(), (0.5 * ((z - x) ** 2).sum(1)).mean(), rtol=1e-12)
    # sums over pixels, means over the batch: duplicating the batch changes nothing
    np.testing.assert_allclose(summed_bce_with_logits(tz.repeat(2, 1), tx.repeat(2, 1)).item(), bce.item(), rtol=1e-12)
    # extreme logits stay finite
    big = torch.tensor([[80.0, -80.0]], dtype=torch.float64, device=device)
    tgt = torch.tensor([[0.0, 1.0]], dtype=torch.float64, device=device)
    np.testing.assert_allclose(summed_bce_with_logits(big, tgt).item(), 160.0, rtol=1e-12)
    with pytest.raises(ValueError):
        summed_bce_with_logits(tz, tx[:, :5])
    with pytest.raises(ValueError):
        half_squared_error(tz, tx[:4])


def test_loss_gradients(device):
    z = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.rand(4, 6, dtype=torch.float64, device=device)
    (g,) = torch.autograd.grad(summed_bce_with_logits(z, x), z)
    torch.testing.assert_close(g, (torch.sigmoid(z) - x) / 4)
    (g,) = torch.autograd.grad(half_squared_error(z, x), z)
    torch.testing.assert_close(g, (z - x) / 4)


def test_loss_and_likelihood_lookup():
    assert loss_for("mnist") is summed_bce_with_logits and loss_for("curves") is summed_bce_with_logits
    assert loss_for("faces") is half_squared_error and loss_for("FACES") is half_squared_error
    assert [likelihood_for(n) for n in ("mnist", "curves", "faces")] == ["bernoulli", "bernoulli", "gaussian"]
    for fn in (loss_for, likelihood_for, build_autoencoder):
        with pytest.raises(ValueError, match="unknown"):
            fn("cifar")
