"""The measured kernel floor (benchmarks/kernel_floor.py) runs exactly the analytic floor's op list.

Timings are never asserted: what is checked is that the bare-kernel plan executes each operation of
:func:`benchmarks.flops.step_ops` once, with the shapes that give the hand-counted FLOPs, so that the
kernel floor and the FLOP floor describe the same work.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import MethodSpec, mlp_shapes, step_floor, step_ops
from benchmarks.kernel_floor import LIBRARY_STAGES, KernelPlan, activations_of, library_stages, main
from benchmarks.models import build_autoencoder

# The 2-layer MLP 3 -> 2 -> 4 with biases, batch 5 of tests/benchmarks/test_flops.py.
# Layer 1: d_in 3, d_out 2, d_a 4 (first layer: no input gradient); layer 2: d_in 2, d_out 4, d_a 3.
WIDTHS, BATCH = (3, 2, 4), 5
# FLOPs the analytic floor counts (derivations in test_flops.py's HAND).
ANALYTIC = {
    MethodSpec("sgdm"): 560,
    MethodSpec("adam"): 740,
    MethodSpec("kfac", 1, 1): 1412,
    MethodSpec("kfac", 2, 4): 1077.25,
    MethodSpec("diagonal"): 945,
    MethodSpec("kbfgs"): 1719,
    MethodSpec("kbfgsl", memory=3): 2487,
}
# GEMM FLOPs torch's FlopCounterMode sees (mm/addmm only: 2mnk, no bias add, sums, elementwise, Cholesky
# or triangular solves) in one step running every op:
#   forward addmm 2*5*3*2 + 2*5*2*4 = 140; weight grads 140; input grad (layer 2) 80  -> base 360
#   gram (A: XᵀX over the d_in data columns, the ones row/column is a column sum): 2*5*3*3 + 2*5*2*2 = 130;
#     (G) 2*5*2*2 + 2*5*4*4 = 200
#   kron H_g M H_a: (2*2*2*4 + 2*2*4*4) + (2*4*4*3 + 2*4*3*3) = 264
#   diagonal statistic (g∘g)ᵀ(a∘a): 2*5*2*4 + 2*5*4*3 = 200
#   second pass: forward 140 + input grad 80 = 220
#   dense H_g update: Hy, u = Hỹ as [d,d]@[d,1] (2d² each) + rank 2 as [d,2]@[2,d] (4d²) = 8d²: 8*(4+16) = 160
#   Hessian action: s = Hā, y = As, u = Hy, rank 2: 10d_a²: 10*(16+9) = 250
#   L-BFGS apply (p = 3, n columns): SᵀV, YᵀV, (YᵀY)X, S·, Y· = 8pdn + 2p²n (the two solves unseen):
#     precondition (d_out, n = d_a): (192 + 72) + (288 + 54) = 606, plus M H_a 2*2*4*4 + 2*4*3*3 = 136;
#     H_g update (n = 1): (48 + 18) + (96 + 18) = 180; append Sᵀy, Yᵀs, Yᵀy: 6pd = 36 + 72 = 108
COUNTED = {
    MethodSpec("sgdm"): 360,
    MethodSpec("adam"): 360,
    MethodSpec("kfac", 1, 1): 360 + 130 + 200 + 264,
    MethodSpec("diagonal"): 360 + 200,
    MethodSpec("kbfgs"): 360 + 130 + 264 + 220 + 160 + 250,
    MethodSpec("kbfgsl", memory=3): 360 + 130 + 136 + 606 + 220 + 180 + 108 + 250,
}


def _id(spec: MethodSpec) -> str:
    return f"{spec.kind}-{spec.curvature_update_freq}-{spec.inverse_update_freq}-{spec.memory}"


@pytest.mark.parametrize("spec", list(ANALYTIC), ids=_id)
def test_plan_runs_the_analytic_op_list_exactly_once(spec, device):
    shapes = mlp_shapes(WIDTHS)
    plan = KernelPlan(spec, shapes, BATCH, [True, False], device=device)
    ops = step_ops(spec, shapes, BATCH)
    assert Counter(map(repr, plan.scheduled_ops)) == Counter(map(repr, ops))
    total = sum(op.amortized_flops for _, op in plan.scheduled_ops)
    assert total == pytest.approx(ANALYTIC[spec], rel=1e-12)
    assert total == pytest.approx(step_floor(spec, shapes, BATCH).total, rel=1e-12)


@pytest.mark.parametrize("spec", list(COUNTED), ids=_id)
@pytest.mark.parametrize("activations", [(False, False), (True, False)], ids=["linear", "relu"])
def test_plan_executes_the_hand_counted_gemms(spec, activations, device):
    plan = KernelPlan(spec, mlp_shapes(WIDTHS), BATCH, activations, device=device, dtype=torch.float64)
    plan.run()  # first run outside the counter (nothing lazy, but keeps the count to one step)
    with FlopCounterMode(display=False) as counter:
        plan.run("steady")
    assert counter.get_total_flops() == COUNTED[spec]
    for layer in plan.layers:  # the buffers stay finite (a plan that diverged would time denormals/NaNs)
        assert torch.isfinite(layer.W).all() and torch.isfinite(layer.P).all()


def test_periodic_phases_run_only_their_ops(device):
    """KFAC with T_cov 2, T_inv 4: a plain step runs the passes and the preconditioning, a statistics step adds
    the two factor GEMMs (130 + 200), the inverses add no GEMM."""
    plan = KernelPlan(MethodSpec("kfac", 2, 4), mlp_shapes(WIDTHS), BATCH, device=device, dtype=torch.float64)
    assert sorted(plan.schedule.weights) == ["inverse+stats", "plain", "stats"]
    counts = {}
    for phase in ("plain", "stats", "inverse+stats"):
        with FlopCounterMode(display=False) as counter:
            plan.run(phase)
        counts[phase] = counter.get_total_flops()
    assert counts == {"plain": 360 + 264, "stats": 360 + 264 + 330, "inverse+stats": 360 + 264 + 330}
    timed = plan.run_timed("inverse+stats")
    assert "inverse" in timed and "statistics" in timed and "mc_pass" not in timed


def test_activations_follow_the_autoencoder():
    """ReLU after every hidden layer but the code layer; none after the output layer."""
    assert activations_of(build_autoencoder("curves", seed=0)) == [True] * 5 + [False] + [True] * 5 + [False]
    assert activations_of(build_autoencoder("mnist", seed=0)) == [True, True, True, False, True, True, True, False]
    with pytest.raises(ValueError, match="activation flags"):
        KernelPlan(MethodSpec("sgdm"), mlp_shapes(WIDTHS), BATCH, [True])


def test_cli_reports_the_split(tmp_path, capsys):
    """The split adds up: step = FLOP floor + BLAS gap + overhead, for every method of a tiny run."""
    import json

    assert main(["--model", "tiny", "--batch", "8", "--steps", "2", "--repeats", "1", "--warmup", "1",
                 "--methods", "sgdm,kbfgs", "--clock", "thread", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernel_floor.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["adam", "sgdm", "kbfgs"]
    for row in data["rows"]:
        assert row["flop_ms"] + row["blas_ms"] + row["overhead_ms"] == pytest.approx(row["step_ms"])
        assert row["kernel_ms"] > 0 and row["flop_gflop"] > 0
    assert "K-BFGS" in capsys.readouterr().out


def test_library_stages_partition_the_step_and_restore_the_library():
    """Every stage is charged exclusively (the stages and the rest add up to the step, none negative), K-BFGS's
    two closure calls are told apart, and every wrapped function is the original again afterwards."""
    import importlib

    from benchmarks.throughput import Workload, make_candidate

    def originals():
        out = []
        for target, attr, _ in LIBRARY_STAGES:
            module, _, cls = target.partition(":")
            owner = importlib.import_module(module)
            owner = getattr(owner, cls) if cls else owner
            out.append(vars(owner).get(attr))
        return out

    before = originals()
    cand = make_candidate("kbfgs", Workload.autoencoder("tiny", 16), torch.device("cpu"))
    closure = cand.closure
    cand.step()
    stages = library_stages(cand, steps=2)
    assert {"first pass", "second pass", "statistics", "precondition", "pair updates", "snapshot", "checks"} <= set(stages)
    assert all(v >= 0.0 for k, v in stages.items() if k != "rest") and stages["rest"] > -1e-3
    parts = sum(v for k, v in stages.items() if k != "step")
    assert parts == pytest.approx(stages["step"], rel=1e-9)
    assert originals() == before and cand.closure is closure
