"""``CurvatureOptimizer.warm_start``: the factors' statistics set to plain averages over full passes.

Oracles, built independently of the library's capture: for a Linear layer with input rows x_i (bias
coordinate 1 appended: ā_i) and the per-sample loss ℓ_i with pre-activation gradient g_i = ∂ℓ_i/∂s_i
(per-sample autograd on the batch), one batch's statistics are A_b = (1/B) Σ ā_i ā_iᵀ and
G_b = (1/B) Σ g_i g_iᵀ; warm start over n batches sets A = (1/n) Σ_b A_b and G = (1/n) Σ_b G_b (G only
when a loss is given, or with the Monte-Carlo Fisher's sampled targets), leaves the parameters, their
gradients and the step count alone, and returns n. The first step after it equals the step of a twin
whose factors were set by hand to the same averages.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimizers import KFAC, CurvatureOptimizer
from optimizers.recipes import diagonal_block, kfac_block
from tests.optimizers.closures import loss_closure
from tests.optimizers.thread_world import run_ranks

D = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)


def _batches(sizes=(5, 7)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, generator=g, dtype=D), torch.randn(n, 2, generator=g, dtype=D)) for n in sizes]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-sample ℓ_i = ½‖out_i − y_i‖²."""
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def _oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (A_b, G_b) of one batch, from per-sample pre-activation gradients of ℓ_i."""
    lin1, act, lin2 = model[0], model[1], model[2]
    s1 = x @ lin1.weight.T + lin1.bias
    h = act(s1)
    s2 = (h @ lin2.weight.T + lin2.bias).detach().requires_grad_(True)
    s1 = s1.detach().requires_grad_(True)
    out = act(s1) @ lin2.weight.T.detach() + lin2.bias.detach()
    per_sample = 0.5 * ((out - y) ** 2).sum(1)  # ℓ_i; ∂ℓ_i/∂s1_i is row i of the gradient of Σ ℓ_i
    (g1,) = torch.autograd.grad(per_sample.sum(), s1)
    (g2,) = torch.autograd.grad((0.5 * ((s2 - y) ** 2).sum(1)).sum(), s2)
    n = x.shape[0]
    ones = torch.ones(n, 1, dtype=D)
    a1, a2 = torch.cat([x, ones], 1), torch.cat([h.detach(), ones], 1)
    return {"0": (a1.T @ a1 / n, g1.T @ g1 / n), "2": (a2.T @ a2 / n, g2.T @ g2 / n)}


def _averages(model, batches):
    stats = [_oracle(model, x, y) for x, y in batches]
    return {name: (sum(s[name][0] for s in stats) / len(stats), sum(s[name][1] for s in stats) / len(stats))
            for name in ("0", "2")}


def test_empirical_fisher_sets_both_factors_to_full_pass_averages():
    model, batches = _model(), _batches()
    opt = KFAC(model, lr=0.1, damping=0.3)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.warm_start(batches, loss_fn) == 2
    for name, (a, g) in _averages(model, batches).items():
        block = opt.blocks[name]
        torch.testing.assert_close(block.a_factor.statistic, a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(block.g_factor.statistic, g, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert opt.steps == 0


def test_without_a_loss_only_a_is_set_and_pairs_are_read_as_inputs_and_targets():
    model, batches = _model(), _batches()
    opt = KFAC(model, lr=0.1, damping=0.3)
    g_before = {n: b.g_factor.statistic.clone() for n, b in opt.blocks.items()}
    assert opt.warm_start(batches) == 2  # (inputs, targets) pairs: the targets are not fed to the model
    for name, (a, _) in _averages(model, batches).items():
        torch.testing.assert_close(opt.blocks[name].a_factor.statistic, a, rtol=1e-12, atol=1e-14)
        assert torch.equal(opt.blocks[name].g_factor.statistic, g_before[name])
    model2 = _model()
    opt2 = KFAC(model2, lr=0.1, damping=0.3)
    assert opt2.warm_start([x for x, _ in batches]) == 2  # bare inputs
    assert torch.equal(opt2.blocks["0"].a_factor.statistic, opt.blocks["0"].a_factor.statistic)
    assert opt2.warm_start([[x, y] for x, y in batches], loss_fn) == 2  # a list pair is a pair too
    torch.testing.assert_close(opt2.blocks["2"].g_factor.statistic, _averages(model2, batches)["2"][1],
                               rtol=1e-12, atol=1e-14)


def test_monte_carlo_fisher_sets_g_from_sampled_targets_without_a_loss():
    model, batches = _model(), _batches()
    opt = KFAC(model, lr=0.1, damping=0.3, fisher="mc", likelihood="gaussian", seed=3)
    assert opt.warm_start([x for x, _ in batches]) == 2
    for name in ("0", "2"):
        g = opt.blocks[name].g_factor.statistic
        assert float(g.trace()) > 0 and torch.equal(g, g.T)
    # Gaussian likelihood: the output layer's sampled gradient is s − (s + ε) = −ε, so E[ggᵀ] ≈ I (2 × 2)
    assert float((opt.blocks["2"].g_factor.statistic - torch.eye(2, dtype=D)).abs().max()) < 1.0


def test_no_batches_is_an_error():
    opt = KFAC(_model(), lr=0.1, damping=0.3)
    with pytest.raises(ValueError, match="^warm_start got no batches$"):
        opt.warm_start([])


def test_the_first_step_after_it_matches_a_twin_with_the_same_statistics_set_by_hand():
    batches = _batches((6, 4, 6))
    model, twin_model = _model(), _model()
    opt = KFAC(model, lr=0.1, damping=0.3, inverse_update_freq=5)
    twin = KFAC(twin_model, lr=0.1, damping=0.3, inverse_update_freq=5)
    opt.warm_start(batches[:2], loss_fn)
    for name, (a, g) in _averages(twin_model, batches[:2]).items():
        twin.blocks[name].warm_start(a, g)
    x, y = batches[2]
    for o, m in ((opt, model), (twin, twin_model)):
        def closure(o=o, m=m):
            o.zero_grad()
            loss = loss_fn(m(x), y)
            loss.backward()
            return loss
        o.step(closure)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    for name in ("0", "2"):
        torch.testing.assert_close(opt.blocks[name].a_factor.statistic, twin.blocks[name].a_factor.statistic,
                                   rtol=1e-12, atol=1e-14)


def test_ranks_average_over_all_their_batches_weighted_by_count():
    """Two thread ranks with 1 and 2 batches: every rank's factors are the average over all 3 batches
    (each rank's average weighted by its batch count), and each rank returns its own count."""
    batches = _batches((5, 7, 3))
    shares = [batches[:1], batches[1:]]
    models = [_model(), _model()]  # built before the threads: torch.manual_seed is global

    def rank(comm):
        opt = KFAC(models[comm.rank], lr=0.1, damping=0.3, distributed=comm)
        count = opt.warm_start(shares[comm.rank], loss_fn)
        return count, {n: (b.a_factor.statistic.clone(), b.g_factor.statistic.clone()) for n, b in opt.blocks.items()}

    results, _ = run_ranks(2, rank)
    assert [count for count, _ in results] == [1, 2]
    for name, (a, g) in _averages(_model(), batches).items():
        for _, stats in results:
            torch.testing.assert_close(stats[name][0], a, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(stats[name][1], g, rtol=1e-12, atol=1e-14)


class _SkipsALayer(nn.Module):
    """Three Linear layers of which the forward uses only the first and the last (a branch never taken)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.unused, self.last = nn.Linear(3, 4).to(D), nn.Linear(4, 4).to(D), nn.Linear(4, 2).to(D)

    def forward(self, x):
        return self.last(torch.tanh(self.first(x)))


def test_a_layer_no_batch_reaches_keeps_its_statistics_and_the_others_are_set():
    model, batches = _SkipsALayer(), _batches()
    opt = KFAC(model, lr=0.1, damping=0.3)
    unused = opt.blocks["unused"].a_factor.statistic.clone()
    assert opt.warm_start(batches, loss_fn) == 2
    assert torch.equal(opt.blocks["unused"].a_factor.statistic, unused)
    ones = [torch.ones(len(x), 1, dtype=D) for x, _ in batches]
    a_first = [torch.cat([x, o], 1) for (x, _), o in zip(batches, ones)]
    a_last = [torch.cat([torch.tanh(model.first(x)).detach(), o], 1) for (x, _), o in zip(batches, ones)]
    for name, rows in (("first", a_first), ("last", a_last)):
        want = sum(a.T @ a / len(a) for a in rows) / len(rows)
        torch.testing.assert_close(opt.blocks[name].a_factor.statistic, want, rtol=1e-12, atol=1e-14)


def test_a_bare_batch_of_two_rows_is_inputs_not_a_pair():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 3, generator=g, dtype=D) for _ in range(2)]
    model = _model()
    opt = KFAC(model, lr=0.1, damping=0.3)
    assert opt.warm_start(xs) == 2
    abar = [torch.cat([x, torch.ones(2, 1, dtype=D)], 1) for x in xs]
    torch.testing.assert_close(opt.blocks["0"].a_factor.statistic, sum(a.T @ a / 2 for a in abar) / 2,
                               rtol=1e-12, atol=1e-14)


def test_monte_carlo_draws_come_from_the_optimizers_generator_not_the_global_one():
    inputs = [x for x, _ in _batches()]
    stats = []
    for global_seed in (100, 200):
        opt = KFAC(_model(), lr=0.1, damping=0.3, fisher="mc", likelihood="gaussian", seed=3)
        torch.manual_seed(global_seed)
        opt.warm_start(inputs)
        stats.append(opt.blocks["2"].g_factor.statistic)
    assert torch.equal(stats[0], stats[1])


def test_monte_carlo_step_after_it_matches_a_twin_with_the_same_statistics_and_generator_state():
    batches = _batches((6, 4, 6))
    model, twin_model = _model(), _model()
    opt = KFAC(model, lr=0.1, damping=0.3, fisher="mc", likelihood="gaussian", seed=3, inverse_update_freq=5)
    twin = KFAC(twin_model, lr=0.1, damping=0.3, fisher="mc", likelihood="gaussian", seed=3, inverse_update_freq=5)
    opt.warm_start([x for x, _ in batches[:2]])
    for name, block in opt.blocks.items():
        twin.blocks[name].warm_start(block.a_factor.statistic.clone(), block.g_factor.statistic.clone())
    twin._generator.set_state(opt._generator.get_state())
    x, y = batches[2]
    for o, m in ((opt, model), (twin, twin_model)):
        o.step(loss_closure(o, m, loss_fn, x, y))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_an_embeddings_a_is_the_token_frequency_over_the_whole_vocabulary():
    """One-hot inputs: A_b = (1/B) Σ e_i e_iᵀ is diagonal, the tokens' frequencies, over all 10 words even
    when a batch never shows the last ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 3), nn.Linear(3, 2)).to(D)
    batches = [torch.tensor([0, 1, 1, 3]), torch.tensor([2, 2, 5])]
    opt = KFAC(model, lr=0.1, damping=0.3)
    assert opt.warm_start(batches) == 2
    want = sum(torch.bincount(b, minlength=10).to(D) / len(b) for b in batches) / 2
    torch.testing.assert_close(opt.blocks["0"].a_factor.counts, want, rtol=1e-12, atol=1e-14)


