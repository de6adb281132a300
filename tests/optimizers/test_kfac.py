"""KFAC: dense-solve oracle for the step, Monte-Carlo Fisher statistics, and training on real MNIST."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvature.blocks import vec_c
from curvature.damping import FactoredPi, pi_split
from optimizers import KFAC
from optimizers.communicator import LocalCommunicator
from optimizers.recovery import Recovery
from curvature.factors import OneHotCountFactor

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


# ------------------------------------------------------------------ the constructor (mutation audit of kfac.py)
def _kfac_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 2))


def _settings(opt):
    g = opt.param_groups[0]
    block = opt.slots["0"].block
    return {
        "lr": g["lr"], "damping": g["damping"], "momentum": g["momentum"], "weight_decay": g["weight_decay"],
        "fallback_lr": g["fallback_lr"], "fallback_betas": g["fallback_betas"], "fallback_eps": g["fallback_eps"],
        "factor_decay": block.a_factor.decay, "g_decay": block.g_factor.decay, "approx": block.approx,
        "curvature_update_freq": opt.curvature_update_freq, "inverse_update_freq": opt.inverse_update_freq,
        "inverse_warmup_steps": opt.inverse_warmup_steps, "fisher": opt.fisher, "likelihood": opt.likelihood,
        "kl_clip": opt.kl_clip, "fallback": opt.fallback, "loss_reduction": opt.loss_reduction,
        "lag_factors": opt.lag_factors, "inverse_method": opt.inverse_method, "seed": opt._generator.initial_seed(),
        "strict": opt.strict, "blocks": sorted(opt.slots), "recovery": opt.recovery,
    }


def test_kfac_defaults_are_the_documented_ones():
    """The docstring's defaults: empirical Fisher with lr 0.1, λ 1; with a likelihood the Monte-Carlo
    Fisher with lr 1, λ 3; EMA 0.9, momentum 0.9, τ 1e-5, T_cov 1, T_inv 20, warm-up 20, ..."""
    got = _settings(KFAC(_kfac_model()))
    assert got == {
        "lr": 0.1, "damping": 1.0, "momentum": 0.9, "weight_decay": 1e-5, "fallback_lr": None,
        "fallback_betas": None, "fallback_eps": 1e-8, "factor_decay": 0.9, "g_decay": 0.9, "approx": "expand",
        "curvature_update_freq": 1, "inverse_update_freq": 20, "inverse_warmup_steps": 20, "fisher": "empirical",
        "likelihood": None, "kl_clip": None, "fallback": "sgd", "loss_reduction": "mean", "lag_factors": False,
        "inverse_method": "cholesky", "seed": 0, "strict": False, "blocks": ["0", "2", "4"], "recovery": Recovery(),
    }
    mc = _settings(KFAC(_kfac_model(), likelihood="bernoulli"))
    assert (mc["fisher"], mc["likelihood"], mc["lr"], mc["damping"]) == ("mc", "bernoulli", 1.0, 3.0)


def test_every_kfac_keyword_reaches_the_optimizer():
    recovery = Recovery(step_shrink=0.5)
    opt = KFAC(_kfac_model(), lr=0.7, damping=0.4, momentum=0.3, weight_decay=0.02, factor_decay=0.8,
               curvature_update_freq=2, inverse_update_freq=6, inverse_warmup_steps=3, fisher="mc",
               likelihood="gaussian", kl_clip=0.01, fallback="adam", fallback_lr=0.002, fallback_betas=(0.5, 0.9),
               fallback_eps=1e-6, loss_reduction="sum", lag_factors=True, inverse_method="eigh",
               layer_types=(nn.Linear,), approx="reduce", blocks={"4": None}, seed=7, recovery=recovery, strict=True)
    got = _settings(opt)
    assert got == {
        "lr": 0.7, "damping": 0.4, "momentum": 0.3, "weight_decay": 0.02, "fallback_lr": 0.002,
        "fallback_betas": (0.5, 0.9), "fallback_eps": 1e-6, "factor_decay": 0.8, "g_decay": 0.8, "approx": "reduce",
        "curvature_update_freq": 2, "inverse_update_freq": 6, "inverse_warmup_steps": 3, "fisher": "mc",
        "likelihood": "gaussian", "kl_clip": 0.01, "fallback": "adam", "loss_reduction": "sum", "lag_factors": True,
        "inverse_method": "eigh", "seed": 7, "strict": True, "blocks": ["0"], "recovery": recovery,
    }
    assert got["recovery"] is recovery
    # exclude, param_groups, the communicator and the layout reach it too
    model = _kfac_model()
    excluded = KFAC(model, exclude=["0"], param_groups=[{"params": list(model.parameters()), "lr": 0.05}])
    assert sorted(excluded.slots) == ["2", "4"] and excluded.param_groups[0]["lr"] == 0.05
    comm = LocalCommunicator()
    placed = KFAC(_kfac_model(), distributed=comm, distribute="layerwise")
    assert placed.data_parallel.comm is comm and placed.data_parallel.distribute == "layerwise"


def test_kfac_embeddings_get_the_one_hot_kfac_block_by_default():
    """default_blocks' embedding recipe is KFAC's own (a diagonal one-hot A factor), not the fallback."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 2))
    opt = KFAC(model)
    assert sorted(opt.slots) == ["0", "2"]
    assert isinstance(opt.slots["0"].block.a_factor, OneHotCountFactor)
