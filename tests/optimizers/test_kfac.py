"""KFAC: dense-solve oracle for the step, Monte-Carlo Fisher statistics, and training on real MNIST."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvature.blocks import vec_c
from curvature.damping import FactoredPi, pi_split
from optimizers import KFAC

D = torch.float64


def test_kfac_step_equals_dense_kronecker_solve(device):
    """One layer, momentum 0: ΔW = −α [(A + λ_A I) ⊗ (G + λ_G I)]^{-1} vec_c(∇), built with torch.kron."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).to(D).to(device)
    x = torch.randn(10, 4, dtype=D, device=device)
    y = torch.randn(10, 3, dtype=D, device=device)
    opt = KFAC(lin, lr=0.5, damping=FactoredPi(0.2), momentum=0.0, weight_decay=0.0)
    old = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).clone()
    opt.zero_grad()
    (0.5 * ((lin(x) - y) ** 2).sum(1).mean()).backward()
    grad = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone()
    abar = torch.cat([x, torch.ones(10, 1, dtype=D, device=device)], 1)
    A = abar.T @ abar / 10
    with torch.no_grad():  # a forward with gradients enabled would start a new capture
        h = lin(x)
    G = (h - y).T @ (h - y) / 10  # per-sample dℓ/dh = h − y; G = mean of outer products
    opt.step()
    lam_a, lam_g = pi_split(0.2, A, G)
    dense = torch.kron(A + lam_a * torch.eye(5, dtype=D, device=device), G + lam_g * torch.eye(3, dtype=D, device=device))
    expected = old - 0.5 * torch.linalg.solve(dense, vec_c(grad)).reshape(5, 3).T
    new = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)
    torch.testing.assert_close(new, expected)


def _mc_g_factor(likelihood, logits, device, samples=400):
    """Average the MC G factor of a single output layer over many sampled passes."""
    lin = nn.Linear(logits.shape[1], logits.shape[1], bias=False).to(D).to(device)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(logits.shape[1], dtype=D, device=device))
    opt = KFAC(lin, lr=1e-9, damping=1.0, fisher="mc", likelihood=likelihood, momentum=0.0, weight_decay=0.0,
               factor_decay=0.0, seed=3)
    total = torch.zeros(logits.shape[1], logits.shape[1], dtype=D, device=device)
    for _ in range(samples):
        opt.zero_grad()
        lin(logits).sum().backward()  # the training loss is irrelevant for the MC Fisher
        opt.step()
        total += opt.blocks[""].g_factor.statistic
    return total / samples


def test_monte_carlo_fisher_gaussian_g_is_identity(device):
    z = torch.randn(50, 3, dtype=D, device=device)
    G = _mc_g_factor("gaussian", z, device)
    # E[εεᵀ] = I; each entry of the average has sd ≈ sqrt(2/(N·S)) ≤ 0.01: 6σ ≈ 0.06
    torch.testing.assert_close(G, torch.eye(3, dtype=D, device=device), atol=0.06, rtol=0)


def test_monte_carlo_fisher_bernoulli_g_is_p_one_minus_p(device):
    z = torch.randn(50, 2, dtype=D, device=device)
    G = _mc_g_factor("bernoulli", z, device)
    p = torch.sigmoid(z)
    expected = torch.diag((p * (1 - p)).mean(0))  # off-diagonals vanish: independent pixels
    torch.testing.assert_close(G, expected, atol=0.02, rtol=0)


def test_monte_carlo_fisher_categorical_g_is_softmax_fisher(device):
    z = torch.randn(50, 4, dtype=D, device=device)
    G = _mc_g_factor("categorical", z, device)
    p = torch.softmax(z, 1)
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    torch.testing.assert_close(G, expected, atol=0.02, rtol=0)


def test_empirical_and_mc_fisher_differ(device):
    z = torch.randn(50, 2, dtype=D, device=device)
    assert not torch.allclose(_mc_g_factor("bernoulli", z, device, samples=20),
                              _mc_g_factor("gaussian", z, device, samples=20), atol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_kfac_lowers_the_loss_of_a_small_mnist_autoencoder(mnist_path, fisher):
    from benchmarks.data.mnist import load_mnist

    images, _ = load_mnist(mnist_path, split="test")
    images = images[:2000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 16), nn.Linear(16, 64), nn.ReLU(),
                          nn.Linear(64, 784))

    def loss_fn(logits, target):
        return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()

    opt = KFAC(model, lr=0.3, damping=3.0, fisher=fisher, likelihood="bernoulli" if fisher == "mc" else None)
    losses = []
    for k in range(100):
        xb = images[(k % 10) * 200 : (k % 10 + 1) * 200]

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(xb), xb)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert opt.skipped_steps == 0