def test_a_reduce_block_gets_per_sample_mean_rows_and_summed_gradients():
    """A Linear over a (B, T, d) input with kfac_block(approx="reduce"): per sample b the mean input row
    â_b = mean_t ā_bt and the summed output residual ê_b = Σ_t (out_bt − y_bt); A = (1/B) Σ_b â_b â_bᵀ and,
    for ℓ_b = ½ Σ_t ‖out_bt − y_bt‖², G = (1/B) Σ_b ê_b ê_bᵀ (expand would average over all B·T rows)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(D)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 5, 3, generator=g, dtype=D), torch.randn(4, 5, 2, generator=g, dtype=D)
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block(approx="reduce")}, damping=0.3)
    seq_loss = lambda out, t: 0.5 * ((out - t) ** 2).sum((1, 2)).mean()  # noqa: E731
    assert opt.warm_start([(x, y)], seq_loss) == 1
    a_hat = torch.cat([x, torch.ones(4, 5, 1, dtype=D)], 2).mean(1)
    e_hat = (model(x) - y).detach().sum(1)
    block = next(iter(opt.blocks.values()))
    torch.testing.assert_close(block.a_factor.statistic, a_hat.T @ a_hat / 4, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(block.g_factor.statistic, e_hat.T @ e_hat / 4, rtol=1e-12, atol=1e-14)


def test_blocks_without_an_a_statistic_or_an_approx_are_passed_over():
    """A gradient-source diagonal block captures no input rows and a DiagonalBlock has no ``approx``: warm
    start leaves them alone and still sets the KFAC block after them (A of the second layer's inputs)."""
    model, batches = _model(), _batches()
    opt = CurvatureOptimizer(model, 0.1, {"0": diagonal_block(source="gradient"), "2": kfac_block()}, damping=0.3)
    assert not hasattr(opt.blocks["0"], "approx")
    assert opt.warm_start([x for x, _ in batches]) == 2
    torch.testing.assert_close(opt.blocks["2"].a_factor.statistic, _averages(model, batches)["2"][0],
                               rtol=1e-12, atol=1e-14)
    empirical = CurvatureOptimizer(_model(), 0.1, {nn.Linear: diagonal_block()}, damping=0.3)
    assert not hasattr(empirical.blocks["0"], "approx")
    assert empirical.warm_start([x for x, _ in batches]) == 2
