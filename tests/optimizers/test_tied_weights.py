"""Tied weights: one summed block when every layer holds the very same weight and bias, else fallback.

The oracle is independent of the capture: the statistics of a full tie are those of *one* module
applied to all the tied layers' inputs (expand over calls, one sample count per pass), so in the
exact setting (layers linear in the shared weight, loss terms ``σ·cᵀh`` with random signs) the
Kronecker product of the block's factors is the dense empirical Fisher over both calls, built here
from per-term gradients by ``torch.func``; the preconditioned gradient is compared with a dense
float64 solve.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from benchmarks.transformer import TinyDecoder
from curvature.adapters import UnsupportedLayerError
from curvature.blocks import vec_c
from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer
from optimizers.recipes import kbfgs_block, kfac_block

D = torch.float64
N, DIM = 5, 3


class TiedPair(nn.Module):
    """Two Linear layers holding the same weight and bias, applied to two inputs; ``loss`` is the
    exact setting ``(1/N) Σ_n Σ_k σ_nk cᵀ h_nk``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(DIM, DIM)
        self.b = nn.Linear(DIM, DIM)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias

    def forward(self, x1, x2):
        return self.a(x1), self.b(x2)


class OneModuleTwice(nn.Module):
    """The reference: one Linear applied to both inputs."""

    def __init__(self, pair: TiedPair) -> None:
        super().__init__()
        self.a = copy.deepcopy(pair.a)

    def forward(self, x1, x2):
        return self.a(x1), self.a(x2)


