"""Declared capabilities instead of class checks: user factors that subclass nothing of ours plug
into KroneckerBlock and the driver, and receive exactly the statistics, gradients and secant pairs
they declare (float64 oracles computed here from autograd, independently of the capture)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from curvature import (
    BFGSFactor,
    BlockProtocol,
    CurvatureBlock,
    DoubleDamping,
    EMACovarianceFactor,
    FactorProtocol,
    HessianActionFactor,
    KroneckerBlock,
    LBFGSFactor,
    LinearAdapter,
    declares,
)
from optimizers import CurvatureOptimizer, kbfgs_block, kfac_block

D = torch.float64


class PlainFactor:
    """A user factor written from the protocol only: identity H, records what it is given."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.seen: list[Any] = []

    def request_inverse(self, inverter, damping: float) -> None:
        self.seen.append(("damping", damping))

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return V.clone()

    def to_dense(self) -> torch.Tensor:
        return torch.eye(self.dim, dtype=D)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StatisticsFactor(PlainFactor):
    uses_statistics = True

    def observe_gram(self, rows: torch.Tensor, with_ones: bool, scale: float) -> None:
        if with_ones:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        self.seen.append(("statistic", scale * rows.T @ rows))

    def set_statistic(self, statistic: torch.Tensor) -> None:
        self.seen.append(("warm", statistic))

    @property
    def statistic(self) -> torch.Tensor | None:
        return None


class GradientFactor(PlainFactor):
    uses_gradient = True

    def observe_gradient(self, V: torch.Tensor) -> None:
        self.seen.append(("gradient", V.clone()))


class PairFactor(PlainFactor):
    uses_secant_pairs = True

    def observe_pair(self, s: torch.Tensor, y: torch.Tensor, reference_norm: float | None = None):
        self.seen.append(("pair", s.clone(), y.clone()))


def _recorded(factor: PlainFactor, what: str) -> list:
    return [entry[1:] for entry in factor.seen if entry[0] == what]


def _problem(device, n=7):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g, dtype=D).to(device)
    t = torch.randn(n, 2, generator=g, dtype=D).to(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(D).to(device)
    return model, x, t


def _loss(model, x, t):
    return 0.5 * ((model(x) - t) ** 2).sum(1).mean()


def _closure(opt, model, x, t):
    def closure():
        opt.zero_grad()
        loss = _loss(model, x, t)
        loss.backward()
        return loss

    return closure


def _oracle(model, x, t):
    """Inputs, pre-activations and per-sample output gradients of layer '2' by autograd, per sample."""
    hidden = torch.tanh(model[0](x)).detach()
    h = model[2](hidden)
    per_sample = torch.stack([torch.autograd.grad(0.5 * ((h[i] - t[i]) ** 2).sum(), h, retain_graph=True)[0][i]
                              for i in range(x.shape[0])])
    return hidden, h.detach(), per_sample


def test_shipped_factors_declare_their_capabilities():
    dd = DoubleDamping(0.2, 0.5)
    expected = {
        EMACovarianceFactor(3): {"uses_statistics", "has_quadratic_form", "has_eigenbasis"},
        HessianActionFactor(3, 0.1): {"uses_statistics", "uses_matrix_action"},
        BFGSFactor(3, dd): {"uses_secant_pairs"},
        LBFGSFactor(3, dd, memory=2): {"uses_secant_pairs"},
    }
    capabilities = ("uses_statistics", "uses_gradient", "uses_secant_pairs", "uses_matrix_action",
                    "has_quadratic_form", "has_eigenbasis")
    for factor, declared in expected.items():
        assert isinstance(factor, FactorProtocol)
        assert {c for c in capabilities if declares(factor, c)} == declared, type(factor).__name__
    assert isinstance(PlainFactor(2), FactorProtocol) and not isinstance(object(), FactorProtocol)


def test_block_capabilities_follow_the_factors_declarations():
    adapter = LinearAdapter(nn.Linear(3, 2))
    dd = DoubleDamping(0.2, 0.5)
    kfac = KroneckerBlock("l", adapter, EMACovarianceFactor(4), EMACovarianceFactor(2))
    assert (kfac.needs_a, kfac.needs_g, kfac.needs_second_pass, kfac.has_quadratic_form) == (True, True, False, True)
    kbfgs = KroneckerBlock("l", adapter, HessianActionFactor(4, 0.1), BFGSFactor(2, dd))
    assert (kbfgs.needs_a, kbfgs.needs_g, kbfgs.needs_second_pass, kbfgs.has_quadratic_form) == (True, False, True, False)
    # an action factor is updated after the step: the block asks for it even with a statistics G side
    mixed = KroneckerBlock("l", adapter, HessianActionFactor(4, 0.1), EMACovarianceFactor(2))
    assert mixed.needs_second_pass and mixed.needs_g and not mixed.has_quadratic_form
    user = KroneckerBlock("l", adapter, GradientFactor(4), PairFactor(2))
    assert (user.needs_a, user.needs_g, user.needs_second_pass, user.has_quadratic_form) == (False, False, True, False)
    assert isinstance(user, BlockProtocol)


def test_misplaced_or_incomplete_factors_are_rejected_with_a_reason():
    adapter = LinearAdapter(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="G side only"):
        KroneckerBlock("l", adapter, PairFactor(4), PairFactor(2))
    with pytest.raises(ValueError, match="A side only"):
        KroneckerBlock("l", adapter, EMACovarianceFactor(4), HessianActionFactor(2, 0.1))

    class NoApply:
        dim = 4

    with pytest.raises(TypeError, match="apply"):
        KroneckerBlock("l", adapter, NoApply(), PlainFactor(2))
    with pytest.raises(ValueError, match="do not match"):
        KroneckerBlock("l", adapter, PlainFactor(3), PlainFactor(2))


def test_user_statistics_factors_receive_the_per_sample_definitions(device):
    """A, G folded in through observe_gram equal (1/N) Σ ā āᵀ and (1/N) Σ g gᵀ from per-sample autograd."""
    model, x, t = _problem(device)
    made: dict[str, KroneckerBlock] = {}

    def recipe(name, adapter, ctx):
        made[name] = KroneckerBlock(name, adapter, StatisticsFactor(adapter.a_dim), StatisticsFactor(adapter.g_dim))
        return made[name]

    opt = CurvatureOptimizer(model, lr=0.1, blocks={nn.Linear: recipe}, momentum=0.0)
    hidden, _, g = _oracle(model, x, t)
    opt.step(_closure(opt, model, x, t))
    a_bar = torch.cat([hidden, torch.ones(x.shape[0], 1, dtype=D, device=device)], dim=1)
    (A,), = _recorded(made["2"].a_factor, "statistic")
    (G,), = _recorded(made["2"].g_factor, "statistic")
    torch.testing.assert_close(A, a_bar.T @ a_bar / x.shape[0])
    torch.testing.assert_close(G, g.T @ g / x.shape[0])
    assert _recorded(made["2"].a_factor, "damping") and _recorded(made["2"].g_factor, "damping")


def test_user_gradient_and_secant_factors_receive_gradients_and_pairs(device):
    """G side: ∇ as [∇W | ∇b] and the pair (Δh̄, Δḡ) of a second pass; A side: ∇ᵀ (uses_gradient)."""
    model, x, t = _problem(device)
    made: dict[str, KroneckerBlock] = {}

    def recipe(name, adapter, ctx):
        made[name] = KroneckerBlock(name, adapter, GradientFactor(adapter.a_dim), PairFactor(adapter.g_dim))
        return made[name]

    opt = CurvatureOptimizer(model, lr=0.1, blocks={nn.Linear: recipe}, momentum=0.0)
    assert opt.require_closure
    _, h0, g0 = _oracle(model, x, t)
    model.zero_grad()
    _loss(model, x, t).backward()
    grad = torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], dim=1).clone()
    step = -0.1 * grad  # identity factors: P(M) = M
    new_w = model[2].weight.detach() + step[:, :-1]
    new_b = model[2].bias.detach() + step[:, -1]
    opt.step(_closure(opt, model, x, t))
    torch.testing.assert_close(model[2].weight.detach(), new_w)
    torch.testing.assert_close(model[2].bias.detach(), new_b)
    (seen_t,), = _recorded(made["2"].a_factor, "gradient")
    torch.testing.assert_close(seen_t, grad.T)
    _, h1, g1 = _oracle(model, x, t)  # model[0] moved too, so recompute both layers' output at the new point
    (s, y), = _recorded(made["2"].g_factor, "pair")
    torch.testing.assert_close(s, h1.mean(0) - h0.mean(0))
    torch.testing.assert_close(y, g1.mean(0) - g0.mean(0))


