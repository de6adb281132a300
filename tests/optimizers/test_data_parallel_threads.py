"""Data-parallel training (optimizers/data_parallel.py) on W ranks simulated by threads in the test process.

The scenarios of test_data_parallel.py (which spawns gloo processes, invisible to a mutation tool) for
plain modules whose gradients ``all_reduce_gradients`` averages, each rank a thread with a
:class:`~tests.optimizers.thread_world.ThreadComm`. Oracles: the single-process full-batch run
(``dist_workers.reference_run``) to 1e-10 relative at every step; bit-identical parameters and optimizer
state on every rank after every step; the exact collectives of a step (counts of numbers hand-computed
from the layer sizes). Then the methods of DataParallel, LayerInverter and all_reduce_gradients one at
a time with hand-computed values. No results are shared between tests (a mutation tool attributes a
function to the tests that call it).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from curvature.blocks import DiagonalBlock, KroneckerBlock
from curvature.capture import LayerRecord
from curvature.factors import EMACovarianceFactor, Factor
from curvature.adapters import LinearAdapter
from curvature.inverter import BatchedInverter
from curvature.linalg import InversionError
from optimizers.communicator import LocalCommunicator
from optimizers.data_parallel import OTHER_RANK, DataParallel, LayerInverter, all_reduce_gradients
from tests.optimizers import dist_workers as W
from tests.optimizers.thread_world import ThreadComm, World, run_ranks

F64 = torch.float64
RESUME_AT = 10
EQUIV_STEPS = 12  # KFAC: several inverse updates (warm-up 2, then every 3); K-BFGS: 11 second passes
REVERTED = "non-finite loss or gradient at the new point (step reverted)"
UNEQUAL2, UNEQUAL3 = W.SPLITS[(2, "unequal")], W.SPLITS[(3, "unequal")]
#: (a_dim with bias, g_dim) of the three Linear layers of dist_workers.make_model: 5→6→4→3
DIMS = [(6, 6), (7, 4), (5, 3)]
N_PARAMS = sum(a * g for a, g in DIMS)  # 79: weights and biases
AGREEMENT = 2 + 3 * 2  # flag, loss, 3 layers × 2 ranks of sample counts
KFAC_STATS = sum(a * a + g * g for a, g in DIMS) + 2 * 3  # A and G of 3 layers, one weight per factor
KBFGS_STATS = sum(a * a for a, _ in DIMS) + 3  # A only (G is a BFGS factor)
#: K-BFGS second pass per layer: Σ h before and after, Σ g before and after (g_dim each), Σ input (a_dim - 1);
#: control: flag, loss and the 5 row counts of each layer
SECOND_PASS = sum(4 * g + (a - 1) for a, g in DIMS) + 2 + 5 * 3


@functools.lru_cache(maxsize=None)
def reference(kind: str, steps: int = W.STEPS) -> dict:
    return W.reference_run(kind, steps=steps)


def threaded(size: int, split: list[int], kind: str, distribute: str, **kw) -> tuple[list[dict], World]:
    """``dist_workers.distributed_run`` ("plain") on ``size`` thread ranks."""
    return run_ranks(size, lambda c: W.distributed_run(c.rank, size, kind, distribute, "plain", split, comm=c, **kw))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_replicated(ranks: list[dict]) -> None:
    for step in range(len(ranks[0]["params"])):
        for r in ranks[1:]:
            assert torch.equal(r["params"][step], ranks[0]["params"][step]), f"parameters differ at step {step}"
            assert torch.equal(r["states"][step], ranks[0]["states"][step]), f"optimizer state differs at step {step}"


def assert_matches(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert _rel(g, w) < 1e-10, f"step {step}: relative difference {_rel(g, w):.3g}"


KINDS = ["kfac", "kfac_mc", "kbfgs", "kbfgsl", "mixed"]
CASES = [(2, k, d) for k in KINDS for d in ("replicate", "layerwise")] + [
    (3, "kbfgs", "layerwise"), (3, "mixed", "layerwise"), (3, "kfac_mc", "replicate"), (3, "kfac", "layerwise")]


@pytest.mark.parametrize("size,kind,distribute", CASES, ids=[f"W{w}-{k}-{d}" for w, k, d in CASES])
def test_threads_match_single_process_and_stay_identical(size, kind, distribute):
    split = UNEQUAL2 if size == 2 else UNEQUAL3
    ranks, world = threaded(size, split, kind, distribute, steps=EQUIV_STEPS)
    assert_replicated(ranks)
    assert_matches(ranks[0]["params"], reference(kind)["params"][:EQUIV_STEPS])
    for r in ranks:
        assert r["counters"]["skipped_steps"] == 0 and r["counters"]["reverted_steps"] == 0
    ops = {op for op, *_ in world.log}
    if distribute == "replicate":
        assert ops == {"all_reduce"}
    elif kind in ("kbfgs", "kbfgsl"):  # updated BFGS states from each owner (one layer per rank at most)
        assert {src for op, src, *_ in world.log if op == "broadcast_object"} == set(range(size))
    elif kind == "mixed":  # one BFGS layer: its owner's state
        assert len({src for op, src, *_ in world.log if op == "broadcast_object"}) == 1


def test_kfac_replicate_step_is_the_agreement_and_the_statistics():
    """KFAC replicate: per step the gradients (79 numbers), the agreement (2 + L·W) and the statistics
    (Σ d_a² + d_g² plus one weight per factor), all float64 -- and nothing else."""
    ranks, world = threaded(2, UNEQUAL2, "kfac", "replicate", steps=4)
    for step in ranks[0]["comm"]:
        assert step["step_by_op"] == {"all_reduce": {"calls": 3, "bytes": 8 * (N_PARAMS + AGREEMENT + KFAC_STATS)}}
    assert world.log == [("all_reduce", None, F64, n) for n in (N_PARAMS, AGREEMENT, KFAC_STATS)] * 4


def test_kfac_layerwise_broadcasts_each_owners_inverses():
    """Owners by cost d_a³ + d_g³ (432, 407, 152): layer 0 → rank 0, layers 1 and 2 → rank 1. An inverse
    step adds the failure flag and one broadcast per owner: 6² + 6² and 7² + 4² + 5² + 3² numbers."""
    _, world = threaded(2, UNEQUAL2, "kfac", "layerwise", steps=1)
    assert world.log == [("all_reduce", None, F64, N_PARAMS), ("all_reduce", None, F64, AGREEMENT),
                         ("all_reduce", None, F64, KFAC_STATS), ("all_reduce", None, F64, 1),
                         ("broadcast", 0, F64, 72), ("broadcast", 1, F64, 99)]


def test_kbfgs_layerwise_second_pass_is_one_all_reduce_then_each_owners_state():
    """K-BFGS, three ranks: owners by d_a² + d_g² (72, 65, 34) are ranks 0, 1, 2. A step is gradients,
    agreement (2 + 3·3), A statistics, the inverters' failure flag, the A inverses (step 1 only: 6², 7², 5²
    from their owners), the second pass's sums and control in one all-reduce, one object broadcast per owner."""
    ranks, world = threaded(3, UNEQUAL3, "kbfgs", "layerwise", steps=2)
    head = [("all_reduce", None, F64, n) for n in (N_PARAMS, 2 + 3 * 3, KBFGS_STATS, 1)]
    tail = [("all_reduce", None, F64, SECOND_PASS)] + [("broadcast_object", r, None, None) for r in range(3)]
    inverses = [("broadcast", r, F64, a * a) for r, (a, _) in enumerate(DIMS)]
    assert world.log == head + inverses + tail + head + tail
    assert ranks[0]["comm"][-1]["step_by_op"]["all_reduce"] == {
        "calls": 5, "bytes": 8 * (N_PARAMS + 11 + KBFGS_STATS + 1 + SECOND_PASS)}


