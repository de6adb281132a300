"""The shared logic of Communicator (coalescing, weights, owners, counters) on W ranks simulated by
threads in one process, with exact hand-computed oracles; TorchCommunicator's primitives on a one-process
gloo group. The spawned gloo runs of test_communicator.py check the same on real processes; these run in
the test process itself, where a mutation tool sees them (mutation audit of optimizers/communicator.py)."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from optimizers import communicator as cm
from optimizers.communicator import CommStats, LocalCommunicator, OpStats, TorchCommunicator
from tests.optimizers.thread_world import run_ranks as _run

F64, F32 = torch.float64, torch.float32


def _inputs(rank):
    # small integers and halves: every sum and mean below is exact in float32 and float64
    return [torch.arange(6, dtype=F64).reshape(2, 3) * (rank + 1),     # float64 group
            torch.tensor([1.5, -2.0, 3.0], dtype=F32) * (rank + 2),    # float32 group
            torch.tensor(float(10 * rank), dtype=F64),                  # float64 group, 0-dim
            torch.full((2, 2), float(rank - 1), dtype=F32)]             # float32 group


def test_all_reduce_sum_is_exact_coalesced_and_counted():
    results, world = _run(3, lambda c: (c.all_reduce_sum(_inputs(c.rank)), c.stats.as_dict()))
    expected = [torch.arange(6, dtype=F64).reshape(2, 3) * 6, torch.tensor([1.5, -2.0, 3.0], dtype=F32) * 9,
                torch.tensor(30.0, dtype=F64), torch.zeros(2, 2, dtype=F32)]
    for sums, stats in results:
        assert len(sums) == 4
        for got, exp in zip(sums, expected):
            assert got.dtype == exp.dtype and got.shape == exp.shape and torch.equal(got, exp)
        assert stats == {"calls": 2, "bytes": 7 * 8 + 7 * 4, "steps": 0, "step_calls": 2, "step_bytes": 7 * 8 + 7 * 4,
                         "by_op": {"all_reduce": {"calls": 2, "bytes": 84}},
                         "step_by_op": {"all_reduce": {"calls": 2, "bytes": 84}}}
    # one call per (dtype, device) group, in first-seen order: float64 (6 + 1 numbers), float32 (3 + 4)
    assert world.log == [("all_reduce", None, F64, 7), ("all_reduce", None, F32, 7)]


def test_all_reduce_sum_leaves_its_inputs_and_handles_empty_lists():
    def fn(c):
        x = _inputs(c.rank)
        before = [t.clone() for t in x]
        out = c.all_reduce_sum(x)
        assert all(torch.equal(a, b) for a, b in zip(x, before))
        assert all(o.data_ptr() != t.data_ptr() for o, t in zip(out, x))
        assert c.all_reduce_sum([]) == []
        return c.stats.calls

    results, world = _run(2, fn)
    assert results == [2, 2] and len(world.log) == 2


def test_weighted_mean_is_exact_with_a_zero_weight_and_one_call_per_dtype():
    weights = [2.0, 0.0, 6.0]

    def fn(c):
        x = _inputs(c.rank)
        return c.weighted_mean([(x[0], weights[c.rank]), (x[1], 1.0), (x[2], weights[c.rank])]), c.stats.as_dict()

    results, world = _run(3, fn)
    base = torch.arange(6, dtype=F64).reshape(2, 3)
    expected = [base * (2 * 1 + 0 * 2 + 6 * 3) / 8, torch.tensor([1.5, -2.0, 3.0], dtype=F32) * 3,
                torch.tensor((2 * 0 + 0 * 10 + 6 * 20) / 8, dtype=F64)]
    for means, stats in results:
        for got, exp in zip(means, expected):
            assert got.dtype == exp.dtype and got.shape == exp.shape and torch.equal(got, exp)
        # float64: 6 + 1 values and their 2 weights; float32: 3 values and 1 weight
        assert stats["by_op"] == {"all_reduce": {"calls": 2, "bytes": 9 * 8 + 4 * 4}}
    assert world.log == [("all_reduce", None, F64, 9), ("all_reduce", None, F32, 4)]


def test_weighted_mean_inputs_are_not_modified_and_a_zero_total_raises():
    def fn(c):
        x = torch.tensor([1.0, 2.0], dtype=F64) * (c.rank + 1)
        kept = x.clone()
        (m,) = c.weighted_mean([(x, 3.0)])
        assert torch.equal(x, kept) and torch.equal(m, torch.tensor([1.5, 3.0], dtype=F64))
        assert c.weighted_mean([]) == []
        with pytest.raises(RuntimeError, match="^weighted_mean: the weights sum to zero over all ranks$"):
            c.weighted_mean([(x, 0.0)])
        return True

    results, _ = _run(2, fn)
    assert results == [True, True]


def test_broadcast_from_owners_exact_values_rank_order_and_counts():
    owners = [2, 0, 2, 1, 0]

    def fn(c):
        r = float(c.rank)
        ts = [torch.full((2, 2), 100 + r, dtype=F64), torch.full((3,), 200 + r, dtype=F64),
              torch.full((1,), 300 + r, dtype=F32), torch.full((2,), 400 + r, dtype=F64),
              torch.full((4,), 500 + r, dtype=F32)]
        ptrs = [t.data_ptr() for t in ts]
        c.broadcast_from_owners(ts, owners)
        assert [t.data_ptr() for t in ts] == ptrs  # in place
        return ts, c.stats.as_dict()

    results, world = _run(3, fn)
    for ts, stats in results:
        for t, src, base, dtype in zip(ts, owners, [100, 200, 300, 400, 500], [F64, F64, F32, F64, F32]):
            assert t.dtype == dtype and torch.equal(t, torch.full_like(t, base + src))
        assert stats["by_op"] == {"broadcast": {"calls": 5, "bytes": 3 * 8 + 4 * 4 + 2 * 8 + 4 * 8 + 1 * 4}}
    # owner 0: float64 (3) then float32 (4); owner 1: float64 (2); owner 2: float64 (4) then float32 (1)
    assert world.log == [("broadcast", 0, F64, 3), ("broadcast", 0, F32, 4), ("broadcast", 1, F64, 2),
                         ("broadcast", 2, F64, 4), ("broadcast", 2, F32, 1)]


def test_broadcast_from_owners_checks_lengths_first_and_skips_empty():
    def fn(c):
        with pytest.raises(ValueError, match="^broadcast_from_owners: one owner per tensor$"):
            c.broadcast_from_owners([torch.zeros(1)], [0, 1])
        c.broadcast_from_owners([], [])
        return c.stats.calls

    results, world = _run(2, fn)
    assert results == [0, 0] and world.log == []


def test_broadcast_object_returns_the_source_object_and_counts_its_saved_size():
    def fn(c):
        obj = {"x": torch.arange(3.0) + c.rank, "n": c.rank}
        return c.broadcast_object(obj, src=1), c.stats.as_dict()

    results, world = _run(3, fn)
    buf = io.BytesIO()
    torch.save({"x": torch.arange(3.0) + 1, "n": 1}, buf)
    for got, stats in results:
        assert got["n"] == 1 and torch.equal(got["x"], torch.arange(3.0) + 1)
        assert stats["by_op"] == {"broadcast_object": {"calls": 1, "bytes": buf.tell()}}
    assert world.log == [("broadcast_object", 1, None, None)]


def test_any_true_is_true_when_any_rank_is_and_uses_one_small_all_reduce():
    def fn(c):
        return c.any_true(c.rank == 2, False, True, c.rank != 0), c.stats.as_dict()

    results, world = _run(3, fn)
    for flags, stats in results:
        assert flags == [True, False, True, True] and all(type(f) is bool for f in flags)
        assert stats["by_op"] == {"all_reduce": {"calls": 1, "bytes": 4 * 8}}
    assert world.log == [("all_reduce", None, F64, 4)]
    assert LocalCommunicator().any_true(0, 1, 0) == [False, True, False]


def test_comm_stats_count_per_op_in_total_and_per_step():
    s = CommStats()
    s.record("all_reduce", 8)
    s.record("all_reduce", 4.0)
    s.record("broadcast", 16)
    assert s.as_dict() == {"calls": 3, "bytes": 28, "steps": 0, "step_calls": 3, "step_bytes": 28,
                           "by_op": {"all_reduce": {"calls": 2, "bytes": 12}, "broadcast": {"calls": 1, "bytes": 16}},
                           "step_by_op": {"all_reduce": {"calls": 2, "bytes": 12},
                                          "broadcast": {"calls": 1, "bytes": 16}}}
    assert type(s.as_dict()["bytes"]) is int
    s.begin_step()
    s.record("broadcast_object", 5)
    assert s.as_dict() == {"calls": 4, "bytes": 33, "steps": 1, "step_calls": 1, "step_bytes": 5,
                           "by_op": {"all_reduce": {"calls": 2, "bytes": 12}, "broadcast": {"calls": 1, "bytes": 16},
                                     "broadcast_object": {"calls": 1, "bytes": 5}},
                           "step_by_op": {"broadcast_object": {"calls": 1, "bytes": 5}}}
    s.begin_step()
    assert (s.steps, s.step_calls, s.step_bytes, s.as_dict()["step_by_op"]) == (2, 0, 0, {})
    s.step_by_op["new"].add(3)  # the per-step map is a defaultdict again
    o = OpStats()
    o.add(7.9)
    o.add(2)
    assert o.as_dict() == {"calls": 2, "bytes": 9}


# ------------------------------------------------------------------ TorchCommunicator on a one-process gloo group
@pytest.fixture
def gloo_group(tmp_path):
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_torch_communicator_needs_a_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="^TorchCommunicator needs an initialized process group: call "
                       r"torch\.distributed\.init_process_group\(backend='gloo' or 'nccl'\) first \(torchrun sets "
                       r"the environment\), or use LocalCommunicator for one process$"):
        TorchCommunicator()
    assert type(cm.default_communicator()) is LocalCommunicator


def test_torch_communicator_primitives_on_one_gloo_process(gloo_group):
    comm = TorchCommunicator()
    assert (comm.rank, comm.world_size, comm.backend, comm.group) == (0, 1, "gloo", None)
    assert comm.device == torch.device("cpu") and not comm.distributed and comm.stats.calls == 0
    assert type(cm.default_communicator()) is TorchCommunicator
    flat = torch.tensor([1.0, 2.5, -3.0], dtype=F64)
    comm._all_reduce_flat(flat)  # a sum over one rank
    assert torch.equal(flat, torch.tensor([1.0, 2.5, -3.0], dtype=F64))
    comm._broadcast_flat(flat, 0)
    assert torch.equal(flat, torch.tensor([1.0, 2.5, -3.0], dtype=F64))
    assert comm._broadcast_object({"a": [1, 2]}, 0) == {"a": [1, 2]}
    assert comm._global(0) == 0
    sub = dist.new_group([0])
    on_sub = TorchCommunicator(sub)
    assert on_sub.group is sub and (on_sub.rank, on_sub.world_size, on_sub.backend) == (0, 1, "gloo")
    assert on_sub._global(0) == 0
    on_sub._broadcast_flat(flat, 0)
    assert on_sub._broadcast_object(("x", 3), 0) == ("x", 3)


def test_init_process_group_from_env(monkeypatch, tmp_path):
    calls = []
    real_init = dist.init_process_group

    def fake_init(backend=None, timeout=None, **kw):
        calls.append((backend, timeout, kw))
        real_init(backend, store=dist.FileStore(str(tmp_path / "s"), 1), rank=0, world_size=1, timeout=timeout)

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert type(cm.init_process_group_from_env()) is LocalCommunicator
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert type(cm.init_process_group_from_env("gloo")) is LocalCommunicator and calls == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        comm = cm.init_process_group_from_env(timeout_s=12.5)
        assert type(comm) is TorchCommunicator and comm.backend == "gloo"
        assert calls == [("gloo", timedelta(seconds=12.5), {})]  # gloo without CUDA
        again = cm.init_process_group_from_env("nccl")  # already initialized: used as it is
        assert type(again) is TorchCommunicator and len(calls) == 1
    finally:
        dist.destroy_process_group()
    calls.clear()
    try:
        cm.init_process_group_from_env(backend="gloo")
        assert calls == [("gloo", timedelta(seconds=600.0), {})]
    finally:
        dist.destroy_process_group()


def test_broadcast_from_owners_unflattens_several_tensors_per_buffer_and_skips_ranks_owning_nothing():
    owners = [2, 2, 2]  # ranks 0 and 1 own nothing; rank 2's three float64 tensors travel in one buffer

    def fn(c):
        r = float(c.rank)
        ts = [torch.full((2,), 10 + r, dtype=F64), torch.full((3,), 20 + r, dtype=F64), torch.full((1,), 30 + r, dtype=F64)]
        c.broadcast_from_owners(ts, owners)
        return ts

    results, world = _run(3, fn)
    for ts in results:
        assert [t.tolist() for t in ts] == [[12.0, 12.0], [22.0, 22.0, 22.0], [32.0]]
    assert world.log == [("broadcast", 2, F64, 6)]


def test_weighted_mean_accepts_weights_summing_below_one():
    def fn(c):
        x = torch.tensor([4.0, -8.0], dtype=F64) * (c.rank + 1)
        (m,) = c.weighted_mean([(x, 0.25)])
        return m

    results, _ = _run(2, fn)
    for m in results:
        assert torch.equal(m, torch.tensor([6.0, -12.0], dtype=F64))  # (0.25·x + 0.25·2x) / 0.5


def test_local_weighted_mean_is_the_exact_copy_whatever_the_weight():
    """One process: the statistic itself, not x·w/w (which rounds: 0.1·3/3 ≠ 0.1) and no check of w."""
    x = torch.tensor([0.1, 0.7], dtype=F64)
    assert (x * 3.0 / 3.0)[0] != x[0]
    for w in (3.0, 0.0):
        (m,) = LocalCommunicator().weighted_mean([(x, w)])
        assert torch.equal(m, x) and m.data_ptr() != x.data_ptr()


class _Spy:
    def __init__(self):
        self.calls = []

    def fn(self, name, result=None):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return result(*args, **kwargs) if callable(result) else result
        return call


def test_torch_communicator_hands_its_group_and_sources_to_torch_distributed(monkeypatch):
    """Which group, source rank and op reach torch.distributed (a group whose ranks differ from the
    global ones cannot be built in one process: the calls are recorded instead)."""
    spy, group = _Spy(), object()
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", spy.fn("get_rank", lambda g=None: 3 if g is group else 0))
    monkeypatch.setattr(dist, "get_world_size", spy.fn("get_world_size", lambda g=None: 5 if g is group else 1))
    monkeypatch.setattr(dist, "get_backend", spy.fn("get_backend", lambda g=None: "gloo" if g is group else "mpi"))
    monkeypatch.setattr(dist, "get_global_rank", spy.fn("get_global_rank", lambda g, r: r + 10))
    monkeypatch.setattr(dist, "all_reduce", spy.fn("all_reduce"))
    monkeypatch.setattr(dist, "broadcast", spy.fn("broadcast"))

    def bol(box, src=None, group=None, device=None):
        box[0] = ("from", src)
    monkeypatch.setattr(dist, "broadcast_object_list", spy.fn("broadcast_object_list", bol))

    comm = TorchCommunicator(group)
    assert (comm.rank, comm.world_size, comm.backend, comm.group) == (3, 5, "gloo", group)
    spy.calls.clear()
    flat = torch.zeros(2)
    comm._all_reduce_flat(flat)
    comm._broadcast_flat(flat, 2)
    assert comm._broadcast_object("mine", 1) == ("from", 11)
    assert spy.calls[0] == ("all_reduce", (flat,), {"op": dist.ReduceOp.SUM, "group": group})
    assert spy.calls[1] == ("get_global_rank", (group, 2), {})
    assert spy.calls[2] == ("broadcast", (flat,), {"src": 12, "group": group})
    assert spy.calls[3] == ("get_global_rank", (group, 1), {})
    name, args, kwargs = spy.calls[4]
    assert name == "broadcast_object_list" and kwargs["src"] == 11 and kwargs["group"] is group
    # the default group: global ranks are the group's, no translation
    default = TorchCommunicator()
    assert (default.rank, default.world_size, default.backend) == (0, 1, "mpi")
    assert default._global(4) == 4


def test_init_process_group_from_env_picks_nccl_and_the_local_device_when_a_gpu_is_seen(monkeypatch, tmp_path):
    """The NCCL branch with the CUDA calls recorded (no GPU here): the backend defaults to NCCL when
    CUDA is available, and the process binds to LOCAL_RANK's device (0 when unset) before initializing."""
    events = []
    real_init = dist.init_process_group

    def fake_init(backend=None, timeout=None, **kw):
        events.append(("init", backend))
        real_init("gloo", store=dist.FileStore(str(tmp_path / f"s{len(events)}"), 1), rank=0, world_size=1)

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", d)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for local, want in ((None, 0), ("3", 3)):
        if local is not None:
            monkeypatch.setenv("LOCAL_RANK", local)
        events.clear()
        try:
            assert type(cm.init_process_group_from_env()) is TorchCommunicator
        finally:
            dist.destroy_process_group()
        assert events == [("set_device", want), ("init", "nccl")]
