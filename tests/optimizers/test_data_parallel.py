"""Data-parallel KFAC, K-BFGS, K-BFGS(L) and a mixed composition on spawned gloo processes.

Oracle: the same 20 steps on one process with the global batch (float64). Every distributed run
must match it to 1e-10 relative at every step, hold bit-identical parameters and optimizer state on
all ranks after every step, issue exactly one DDP gradient reduction per step (none in K-BFGS's
second pass), skip or revert together when one rank alone sees a non-finite loss, and resume from
checkpoints across world sizes 1, 2 and 4. One spawn per world size runs all its cases.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import dist_workers as W  # noqa: E402

from optimizers.communicator import LocalCommunicator  # noqa: E402
from optimizers.data_parallel import OTHER_RANK, DataParallel  # noqa: E402

KINDS = ["kfac", "kfac_mc", "kbfgs", "kbfgsl", "mixed"]
RESUME_AT = 10


@functools.lru_cache(maxsize=None)
def reference(kind: str):
    return W.reference_run(kind)


@functools.lru_cache(maxsize=None)
def reference_checkpoint(kind: str):
    return W.reference_run(kind, steps=RESUME_AT)


def _cases_w2():
    cases = {}
    for i, kind in enumerate(KINDS):
        for j, distribute in enumerate(["replicate", "layerwise"]):
            wrap = "ddp" if (i + j) % 2 == 0 else "plain"
            split = "unequal" if (i + 2 * j) % 3 != 0 else "equal"
            cases[f"{kind}-{distribute}-{wrap}-{split}"] = dict(kind=kind, distribute=distribute, wrap=wrap,
                                                                 split=W.SPLITS[(2, split)])
    cases["skip-and-revert"] = dict(kind="kbfgs", distribute="layerwise", wrap="ddp", split=W.SPLITS[(2, "unequal")],
                                    nan_loss_at=(3, 1), nan_second_at=(6, 1))
    cases["kfac-skip"] = dict(kind="kfac", distribute="layerwise", wrap="plain", split=W.SPLITS[(2, "equal")],
                              nan_loss_at=(4, 0))
    for kind in ("kbfgs", "kfac_mc"):
        cases[f"resume-1to2-{kind}"] = dict(kind=kind, distribute="layerwise", wrap="ddp",
                                            split=W.SPLITS[(2, "unequal")], start=RESUME_AT,
                                            steps=W.STEPS - RESUME_AT, checkpoint=reference_checkpoint(kind))
        cases[f"checkpoint-2-{kind}"] = dict(kind=kind, distribute="replicate", wrap="plain",
                                             split=W.SPLITS[(2, "unequal")], steps=RESUME_AT)
    return cases


def _cases_w4():
    return {
        "kbfgs-layerwise-ddp-unequal": dict(kind="kbfgs", distribute="layerwise", wrap="ddp", split=W.SPLITS[(4, "unequal")]),
        "kfac_mc-replicate-plain-unequal": dict(kind="kfac_mc", distribute="replicate", wrap="plain",
                                                split=W.SPLITS[(4, "unequal")]),
        "mixed-layerwise-ddp-equal": dict(kind="mixed", distribute="layerwise", wrap="ddp", split=W.SPLITS[(4, "equal")]),
        "resume-1to4-kfac": dict(kind="kfac", distribute="layerwise", wrap="ddp", split=W.SPLITS[(4, "equal")],
                                 start=RESUME_AT, steps=W.STEPS - RESUME_AT, checkpoint=reference_checkpoint("kfac")),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Case name -> per-rank results, for world sizes 2 and 4 (one spawn each)."""
    out = {}
    for world, cases in ((2, _cases_w2()), (4, _cases_w4())):
        results = W.spawn(W.optimizer_suite, world, tmp_path_factory.mktemp(f"w{world}"), cases=list(cases.values()))
        for i, name in enumerate(cases):
            out[(world, name)] = ([results[r][i] for r in range(world)], cases[name])
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_replicated(ranks):
    for step in range(len(ranks[0]["params"])):
        for r in ranks[1:]:
            assert torch.equal(r["params"][step], ranks[0]["params"][step]), f"parameters differ at step {step}"
            assert torch.equal(r["states"][step], ranks[0]["states"][step]), f"optimizer state differs at step {step}"


EQUIV = [(2, f"{k}-{d}") for k in KINDS for d in ("replicate", "layerwise")] + [
    (4, "kbfgs-layerwise"), (4, "kfac_mc-replicate"), (4, "mixed-layerwise")]