def test_one_rank_nonfinite_loss_skips_everywhere_and_second_pass_reverts_everywhere():
    """K-BFGS layerwise: rank 1's loss is NaN at step 3 (every rank skips: its own reason on rank 1,
    OTHER_RANK on rank 0) and its second-pass loss at step 6 (every rank reverts). Both steps leave the
    parameters bit-identical to the step before, on every rank."""
    ranks, _ = threaded(2, UNEQUAL2, "kbfgs", "layerwise", steps=8, nan_loss_at=(3, 1), nan_second_at=(6, 1))
    assert_replicated(ranks)
    for r, res in enumerate(ranks):
        c = res["counters"]
        assert c["skipped_steps"] == 1 and c["reverted_steps"] == 1, c
        assert c["skip_reasons"] == {("non-finite loss" if r == 1 else OTHER_RANK): 1, REVERTED: 1}, c["skip_reasons"]
        assert torch.equal(res["params"][3], res["params"][2]) and torch.equal(res["params"][6], res["params"][5])
    assert_matches(ranks[0]["params"][:3], reference("kbfgs")["params"][:3])


def test_kfac_skip_on_rank_zero():
    ranks, _ = threaded(2, W.SPLITS[(2, "equal")], "kfac", "layerwise", steps=6, nan_loss_at=(4, 0))
    assert_replicated(ranks)
    assert [res["counters"]["skip_reasons"] for res in ranks] == [{"non-finite loss": 1}, {OTHER_RANK: 1}]
    assert torch.equal(ranks[1]["params"][4], ranks[1]["params"][3])
    assert_matches(ranks[0]["params"][:4], reference("kfac")["params"][:4])


@pytest.mark.parametrize("kind", ["kbfgs", "kfac_mc"])
def test_resume_one_process_checkpoint_on_two_threads(kind):
    """A one-process checkpoint at step 10 continued on two ranks ends where one process ends."""
    ref = reference(kind)
    ckpt = W.reference_run(kind, steps=RESUME_AT)
    ranks, _ = threaded(2, UNEQUAL2, kind, "layerwise", start=RESUME_AT, steps=W.STEPS - RESUME_AT, checkpoint=ckpt)
    assert_replicated(ranks)
    assert_matches(ranks[0]["params"], ref["params"][RESUME_AT:])


