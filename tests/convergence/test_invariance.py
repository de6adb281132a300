"""P19 (reparametrization invariance of the natural-gradient step where it holds) and P20 (Adam's loss-scale
invariance, diagonal NGD under diagonal reparametrization) as hypothesis properties (theory notes §5).

P19, KFAC, one linear layer z = W a, undamped: with a' = Ω a and W' = Φ W Ω⁻¹ (so z' = Φ z, the same function),
the KFAC step ΔW = G⁻¹ ∇W A⁻¹ satisfies ΔW = Φ⁻¹ ΔW' Ω. The primed quantities are *not* derived from the
unprimed ones by the formula: a' is fed to a second model whose weight is W', and its per-example output
gradients g' come from autograd on that model. Isotropic damping breaks the identity (negative control).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _well_conditioned(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q * (10.0 ** (torch.rand(n, generator=gen, dtype=F64) - 0.5))


def _kfac_step(W: torch.Tensor, a: torch.Tensor, t: torch.Tensor, out_map: torch.Tensor | None, damping: float):
    """KFAC direction for z = W a with loss ½‖M z - t‖² (M = out_map⁻¹ or I), from autograd per-example g."""
    W = W.clone().requires_grad_(True)
    z = a @ W.T  # N × d_out
    pred = z if out_map is None else z @ torch.linalg.inv(out_map).T
    loss_per = 0.5 * (pred - t).pow(2).sum(1)
    g = torch.autograd.grad(loss_per.sum(), z)[0]  # per-example dℓ_i/dz_i
    n = a.shape[0]
    A = a.T @ a / n
    G = g.T @ g / n
    grad_W = g.T @ a / n
    eye_a, eye_g = torch.eye(A.shape[0], dtype=F64), torch.eye(G.shape[0], dtype=F64)
    return torch.linalg.solve(G + damping * eye_g, grad_W) @ torch.linalg.inv(A + damping * eye_a)


@SETTINGS
@given(d_in=st.integers(1, 4), d_out=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_p19_kfac_step_is_invariant_under_affine_reparametrization(d_in, d_out, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 4 * (d_in + d_out) + 8
    a = torch.randn(n, d_in, generator=gen, dtype=F64)
    t = torch.randn(n, d_out, generator=gen, dtype=F64)
    W = torch.randn(d_out, d_in, generator=gen, dtype=F64)
    Omega, Phi = _well_conditioned(d_in, gen), _well_conditioned(d_out, gen)
    step = _kfac_step(W, a, t, None, 0.0)
    # the same function in new coordinates: a' = Ω a, W' = Φ W Ω⁻¹, outputs z' = Φ z mapped back by Φ⁻¹
    a_new = a @ Omega.T
    W_new = Phi @ W @ torch.linalg.inv(Omega)
    step_new = _kfac_step(W_new, a_new, t, Phi, 0.0)
    back = torch.linalg.solve(Phi, step_new) @ Omega
    torch.testing.assert_close(back, step, rtol=1e-7, atol=1e-9 * float(step.abs().max()))


def test_p19_isotropic_damping_breaks_the_invariance():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(40, 3, generator=gen, dtype=F64)
    t = torch.randn(40, 2, generator=gen, dtype=F64)
    W = torch.randn(2, 3, generator=gen, dtype=F64)
    Omega = torch.diag(torch.tensor([10.0, 1.0, 0.1], dtype=F64))
    Phi = torch.diag(torch.tensor([5.0, 0.2], dtype=F64))
    step = _kfac_step(W, a, t, None, 0.5)
    back = torch.linalg.solve(Phi, _kfac_step(Phi @ W @ torch.linalg.inv(Omega), a @ Omega.T, t, Phi, 0.5)) @ Omega
    assert float((back - step).abs().max()) > 1e-2 * float(step.abs().max())


@SETTINGS
@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 10_000))
def test_p20_adam_direction_is_invariant_to_loss_scaling(device, scale, seed):
    """Adam with eps = 0: the trajectories for f and c·f coincide (m/√v is homogeneous of degree 0 in g)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, generator=gen, dtype=F64).to(device)
    y = torch.randn(32, 1, generator=gen, dtype=F64).to(device)
    w0 = torch.randn(3, 1, generator=gen, dtype=F64).to(device)
    paths = []
    for c in (1.0, scale):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=0.05, eps=0.0)
        for k in range(5):
            opt.zero_grad()
            loss = c * 0.5 * (x[k::5] @ w - y[k::5]).pow(2).mean()
            loss.backward()
            opt.step()
        paths.append(w.detach().clone())
    torch.testing.assert_close(paths[0], paths[1], rtol=1e-10, atol=1e-12)


def test_p20_adam_with_eps_is_not_scale_invariant_at_tiny_scales(device):
    """Negative control: with eps > 0 a loss scaled far below eps changes the step."""
    x = torch.ones(4, 1, dtype=F64, device=device)
    steps = []
    for c in (1.0, 1e-9):
        w = torch.zeros(1, 1, dtype=F64, device=device, requires_grad=True)
        opt = torch.optim.Adam([w], lr=0.1, eps=1e-8)
        opt.zero_grad()
        (c * (x @ w - 1.0).pow(2).mean()).backward()
        opt.step()
        steps.append(float(w.detach()))
    assert abs(steps[0] - steps[1]) > 1e-2


@SETTINGS
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_p20_diagonal_fisher_step_is_invariant_to_diagonal_reparametrization(n, seed):
    """θ = D φ: Δθ = F_θ⁻¹∇_θ with F = diag(E[g²]) maps exactly to D·Δφ; a rotation does not (negative control)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(20, n, generator=gen, dtype=F64)  # per-example gradients in θ
    d = 10.0 ** (torch.rand(n, generator=gen, dtype=F64) * 2 - 1)

    def step(per_example):
        return per_example.mean(0) / per_example.pow(2).mean(0)

    torch.testing.assert_close(d * step(G * d), step(G), rtol=1e-10, atol=0.0)
    if n >= 2:
        R, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
        rotated = R @ step(G @ R)  # θ = R φ: g_φ = Rᵀ g_θ, i.e. rows G R
        assert not torch.allclose(rotated, step(G), rtol=1e-6)
