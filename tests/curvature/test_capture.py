"""Layer capture and adapters against explicit per-sample computations (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature.adapters import Conv2dAdapter, LinearAdapter, UnsupportedLayerError, adapter_for
from curvature.blocks import a_statistic, g_statistic
from curvature.capture import LayerCapture, frozen_parameters


def _mlp(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().to(device)


def _per_sample_output_grads(model, x, y, reduction):
    """Per-sample dℓ_i/dh for both layers by separate backward passes (the independent oracle)."""
    out = []
    for i in range(x.shape[0]):
        h1 = model[0](x[i : i + 1])
        h1.retain_grad()
        h2 = model[2](torch.tanh(h1))
        h2.retain_grad()
        loss = 0.5 * ((h2 - y[i : i + 1]) ** 2).sum()
        loss.backward()
        out.append((h1.grad[0].clone(), h2.grad[0].clone(), h1[0].detach(), h2[0].detach()))
        model.zero_grad()
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_rows_are_per_sample_quantities(device, reduction):
    model = _mlp(device)
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    y = torch.randn(6, 3, dtype=torch.float64, device=device)
    layers = {"0": LinearAdapter(model[0]), "2": LinearAdapter(model[2])}
    cap = LayerCapture(layers, loss_reduction=reduction)
    oracle = _per_sample_output_grads(model, x, y, reduction)  # capture still inactive here
    cap.set(a=True, h=True, g=True)
    per_sample = 0.5 * ((model(x) - y) ** 2).sum(1)
    (per_sample.mean() if reduction == "mean" else per_sample.sum()).backward()
    a0 = torch.cat([x, torch.ones(6, 1, dtype=x.dtype, device=device)], 1)
    torch.testing.assert_close(cap.records["0"].a_rows, a0)
    for i, (g1, g2, h1, h2) in enumerate(oracle):
        torch.testing.assert_close(cap.records["0"].g_rows[i], g1)
        torch.testing.assert_close(cap.records["2"].g_rows[i], g2)
        torch.testing.assert_close(cap.records["0"].h_rows[i], h1)
        torch.testing.assert_close(cap.records["2"].h_rows[i], h2)
    # the weight gradient is the sum of per-sample outer products (scaled back for a mean loss)
    scale = 1.0 / 6 if reduction == "mean" else 1.0
    rec = cap.records["2"]
    torch.testing.assert_close(layers["2"].grad_matrix(), scale * rec.g_rows.T @ rec.a_rows)
    cap.remove()


def test_linear_on_3d_inputs_treats_leading_dims_as_samples(device):
    """[B, S, D]: B·S samples (one row each, the loss a mean over all positions), B groups of S rows."""
    torch.manual_seed(1)
    lin = nn.Linear(3, 2).double().to(device)
    x = torch.randn(4, 5, 3, dtype=torch.float64, device=device)
    cap = LayerCapture({"l": LinearAdapter(lin)}, "mean")
    cap.set(a=True, g=True)
    lin(x).pow(2).sum(dim=2).mean().backward()  # mean over the 20 positions of ℓ_{b,s} = |h_{b,s}|²
    rec = cap.records["l"]
    assert rec.a_rows.shape == (20, 4) and rec.rows_per_sample == 1 and rec.batch_size == 20 and rec.groups == 4
    h = lin(x).detach()
    torch.testing.assert_close(rec.g_rows, (2 * h).reshape(20, 2))  # 20 * d(mean ℓ)/dh = dℓ_{b,s}/dh
    adapter = LinearAdapter(lin)
    torch.testing.assert_close(adapter.grad_matrix(), rec.g_rows.T @ rec.a_rows / 20)
    A = a_statistic(rec, adapter)
    torch.testing.assert_close(A, rec.a_rows.T @ rec.a_rows / 20)
    torch.testing.assert_close(g_statistic(rec), rec.g_rows.T @ rec.g_rows / 20)


def _explicit_patches(x, conv):
    """Patches by explicit slicing of the zero-padded input (no unfold): rows [N*L, C*kh*kw]."""
    n, c, hgt, wid = x.shape
    ph, pw = conv.padding
    sh, sw = conv.stride
    dh, dw = conv.dilation
    kh, kw = conv.kernel_size
    xp = F.pad(x, (pw, pw, ph, ph))
    out_h = (hgt + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (wid + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(n):
        for r in range(out_h):
            for q in range(out_w):
                patch = xp[i, :, r * sh : r * sh + dh * (kh - 1) + 1 : dh, q * sw : q * sw + dw * (kw - 1) + 1 : dw]
                rows.append(patch.reshape(-1))
    return torch.stack(rows), out_h * out_w


@pytest.mark.parametrize("stride,padding,dilation,bias", [(1, 0, 1, True), (2, 1, 1, True), (1, 2, 2, False)])
def test_conv2d_factors_match_explicit_patch_computation(device, stride, padding, dilation, bias):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation, bias=bias).double().to(device)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, device=device)
    adapter = Conv2dAdapter(conv)
    cap = LayerCapture({"c": adapter}, "mean")
    cap.set(a=True, g=True)
    out = conv(x)
    weights = torch.randn_like(out)
    (out * weights).sum(dim=(1, 2, 3)).pow(2).mean().backward()
    rec = cap.records["c"]
    patches, locations = _explicit_patches(x, conv)
    if bias:
        patches = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=x.dtype, device=device)], 1)
    torch.testing.assert_close(rec.a_rows, patches)
    assert rec.rows_per_sample == locations
    # per-sample gradient w.r.t. the output, location-major rows, times N for the mean loss
    s = (out.detach() * weights).sum(dim=(1, 2, 3))
    g = (2 * s).reshape(-1, 1, 1, 1) * weights  # dℓ_i/dout_i
    g_rows = g.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(rec.g_rows, g_rows)
    # KFC factors: Ω = (1/N) Σ_i Σ_t ā āᵀ, Γ = (1/(N T)) Σ_i Σ_t g gᵀ
    omega = sum(torch.outer(r, r) for r in patches) / 2
    gamma = sum(torch.outer(r, r) for r in g_rows) / (2 * locations)
    torch.testing.assert_close(a_statistic(rec, adapter), omega)
    torch.testing.assert_close(g_statistic(rec), gamma)
    # the layer gradient matrix [∇W | ∇b] = (1/N) Σ_rows g āᵀ
    torch.testing.assert_close(adapter.grad_matrix(), g_rows.T @ patches / 2)


def test_conv2d_unsupported_configurations_raise():
    grouped = Conv2dAdapter(nn.Conv2d(4, 6, 3, groups=2))  # grouped: per-group blocks (test_grouped_conv.py)
    assert (grouped.a_dim, grouped.g_dim, list(grouped.chunk_rows())) == (2 * 9 + 1, 6, ["g0", "g1"])
    with pytest.raises(UnsupportedLayerError, match="padding_mode"):
        Conv2dAdapter(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    assert adapter_for(nn.PReLU()) is None
    assert isinstance(adapter_for(nn.Linear(2, 2)), LinearAdapter)


def test_split_matrix_inverts_to_matrix(device):
    conv = nn.Conv2d(2, 3, (2, 3)).to(device)
    adapter = Conv2dAdapter(conv)
    w, b = adapter.split_matrix(adapter.weight_matrix())
    assert torch.equal(w, conv.weight.detach()) and torch.equal(b, conv.bias.detach())
    lin = nn.Linear(3, 2, bias=False).to(device)
    ad = LinearAdapter(lin)
    assert ad.a_dim == 3 and ad.split_matrix(ad.weight_matrix())[1] is None


def test_preactivation_grads_only_matches_full_pass_without_weight_grads(device):
    model = _mlp(device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    y = torch.randn(5, 3, dtype=torch.float64, device=device)
    layers = {"0": LinearAdapter(model[0]), "2": LinearAdapter(model[2])}
    cap = LayerCapture(layers, "mean")
    cap.set(h=True, g=True)
    (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
    full = {k: (v.h_rows.clone(), v.g_rows.clone()) for k, v in cap.records.items()}
    model.zero_grad(set_to_none=True)
    cap.set(h=True, g=True, preactivation_grads_only=True)
    with frozen_parameters(list(model.parameters())):
        (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for k, (h, g) in full.items():
        torch.testing.assert_close(cap.records[k].h_rows, h)
        torch.testing.assert_close(cap.records[k].g_rows, g)


def test_capture_is_silent_without_grad_or_when_inactive(device):
    model = _mlp(device)
    cap = LayerCapture({"0": LinearAdapter(model[0])}, "mean")
    cap.set(a=True, g=True)
    with torch.no_grad():
        model(torch.randn(2, 4, dtype=torch.float64, device=device))
    assert cap.records == {}
    cap.set()
    model(torch.randn(2, 4, dtype=torch.float64, device=device)).sum().backward()
    assert cap.records == {}
    with pytest.raises(ValueError, match="loss_reduction"):
        LayerCapture({}, loss_reduction="avg")


def test_deep_copied_model_does_not_feed_the_original_capture(device):
    import copy

    model = _mlp(device)
    cap = LayerCapture({"0": LinearAdapter(model[0])}, "mean")
    cap.set(a=True)
    twin = copy.deepcopy(model)
    twin(torch.randn(3, 4, dtype=torch.float64, device=device))
    assert cap.records == {}
    model(torch.randn(3, 4, dtype=torch.float64, device=device))
    assert cap.records["0"].a_rows.shape == (3, 5)