@pytest.mark.parametrize("world,prefix", EQUIV, ids=[f"W{w}-{p}" for w, p in EQUIV])
def test_matches_single_process_and_ranks_stay_identical(runs, world, prefix):
    (key,) = [k for k in runs if k[0] == world and k[1].startswith(prefix + "-")]
    ranks, case = runs[key]
    ref = reference(case["kind"])
    _assert_replicated(ranks)
    for step, (got, want) in enumerate(zip(ranks[0]["params"], ref["params"])):
        assert _rel(got, want) < 1e-10, f"step {step}: relative difference {_rel(got, want):.3g}"
    assert ranks[0]["counters"]["skipped_steps"] == 0 and ranks[0]["counters"]["reverted_steps"] == 0
    if case["wrap"] == "ddp":  # exactly one gradient reduction per step: none from the second pass
        assert all(n == 1 for n in ranks[0]["reductions"]), ranks[0]["reductions"]
    comm = ranks[0]["comm"][-1]["step_by_op"]
    assert comm["all_reduce"]["calls"] >= 1  # the agreement at least
    if case["distribute"] == "layerwise" and case["kind"] in ("kbfgs", "kbfgsl"):
        assert comm["broadcast_object"]["calls"] >= 1  # updated BFGS states from their owners
    if case["distribute"] == "replicate":
        assert "broadcast" not in comm and "broadcast_object" not in comm


def test_one_rank_nonfinite_loss_skips_everywhere_and_second_pass_reverts_everywhere(runs):
    ranks, _ = runs[(2, "skip-and-revert")]
    _assert_replicated(ranks)
    for r, res in enumerate(ranks):
        c = res["counters"]
        assert c["skipped_steps"] == 1 and c["reverted_steps"] == 1, c
        expected = "non-finite loss" if r == 1 else OTHER_RANK
        assert c["skip_reasons"].get(expected) == 1, c["skip_reasons"]
    # the skipped step left the parameters where they were, on both ranks
    assert torch.equal(ranks[0]["params"][3], ranks[0]["params"][2])
    assert torch.equal(ranks[0]["params"][6], ranks[0]["params"][5])
    ranks, _ = runs[(2, "kfac-skip")]
    _assert_replicated(ranks)
    assert [res["counters"]["skipped_steps"] for res in ranks] == [1, 1]


@pytest.mark.parametrize("kind", ["kbfgs", "kfac_mc"])
def test_resume_across_world_sizes(runs, kind):
    ref = reference(kind)
    # 1 -> 2: a one-process checkpoint at step 10 continued on two ranks
    ranks, _ = runs[(2, f"resume-1to2-{kind}")]
    _assert_replicated(ranks)
    assert _rel(ranks[0]["params"][-1], ref["params"][-1]) < 1e-10
    # 2 -> 1: a two-rank checkpoint at step 10 continued on one process
    ranks, _ = runs[(2, f"checkpoint-2-{kind}")]
    assert all(torch.equal(ranks[0]["states"][-1], r["states"][-1]) for r in ranks)
    resumed = W.reference_run(kind, steps=W.STEPS - RESUME_AT, start=RESUME_AT,
                              checkpoint={"model": ranks[0]["model"], "opt": ranks[1]["opt"]})
    assert _rel(resumed["params"][-1], ref["params"][-1]) < 1e-10


def test_resume_one_to_four(runs):
    ranks, _ = runs[(4, "resume-1to4-kfac")]
    _assert_replicated(ranks)
    assert _rel(ranks[0]["params"][-1], reference("kfac")["params"][-1]) < 1e-10


def test_comm_stats_count_statistics_bytes(runs):
    """KFAC replicate: per step the agreement (2 + L·W float64) and the statistics (Σ d_a² + d_g² plus
    one weight per factor, float64) -- nothing else."""
    (key,) = [k for k in runs if k[0] == 2 and k[1].startswith("kfac-replicate-")]
    ranks, _ = runs[key]
    dims = [(6, 6), (7, 4), (5, 3)]  # (a_dim with bias, g_dim) of the three Linear layers
    stats = sum(a * a + g * g for a, g in dims) + 2 * len(dims)
    agreement = 2 + len(dims) * 2
    step = ranks[0]["comm"][-1]["step_by_op"]
    assert step == {"all_reduce": {"calls": 2, "bytes": 8 * (stats + agreement)}}


def test_single_process_data_parallel_is_inert():
    dp = DataParallel(LocalCommunicator(), "layerwise")
    assert not dp.active and dp.loss_weight(7) == 1.0
    with pytest.raises(ValueError, match="distribute"):
        DataParallel(LocalCommunicator(), "sharded")


def test_runner_and_example_on_two_ranks(tmp_path):
    """``run_experiment`` with two ranks ends where one process ends (float32, reduction order
    apart), only rank 0 writes; ``examples/ddp.py`` trains the same on two ranks as on one."""
    ranks = W.spawn(W.integration_scenario, 2, tmp_path, out=str(tmp_path / "runner"))
    single = W.run_runner(str(tmp_path / "single"))
    for name, value in single.items():
        assert ranks[0]["finals"][name] == pytest.approx(value, rel=1e-4), name
        assert ranks[1]["finals"][name] == ranks[0]["finals"][name]
    assert "results.json" in ranks[0]["files"] and "curves.csv" in ranks[0]["files"]
    assert any(f.endswith(".png") for f in ranks[0]["files"])
    assert ranks[1]["files"] == []
    import torch.distributed as dist

    assert not dist.is_initialized()
    example_single = W.run_example()
    assert ranks[0]["example"] == ranks[1]["example"]
    assert ranks[0]["example"] == pytest.approx(example_single, rel=1e-4)
    assert ranks[0]["example"][-1] < ranks[0]["example"][0]