def test_action_factor_beside_a_statistics_factor_is_updated_after_the_step(device):
    """H_a (matrix action) with an EMA G: the block asks for the post-step update, so H_a changes."""
    model, x, t = _problem(device)

    def recipe(name, adapter, ctx):
        return KroneckerBlock(name, adapter, HessianActionFactor(adapter.a_dim, 0.3, dtype=D, device=device),
                              EMACovarianceFactor(adapter.g_dim, dtype=D, device=device))

    opt = CurvatureOptimizer(model, lr=0.1, blocks={nn.Linear: recipe})
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    for _ in range(2):
        opt.step(_closure(opt, model, x, t))
    diag = opt.blocks["2"].diagnostics()
    assert diag["a_hessian_action_updates"] + sum(diag["a_hessian_action_skips"].values()) == 2


def test_shipped_diagnostics_keep_their_names(device):
    model, x, t = _problem(device)
    opt = CurvatureOptimizer(model, lr=0.1, damping=0.3, blocks={nn.Linear: kbfgs_block()})
    opt.step(_closure(opt, model, x, t))
    diag = opt.blocks["0"].diagnostics()
    assert set(diag) == {"a_hessian_action_updates", "a_hessian_action_skips", "g_damping", "g_updates"}
    assert diag["g_damping"]["pairs"] == 1


def test_ema_eigenbasis_reconstructs_the_statistic(device):
    f = EMACovarianceFactor(5, dtype=D, device=device)
    rows = torch.randn(9, 4, generator=torch.Generator().manual_seed(0), dtype=D).to(device)
    f.observe_gram(rows, True, 0.25)
    evals, evecs = f.eigenbasis()
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, f.statistic)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(5, dtype=D, device=device))
    assert bool((evals[1:] >= evals[:-1]).all())


def test_describe_names_user_blocks(device):
    model, x, t = _problem(device)

    class MyBlock(CurvatureBlock):
        def precondition(self, grad):
            return grad

    opt = CurvatureOptimizer(model, lr=0.1, blocks={"0": lambda n, a, c: MyBlock(n, a), "2": kfac_block()})
    table = opt.describe()
    assert "MyBlock" in table and "kfac[A: EMACovarianceFactor, G: EMACovarianceFactor]" in table
    assert table.splitlines()[0].split() == ["layer", "module", "adapter", "curvature", "parameters"]
    assert all("LinearAdapter" in line for line in table.splitlines()[1:])
