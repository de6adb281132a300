"""Timing statistics, interleaving, phases, memory accounting, the throughput script end to end and the
profiler breakdown. No assertion here depends on how fast anything runs."""

from __future__ import annotations

import csv
import gc
import json
import sys

import pytest
import torch

from benchmarks import throughput
from benchmarks.profile_step import attribute, our_function, profile_method, qualname
from benchmarks.throughput import (
    OUR_METHODS,
    SWEEP_COLUMNS,
    TABLE_COLUMNS,
    Schedule,
    Workload,
    make_candidate,
    periodic_schedule,
    plan_phases,
    prefill_lbfgs,
    state_dict_bytes,
)
from benchmarks.timing import (
    CPUTimer,
    Sample,
    make_timer,
    paired_ratios,
    phase_weighted,
    quantile,
    rotated,
    run_interleaved,
    summarize,
)

TINY = Workload.autoencoder("tiny", 8)


# ---------------------------------------------------------------------------------- statistics
def test_quantiles_and_summary():
    values = [4.0, 1.0, 3.0, 2.0]
    assert quantile(values, 0.0) == 1.0 and quantile(values, 1.0) == 4.0
    assert quantile(values, 0.25) == pytest.approx(1.75) and quantile(values, 0.5) == pytest.approx(2.5)
    s = summarize(values)
    assert (s.median, s.q25, s.q75, s.min, s.max, s.n) == (2.5, 1.75, 3.25, 1.0, 4.0, 4)
    assert s.iqr == pytest.approx(1.5) and s.scaled(2.0).median == 5.0
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        quantile([1.0], 1.5)


def test_phase_weighted_amortization():
    s = phase_weighted({"plain": [1.0, 1.0, 3.0], "inverse": [21.0]}, {"plain": 0.95, "inverse": 0.05})
    assert s.median == pytest.approx(0.95 * 1.0 + 0.05 * 21.0)
    assert s.max == pytest.approx(0.95 * 3.0 + 0.05 * 21.0) and s.n == 4
    with pytest.raises(ValueError, match="sum to 1"):
        phase_weighted({"a": [1.0]}, {"a": 0.5})
    with pytest.raises(ValueError, match="no values"):
        phase_weighted({"a": [1.0]}, {"a": 0.5, "b": 0.5})


class _FakeTimer:
    """Runs the call and returns preset durations, in order."""

    def __init__(self, durations):
        self.durations = list(durations)

    def time(self, fn):
        fn()
        return self.durations.pop(0)


class _FakeCandidate:
    def __init__(self, name, log, phases=("steady",)):
        self.name, self.log, self.phases, self.prepared = name, log, phases, []

    def plan(self, rounds):
        return [self.phases[i % len(self.phases)] for i in range(rounds)]

    def prepare(self, phase):
        self.prepared.append(phase)

    def step(self):
        self.log.append((self.name, gc.isenabled()))

    def after_step(self):
        return {"n": len(self.log)}


def test_run_interleaved_rotates_and_pairs():
    log = []
    cands = {"adam": _FakeCandidate("adam", log), "x": _FakeCandidate("x", log, ("p", "q"))}
    durations = [1.0, 2.0, 6.0, 2.0, 1.0, 4.0, 8.0, 2.0]  # repeat 0: rounds 0, 1; repeat 1: rounds 0, 1
    samples = run_interleaved(cands, repeats=2, rounds=2, timer=_FakeTimer(durations))
    order = [name for name, _ in log]
    assert order == ["adam", "x", "x", "adam", "adam", "x", "x", "adam"]
    assert not any(enabled for _, enabled in log)  # the collector is paused while a step runs
    assert gc.isenabled()
    assert cands["x"].prepared == ["p", "q", "p", "q"]
    assert [(s.name, s.repeat, s.round, s.phase) for s in samples[:4]] == [
        ("adam", 0, 0, "steady"), ("x", 0, 0, "p"), ("x", 0, 1, "q"), ("adam", 0, 1, "steady")]
    ratios = [r for _, r in paired_ratios(samples, "x", "adam")]
    assert ratios == [2.0, 3.0, 4.0, 4.0]  # 2/1, 6/2, 4/1, 8/2
    assert samples[1].extra == {"n": 2}
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_timers(device):
    timer = make_timer(device)
    calls = []
    assert timer.time(lambda: calls.append(torch.ones(3, device=device).sum())) >= 0.0
    assert len(calls) == 1
    assert isinstance(make_timer("cpu"), CPUTimer)