def test_two_thread_checkpoint_resumes_on_one_process():
    ranks, _ = threaded(2, UNEQUAL2, "kbfgs", "replicate", steps=RESUME_AT)
    resumed = W.reference_run("kbfgs", steps=W.STEPS - RESUME_AT, start=RESUME_AT,
                              checkpoint={"model": ranks[0]["model"], "opt": ranks[1]["opt"]})
    assert_matches(resumed["params"], reference("kbfgs")["params"][RESUME_AT:])


# ------------------------------------------------------------------ DataParallel's methods, one at a time
def test_loss_weight_is_n_local_times_world_over_the_global_count():
    """Shards 2, 3, 5 of B = 10 on W = 3: N_r·W/B = 0.6, 0.9, 1.5 (one float64 all-reduce of the count)."""
    results, world = run_ranks(3, lambda c: DataParallel(c).loss_weight(W.SPLITS[(3, "unequal")][c.rank]))
    assert results == [0.6, 0.9, 1.5]
    assert world.log == [("all_reduce", None, F64, 1)]
    assert DataParallel(LocalCommunicator()).loss_weight(7) == 1.0


def test_construction_checks_and_local_default():
    dp = DataParallel()
    assert type(dp.comm) is LocalCommunicator and not dp.active and (dp.rank, dp.world_size) == (0, 1)
    assert (dp.distribute, dp.loss_reduction, dp.owners) == ("replicate", "mean", {})
    with pytest.raises(ValueError, match=r"^distribute must be one of \('replicate', 'layerwise'\), got 'sharded'$"):
        DataParallel(LocalCommunicator(), "sharded")
    with pytest.raises(TypeError, match="^comm must be a Communicator, got str$"):
        DataParallel("gloo")
    dp = DataParallel(ThreadComm(World(3), 2), "layerwise", "sum")
    assert dp.active and (dp.rank, dp.world_size, dp.distribute, dp.loss_reduction) == (2, 3, "layerwise", "sum")


def _slot(a_dim: int, g_dim: int, second_pass: bool, block=None) -> SimpleNamespace:
    block = block if block is not None else SimpleNamespace(needs_second_pass=second_pass)
    return SimpleNamespace(block=block, adapter=SimpleNamespace(a_dim=a_dim, g_dim=g_dim))


#: costs: x inverse 4³ + 1³ = 65, y update 5² + 5² = 50 (as an inverse 250), z inverse 3³ + 2³ = 35
SLOTS = {"x": _slot(4, 1, False), "y": _slot(5, 5, True), "z": _slot(3, 2, False)}


def test_assign_balances_costs_by_kind_and_owns_follows_it():
    """Layerwise on 2 ranks, longest first: x (65) → 0, y (50) → 1, z (35) → 1 (load 50 < 65).
    Replicate: every layer is this rank's."""
    dp = DataParallel(ThreadComm(World(2), 1), "layerwise")
    dp.assign(SLOTS)
    assert dp.owners == {"x": 0, "y": 1, "z": 1}
    assert [dp.owns(n) for n in ("x", "y", "z", "unknown")] == [False, True, True, True]
    dp0 = DataParallel(ThreadComm(World(2), 0), "layerwise")
    dp0.assign(SLOTS)
    assert [dp0.owns(n) for n in ("x", "y", "z", "unknown")] == [True, False, False, True]
    rep = DataParallel(ThreadComm(World(2), 1), "replicate")
    rep.assign(SLOTS)
    assert rep.owners == {"x": 1, "y": 1, "z": 1} and rep.owns("x")


def _linear_block(a_factor, g_factor) -> KroneckerBlock:
    return KroneckerBlock("fc", LinearAdapter(nn.Linear(2, 3)), a_factor, g_factor)


class _RowsOnly(Factor):
    """Takes statistics (observe_gram) but keeps Factor.observe: cannot be reduced across ranks."""

    uses_statistics = True


def test_check_block_messages():
    fine = _linear_block(EMACovarianceFactor(3), EMACovarianceFactor(3))
    DataParallel._check_block("fc", fine)
    DataParallel._check_block("d", DiagonalBlock("d", LinearAdapter(nn.Linear(2, 3))))
    for side, block in (("A", _linear_block(_RowsOnly(3), EMACovarianceFactor(3))),
                        ("G", _linear_block(EMACovarianceFactor(3), _RowsOnly(3)))):
        with pytest.raises(ValueError, match=rf"^layer 'fc': the {side} factor _RowsOnly takes statistics only as rows "
                           r"\(observe_gram\); data-parallel training reduces formed statistics across ranks, so "
                           r"implement observe\(statistic\) as well$"):
            DataParallel._check_block("fc", block)
    with pytest.raises(ValueError, match=r"^layer 'q': SimpleNamespace has no data-parallel reduction \(supported: "
                       r"KroneckerBlock with statistics, secant or Hessian-action factors, and DiagonalBlock\); "
                       r"train it on one process$"):
        DataParallel._check_block("q", SimpleNamespace())


