"""Communicator collectives on spawned gloo processes (world size 2 and 4) and the local no-op."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

from optimizers.assignment import balanced_assignment, layer_cost
from optimizers.comm_volume import kaisa_bytes_per_step
from optimizers.communicator import LocalCommunicator

sys.path.insert(0, str(Path(__file__).parent))
import dist_workers  # noqa: E402


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_match_oracles(world, tmp_path):
    results = dist_workers.spawn(dist_workers.communicator_scenario, world, tmp_path)
    inputs = [dist_workers.rank_tensors(r) for r in range(world)]
    for rank, res in enumerate(results):
        assert (res["rank"], res["world"]) == (rank, world)
        # coalesced sum: one call per dtype (float64 group holds a64 and b64)
        for got, key in zip(res["sum"], ["a64", "c32", "b64"]):
            expected = sum(inp[key].double() for inp in inputs)
            torch.testing.assert_close(got.double(), expected, rtol=1e-6 if key == "c32" else 1e-14, atol=1e-6)
            assert got.dtype == inputs[0][key].dtype and got.shape == inputs[0][key].shape
        stats = res["sum_stats"]["step_by_op"]["all_reduce"]
        assert stats["calls"] == 2
        assert stats["bytes"] == (12 + 5) * 8 + 4 * 4
        # weighted mean == the statistic of all ranks' rows together
        rows = torch.cat([inp["rows"] for inp in inputs])
        torch.testing.assert_close(res["wmean"][0], rows.mean(0), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(res["wmean"][1], rows.T @ rows / rows.shape[0], rtol=1e-13, atol=1e-14)
        expected_c = sum((r + 1) * inputs[r]["c32"] for r in range(world)) / sum(r + 1 for r in range(world))
        torch.testing.assert_close(res["wmean"][2], expected_c, rtol=1e-6, atol=1e-6)
        assert res["wmean_stats"]["step_calls"] == 2  # float64 and float32 buffers, weights inside
        # broadcast from owners: each tensor has its owner's value, one call per (owner, dtype)
        assert torch.equal(res["owned"][0], torch.zeros(2, 3, dtype=torch.float64))
        assert torch.equal(res["owned"][1], torch.full((4,), 10.0 + world - 1, dtype=torch.float64))
        assert torch.equal(res["owned"][2], torch.full((3,), 20.0 + world - 1, dtype=torch.float32))
        assert torch.equal(res["owned"][3], torch.full((1,), 30.0, dtype=torch.float64))
        assert res["owned_stats"]["step_by_op"]["broadcast"] == {"calls": 3, "bytes": (6 + 1) * 8 + 4 * 8 + 3 * 4}
        # object broadcast and agreement
        assert res["object"]["n"] == world - 1
        assert torch.equal(res["object"]["x"], torch.arange(3.0) + world - 1)
        assert res["any"] == [True, False, True]
        assert res["final_stats"]["step_by_op"]["all_reduce"]["calls"] == 1  # any_true: one small call


def test_local_communicator_is_identity_and_silent():
    comm = LocalCommunicator()
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(2, 2)
    s = comm.all_reduce_sum([x, y])
    assert torch.equal(s[0], x) and torch.equal(s[1], y) and s[0] is not x
    (m,) = comm.weighted_mean([(x, 7.0)])
    assert torch.equal(m, x)
    z = x.clone()
    comm.broadcast_from_owners([z], [0])
    assert torch.equal(z, x)
    assert comm.broadcast_object({"a": 1}, 0) == {"a": 1}
    assert comm.any_true(True, False) == [True, False]
    assert comm.stats.calls == 0 and comm.stats.bytes == 0


def test_broadcast_from_owners_rejects_mismatched_owners():
    with pytest.raises(ValueError, match="one owner per tensor"):
        LocalCommunicator().broadcast_from_owners([torch.zeros(1)], [0, 1])


def _makespan(costs, owner, world):
    load = [0.0] * world
    for name, c in costs.items():
        load[owner[name]] += c
    return max(load)


def test_balanced_assignment_within_graham_bound_of_brute_force_optimum():
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        n, world = 2 + trial % 6, 2 + trial % 3
        costs = {f"l{i}": float(torch.randint(1, 50, (1,), generator=gen)) for i in range(n)}
        owner = balanced_assignment(costs, world)
        assert set(owner) == set(costs) and all(0 <= r < world for r in owner.values())
        best = min(_makespan(costs, dict(zip(costs, assign)), world)
                   for assign in itertools.product(range(world), repeat=n))
        assert _makespan(costs, owner, world) <= (4 / 3 - 1 / (3 * world)) * best + 1e-9


def test_balanced_assignment_is_deterministic_and_validated():
    costs = {"a": layer_cost(10, 5), "b": layer_cost(3, 3), "c": layer_cost(10, 5), "d": 0.0}
    assert balanced_assignment(costs, 2) == {"a": 0, "b": 0, "c": 1, "d": 1}
    assert balanced_assignment(costs, 1) == {k: 0 for k in costs}
    with pytest.raises(ValueError, match="world_size"):
        balanced_assignment(costs, 0)
    with pytest.raises(ValueError, match="cost"):
        balanced_assignment({"a": -1.0}, 2)
    with pytest.raises(ValueError, match="kind"):
        layer_cost(2, 2, "other")


def test_kaisa_volume_hand_computed():
    layers = [(3, 2), (5, 4)]  # grads 6 + 20 = 26; factors 9+4 + 25+16 = 54; eigen 12+6 + 30+20 = 68
    v = kaisa_bytes_per_step(layers, 4, grad_worker_fraction=1.0, inverse_update_freq=2, dtype_bytes=4)
    assert v == {"gradients": 104, "factors": 216, "inverses": 136.0, "preconditioned_gradients": 0.0,
                 "total": 104 + 216 + 136}
    mem = kaisa_bytes_per_step(layers, 4, grad_worker_fraction=0.25, dtype_bytes=1, symmetry_aware=True)
    assert mem["inverses"] == 0 and mem["preconditioned_gradients"] == 26
    assert mem["factors"] == (6 + 3 + 15 + 10)
    assert kaisa_bytes_per_step(layers, 1)["total"] == 0
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        kaisa_bytes_per_step(layers, 4, grad_worker_fraction=0.1)


def test_kaisa_volume_every_option_by_hand():
    """Each option of kaisa_bytes_per_step against a hand count (layers (3, 2) and (5, 4): gradients
    6 + 20 = 26, factors 9 + 4 + 25 + 16 = 54, inverses 13 + 41 = 54 without eigenvalues, 68 with)."""
    layers = [(3, 2), (5, 4)]
    # the documented defaults: f = 1, T_cov = T_inv = 1, 4-byte elements, full factors, eigendecompositions
    assert kaisa_bytes_per_step(layers, 4) == {"gradients": 104, "factors": 216, "inverses": 272.0,
                                               "preconditioned_gradients": 0.0, "total": 104 + 216 + 272}
    # inverses instead of eigendecompositions; factors every 2 steps
    v = kaisa_bytes_per_step(layers, 4, eigen=False, factor_update_freq=2, dtype_bytes=2)
    assert v == {"gradients": 52, "factors": 54.0, "inverses": 108.0, "preconditioned_gradients": 0.0,
                 "total": 52 + 54 + 108}
    # between COMM-OPT and MEM-OPT: f = 1/2 on 4 ranks sends both the inverses and the preconditioned gradients
    mid = kaisa_bytes_per_step(layers, 4, grad_worker_fraction=0.5, dtype_bytes=4)
    assert (mid["inverses"], mid["preconditioned_gradients"]) == (272.0, 104.0)
    # two ranks, COMM-OPT (f·W = 2): the inverses are broadcast; MEM-OPT (f = 1/W): only the gradients
    assert kaisa_bytes_per_step(layers, 2)["inverses"] == 272.0
    mem = kaisa_bytes_per_step(layers, 2, grad_worker_fraction=0.5)
    assert (mem["inverses"], mem["preconditioned_gradients"]) == (0.0, 104.0)
    # one rank: nothing is communicated, every part reported as 0
    assert kaisa_bytes_per_step(layers, 1) == {"gradients": 0.0, "factors": 0.0, "inverses": 0.0,
                                               "preconditioned_gradients": 0.0, "total": 0.0}
    with pytest.raises(ValueError, match=r"^world_size must be >= 1$"):
        kaisa_bytes_per_step(layers, 0)
    with pytest.raises(ValueError, match=r"grad_worker_fraction must be in \[1/W, 1\], got 1.5"):
        kaisa_bytes_per_step(layers, 4, grad_worker_fraction=1.5)


def test_kaisa_volume_tolerances_at_their_edges():
    """The documented interval [1/W, 1] is read with rounding tolerances: f = 1/W − 1e-12 is still accepted,
    f·W = 1 + 1e-9 (W = 2: exact in binary) still counts as MEM-OPT (no inverses broadcast), and
    f = 1 − 1e-12 still counts as COMM-OPT (no preconditioned gradients broadcast)."""
    layers = [(3, 2), (5, 4)]
    edge = kaisa_bytes_per_step(layers, 4, grad_worker_fraction=1.0 / 4 - 1e-12)
    assert edge["inverses"] == 0.0 and edge["preconditioned_gradients"] == 104.0
    assert kaisa_bytes_per_step(layers, 2, grad_worker_fraction=(1 + 1e-9) / 2)["inverses"] == 0.0
    assert kaisa_bytes_per_step(layers, 4, grad_worker_fraction=1.0 - 1e-12)["preconditioned_gradients"] == 0.0
