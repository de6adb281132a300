"""The EMA that the optimizer uses (``observe_gram``, folding rows in without forming the statistic)
equals ``observe`` of the explicitly formed statistic and the textbook EMA, over several observations
at β = 0.9 (issue 17: swapped decay weights or a dropped (1 − β) must fail here)."""

from __future__ import annotations

import pytest
import torch

from curvature.factors import EMACovarianceFactor, HessianActionFactor

D = torch.float64


@pytest.mark.parametrize("with_ones", [True, False])
@pytest.mark.parametrize("cls", [EMACovarianceFactor, lambda d, decay, **kw: HessianActionFactor(d, 0.1, decay, **kw)],
                         ids=["ema", "hessian-action"])
def test_observe_gram_equals_observe_and_the_textbook_ema(device, with_ones, cls):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(7, 4, generator=g, dtype=D).to(device) for _ in range(4)]
    scales = [1 / 7, 0.5, 2.0, 1 / 3]
    d = 4 + int(with_ones)
    by_rows, by_stat = cls(d, 0.9, dtype=D, device=device), cls(d, 0.9, dtype=D, device=device)
    oracle = None
    for rows, scale in zip(batches, scales):
        full = torch.cat([rows, torch.ones(7, 1, dtype=D, device=device)], 1) if with_ones else rows
        stat = scale * full.T @ full
        by_rows.observe_gram(rows, with_ones, scale)
        by_stat.observe(stat)
        oracle = stat if oracle is None else 0.9 * oracle + 0.1 * stat
        torch.testing.assert_close(by_rows.statistic, oracle, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(by_stat.statistic, oracle, rtol=1e-12, atol=1e-14)