def test_attach_checks_blocks_only_with_several_ranks_and_assigns():
    slots = {"x": _slot(4, 1, False, SimpleNamespace(needs_second_pass=False))}
    local = DataParallel(LocalCommunicator(), "layerwise")
    local.attach(slots)  # one process: any block is accepted
    assert local.owners == {"x": 0}
    with pytest.raises(ValueError, match="^layer 'x': SimpleNamespace has no data-parallel reduction"):
        DataParallel(ThreadComm(World(2), 1), "layerwise").attach(slots)
    dp = DataParallel(ThreadComm(World(2), 1), "layerwise")
    dp.attach({"a": _slot(3, 3, False, _linear_block(EMACovarianceFactor(3), EMACovarianceFactor(3)))})
    assert dp.owners == {"a": 0}


def _records(sizes: dict[str, int]) -> dict[str, LayerRecord]:
    return {n: LayerRecord(batch_size=b) for n, b in sizes.items()}


def test_agree_reduces_flags_counts_and_loss():
    """Rank r: layer "a" with 2 + r samples, layer "b" only on rank 1 (6), loss 1.5 + r: counts per
    rank, mean loss (1.5 + 2.5) / 2 = 2.0, no reason."""
    def fn(c):
        dp = DataParallel(c)
        dp.begin_step()
        recs = _records({"a": 2 + c.rank, **({"b": 6} if c.rank else {})})
        agreement = dp.agree(None, 1.5 + c.rank, recs, ["a", "b"])
        return agreement, dp.agreed_loss(9.0)

    results, world = run_ranks(2, fn)
    for agreement, loss in results:
        assert (agreement.reason, agreement.counts, agreement.loss, loss) == (None, {"a": [2, 3], "b": [0, 6]}, 2.0, 2.0)
    assert world.log == [("all_reduce", None, F64, 2 + 2 * 2)]


def test_agree_one_bad_rank_makes_every_rank_skip_without_a_loss():
    def fn(c):
        dp = DataParallel(c)
        reason = "non-finite loss" if c.rank == 2 else None
        agreement = dp.agree(reason, float("nan") if c.rank == 2 else 1.0, _records({"a": 4}), ["a"])
        return agreement.reason, agreement.counts, agreement.loss, dp.agreed_loss(1.0)

    results, _ = run_ranks(3, fn)
    assert results == [(OTHER_RANK, {"a": [4, 4, 4]}, None, None)] * 2 + [("non-finite loss", {"a": [4, 4, 4]}, None, None)]


def test_agree_without_a_loss_and_on_one_process():
    results, _ = run_ranks(2, lambda c: DataParallel(c).agree(None, None, _records({"a": 1}), ["a"]).loss)
    assert results == [None, None]
    dp = DataParallel(LocalCommunicator())
    assert dp.agreed_loss(3.5) == 3.5  # before any agreement
    agreement = dp.agree("why", 4.5, _records({"a": 3}), ["a", "b"])
    assert (agreement.reason, agreement.counts, agreement.loss) == ("why", {"a": [3], "b": [0]}, 4.5)
    assert dp.agreed_loss(7.0) == 7.0 and dp.comm.stats.calls == 0


def test_agreed_loss_before_agree_is_the_local_loss():
    results, _ = run_ranks(2, lambda c: DataParallel(c).agreed_loss(float(c.rank)))
    assert results == [0.0, 1.0]


def _grad_record(n: int) -> LayerRecord:
    rec = LayerRecord(batch_size=n)
    rec.grad_rows = torch.ones(n, 2, dtype=F64)
    return rec


@pytest.mark.parametrize("reduction,scale,late_scale", [("mean", 5.0, 0.0), ("sum", 0.5, 0.5)])
def test_set_grad_scales_from_the_agreed_counts(reduction, scale, late_scale):
    """Counts 3 and 7 (B = 10) on W = 2: B/W = 5 for "mean", 1/W for "sum"; a layer without gradient
    rows keeps its scale; a layer absent from the counts gets 0/W for "mean" (1/W for "sum")."""
    def fn(c):
        dp = DataParallel(c, loss_reduction=reduction)
        with pytest.raises(RuntimeError, match=r"^DataParallel.set_grad_scales before agree\(\)$"):
            dp.set_grad_scales({})
        n = UNEQUAL2[c.rank]
        recs = {"a": _grad_record(n), "none": LayerRecord(batch_size=n), "late": _grad_record(n)}
        dp.agree(None, 1.0, recs, ["a", "none"])
        cached = recs["a"].g_rows  # built with scale 1, must be rebuilt
        assert torch.equal(cached, torch.ones(n, 2, dtype=F64))
        dp.set_grad_scales(recs)
        return recs["a"].grad_scale, recs["a"].g_rows, recs["none"].grad_scale, recs["late"].grad_scale

    results, _ = run_ranks(2, fn)
    for r, (a, g_rows, none, late) in enumerate(results):
        assert (a, none, late) == (scale, 1.0, late_scale) and type(a) is float
        assert torch.equal(g_rows, torch.full((UNEQUAL2[r], 2), scale, dtype=F64))
    rec = _grad_record(3)
    DataParallel(LocalCommunicator()).set_grad_scales({"a": rec})  # one process: untouched, no agreement needed
    assert rec.grad_scale == 1.0