# ---------------------------------------------------------------------------------- phases
def test_periodic_schedule_phases_and_weights():
    sched = periodic_schedule(10, 100, first_periodic=21)
    assert sched.period == 100 and sched.periodic
    assert sched.weights == pytest.approx({"inverse+stats": 0.01, "stats": 0.09, "plain": 0.90})
    assert sched.next_step(0, "plain") == 21 and sched.next_step(0, "stats") == 30
    assert sched.next_step(31, "inverse+stats") == 100 and sched.next_step(100, "inverse+stats") == 100
    assert periodic_schedule(1, 20, 0).weights == pytest.approx({"inverse+stats": 0.05, "stats": 0.95})
    assert periodic_schedule(3, 2, 0).weights == pytest.approx(
        {"inverse+stats": 1 / 6, "plain": 2 / 6, "inverse": 2 / 6, "stats": 1 / 6})  # k = 0..5
    assert not periodic_schedule(1, 1, 5).periodic
    with pytest.raises(ValueError, match="unknown phase"):
        sched.next_step(0, "steady")


def test_plan_covers_every_phase_evenly():
    plan = plan_phases(periodic_schedule(10, 100, 0), 20)
    assert len(plan) == 20 and plan.count("inverse+stats") == 1 and plan.count("stats") == 2
    assert plan.count("plain") == 17
    assert plan_phases(Schedule(), 3) == ["steady"] * 3
    with pytest.raises(ValueError, match="at least 3"):
        plan_phases(periodic_schedule(10, 100, 0), 2)


def test_phase_jumps_make_kfac_invert_only_on_inverse_steps(device):
    cand = make_candidate("kfac", TINY, torch.device(device))
    cand.step()
    cand.after_step()
    seen = {}
    for phase in ("stats", "inverse+stats", "stats", "inverse+stats"):
        cand.prepare(phase)
        k = cand.optimizer.steps
        cand.step()
        seen.setdefault(phase, []).append(cand.after_step()["inverses"])
        assert k > cand.optimizer.inverse_warmup_steps
        assert (k % cand.optimizer.inverse_update_freq == 0) == (phase == "inverse+stats")
    assert all(n > 0 for n in seen["inverse+stats"]) and all(n == 0 for n in seen["stats"])


def test_prefilled_lbfgs_memory_is_full_and_leaves_h_at_identity(device):
    cand = make_candidate("kbfgsl", TINY, torch.device(device))
    assert cand.prefilled > 0
    for block in cand.optimizer.blocks.values():
        lbfgs = block.g_factor.lbfgs
        assert lbfgs.size == lbfgs.memory == 100
        eye = torch.eye(lbfgs.dim, device=device)
        torch.testing.assert_close(lbfgs.to_dense(), eye, atol=1e-4, rtol=0)
    assert cand.floor_spec().memory == 100
    assert prefill_lbfgs(cand.optimizer) == 0  # already full
    assert make_candidate("kbfgsl", TINY, torch.device(device), prefill=False).floor_spec().memory == 0


# ---------------------------------------------------------------------------------- memory
def test_state_dict_bytes_walks_nested_containers():
    state = {"a": torch.zeros(3, dtype=torch.float32), "b": [torch.zeros(2, 2, dtype=torch.float64), 7, "x"],
             "c": {"d": (torch.zeros(5, dtype=torch.int8), None)}}
    assert state_dict_bytes(state) == 3 * 4 + 4 * 8 + 5 * 1


def test_state_bytes_include_the_curvature_state(device):
    kfac = make_candidate("kfac", TINY, torch.device(device))
    adam = make_candidate("adam", TINY, torch.device(device))
    kfac.step()
    adam.step()
    params = sum(p.numel() for p in adam.model.parameters())
    assert adam.state_bytes() >= 2 * 4 * params  # exp_avg and exp_avg_sq
    factors = sum(b.a_factor.dim ** 2 + b.g_factor.dim ** 2 for b in kfac.optimizer.blocks.values())
    # momentum + F and inverse of every factor, in float32
    assert kfac.state_bytes() >= 4 * (params + 2 * factors)