def _data(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1, x2 = (torch.randn(N, DIM, generator=g, dtype=D).to(device) for _ in range(2))
    c = torch.randn(DIM, generator=g, dtype=D).to(device)
    sign = (torch.randint(0, 2, (N, 2), generator=g) * 2 - 1).to(device, D)
    return x1, x2, c, sign


def _loss(model, x1, x2, c, sign):
    h1, h2 = model(x1, x2)
    return ((h1 @ c) * sign[:, 0] + (h2 @ c) * sign[:, 1]).mean()


def _one_kfac_step(model, data, damping):
    """One KFAC step (no momentum, factors = this batch); returns (block, gradient matrix, direction)."""
    opt = CurvatureOptimizer(model, lr=0.1, damping=damping, momentum=0.0, blocks={nn.Linear: kfac_block(decay=0.0)})
    seen = {}
    opt.register_precondition_hook(lambda k, name, block, g, d: seen.update({name: (block, g.clone(), d.clone())}))

    def closure():
        opt.zero_grad()
        loss = _loss(model, *data)
        loss.backward()
        return loss

    opt.step(closure)
    return opt, seen


def test_summed_block_is_the_fisher_over_both_layers_calls(device):
    torch.manual_seed(0)
    pair = TiedPair().to(D).to(device)
    ref = OneModuleTwice(pair).to(device)
    data = _data(device)
    x1, x2, c, sign = data
    w0 = {k: v.detach().clone() for k, v in pair.a.named_parameters()}
    damping = 0.1

    # independent oracle: per-term gradients with respect to the shared (weight, bias)
    def term(n, k):
        inp = (x1, x2)[k][n]
        return lambda p: sign[n, k] * (functional_call(pair.a, p, (inp,)) @ c)

    def flat(f):
        g = grad(f)(w0)
        return vec_c(torch.cat([g["weight"], g["bias"].reshape(-1, 1)], 1))

    grads = torch.stack([flat(term(n, k)) for n in range(N) for k in range(2)])
    fisher = grads.T @ grads / N  # loss (1/N) Σ_n Σ_k ℓ_nk: N samples, two calls each
    abar = torch.cat([torch.cat([x1, x2]), torch.ones(2 * N, 1, dtype=D, device=device)], 1)
    A = abar.T @ abar / N  # (1/N) Σ over both calls' rows
    G = torch.outer(c, c) * 2 * N / (2 * N)  # ğ = N·∂L/∂h = σ c: (1/R) Σ ğğᵀ with R = 2N rows
    full = torch.func.grad(lambda p: sum(term(n, k)(p) for n in range(N) for k in range(2)) / N)(w0)
    M = torch.cat([full["weight"], full["bias"].reshape(-1, 1)], 1)

    opt, seen = _one_kfac_step(pair, data, damping)
    assert list(opt.slots) == ["a"] and [n for n, _ in opt.slots["a"].shared] == ["b"]
    block, g, d = seen["a"]
    torch.testing.assert_close(block.a_factor.statistic, A)
    torch.testing.assert_close(block.g_factor.statistic, G)
    torch.testing.assert_close(torch.kron(block.a_factor.statistic, block.g_factor.statistic), fisher)
    torch.testing.assert_close(g, M)
    r = math.sqrt(damping)  # Tikhonov split √λ / √λ
    dense = torch.linalg.solve(torch.kron(A + r * torch.eye(DIM + 1, dtype=D, device=device),
                                          G + r * torch.eye(DIM, dtype=D, device=device)), vec_c(M))
    torch.testing.assert_close(vec_c(d), dense)

    _, seen_ref = _one_kfac_step(ref, data, damping)  # one module applied to both inputs
    block_ref, g_ref, d_ref = seen_ref["a"]
    torch.testing.assert_close(block.a_factor.statistic, block_ref.a_factor.statistic)
    torch.testing.assert_close(block.g_factor.statistic, block_ref.g_factor.statistic)
    torch.testing.assert_close(d, d_ref)


@pytest.mark.parametrize("make", [
    lambda m: KFAC(m, lr=0.1, damping=0.3),
    lambda m: KBFGS(m, lr=0.1, damping=0.3),
    lambda m: KBFGSL(m, lr=0.1, damping=0.3, memory=3),
], ids=["kfac", "kbfgs", "kbfgsl"])
def test_tied_pair_trains_like_one_module_applied_twice(device, make):
    """Every step (statistics, K-BFGS's pairs from both passes, the update) of the tied pair equals
    that of one module applied to both inputs."""
    torch.manual_seed(1)
    pair = TiedPair().to(D).to(device)
    ref = OneModuleTwice(pair).to(device)
    x1, x2, c, sign = _data(device, seed=2)

    def nonlinear(model):  # a loss with curvature, so the pairs are not trivial
        h1, h2 = model(x1, x2)
        return (torch.tanh(h1) @ c).pow(2).mean() + torch.sin(h2 @ c).mean()

    runs = []
    for model in (pair, ref):
        opt = make(model)
        for _ in range(4):
            def closure(opt=opt, model=model):
                opt.zero_grad()
                loss = nonlinear(model)
                loss.backward()
                return loss
            opt.step(closure)
        runs.append((opt, model.a.weight.detach().clone(), model.a.bias.detach().clone()))
    (opt, w, b), (_, w_ref, b_ref) = runs
    assert "b" in opt.describe() and "one summed block with 'a'" in opt.describe()
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(b, b_ref)


class TiedAutoencoder(nn.Module):
    """x → tanh(enc x) → tanh(mid ·) → tanh(enc ·) → out: ``enc`` is applied twice through a tied copy."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.mid = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6)
        self.dec.weight, self.dec.bias = self.enc.weight, self.enc.bias
        self.out = nn.Linear(6, 6)

    def forward(self, x):
        return self.out(torch.tanh(self.dec(torch.tanh(self.mid(torch.tanh(self.enc(x)))))))


@pytest.mark.parametrize("kind", ["kfac", "kbfgs", "kbfgsl"])
def test_model_with_a_tied_linear_pair_trains(kind):
    torch.manual_seed(0)
    model = TiedAutoencoder()
    x = torch.randn(32, 6)
    y = torch.sin(2 * x)
    opt = {"kfac": lambda: KFAC(model, lr=1.0, damping=0.3), "kbfgs": lambda: KBFGS(model, lr=1.0, damping=0.3),
           "kbfgsl": lambda: KBFGSL(model, lr=1.0, damping=0.3, memory=5)}[kind]()
    table = opt.describe()
    assert "fallback" not in table and "one summed block with 'enc'" in table
    lines = table.splitlines()[1:]
    assert {line.split()[0] for line in lines} == {"enc", "mid", "dec", "out"}
    assert sum(int(line.split()[-1]) for line in lines) == sum(p.numel() for p in model.parameters())
    losses = []
    for _ in range(100):
        def closure():
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    assert all(math.isfinite(v) for v in losses)
    assert opt.counters["skipped_steps"] == 0 and opt.counters["reverted_steps"] == 0
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, (losses[:3], losses[-3:])


def test_ties_that_cannot_be_one_block_fall_back_with_the_reason():
    # weight shared, biases separate: a partial tie
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    model[2].weight = model[0].weight
    opt = KFAC(model, lr=0.1)
    assert not opt.slots and set(opt.fallback_modules) == {"0", "2"}
    assert "partial tie between ['0', '2']" in opt.describe()
    with pytest.raises(UnsupportedLayerError, match="partial tie"):
        KFAC(model, lr=0.1, fallback="error")

    # embedding tied with the output head: transposed Kronecker structures
    dec = TinyDecoder(6, dim=8, heads=2, layers=1, max_len=4, tied=True)
    table = KFAC(dec, lr=0.1).describe()
    assert "transposed" in table and "['tok', 'head']" in table

    # a full tie where one member is excluded, or mapped to another recipe
    pair = TiedPair()
    opt = KFAC(pair, lr=0.1, exclude=["b"])
    assert opt.fallback_reasons == {"a": "tied weights shared with ['b'], which fall back on their own", "b": "excluded"}
    opt = CurvatureOptimizer(pair, lr=0.1, blocks={"a": kfac_block(), "b": kbfgs_block()})
    assert "which blocks maps to different recipes" in opt.fallback_reasons["a"]
    # every parameter counted once in describe()
    lines = opt.describe().splitlines()[1:]
    assert sum(int(line.split()[-1]) for line in lines) == sum(p.numel() for p in pair.parameters())


def test_tied_calls_on_different_batch_sizes_raise_before_mutating():
    """As for one module called several times: every call in one forward must see the same samples."""
    pair = TiedPair()
    opt = KFAC(pair, lr=0.1)
    before = [p.detach().clone() for p in pair.parameters()]
    h1, h2 = pair(torch.randn(4, DIM), torch.randn(8, DIM))
    (h1.sum() + h2.sum()).backward()
    with pytest.raises(RuntimeError, match="layer 'a': a layer was called with different batch sizes"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(pair.parameters(), before)) and opt.steps == 0 and not opt.state