def test_mc_noise_hands_each_rank_its_rows_of_one_global_draw():
    """Counts 2, 3, 5: one draw of 10 rows per step on every rank; rank r gets rows [o_r, o_r + N_r) and a
    second request continues after them; a new step draws again."""
    def fn(c):
        dp = DataParallel(c)
        draws = []

        def draw(n):
            draws.append(n)
            return torch.arange(2.0 * n).reshape(n, 2) + 100 * len(draws)

        n = UNEQUAL3[c.rank]
        dp.begin_step()
        dp.agree(None, None, _records({"a": n, "b": 1}), ["a", "b"])
        first, second = dp.mc_noise("a", draw, n), dp.mc_noise("b", draw, 1)
        dp.begin_step()
        dp.agree(None, None, _records({"a": n}), ["a"])
        return first, second, dp.mc_noise("a", draw, n), draws

    results, _ = run_ranks(3, fn)
    for r, (first, second, again, draws) in enumerate(results):
        lo = sum(UNEQUAL3[:r])
        rows = torch.arange(20.0).reshape(10, 2)
        assert draws == [10, 10]
        assert torch.equal(first, rows[lo:lo + UNEQUAL3[r]] + 100)
        assert torch.equal(second, rows[lo + UNEQUAL3[r]:lo + UNEQUAL3[r] + 1] + 100)
        assert torch.equal(again, rows[lo:lo + UNEQUAL3[r]] + 200)
    assert DataParallel(LocalCommunicator()).mc_noise("a", lambda n: 1 / 0, 3) is None


def test_check_replicated_true_false_and_nan():
    """True when every rank holds the same bytes (NaN in the same places included), False on every rank
    when one rank differs (a planted value, or a NaN on one rank only); one broadcast and one flag."""
    def fn(c, plant):
        t = [torch.tensor([1.0, 2.0, float("nan")], dtype=F64), torch.arange(3, dtype=torch.float32)]
        if c.rank == 1:
            plant(t)
        return DataParallel(c).check_replicated(t)

    def nothing(t):
        return None

    def value(t):
        t[1][2] = 2.5

    def nan(t):
        t[0][0] = float("nan")

    for plant, want in ((nothing, True), (value, False), (nan, False)):
        results, world = run_ranks(2, lambda c: fn(c, plant))
        assert results == [want, want], plant.__name__
        assert world.log == [("broadcast", 0, F64, 6), ("all_reduce", None, F64, 1)]
    assert DataParallel(LocalCommunicator()).check_replicated([torch.tensor([float("nan")])])


def test_prepare_second_pass_is_the_one_process_path():
    dp = DataParallel(ThreadComm(World(2), 0))
    with pytest.raises(RuntimeError, match="^prepare_second_pass is the one-process path; use second_pass with several ranks$"):
        dp.prepare_second_pass({}, {}, {})


# ------------------------------------------------------------------ LayerInverter
def _spd(k: float) -> torch.Tensor:
    return torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=F64) * k


def test_layer_inverter_owner_computes_and_broadcasts():
    """Layers a (owner 0) and b (owner 1) requested on both ranks: each base inverter inverts only its own
    layer; every rank's callbacks get diag(1/(2k + λ), 1/(4k + λ)) for both."""
    def fn(c):
        dp = DataParallel(c, "layerwise")
        dp.owners = {"a": 0, "b": 1}
        base = BatchedInverter("cholesky")
        inv = dp.inverter(base)
        got = {}
        for name, k in (("a", 1.0), ("b", 2.0)):
            inv.for_layer(name).request(_spd(k), 0.5, lambda x, name=name: got.__setitem__(name, x))
        return inv.run(), got, base.stats.calls, inv._pending

    results, world = run_ranks(2, fn)
    for n, got, calls, pending in results:
        assert n == 2 and pending == [] and calls == 1
        torch.testing.assert_close(got["a"], torch.diag(torch.tensor([1 / 2.5, 1 / 4.5], dtype=F64)), rtol=1e-14, atol=0)
        torch.testing.assert_close(got["b"], torch.diag(torch.tensor([1 / 4.5, 1 / 8.5], dtype=F64)), rtol=1e-14, atol=0)
    assert torch.equal(results[0][1]["a"], results[1][1]["a"]) and torch.equal(results[0][1]["b"], results[1][1]["b"])
    assert world.log == [("all_reduce", None, F64, 1), ("broadcast", 0, F64, 4), ("broadcast", 1, F64, 4)]


def test_layer_inverter_failure_on_one_rank_raises_on_every_rank_before_any_callback():
    def fn(c):
        dp = DataParallel(c, "layerwise")
        dp.owners = {"a": 0, "b": 1}
        inv = LayerInverter(dp, BatchedInverter("cholesky", strict=True))
        called = []
        inv.for_layer("a").request(_spd(1.0), 0.5, called.append)
        inv.for_layer("b").request(_spd(1.0), float("nan"), called.append)  # rank 1's own request fails
        with pytest.raises(InversionError) as err:
            inv.run()
        return str(err.value), called

    results, _ = run_ranks(2, fn)
    assert results[0] == ("a damped factor inverse failed (on another rank); no inverse was updated", [])
    assert results[1] == ("a damped factor inverse failed (the damping [nan] is not finite); no inverse was updated", [])