# ---------------------------------------------------------------------------------- the script
def _run(tmp_path, *args):
    out = tmp_path / "out"
    rc = throughput.main(["--model", "tiny", "--batch", "8", "--warmup", "1", "--repeats", "1", "--out", str(out), *args])
    return rc, out


def test_script_end_to_end_on_tiny_model(tmp_path, device, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "asdl", None)  # ASDL absent: the peers must be skipped cleanly
    rc, out = _run(tmp_path, "--device", str(device), "--steps", "2", "--memory", "--peers")
    assert rc == 0
    printed = capsys.readouterr().out
    assert "peers skipped: ASDL is not installed" in printed
    for header in ("ms/step [IQR]", "x Adam [q25-q75]", "floor (x SGD)", "meas. (x SGD)", "gap"):
        assert header in printed
    report = json.loads((out / "throughput.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == set(OUR_METHODS)
    for row in rows.values():
        assert set(TABLE_COLUMNS) <= set(row)
        assert row["ms_median"] > 0 and row["x_adam_median"] > 0 and row["floor_gflop"] > 0
        assert row["gap"] == pytest.approx(row["measured_x_sgd"] / row["floor_x_sgd"])
        assert row["skipped_steps"] == 0
    assert rows["adam"]["x_adam_median"] == 1.0 and rows["sgdm"]["floor_x_sgd"] == 1.0
    assert rows["kbfgs"]["floor_x_sgd"] > 1.0
    # KFAC 10/100 has three phases, so the 2 requested steps were raised to 3, every phase timed
    assert report["meta"]["steps_effective"] == 3
    phases = {s["phase"] for s in report["samples"] if s["method"] == "kfac-10-100"}
    assert phases == {"inverse+stats", "stats", "plain"}
    assert len(report["samples"]) == 3 * len(OUR_METHODS)
    with (out / "throughput.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == TABLE_COLUMNS
        assert len(list(reader)) == len(OUR_METHODS)
    memory = {r["method"]: r for r in report["memory"]}
    assert memory["adam"]["state_x_adam"] == 1.0 and memory["kbfgs"]["state_bytes"] > 0
    if torch.device(device).type == "cpu":
        assert "estimate = optimizer-state bytes" in memory["kfac"]["peak_kind"]
        assert memory["kfac"]["peak_bytes"] == memory["kfac"]["state_bytes"]
    assert report["peers"] == [] and "not installed" in report["peers_skipped"][0]
    assert (out / "table.txt").exists() and (out / "memory.csv").exists()


def test_script_sweep_only(tmp_path, capsys):
    rc, out = _run(tmp_path, "--no-main", "--sweep", "--sweep-widths", "6", "--sweep-batches", "4,8",
                   "--sweep-steps", "2", "--methods", "kfac,kbfgs")
    assert rc == 0
    with (out / "sweep.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == SWEEP_COLUMNS
    assert {(r["width"], r["batch"]) for r in rows} == {("6", "4"), ("6", "8")}
    assert {r["method"] for r in rows} == {"adam", "sgdm", "kfac", "kbfgs"}
    assert "Scaling sweep" in capsys.readouterr().out


def test_script_rejects_bad_arguments(tmp_path):
    assert _run(tmp_path, "--methods", "newton")[0] == 2
    if not torch.cuda.is_available():
        assert _run(tmp_path, "--device", "cuda")[0] == 2


def test_peers_against_asdl_when_installed(tmp_path):
    pytest.importorskip("asdl")
    rc, out = _run(tmp_path, "--steps", "3", "--methods", "kfac,kbfgs", "--peers")
    assert rc == 0
    peers = {p["theirs"]: p for p in json.loads((out / "throughput.json").read_text())["peers"]}
    assert set(peers) == {"asdl-kfac", "asdl-kbfgs"}
    assert all(p["ours_over_theirs"] > 0 for p in peers.values())


# ---------------------------------------------------------------------------------- the profiler
def test_qualified_names_come_from_the_source():
    assert our_function("optimizers/driver.py(1): nothing") == "driver.nothing"
    assert our_function("torch/nn/modules/module.py(1782): _call_impl") is None
    assert qualname("curvature/blocks.py", 0, "<genexpr>") == "<genexpr>"
    lines = open("curvature/blocks.py").read().splitlines()
    start = next(i for i, text in enumerate(lines, 1) if text.startswith("class KroneckerBlock"))
    line = next(i for i, text in enumerate(lines, 1) if "def precondition(self, grad" in text and i > start)
    assert our_function(f"curvature/blocks.py({line}): precondition") == "blocks.KroneckerBlock.precondition"


def _exclusive_total(table):
    return sum(row[1] for row in table.rows)


@pytest.mark.parametrize("method", ["kbfgs", "kfac"])
def test_profile_breakdown_partitions_the_step(method, device):
    report = profile_method(method, TINY, device, steps=1, warmup=1, top=10_000)
    phases = {p.phase: p for p in report.phases}
    expected = {"kbfgs": {"steady"}, "kfac": {"stats", "inverse+stats"}}[method]
    assert set(phases) == expected
    for ph in report.phases:
        inclusive, exclusive, by_op = ph.tables[:3]
        functions = {row[0]: row for row in inclusive.rows}
        assert "driver.CurvatureOptimizer.step" in functions
        if torch.device(device).type == "cpu":
            # every op's and frame's own time is charged somewhere: the regions add up to the step
            assert _exclusive_total(exclusive) == pytest.approx(ph.profiled_ms, rel=0.02)
            assert functions["driver.CurvatureOptimizer.step"][2] > 50.0  # a share of the step, not a speed
        assert by_op.rows and all(not row[0].endswith(")") or "::" in row[0] for row in by_op.rows)
        assert any("no record_function labels" in n for n in ph.notes)
    if method == "kbfgs":
        names = {row[0] for row in phases["steady"].tables[0].rows}
        assert {"driver.CurvatureOptimizer._second_pass", "blocks.KroneckerBlock.prepare_after_step"} <= names
    else:
        assert "inverter.BatchedInverter.run" in {r[0] for r in phases["inverse+stats"].tables[0].rows}
        # outside the inverse phase the inverter is constructed but inverts nothing
        stats = {r[0]: r for r in phases["stats"].tables[0].rows}
        assert "linalg.launch_inverses" not in stats
        assert "linalg.launch_inverses" in {r[0] for r in phases["inverse+stats"].tables[0].rows}
    assert report.text().count("by region, exclusive") == len(expected)


def test_attribute_charges_ops_to_the_innermost_library_frame():
    class Ev:
        def __init__(self, name, total, parent=None, python=False, annotation=False):
            self.name, self.cpu_time_total, self.cpu_parent = name, total, parent
            self.is_python_function, self.is_user_annotation = python, annotation
            self.children = []
            if parent is not None:
                parent.children.append(self)
            self.device_time_total = 0.0
            self.self_device_time_total = 0.0

        @property
        def self_cpu_time_total(self):
            return self.cpu_time_total - sum(c.cpu_time_total for c in self.children)

    root = Ev("benchmark::step", 100.0, annotation=True)
    step = Ev("optimizers/driver.py(1): step", 95.0, root, python=True)
    closure = Ev("benchmarks/throughput.py(10): closure", 40.0, step, python=True)
    module = Ev("nn.Module: Linear_0", 25.0, closure, annotation=True)
    addmm = Ev("aten::addmm", 20.0, module)
    bce = Ev("aten::binary_cross_entropy_with_logits", 10.0, closure)
    engine = Ev("autograd::engine::evaluate_function: AddmmBackward0", 3.0, closure)
    mm = Ev("aten::mm", 2.0, engine)
    precond = Ev("curvature/blocks.py(1): precondition", 50.0, step, python=True)
    mm2 = Ev("aten::mm", 45.0, precond)
    events = [root, step, closure, module, addmm, bce, engine, mm, precond, mm2]
    tables = attribute(events, 100.0, 0.0, top=100, steps=1)
    excl = {row[0]: row[1] * 1000.0 for row in tables[1].rows}  # back to microseconds
    assert excl["driver.step > model forward"] == pytest.approx(25.0)  # addmm 20 + the annotation's own 5
    assert excl["driver.step > closure (loss)"] == pytest.approx(2.0 + 10.0)  # the closure's own time + the loss op
    assert excl["driver.step > backward (autograd)"] == pytest.approx(3.0)
    assert excl["blocks.precondition"] == pytest.approx(50.0)
    assert excl["driver.step"] == pytest.approx(5.0)
    assert excl["(outside our packages)"] == pytest.approx(5.0)
    assert sum(excl.values()) == pytest.approx(100.0)
    ops = {row[0]: row[1] * 1000.0 for row in tables[2].rows}
    assert ops["aten::mm"] == pytest.approx(47.0) and ops["aten::addmm"] == pytest.approx(20.0)
    incl = {row[0]: row[1] * 1000.0 for row in tables[0].rows}
    assert incl["driver.step"] == pytest.approx(95.0) and incl["blocks.precondition"] == pytest.approx(50.0)


def test_samples_are_plain_records():
    s = Sample("adam", 0, 1, "steady", 0.5)
    assert s.extra == {} and s.phase == "steady"


def test_transformer_throughput_rows_are_paired_with_adamw(tmp_path):
    from benchmarks.throughput import main as throughput_main

    code = throughput_main(["--model", "transformer", "--batch", "2", "--seq-len", "4", "--warmup", "1",
                            "--steps", "2", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    import csv

    rows = list(csv.DictReader((tmp_path / "transformer.csv").open()))
    assert [r["method"] for r in rows] == ["adamw", "kfac", "kbfgs", "kbfgsl"]
    assert float(rows[0]["x_adamw_median"]) == 1.0
    assert all(float(r["ms_median"]) > 0 and int(r["timed_steps"]) == 2 for r in rows)


def test_matrix_free_methods_report_products_per_step(tmp_path, device):
    res = throughput.run_suite(throughput.Workload.autoencoder("tiny", 64), ["adam", "hf", "sfn", "lm"], device,
                               steps=1, warmup=0, repeats=1, log=lambda *_: None)
    rows = {r["method"]: r for r in res.rows}
    assert rows["adam"]["products_per_step"] is None
    for name in ("hf", "sfn", "lm"):
        assert rows[name]["products_per_step"] >= 1 and rows[name]["loss_evals_per_step"] >= 1
        assert rows[name]["x_adam_median"] > 0 and "loose lower bound" in rows[name]["notes"]
    assert rows["sfn"]["products_per_step"] == 10  # k = 10 Lanczos vectors
    assert "products + " in throughput.format_table(res.rows, "t")


def test_thread_clock_is_selectable_and_rejects_unknown_clocks(device):
    """``--clock thread`` makes CPU timing use the step thread's CPU time; CUDA keeps its events."""
    from benchmarks import timing

    try:
        timing.set_cpu_clock("thread")
        timer = timing.make_timer(device)
        assert isinstance(timer, timing.CUDATimer if device.type == "cuda" else timing.ThreadTimer)
        x = torch.randn(64, 64, device=device)
        assert timer.time(lambda: [x @ x for _ in range(20)]) >= 0.0
        with pytest.raises(ValueError, match="clock"):
            timing.set_cpu_clock("cpu")
    finally:
        timing.set_cpu_clock("wall")
    assert isinstance(timing.make_timer("cpu"), timing.CPUTimer)


def test_cpu_clock_block_restores_the_previous_clock_even_on_error():
    from benchmarks import timing

    assert timing.CPU_CLOCK == "wall"
    with timing.cpu_clock("thread"):
        assert timing.CPU_CLOCK == "thread"
    assert timing.CPU_CLOCK == "wall"
    with pytest.raises(RuntimeError, match="^inside$"):
        with timing.cpu_clock("thread"):
            raise RuntimeError("inside")
    assert timing.CPU_CLOCK == "wall"


def test_write_study_prints_and_writes_rows_and_table(tmp_path, capsys):
    import json

    from benchmarks import timing

    rows = [{"n": 1, "ms": 0.5}]
    timing.write_study(None, "study", rows, "| n |")
    assert capsys.readouterr().out == "| n |\n" and not list(tmp_path.iterdir())
    timing.write_study(str(tmp_path / "out"), "study", rows, "| n |")
    assert json.loads((tmp_path / "out" / "study.json").read_text()) == rows
    assert (tmp_path / "out" / "study.md").read_text() == "| n |\n"
