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


def test_config_errors_name_the_argument():
    """Each rejected setting is named in the message (what to change)."""
    from curvature.damping import DampingPolicy

    with pytest.raises(ValueError, match=r"^damping must be a finite number > 0, got 0"):
        DampingPolicy(0)
    for cls in (AdaptiveLM, DelayedGratification):
        with pytest.raises(ValueError, match=r"^min_damping must be a finite number > 0, got 0"):
            cls(1.0, min_damping=0)
        for max_damping in (1e-3, 1e-4):  # equal to min_damping, or below it
            with pytest.raises(ValueError, match=r"^max_damping must exceed min_damping$"):
                cls(1.0, min_damping=1e-3, max_damping=max_damping)


def test_delayed_gratification_a_ratio_at_the_threshold_is_a_failure():
    """λ/down only when ρ > threshold: ρ = threshold (a step that did not reduce the loss, default 0)
    counts as a failure, λ·up."""
    policy = DelayedGratification(1.0)
    policy.observe_reduction_ratio(0.0)
    assert policy.damping == 2.0
    policy = DelayedGratification(1.0, threshold=0.5)
    policy.observe_reduction_ratio(0.5)
    assert policy.damping == 2.0
    policy.observe_reduction_ratio(0.5000001)
    assert policy.damping == 2.0 / 3.0


def test_lm_schedules_load_a_state_that_has_only_the_damping():
    """A state without pending ratios or history (a fixed policy's ``state_dict``) loads with both empty."""
    for policy in (AdaptiveLM(1.0, interval=2), DelayedGratification(1.0)):
        policy.observe_reduction_ratio(0.9)
        policy.load_state_dict({"damping": 0.5})
        assert policy.damping == 0.5 and policy.history == []
        if isinstance(policy, AdaptiveLM):
            assert policy.state_dict()["pending"] == []
