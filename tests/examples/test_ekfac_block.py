"""EKFAC as a user block: with the eigenbasis fixed, its operator equals the dense float64
(Q_A ⊗ Q_G) diag(1/(s + λ)) (Q_A ⊗ Q_G)ᵀ with s from per-sample autograd gradients; on the MNIST
autoencoder it trains at least as well as KFAC at the same settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvature import vec_c
from optimizers import CurvatureOptimizer, kfac_block

D = torch.float64
DECAY, LAM, LR = 0.8, 0.1, 0.05


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)).to(D).to(device)


def _loss(model, x, t):
    return 0.5 * ((model(x) - t) ** 2).sum(1).mean()


def _per_sample_gradients(model, x, t) -> dict[str, torch.Tensor]:
    """[∇W | ∇b] of each sample's own loss ℓ_i, per layer: [N, d_g, d_a]."""
    out: dict[str, list] = {"0": [], "3": []}
    for i in range(x.shape[0]):
        model.zero_grad()
        (0.5 * ((model(x[i:i + 1]) - t[i:i + 1]) ** 2).sum()).backward()
        for name in out:
            layer = model[int(name)]
            out[name].append(torch.cat([layer.weight.grad.reshape(layer.weight.shape[0], -1), layer.bias.grad[:, None]], 1))
    return {name: torch.stack(grads) for name, grads in out.items()}


def test_ekfac_operator_with_a_fixed_basis_equals_the_dense_computation(device, example):
    ns = example("ekfac_block")
    model = _model(device)
    opt = CurvatureOptimizer(model, lr=LR, damping=LAM, momentum=0.0, blocks={nn.Linear: ns["ekfac_block"](DECAY),
                             nn.Conv2d: ns["ekfac_block"](DECAY)}, inverse_update_freq=10**6)
    assert "ekfac" in opt.describe()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 2, 4, 4, generator=g, dtype=D).to(device), torch.randn(5, 2, generator=g, dtype=D).to(device))
               for _ in range(4)]
    s_oracle: dict[str, torch.Tensor] = {}
    for k, (x, t) in enumerate(batches):
        per_sample = _per_sample_gradients(model, x, t)

        def closure(x=x, t=t):
            opt.zero_grad()
            loss = _loss(model, x, t)
            loss.backward()
            return loss

        opt.step(closure)
        for name, block in opt.blocks.items():
            q_a, q_g = block.basis
            if k == 0:  # the basis was set at step 0; s restarted from KFAC's eigenvalues e_G e_Aᵀ
                A_rot, G_rot = q_a.T @ block.A.statistic @ q_a, q_g.T @ block.G.statistic @ q_g
                torch.testing.assert_close(A_rot, torch.diag(A_rot.diagonal()))  # Q_A diagonalizes A
                torch.testing.assert_close(G_rot, torch.diag(G_rot.diagonal()))
                s_oracle[name] = torch.outer(G_rot.diagonal(), A_rot.diagonal())
            else:
                rotated = q_g.T @ per_sample[name] @ q_a  # Q_Gᵀ ∇_i Q_A
                s_oracle[name] = DECAY * s_oracle[name] + (1 - DECAY) * (rotated ** 2).mean(0)
    for name, block in opt.blocks.items():
        q_a, q_g = block.basis
        torch.testing.assert_close(block.s, s_oracle[name])
        Q = torch.kron(q_a, q_g)
        P = Q @ torch.diag(1.0 / (vec_c(s_oracle[name]) + LAM)) @ Q.T
        M = torch.randn(q_g.shape[0], q_a.shape[0], generator=g, dtype=D).to(device)
        torch.testing.assert_close(vec_c(block.precondition(M)), P @ vec_c(M))
        torch.testing.assert_close(block.to_dense(), P)
        lo, hi = block.spectrum_bounds()
        evals = torch.linalg.eigvalsh(P)
        assert math.isclose(lo, float(evals[0]), rel_tol=1e-9) and math.isclose(hi, float(evals[-1]), rel_tol=1e-9)


def test_ekfac_state_round_trips(device, example):
    ns = example("ekfac_block")
    model = _model(device)
    opt = CurvatureOptimizer(model, lr=LR, damping=LAM, blocks={nn.Linear: ns["ekfac_block"](), nn.Conv2d: ns["ekfac_block"]()})
    x, t = torch.randn(5, 2, 4, 4, dtype=D, device=device), torch.randn(5, 2, dtype=D, device=device)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, t)
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state_dict()
    clone_model = _model(device)
    clone_model.load_state_dict(model.state_dict())
    clone = CurvatureOptimizer(clone_model, lr=LR, damping=LAM, blocks={nn.Linear: ns["ekfac_block"](),
                               nn.Conv2d: ns["ekfac_block"]()})
    clone.load_state_dict(state)
    M = torch.randn(2, 13, dtype=D, device=device)
    torch.testing.assert_close(clone.blocks["3"].precondition(M), opt.blocks["3"].precondition(M), rtol=0, atol=0)


@pytest.mark.slow
def test_ekfac_trains_the_mnist_autoencoder_at_least_as_well_as_kfac(mnist_path, example):
    """200 steps, same settings (lr, λ, momentum, weight decay, T_inv, warm-up) for both. To keep the run
    short: 1,000 test-split images at half resolution (2×2 average pooling, 196 pixels in [0, 1]) and a
    narrow 196-32-8-32-196 autoencoder (when written: KFAC 42.0, EKFAC 37.5 mean loss of the last 20 steps)."""
    from benchmarks.data.mnist import load_mnist

    images = load_mnist(mnist_path, split="test")[0][:1000]
    images = nn.functional.avg_pool2d(images.reshape(-1, 1, 28, 28), 2).reshape(-1, 196)
    ns = example("ekfac_block")

    def run(recipe) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(196, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 32), nn.ReLU(),
                              nn.Linear(32, 196))
        opt = CurvatureOptimizer(model, lr=0.3, damping=3.0, blocks={nn.Linear: recipe}, momentum=0.9,
                                 weight_decay=1e-5, inverse_update_freq=20, inverse_warmup_steps=5)
        losses = []
        for k in range(200):
            xb = images[(k % 10) * 100:(k % 10 + 1) * 100]

            def closure():
                opt.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(model(xb), xb, reduction="none").sum(1).mean()
                loss.backward()
                return loss

            losses.append(float(opt.step(closure).detach()))
        assert opt.skipped_steps == 0 and all(math.isfinite(v) for v in losses)
        return losses

    kfac, ekfac = run(kfac_block()), run(ns["ekfac_block"]())
    final_kfac, final_ekfac = sum(kfac[-20:]) / 20, sum(ekfac[-20:]) / 20  # a full pass over the 1,000 images, twice
    assert final_kfac < 0.5 * kfac[0]  # both actually train ...
    assert final_ekfac <= final_kfac  # ... and EKFAC at least as well
