"""The LM damping schedules the matrix-free optimizers use: AdaptiveLM(factor=...) and DelayedGratification."""

from __future__ import annotations

import math

import pytest

from curvature.damping import AdaptiveLM, DelayedGratification


def test_adaptive_lm_factor_is_martens_hf_rule():
    policy = AdaptiveLM(1.0, factor=2 / 3, use_pi=False)
    policy.observe_reduction_ratio(0.8)
    assert math.isclose(policy.damping, 2 / 3)
    policy.observe_reduction_ratio(0.5)  # between the thresholds: unchanged
    assert math.isclose(policy.damping, 2 / 3)
    policy.observe_reduction_ratio(0.1)
    policy.observe_reduction_ratio(float("nan"))
    assert math.isclose(policy.damping, 2 / 3 * 1.5 * 1.5)
    assert AdaptiveLM(1.0).omega == pytest.approx(0.95)  # the default is unchanged
    for bad in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError, match="factor"):
            AdaptiveLM(1.0, factor=bad)


def test_delayed_gratification_schedule_and_state():
    policy = DelayedGratification(1.0, min_damping=1e-3, max_damping=10.0)
    assert policy.needs_reduction_ratio
    policy.observe_reduction_ratio(0.3)
    assert math.isclose(policy.damping, 1 / 3)
    policy.observe_reduction_ratio(-0.1)
    policy.observe_reduction_ratio(float("-inf"))
    assert math.isclose(policy.damping, 4 / 3)
    for _ in range(20):
        policy.observe_reduction_ratio(1.0)
    assert policy.damping == 1e-3  # clipped
    other = DelayedGratification(5.0)
    other.load_state_dict(policy.state_dict())
    assert other.damping == policy.damping and other.history == policy.history
    with pytest.raises(ValueError, match="down"):
        DelayedGratification(1.0, down=1.0)
    with pytest.raises(ValueError, match="up"):
        DelayedGratification(1.0, up=float("nan"))
