"""E3: per-example gradients, sigma_1^2 and the 1/m scaling of the minibatch-gradient variance.

Oracles: explicit per-example autograd; sigma_1^2 from its definition; V(m) = sigma_1^2/m for i.i.d.
draws and sigma_1^2/m (N-m)/(N-1) for uniform subsets.  Planted violations: batches made of one
example repeated m times (variance does not shrink), and subsets declared as i.i.d. draws at m ~ N/2.
PASS cases use alpha = 1e-6 (a ~5-sigma level) so a fixed-seed false alarm is not a near miss;
the planted cases must reject at p < 1e-12.
"""

from __future__ import annotations

import pytest
import torch

from convergence import problems
from convergence.checks.variance import (
    VarianceConfig,
    batch_gradient,
    check_variance,
    expected_variance,
    full_gradient,
    gradient_noise,
    iid_indices,
    loaded_parameters,
    per_example_gradients,
    subset_indices,
)
from convergence.results import Verdict




def _problem(device, n=128):
    return problems.least_squares(n=n, d=4, noise=0.5, seed=1, device=device)


def test_per_example_gradients_match_autograd_and_sigma(device):
    prob = problems.tanh_mlp(n=24, device=device)
    x, y = prob.full_batch
    table = per_example_gradients(prob.model, prob.loss_fn, x, y, chunk_size=5)
    for i in (0, 7, 23):
        _, g = batch_gradient(prob.model, prob.loss_fn, x[i : i + 1], y[i : i + 1])
        torch.testing.assert_close(table[i], g, rtol=1e-10, atol=1e-12)
    _, full = full_gradient(prob.model, prob.loss_fn, x, y, chunk_size=7)
    torch.testing.assert_close(table.mean(0), full, rtol=1e-10, atol=1e-12)
    noise = gradient_noise(prob.model, prob.loss_fn, x, y, chunk_size=5, keep_table=True)
    sigma = float(((table - table.mean(0)) ** 2).sum(1).mean())
    assert noise.sigma1_sq == pytest.approx(sigma, rel=1e-10)
    torch.testing.assert_close(noise.gradient, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(noise.table, table)


def test_loaded_parameters_restores_the_model(device):
    prob = _problem(device)
    before = prob.parameters_flat().clone()
    with loaded_parameters(prob.model, torch.zeros_like(before)):
        assert float(prob.parameters_flat().abs().max()) == 0.0
    torch.testing.assert_close(prob.parameters_flat(), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="flat vector"):
        with loaded_parameters(prob.model, torch.zeros(3, dtype=before.dtype, device=device)):
            pass


def test_expected_variance_formula():
    assert expected_variance(2.0, 4, 10, replacement=True) == pytest.approx(0.5)
    assert expected_variance(2.0, 4, 10, replacement=False) == pytest.approx(0.5 * 6 / 9)
    assert expected_variance(2.0, 10, 10, replacement=False) == 0.0
    with pytest.raises(ValueError):
        expected_variance(1.0, 0, 10, True)


def test_iid_sampling_passes_and_ratios_are_near_one(device):
    prob = _problem(device)
    x, y = prob.full_batch
    res = check_variance(prob.model, prob.loss_fn, x, y, num_batches=300, alpha=1e-6, seed=3,
                         sigma_history=[(0, 1.0), (5, 2.0)])
    assert res.verdict is Verdict.PASS, res.evidence
    assert res.evidence["p_value"] > 1e-6
    rows = res.evidence["per_batch_size"]
    assert [r["m"] for r in rows] == [1, 2, 4, 8, 16, 32, 64, 128]
    sigma = res.evidence["sigma1_sq"]
    for r in rows:
        assert r["V_pred"] == pytest.approx(sigma / r["m"])
        assert abs(r["ratio"] - 1.0) < 0.35  # R = 300 draws: sd of the ratio is about 0.1
    slope = res.evidence["rule_b"]
    assert slope["ci"][0] <= -1.0 <= slope["ci"][1]
    assert res.evidence["sigma_history"]["max"] == 2.0


def test_subset_sampling_with_finite_population_correction_passes(device):
    prob = _problem(device, n=64)
    x, y = prob.full_batch
    res = check_variance(prob.model, prob.loss_fn, x, y, replacement=False, num_batches=300, alpha=1e-6, seed=4)
    assert res.verdict is Verdict.PASS, res.evidence
    assert max(r["m"] for r in res.evidence["per_batch_size"]) == 32  # m < N/2
    m32 = res.evidence["per_batch_size"][-1]
    assert m32["V_pred"] == pytest.approx(res.evidence["sigma1_sq"] / 32 * 32 / 63)


def test_repeated_example_batches_fail(device):
    """Planted violation: a 'batch' of m copies of one example has variance sigma_1^2 for every m."""
    prob = _problem(device)
    x, y = prob.full_batch

    def repeated(n, m, gen):
        return torch.randint(0, n, (1,), generator=gen).repeat(m)

    res = check_variance(prob.model, prob.loss_fn, x, y, sampler=repeated, num_batches=200, seed=0)
    assert res.verdict is Verdict.FAIL
    assert res.evidence["p_value"] < 1e-12
    assert abs(res.evidence["rule_b"]["slope"]) < 0.2  # flat instead of -1
    ratios = {r["m"]: r["ratio"] for r in res.evidence["per_batch_size"]}
    assert ratios[64] > 20  # V_hat(64) ~ sigma^2 = 64 V(64)


def test_subsets_declared_as_iid_fail_at_large_batches(device):
    """Planted violation: sampling without replacement while V(m) assumes i.i.d. draws (m = N/2)."""
    prob = _problem(device, n=64)
    x, y = prob.full_batch
    res = check_variance(prob.model, prob.loss_fn, x, y, sampler=subset_indices, batch_sizes=(1, 4, 16, 32),
                         replacement=True, num_batches=300, seed=5)
    assert res.verdict is Verdict.FAIL
    assert res.evidence["p_value"] < 1e-6
    last = res.evidence["per_batch_size"][-1]
    assert last["ratio"] == pytest.approx(32 / 63, abs=0.15)


def test_direct_batch_gradients_agree_with_the_table(device):
    prob = _problem(device, n=48)
    x, y = prob.full_batch
    kw = dict(batch_sizes=(1, 2, 8), num_batches=40, seed=9, bootstrap=200)
    a = check_variance(prob.model, prob.loss_fn, x, y, **kw)
    b = check_variance(prob.model, prob.loss_fn, x, y, table_limit=0, **kw)
    for ra, rb in zip(a.evidence["per_batch_size"], b.evidence["per_batch_size"]):
        assert ra["V_hat"] == pytest.approx(rb["V_hat"], rel=1e-9)


def test_config_validation():
    with pytest.raises(ValueError, match="batch_sizes"):
        VarianceConfig(batch_sizes=(0, 2))
    with pytest.raises(ValueError, match="num_batches"):
        VarianceConfig(num_batches=1)
    with pytest.raises(ValueError, match="alpha"):
        VarianceConfig(alpha=1.5)
    with pytest.raises(ValueError, match="either config"):
        check_variance(None, None, torch.zeros(4, 1), torch.zeros(4, 1), config=VarianceConfig(), seed=1)
    gen = torch.Generator().manual_seed(0)
    assert iid_indices(5, 9, gen).max() < 5
    assert len(set(subset_indices(9, 9, gen).tolist())) == 9
