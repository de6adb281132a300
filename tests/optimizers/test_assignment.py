"""Layer costs and the greedy assignment of :mod:`optimizers.assignment`: exact values by hand."""

from __future__ import annotations

import pytest

from optimizers.assignment import balanced_assignment, layer_cost


def test_layer_cost_by_hand():
    """d_a = 3, d_g = 5: inverse 3³ + 5³ = 27 + 125 = 152; rank-2 update 3² + 5² = 9 + 25 = 34."""
    assert layer_cost(3, 5) == 152.0 and layer_cost(3, 5, "inverse") == 152.0
    assert layer_cost(3, 5, "update") == 34.0
    assert layer_cost(5, 3, "update") == 34.0 and layer_cost(1, 1, "update") == 2.0


def test_layers_of_tiny_equal_cost_go_to_different_ranks():
    """With at least as many ranks as layers of positive cost, each layer gets a rank of its own, whatever
    the scale of the costs (the loads start at zero: a 1e-20 load is more than an empty rank's)."""
    for scale in (1e-20, 1.0, 1e20):
        costs = {"a": scale, "b": scale, "c": scale}
        assert balanced_assignment(costs, 3) == {"a": 0, "b": 1, "c": 2}
        assert balanced_assignment(costs, 4) == {"a": 0, "b": 1, "c": 2}


@pytest.mark.parametrize("world_size", [True, 2.0, 0, -1, "2"])
def test_world_size_must_be_a_positive_int(world_size):
    with pytest.raises(ValueError, match=r"world_size must be an integer >= 1, got "):
        balanced_assignment({"a": 1.0}, world_size)