def test_layer_inverter_replicate_and_one_process_use_the_base():
    base = BatchedInverter("cholesky")
    for dp in (DataParallel(ThreadComm(World(2), 1), "replicate"), DataParallel(LocalCommunicator(), "layerwise")):
        inv = LayerInverter(dp, base)
        assert not inv.layerwise and inv.for_layer("anything") is base
        got = []
        inv.for_layer("x").request(_spd(1.0), 0.0, got.append)
        assert inv.run() == 1
        torch.testing.assert_close(got[0], torch.diag(torch.tensor([0.5, 0.25], dtype=F64)), rtol=1e-14, atol=0)


# ------------------------------------------------------------------ all_reduce_gradients
def test_all_reduce_gradients_averages_exactly_and_fills_missing_gradients():
    """Rank r: w.grad = (r + 1)·[1, 2], b.grad None on rank 0 and [4] on rank 1, a frozen parameter:
    w.grad = 1.5·[1, 2] and b.grad = [2] on both (zeros for the missing one), the frozen one untouched;
    one all-reduce of the 3 trainable numbers."""
    def fn(c):
        m = nn.Module()
        m.w = nn.Parameter(torch.zeros(2, dtype=F64))
        m.b = nn.Parameter(torch.zeros(1, dtype=F64))
        m.frozen = nn.Parameter(torch.zeros(1, dtype=F64), requires_grad=False)
        m.w.grad = torch.tensor([1.0, 2.0], dtype=F64) * (c.rank + 1)
        w_grad = m.w.grad
        if c.rank == 1:
            m.b.grad = torch.tensor([4.0], dtype=F64)
        all_reduce_gradients(m, c)
        assert m.w.grad is w_grad  # in place
        return m.w.grad, m.b.grad, m.frozen.grad

    results, world = run_ranks(2, fn)
    for w, b, frozen in results:
        assert torch.equal(w, torch.tensor([1.5, 3.0], dtype=F64)) and torch.equal(b, torch.tensor([2.0], dtype=F64))
        assert frozen is None
    assert world.log == [("all_reduce", None, F64, 3)]


def test_all_reduce_gradients_issues_nothing_without_trainable_parameters_or_ranks():
    def fn(c):
        frozen = nn.Linear(2, 2).requires_grad_(False)
        all_reduce_gradients(frozen, c)
        return c.stats.calls

    results, world = run_ranks(2, fn)
    assert results == [0, 0] and world.log == []
    m = nn.Linear(1, 1)
    m.weight.grad = torch.full((1, 1), 3.0)
    all_reduce_gradients(m, LocalCommunicator())
    assert torch.equal(m.weight.grad, torch.full((1, 1), 3.0)) and m.bias.grad is None


# ------------------------------------------------------------------ statistics and the second pass, direct
def test_rows_of_a_missing_tensor_is_zero():
    from optimizers.data_parallel import _rows

    assert _rows(None) == 0 and _rows(torch.zeros(4, 2)) == 4 and type(_rows(torch.zeros(3))) is int


def test_update_statistics_one_process_hands_the_gradient_to_the_block():
    """A gradient-source diagonal block folds grad² (its first statistic is kept as it is)."""
    block = DiagonalBlock("d", LinearAdapter(nn.Linear(2, 3)), source="gradient", dtype=F64)
    grad = (torch.arange(block.v.numel(), dtype=F64).reshape(block.v.shape) - 2.5) / 2
    DataParallel(LocalCommunicator()).update_statistics({"d": SimpleNamespace(block=block)}, {}, {"d": grad},
                                                        LayerRecord)
    assert torch.equal(block.v, grad * grad)


class _PassBlock:
    """A needs_second_pass block that records what it is given (no prepare_after_step)."""

    needs_second_pass = True

    def __init__(self) -> None:
        self.got: list = []
        self.saved = 0
        self.state = {"n": 0}

    def update_after_step(self, before: LayerRecord, after: LayerRecord) -> None:
        self.got.append((before, after))
        self.state = {"n": len(self.got)}

    def state_dict(self) -> dict:
        self.saved += 1
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


