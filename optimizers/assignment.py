r"""Cost-balanced assignment of layers to ranks (layerwise work distribution).

Each layer's expensive curvature work (damped inverses, dense BFGS updates) is done by one rank.
The assignment is the greedy *longest processing time first* rule: layers in decreasing cost, each
to the rank with the least total cost so far (ties: the lower rank; equal costs: model order). Its
makespan is at most :math:`\tfrac43 - \tfrac1{3W}` times the optimum (Graham 1969). The rule is
deterministic, so every rank computes the same assignment without communicating.
"""

from __future__ import annotations

from typing import Mapping


def layer_cost(a_dim: int, g_dim: int, kind: str = "inverse") -> float:
    r"""The work of one layer's factors: :math:`d_a^3 + d_g^3` for inverses or eigendecompositions,
    :math:`d_a^2 + d_g^2` for rank-2 (BFGS) updates."""
    if kind == "inverse":
        return float(a_dim) ** 3 + float(g_dim) ** 3
    if kind == "update":
        return float(a_dim) ** 2 + float(g_dim) ** 2
    raise ValueError(f"kind must be 'inverse' or 'update', got {kind!r}")


def balanced_assignment(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Layer name -> owning rank, greedy longest-processing-time first (see the module doc).

    Args:
        costs: layer name -> non-negative cost, in model order.
        world_size: number of ranks W >= 1.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    order = {name: i for i, name in enumerate(costs)}
    for name, cost in costs.items():
        if not cost >= 0:
            raise ValueError(f"cost of layer {name!r} must be >= 0, got {cost!r}")
    load = [0.0] * world_size
    owner: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], order[n])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return {name: owner[name] for name in costs}
