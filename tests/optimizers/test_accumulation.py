"""Gradient accumulation: k micro-batches with ``(loss / k).backward()`` give exactly the full-batch
step (oracle: the same optimizer on the full batch), for KFAC (empirical and Monte-Carlo Fisher),
diagonal blocks and K-BFGS / K-BFGS(L) (whose closure runs all micro-batches); a module called several
times in one forward contributes extra rows ("expand"); zero_grad() clears captured statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvature.adapters import LinearAdapter
from curvature.blocks import a_statistic, g_statistic
from curvature.capture import LayerCapture
from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer, diagonal_block

D = torch.float64


def _problem(device, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=D).to(device)
    y = (torch.rand(n, 3, generator=g, dtype=D) < 0.5).to(D).to(device)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(D).to(device)
    return model, x, y


def _loss(model, x, y):
    return nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").sum(1).mean()


MAKERS = {
    "kfac-empirical": lambda m: KFAC(m, lr=0.3, damping=0.1, inverse_update_freq=1, weight_decay=1e-3),
    "kfac-mc": lambda m: KFAC(m, lr=0.3, damping=0.1, inverse_update_freq=1, fisher="mc", likelihood="bernoulli"),
    "diagonal": lambda m: CurvatureOptimizer(m, 0.05, {nn.Linear: diagonal_block()}, damping=0.1),
}


def _assert_close_params(a, b, rtol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-10)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_micro_batches_equal_the_full_batch_without_closure(device, kind, k):
    model, x, y = _problem(device)
    twin = copy.deepcopy(model)
    full, micro = MAKERS[kind](model), MAKERS[kind](twin)
    for step in range(3):
        xs, ys = x + 0.1 * step, y
        full.zero_grad()
        _loss(model, xs, ys).backward()
        full.step()
        micro.zero_grad()
        for xb, yb in zip(xs.chunk(k), ys.chunk(k)):
            (_loss(twin, xb, yb) / k).backward()
        micro.step()
        _assert_close_params(model, twin)
    for name, block in full.blocks.items():
        other = micro.blocks[name]
        if kind == "diagonal":
            torch.testing.assert_close(block.v, other.v, rtol=1e-6, atol=1e-12)
        else:
            torch.testing.assert_close(block.a_factor.statistic, other.a_factor.statistic, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(block.g_factor.statistic, other.g_factor.statistic, rtol=1e-6, atol=1e-12)


def test_accumulated_g_statistic_matches_dense_per_sample_oracle(device):
    """G from 4 micro-batches equals (1/N) Σ_i g_i g_iᵀ with g_i = ∂ℓ_i/∂h from explicit per-sample backward."""
    model, x, y = _problem(device)
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: diagonal_block()})  # any optimizer: we read the capture
    opt.capture.set(a=True, g=True)
    for xb, yb in zip(x.chunk(4), y.chunk(4)):
        (_loss(model, xb, yb) / 4).backward()
    rec = opt.capture.records["2"]
    rows = []
    for i in range(x.shape[0]):
        h = model[:2](x[i : i + 1]).detach()
        out = model[2](h)
        hh = out.detach().requires_grad_(True)
        nn.functional.binary_cross_entropy_with_logits(hh, y[i : i + 1], reduction="sum").backward()
        rows.append(hh.grad[0])
    g = torch.stack(rows)
    torch.testing.assert_close(g_statistic(rec), g.T @ g / x.shape[0])
    a = torch.cat([torch.tanh(model[0](x)), torch.ones(x.shape[0], 1, dtype=D, device=device)], 1).detach()
    torch.testing.assert_close(a_statistic(rec, opt.slots["2"].adapter), a.T @ a / x.shape[0])
    assert rec.batch_size == 16 and rec.calls == 4


def test_two_forwards_then_one_backward_are_two_micro_batches(device):
    """forward(x1), forward(x2), ((l1 + l2) / 2).backward() is the full batch: each model forward is a pass."""
    model, x, y = _problem(device)
    twin = copy.deepcopy(model)
    full, micro = MAKERS["kfac-empirical"](model), MAKERS["kfac-empirical"](twin)
    _loss(model, x, y).backward()
    full.step()
    halves = list(zip(x.chunk(2), y.chunk(2)))
    ((_loss(twin, *halves[0]) + _loss(twin, *halves[1])) / 2).backward()
    micro.step()
    _assert_close_params(model, twin)


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL], ids=["kbfgs", "kbfgsl"])
@pytest.mark.parametrize("k", [2, 4])
def test_kbfgs_closure_running_all_micro_batches_equals_full_batch(device, cls, k):
    """K-BFGS accumulates inside the closure: it zeroes, runs every micro-batch with (loss/k).backward()
    and returns the total; the second pass calls it again, so both passes see the whole batch."""
    model, x, y = _problem(device)
    twin = copy.deepcopy(model)
    full, micro = cls(model, lr=0.2, damping=0.3), cls(twin, lr=0.2, damping=0.3)

    def full_closure():
        full.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    def micro_closure():
        micro.zero_grad()
        total = 0.0
        for xb, yb in zip(x.chunk(k), y.chunk(k)):
            loss = _loss(twin, xb, yb) / k
            loss.backward()
            total = total + loss.detach()
        return total

    for _ in range(4):
        la, lb = full.step(full_closure), micro.step(micro_closure)
        torch.testing.assert_close(la.detach(), lb, rtol=1e-10, atol=1e-12)
        _assert_close_params(model, twin)
    for name, block in full.blocks.items():
        torch.testing.assert_close(block.g_factor.to_dense(), micro.blocks[name].g_factor.to_dense(), rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(block.a_factor.to_dense(), micro.blocks[name].a_factor.to_dense(), rtol=1e-6, atol=1e-10)


def test_module_called_twice_contributes_rows_like_a_stacked_input(device):
    """Expand semantics: two calls of one Linear in one forward give the record of one call on the
    inputs stacked along an extra dimension (N × 2 × d), the existing N-D convention."""
    torch.manual_seed(3)
    lin = nn.Linear(4, 3).to(D).to(device)
    x1, x2 = torch.randn(5, 4, dtype=D, device=device), torch.randn(5, 4, dtype=D, device=device)
    w = torch.randn(5, 3, dtype=D, device=device)
    cap = LayerCapture({"l": LinearAdapter(lin)}, "mean")
    cap.set(a=True, h=True, g=True)
    ((lin(x1) * w).sum(1).pow(2) + (lin(x2) * w).sum(1).pow(3)).mean().backward()
    twice = cap.records["l"]
    cap.set(a=True, h=True, g=True)
    out = lin(torch.stack([x1, x2], 1))
    ((out[:, 0] * w).sum(1).pow(2) + (out[:, 1] * w).sum(1).pow(3)).mean().backward()
    stacked = cap.records["l"]
    assert (twice.batch_size, twice.rows_per_sample, twice.calls) == (5, 2, 2)
    assert (stacked.batch_size, stacked.rows_per_sample) == (5, 2)
    for attr in ("a_rows", "h_rows", "g_rows"):
        torch.testing.assert_close(getattr(twice, attr), getattr(stacked, attr))
    adapter = LinearAdapter(lin)
    torch.testing.assert_close(a_statistic(twice, adapter), a_statistic(stacked, adapter))
    torch.testing.assert_close(g_statistic(twice), g_statistic(stacked))


def test_zero_grad_clears_captured_statistics(device):
    model, x, y = _problem(device)
    twin = copy.deepcopy(model)
    a, b = MAKERS["kfac-empirical"](model), MAKERS["kfac-empirical"](twin)
    _loss(model, 3 * x, y).backward()  # a stale batch: zero_grad must forget it
    a.zero_grad()
    _loss(model, x, y).backward()
    a.step()
    _loss(twin, x, y).backward()
    b.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert a.capture.records == {}  # the step cleared them too


def test_forward_without_backward_is_an_error_that_says_what_to_do(device):
    model, x, y = _problem(device)
    opt = MAKERS["kfac-empirical"](model)
    _loss(model, x, y).backward()
    model(x)  # e.g. a metric computed with gradients enabled
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
