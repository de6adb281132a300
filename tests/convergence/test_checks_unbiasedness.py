"""E2: unbiasedness of minibatch gradients drawn through a real DataLoader.

Oracles: uniform i.i.d. sampling of deterministic f_i is exactly unbiased; the bias-norm
estimator satisfies E[B_hat] = |b|^2 exactly.  Planted violation: a WeightedRandomSampler that
draws the first quarter of the examples four times as often.  PASS cases use alpha = 1e-6 for the
t-tests; the planted case must reject at p < 1e-9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from convergence import problems
from convergence.checks.unbiasedness import (
    UnbiasednessConfig,
    bias_norm_estimate,
    check_unbiasedness,
    projection_directions,
)
from convergence.monitor import iid_loader
from convergence.results import Verdict




def _far_problem(device):
    """Least squares at a point far from the minimizer: |grad f| dominates the sampling noise."""
    prob = problems.least_squares(n=128, d=4, noise=0.3, seed=2, device=device)
    with torch.no_grad():
        for p in prob.model.parameters():
            p.fill_(3.0)
    return prob


def test_bias_norm_estimator_is_unbiased_for_the_squared_bias():
    rng = np.random.default_rng(0)
    R, n, reps = 40, 6, 4000
    b = np.array([0.3, -0.2, 0.0, 0.1, 0.0, 0.05])
    estimates = np.empty(reps)
    for i in range(reps):
        d = b + rng.standard_normal((R, n)) * np.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
        estimates[i] = bias_norm_estimate(d @ d.T)[0]
        # the Gram-matrix form equals the definition |mean|^2 - V/R
        if i == 0:
            mean = d.mean(0)
            v = ((d - mean) ** 2).sum(1).sum() / (R - 1)
            assert estimates[0] == pytest.approx(mean @ mean - v / R, rel=1e-12)
    se = estimates.std(ddof=1) / np.sqrt(reps)
    assert abs(estimates.mean() - b @ b) < 6 * se


def test_bias_norm_resample_weights():
    rng = np.random.default_rng(1)
    d = rng.standard_normal((5, 3))
    gram = d @ d.T
    w = np.array([[2, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = bias_norm_estimate(gram, w)
    dup = np.repeat(d, w[0], axis=0)
    mean = dup.mean(0)
    v = ((dup - mean) ** 2).sum() / 4
    assert out[0] == pytest.approx(mean @ mean - v / 5, rel=1e-12)
    assert out[1] == pytest.approx(bias_norm_estimate(gram)[0], rel=1e-12)


def test_projection_directions_are_unit_and_fixed():
    g = torch.tensor([3.0, 4.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    dirs, labels = projection_directions(g, [("w", 3), ("b", 2)], 6, seed=0)
    assert labels[0] == "grad" and labels[1] == "block:w" and labels[2] == "block:b"
    torch.testing.assert_close(torch.linalg.vector_norm(dirs, dim=1), torch.ones(6, dtype=torch.float64))
    dirs2, _ = projection_directions(g, [("w", 3), ("b", 2)], 6, seed=0)
    torch.testing.assert_close(dirs, dirs2, rtol=0, atol=0)


def test_uniform_iid_loader_passes_with_equivalence(device):
    prob = _far_problem(device)
    x, y = prob.full_batch
    loader = iid_loader(prob.dataset, 64, torch.Generator().manual_seed(11), num_samples=64 * 400)
    res = check_unbiasedness(prob.model, prob.loss_fn, x, y, loader, num_batches=400, alpha=1e-6, seed=1)
    assert res.verdict is Verdict.PASS, (res.evidence, res.notes)
    assert res.evidence["p_value"] > 1e-6
    assert res.evidence["relative_bias_upper"] < 0.05
    assert res.evidence["num_directions"] == 20
    assert res.evidence["batch_sizes"] == [64]


def test_loader_is_reiterated_across_epochs(device):
    prob = _far_problem(device)
    x, y = prob.full_batch
    sampler = RandomSampler(prob.dataset, replacement=True, num_samples=32, generator=torch.Generator().manual_seed(2))
    loader = DataLoader(prob.dataset, batch_size=8, sampler=sampler)  # 4 batches per epoch
    res = check_unbiasedness(prob.model, prob.loss_fn, x, y, loader, num_batches=50, alpha=1e-6, bootstrap=200)
    assert res.evidence["num_batches"] == 50
    assert res.verdict is not Verdict.FAIL


def test_weighted_sampler_is_biased_and_fails(device):
    prob = problems.least_squares(n=128, d=4, noise=0.3, seed=2, device=device)
    x, y = prob.full_batch
    weights = torch.ones(128, dtype=torch.float64)
    weights[:32] = 4.0
    sampler = WeightedRandomSampler(weights, num_samples=16 * 300, replacement=True,
                                    generator=torch.Generator().manual_seed(5))
    loader = DataLoader(prob.dataset, batch_size=16, sampler=sampler)
    res = check_unbiasedness(prob.model, prob.loss_fn, x, y, loader, num_batches=300, seed=2)
    assert res.verdict is Verdict.FAIL
    assert res.evidence["p_value"] < 1e-9
    assert res.statistic > res.evidence["t_threshold"]
    # the bias estimate is clearly non-zero: its bootstrap bound sits well above 0
    assert res.evidence["relative_bias"] > 0.1


def test_memory_guard_names_the_limit(device):
    prob = _far_problem(device)
    x, y = prob.full_batch
    loader = iid_loader(prob.dataset, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="max_elements=10"):
        check_unbiasedness(prob.model, prob.loss_fn, x, y, loader, num_batches=10, max_elements=10)


def test_config_validation():
    with pytest.raises(ValueError, match="num_directions"):
        UnbiasednessConfig(num_directions=21)
    with pytest.raises(ValueError, match="num_batches"):
        UnbiasednessConfig(num_batches=2)
    with pytest.raises(ValueError, match="delta"):
        UnbiasednessConfig(delta=0.0)