class _PreparedBlock(_PassBlock):
    """Prepares ``k`` scalars 3, 4, ... and commits the values it is handed; never updates directly."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.values = k, None

    def prepare_after_step(self, before, after):
        def finish(values):
            self.values = (before, after, list(values))
        return [torch.tensor(3.0 + i) for i in range(self.k)], finish

    def update_after_step(self, before, after):
        raise AssertionError("a block with prepare_after_step is updated through it")


def test_prepare_second_pass_one_process_chains_prepared_and_direct_blocks():
    """Scalars in block order; finish hands each prepared block its own values and updates the others
    with their own records; blocks without a second pass are left alone."""
    one, two, direct = _PreparedBlock(1), _PreparedBlock(2), _PassBlock()
    idle = SimpleNamespace(needs_second_pass=False)
    slots = {n: SimpleNamespace(block=b) for n, b in (("one", one), ("idle", idle), ("direct", direct), ("two", two))}
    before = {n: LayerRecord(batch_size=1) for n in slots}
    after = {n: LayerRecord(batch_size=2) for n in slots}
    scalars, finish = DataParallel().prepare_second_pass(slots, before, after)
    assert [float(s) for s in scalars] == [3.0, 3.0, 4.0] and one.values is None and direct.got == []
    finish([3.0, 3.0, 4.0])
    assert one.values == (before["one"], after["one"], [3.0]) and two.values == (before["two"], after["two"], [3.0, 4.0])
    assert direct.got == [(before["direct"], after["direct"])]


def test_second_pass_one_process_reads_once_or_skips_when_bad():
    block = _PreparedBlock(1)
    slots = {"b": SimpleNamespace(block=block)}
    recs = ({"b": LayerRecord(batch_size=1)}, {"b": LayerRecord(batch_size=1)})
    dp = DataParallel()
    assert dp.second_pass(slots, *recs, True, 2.5) == (True, 2.5) and block.values is None
    assert dp.second_pass(slots, *recs, False, 2.5) == (False, 2.5)
    assert block.values == (recs[0]["b"], recs[1]["b"], [3.0])


def _pass_records(rank: int) -> tuple[dict, dict]:
    """Rank r (1 or 3 samples): layer p has every row but the after-step gradient, layer q no before-step
    pre-activations and no input; integers, so every sum and mean is exact."""
    n = (1, 3)[rank]
    base = torch.arange(float(n), dtype=F64)[:, None] + 10.0 * rank

    def rec(**rows):
        r = LayerRecord(batch_size=n)
        for key, value in rows.items():
            setattr(r, key, value)
        return r

    before = {"p": rec(h_rows=base + torch.tensor([1.0, 2.0], dtype=F64), grad_rows=base * 2 + 1 + torch.zeros(2, dtype=F64),
                       input_rows=base + torch.tensor([0.0, 1.0, 2.0], dtype=F64), has_bias=True, grad_scale=0.5),
              "q": rec(grad_rows=base - torch.tensor([1.0, 3.0], dtype=F64), grad_scale=0.5)}
    after = {"p": rec(h_rows=base * 3 + torch.zeros(2, dtype=F64)),
             "q": rec(h_rows=base + 4 + torch.zeros(2, dtype=F64), grad_rows=base * 4 - torch.zeros(2, dtype=F64))}
    return before, after


def _global_mean(which: int, name: str, key: str, scale: float = 1.0) -> torch.Tensor:
    return torch.cat([getattr(_pass_records(r)[which][name], key) * scale for r in range(2)]).mean(0)[None, :]


def test_second_pass_hands_the_owner_the_global_row_means_and_broadcasts_its_state():
    """W = 2, 1 and 3 samples (B = 4): the owner of each layer (p → 0, q → 1) gets records of one
    "sample" holding the row-weighted means over all ranks -- gradient rows times their scale (0.5
    before; after, set from the agreed counts: B/W = 2) -- and None where the rows are missing; the
    other rank loads the owner's state. One all-reduce of 9 + 6 sums and the control (flag, loss,
    7 row counts), then one object broadcast per owner; the mean loss (1 + 2)/2."""
    def fn(c):
        dp = DataParallel(c, "layerwise")
        dp.owners = {"p": 0, "q": 1}
        blocks = {"p": _PassBlock(), "q": _PassBlock()}
        before, after = _pass_records(c.rank)
        dp.agree(None, 1.0, after, ["p", "q"])
        result = dp.second_pass({n: SimpleNamespace(block=b) for n, b in blocks.items()}, before, after, False,
                                1.0 + c.rank)
        return result, blocks

    results, world = run_ranks(2, fn)
    assert world.log[1:] == [("all_reduce", None, F64, 9 + 6 + 9), ("broadcast_object", 0, None, None),
                             ("broadcast_object", 1, None, None)]
    for rank, (result, blocks) in enumerate(results):
        assert result == (False, 1.5)
        owned, other = ("p", "q") if rank == 0 else ("q", "p")
        assert len(blocks[owned].got) == 1 and blocks[other].got == [] and blocks[other].state == {"n": 1}
        assert (blocks[owned].saved, blocks[other].saved) == (1, 0)
        gb, ga = blocks[owned].got[0]
        assert gb.batch_size == ga.batch_size == 1
        if owned == "p":
            assert torch.equal(gb.h_rows, _global_mean(0, "p", "h_rows"))
            assert torch.equal(ga.h_rows, _global_mean(1, "p", "h_rows"))
            assert torch.equal(gb.g_rows, _global_mean(0, "p", "grad_rows", 0.5)) and ga.g_rows is None
            assert torch.equal(gb.input_rows, _global_mean(0, "p", "input_rows")) and gb.has_bias
        else:
            assert gb.h_rows is None and gb.input_rows is None
            assert torch.equal(gb.g_rows, _global_mean(0, "q", "grad_rows", 0.5))
            assert torch.equal(ga.h_rows, _global_mean(1, "q", "h_rows"))
            assert torch.equal(ga.g_rows, _global_mean(1, "q", "grad_rows", 2.0))


@pytest.mark.parametrize("bad_rank,losses,want", [(1, (1.0, float("nan")), (True, None)),
                                                  (None, (None, None), (False, None))])
def test_second_pass_agrees_on_a_bad_rank_or_a_missing_loss(bad_rank, losses, want):
    """Any rank's non-finite flag: every rank returns bad, no block is updated; no loss: None."""
    def fn(c):
        dp = DataParallel(c, "replicate")
        block = _PassBlock()
        before, after = _pass_records(c.rank)
        dp.agree(None, None, after, ["p"])
        result = dp.second_pass({"p": SimpleNamespace(block=block)}, before, after, c.rank == bad_rank,
                                losses[c.rank])
        return result, len(block.got)

    results, world = run_ranks(2, fn)
    assert results == [(want, 0 if want[0] else 1)] * 2
    assert [op for op, *_ in world.log] == ["all_reduce", "all_reduce"]


