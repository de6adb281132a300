"""K-BFGS / K-BFGS(L): pair definition, ordering (AS.4), second pass, conv, end-to-end training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from curvature.blocks import vec_c
from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer, kbfgsl_block, kfac_block

D = torch.float64


def _net(device, dtype=D, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype).to(device)


def _loss(out, y):
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def _closure(opt, model, x, y, counter=None):
    def closure():
        if counter is not None:
            counter.append(1)
        opt.zero_grad()
        loss = _loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _batch_means(model, x, y):
    """Independent oracle: mean pre-activations and mean per-sample dℓ/dh for each Linear, by hand."""
    hs, out = [], x
    for layer in model:
        out = layer(out)
        if isinstance(layer, nn.Linear):
            out.retain_grad()
            hs.append(out)
    _loss(out, y).backward()
    n = x.shape[0]
    result = [(h.detach().mean(0), (n * h.grad).mean(0)) for h in hs]
    model.zero_grad(set_to_none=True)
    return result


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_pairs_are_differences_of_batch_means_at_the_two_points(device, cls):
    model = _net(device)
    x = torch.randn(16, 5, dtype=D, device=device)
    y = torch.randn(16, 3, dtype=D, device=device)
    opt = cls(model, lr=0.2, damping=0.3, pair_decay=0.0)
    for _ in range(2):
        opt.step(_closure(opt, model, x, y))
    probe = copy.deepcopy(model)
    before = _batch_means(probe, x, y)
    opt.step(_closure(opt, model, x, y))
    after = _batch_means(copy.deepcopy(model), x, y)
    for (name, block), (h0, g0), (h1, g1) in zip(opt.blocks.items(), before, after):
        s, yv = block.g_factor.last_raw_pair
        torch.testing.assert_close(s, h1 - h0)
        torch.testing.assert_close(yv, g1 - g0)


def test_pair_ema_starts_at_zero_without_bias_correction(device):
    model = _net(device)
    x = torch.randn(16, 5, dtype=D, device=device)
    y = torch.randn(16, 3, dtype=D, device=device)
    opt = KBFGS(model, lr=0.2, damping=0.3)
    before = _batch_means(copy.deepcopy(model), x, y)
    opt.step(_closure(opt, model, x, y))
    after = _batch_means(copy.deepcopy(model), x, y)
    s, yv = opt.blocks["0"].g_factor.last_raw_pair
    torch.testing.assert_close(s, 0.1 * (after[0][0] - before[0][0]))
    torch.testing.assert_close(yv, 0.1 * (after[0][1] - before[0][1]))


def test_closure_runs_twice_and_second_pass_computes_no_weight_gradients(device):
    model = _net(device)
    x = torch.randn(8, 5, dtype=D, device=device)
    y = torch.randn(8, 3, dtype=D, device=device)
    opt = KBFGSL(model, lr=0.1, damping=0.3)
    calls, grads_in_second = [], []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model(x), y)
        loss.backward()
        grads_in_second.append([p.grad is not None for p in model.parameters()])
        return loss

    opt.step(closure)
    assert len(calls) == 2
    assert all(grads_in_second[0]) and not any(grads_in_second[1])
    assert all(p.requires_grad for p in model.parameters())


def test_step_uses_factors_from_earlier_batches_and_h_updates_follow(device):
    """The direction at step k uses H_a, H_g as they were before batch k's pairs were used."""
    model = _net(device)
    x = torch.randn(16, 5, dtype=D, device=device)
    y = torch.randn(16, 3, dtype=D, device=device)
    opt = KBFGS(model, lr=0.2, damping=0.3, momentum=0.0, weight_decay=0.0)
    for _ in range(3):
        opt.step(_closure(opt, model, x + 0.01, y))
    ops = {n: torch.kron(b.a_factor.to_dense(), b.g_factor.to_dense()) for n, b in opt.blocks.items()}
    olds = {n: s.adapter.weight_matrix().clone() for n, s in opt.slots.items()}
    grads = {}
    opt.register_step_hook(lambda info: grads.update(info.grads))
    opt.step(_closure(opt, model, x, y))
    for name, slot in opt.slots.items():
        delta = slot.adapter.weight_matrix() - olds[name]
        torch.testing.assert_close(vec_c(delta), -0.2 * ops[name] @ vec_c(grads[name]))
        new_op = torch.kron(opt.blocks[name].a_factor.to_dense(), opt.blocks[name].g_factor.to_dense())
        assert not torch.allclose(new_op, ops[name]), "the H updates of step k must happen after the step"


def _operator_at_step(opt, model, batch, lag_probe):
    """Run one step on ``batch`` and return the dense operators that precondition() used."""
    used = {}
    for name, block in opt.blocks.items():
        original = block.precondition

        def spy(grad, name=name, block=block, original=original):
            used[name] = block.to_dense().clone()
            return original(grad)

        block.precondition = spy
    opt.step(_closure(opt, model, *batch))
    for block in opt.blocks.values():
        del block.precondition
    return used


@pytest.mark.parametrize(
    "make,lag,independent",
    [
        (lambda m: KBFGS(m, lr=0.1, damping=0.3, lag_factors=True), True, True),
        (lambda m: KBFGSL(m, lr=0.1, damping=0.3, lag_factors=True), True, True),
        (lambda m: KFAC(m, lr=0.1, damping=0.3, lag_factors=True, inverse_update_freq=1), True, True),
        (lambda m: KFAC(m, lr=0.1, damping=0.3, inverse_update_freq=1), False, False),
    ],
    ids=["kbfgs-lagged", "kbfgsl-lagged", "kfac-lagged", "kfac-as-coded"],
)
def test_as4_swapping_batch_k_leaves_the_operator_unchanged(device, make, lag, independent):
    """E5a / P26: with lagged factors the operator applied at step k is identical for ξ_k and ξ'_k."""
    model = _net(device)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 5, generator=gen, dtype=D).to(device), torch.randn(16, 3, generator=gen, dtype=D).to(device))
               for _ in range(5)]
    opt = make(model)
    for b in batches[:3]:
        opt.step(_closure(opt, model, *b))
    twin_model = copy.deepcopy(model)
    twin = make(twin_model)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    used_a = _operator_at_step(opt, model, batches[3], lag)
    used_b = _operator_at_step(twin, twin_model, batches[4], lag)
    same = all(torch.equal(used_a[n], used_b[n]) for n in used_a)
    assert same == independent


def test_conv2d_layers_and_mixed_composition_train(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 10)).to(D).to(device)
    x = torch.randn(32, 1, 8, 8, dtype=D, device=device)
    labels = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    for make in (lambda m: KBFGS(m, lr=0.1, damping=0.3),
                 lambda m: CurvatureOptimizer(m, 0.1, {nn.Linear: kbfgsl_block(), nn.Conv2d: kfac_block()}, damping=0.3)):
        net = copy.deepcopy(model)
        opt = make(net)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), labels)
            loss.backward()
            return loss

        losses = [float(opt.step(closure).detach()) for _ in range(60)]
        assert all(math.isfinite(v) for v in losses)
        assert losses[-1] < 0.7 * losses[0]
        assert opt.skipped_steps == 0


def _train(opt, model, batches, loss_fn, steps):
    losses = []
    for k in range(steps):
        xb, yb = batches[k % len(batches)]

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


def _assert_trains(losses, opt, ratio):
    assert all(math.isfinite(v) for v in losses), "a non-finite loss appeared"
    for p in opt.model.parameters():
        assert torch.isfinite(p).all()
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < ratio * first, (first, last)
    assert opt.skipped_steps == 0 and opt.counters["reverted_steps"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_300_steps_on_mnist_autoencoder(mnist_path, cls):
    from benchmarks.data.mnist import load_mnist

    images, _ = load_mnist(mnist_path, split="test")
    images = images[:2000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 16), nn.Linear(16, 64), nn.ReLU(),
                          nn.Linear(64, 784))

    def bce(logits, target):
        return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()

    opt = cls(model, lr=0.3, damping=0.3)
    batches = [(images[i : i + 200], images[i : i + 200]) for i in range(0, 2000, 200)]
    assert opt.warm_start(xb for xb, _ in batches) == 10  # the authors' full-pass warm start of A
    losses = _train(opt, model, batches, bce, 300)
    _assert_trains(losses, opt, 0.6)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_300_steps_on_a_generated_regression_problem(device, cls):
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(10, 4, generator=gen)
    x = torch.randn(1200, 10, generator=gen)
    y = torch.tanh(x @ teacher) + 0.05 * torch.randn(1200, 4, generator=gen)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    opt = cls(model, lr=0.1, damping=0.3)
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 1200, 100)]
    losses = _train(opt, model, batches, _loss, 300)
    _assert_trains(losses, opt, 0.3)