def test_declares_reads_a_capability_defaulting_to_false():
    from optimizers.data_parallel import _declares

    assert _declares(object(), "uses_statistics") is False
    assert _declares(SimpleNamespace(uses_gradient=1), "uses_gradient") is True


class _GradientFactor(Factor):
    """Takes the (already global) weight gradient, as the A (transposed) or G side."""

    uses_gradient = True

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.seen: list = []

    def observe_gradient(self, v: torch.Tensor) -> None:
        self.seen.append(v)


def test_update_statistics_hands_gradient_factors_the_gradient_after_the_reduction():
    """Factors that use the gradient get G.T (A side) and G (G side) of the averaged gradient; nothing
    is reduced for them. A gradient-source diagonal layer weighs every rank 1 (its records may be
    empty), so its statistic is grad² exactly; an unsupported block raises."""
    grad = torch.arange(9.0, dtype=F64).reshape(3, 3) - 4.0  # g_dim × a_dim of Linear(2, 3) with bias

    def fn(c):
        dp = DataParallel(c)
        block = _linear_block(_GradientFactor(3), _GradientFactor(3))
        diag = DiagonalBlock("d", LinearAdapter(nn.Linear(2, 3)), source="gradient", dtype=F64)
        slots = {"fc": SimpleNamespace(block=block, adapter=block.adapter), "d": SimpleNamespace(block=diag)}
        dp.update_statistics(slots, {}, {"fc": grad, "d": grad}, LayerRecord)
        with pytest.raises(ValueError, match="^layer 'x': no data-parallel reduction for SimpleNamespace$"):
            dp.update_statistics({"x": SimpleNamespace(block=SimpleNamespace())}, {}, {"x": grad}, LayerRecord)
        return block.a_factor.seen, block.g_factor.seen, diag.v

    results, world = run_ranks(2, fn)
    for a_seen, g_seen, v in results:
        assert len(a_seen) == 1 and torch.equal(a_seen[0], grad.T) and len(g_seen) == 1 and torch.equal(g_seen[0], grad)
        assert torch.equal(v, grad * grad)
    assert world.log == [("all_reduce", None, F64, 9 + 1)]  # the diagonal statistic and its weight


class _Kept(Factor):
    """Keeps the last statistic it observes (a one-hot A side: the vector of token frequencies)."""

    uses_statistics = True
    kept = None

    def observe(self, statistic: torch.Tensor) -> None:
        self.kept = statistic


def test_update_statistics_reduces_one_hot_counts_over_the_whole_vocabulary():
    """An embedding of 6 tokens: rank 0 sees tokens 0, 2 and rank 1 sees 1, 1, 3 (none sees 4 or 5). The
    reduced A diagonal is the token frequency over the 5 samples, with the vocabulary's length (the
    adapter's, not the largest index seen)."""
    from curvature.adapters import EmbeddingAdapter

    tokens = (torch.tensor([0, 2]), torch.tensor([1, 1, 3]))

    def fn(c):
        adapter = EmbeddingAdapter(nn.Embedding(6, 2))
        block = KroneckerBlock("e", adapter, _Kept(6), _Kept(2))
        rec = LayerRecord(batch_size=len(tokens[c.rank]))
        rec.input_rows, rec.grad_rows = tokens[c.rank], torch.ones(len(tokens[c.rank]), 2, dtype=F64)
        DataParallel(c).update_statistics({"e": SimpleNamespace(block=block, adapter=adapter)}, {"e": rec},
                                          {"e": None}, LayerRecord)
        return block.a_factor.kept

    results, _ = run_ranks(2, fn)
    for kept in results:
        torch.testing.assert_close(kept, torch.tensor([1.0, 2.0, 1.0, 1.0, 0.0, 0.0], dtype=F64) / 5, rtol=1e-15, atol=0)


def test_agreement_state_starts_empty_and_begin_step_forgets_it():
    """Before any step mc_noise draws (no stale offsets); after begin_step the loss is the local one again."""
    def fn(c):
        dp = DataParallel(c)
        dp.agree(None, 2.0 * c.rank, _records({"a": 1}), ["a"])
        noise = dp.mc_noise("a", lambda n: torch.arange(float(n)), 1)
        agreed = dp.agreed_loss(5.0)
        dp.begin_step()
        return noise, agreed, dp.agreed_loss(5.0)

    results, _ = run_ranks(2, fn)
    assert [(n.tolist(), a, b) for n, a, b in results] == [([0.0], 1.0, 5.0), ([1.0], 1.0, 5.0)]
