"""The autoencoder experiment runner: CLI end to end, configuration, grid search, resume, MNIST."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.autoencoder import main
from benchmarks.data import DatasetError, load_curves
from benchmarks.experiment import build_config, log_grid, run_experiment
from benchmarks.experiment.config import ExperimentConfig, parse_set
from benchmarks.experiment.datasets import DataBundle, load_data
from benchmarks.experiment.report import (BEST_FIRST_ORDER_RULE, WORST_FINAL_RULE, default_target, summary_rows,
                                          time_to_target)
from benchmarks.experiment.runner import CURVE_FIELDS, TIMING_FIELDS, RunRecord, build_model, evaluate
from benchmarks.experiment.settings import BuildContext, make_settings
from benchmarks.models import likelihood_for, loss_for, summed_bce_with_logits

ALL = ("kbfgs", "kbfgsl", "kfac", "adam", "rmsprop", "sgdm")
# micro problem: CURVES images average-pooled to 14×14 (see ``micro_data``), a 196-16-4-16-196 network
MICRO = {"dataset": "curves", "n_train": 400, "n_test": 200, "batch_size": 100, "widths": [196, 16, 4, 16, 196],
         "threads": 1}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def curves_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("curves-cache")


@pytest.fixture(scope="module")
def micro_data(curves_cache) -> DataBundle:
    """400/200 CURVES images pooled 2×2 to 196 pixels (values stay in [0, 1]): fast factor algebra."""
    def pool(x):
        return torch.nn.functional.avg_pool2d(x.view(-1, 1, 28, 28), 2).reshape(-1, 196).contiguous()

    return DataBundle(pool(load_curves(curves_cache, "train", 0, 400, 200)),
                      pool(load_curves(curves_cache, "test", 0, 400, 200)), "pooled CURVES")


# ------------------------------------------------------------------ tiny preset, end to end (CLI)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, curves_cache):
    out = tmp_path_factory.mktemp("tiny")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--preset", "tiny", "--out", str(out), "--data-dir", str(curves_cache), "--no-progress",
                   "--threads", "1", "--set", "adam.lr=3e-4"])
    return rc, out, buf.getvalue()


def test_tiny_preset_writes_every_output(tiny_run):
    rc, out, stdout = tiny_run
    assert rc == 0
    for name in ("results.json", "curves.csv", "train_loss_vs_epoch.png", "train_loss_vs_wall_time.png",
                 "train_loss_vs_cpu_time.png", "test_loss_vs_epoch.png"):
        assert (out / name).is_file(), name
    for name in ALL:
        assert (out / "runs" / name / "main" / "checkpoint.pt").is_file()
        assert (out / "runs" / name / "main" / "result.json").is_file()


def test_tiny_preset_results_json(tiny_run):
    _, out, _ = tiny_run
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert (cfg["dataset"], cfg["n_train"], cfg["n_test"], cfg["epochs"], cfg["batch_size"], cfg["seed"]) == (
        "curves", 2000, 1000, 1, 500, 9999)
    assert cfg["settings"]["adam"]["lr"] == 3e-4 and cfg["settings"]["kbfgs"] == {
        "lr": 0.3, "momentum": 0.9, "weight_decay": 1e-5, "damping": 0.3, "warm_start": True}
    assert res["data"]["n_train"] == 2000 and res["data"]["n_test"] == 1000
    assert list(res["runs"]) == list(ALL) and [r["optimizer"] for r in res["summary"]] == [
        "K-BFGS", "K-BFGS(L)", "KFAC", "Adam", "RMSprop", "SGD-m"]
    for name, run in res["runs"].items():
        assert run["epoch"] == [0, 1]
        assert run["steps"] == [0, 4]  # 2000 // 500
        assert len(run["batch_losses"]) == 4 and len(run["step_times_ms"][1]) == 4
        assert run["wall_time"][0] == 0.0 and run["wall_time"][1] > 0 and run["cpu_time"][1] > 0
        assert all(math.isfinite(v) for v in run["train_loss"] + run["test_loss"])
        assert run["train_loss"][1] < run["train_loss"][0], name  # one epoch makes progress
        assert run["stop_reason"] == "epochs" and run["skipped_steps"] == [0, 0]
        warm = name in ("kbfgs", "kbfgsl", "kfac", "rmsprop")
        assert run["warm_start_batches"] == (4 if warm else 0)
    # same initial weights for every optimizer
    assert len({run["train_loss"][0] for run in res["runs"].values()}) == 1
    first_order = [res["runs"][n]["train_loss"][-1] for n in ("adam", "rmsprop", "sgdm")]
    assert res["target"] == min(first_order) and res["target_rule"] == BEST_FIRST_ORDER_RULE


def test_tiny_preset_curves_csv(tiny_run):
    _, out, _ = tiny_run
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["optimizer", "run", "selected", *CURVE_FIELDS, "median_step_ms"]
    assert len(rows) == 12 and {r["optimizer"] for r in rows} == set(ALL)
    res = json.loads((out / "results.json").read_text())
    for r in rows:
        assert r["selected"] == "1" and r["run"] == "main"
        run = res["runs"][r["optimizer"]]
        assert float(r["train_loss"]) == run["train_loss"][int(r["epoch"])]


def test_tiny_preset_pngs_are_valid(tiny_run):
    import matplotlib.image

    _, out, _ = tiny_run
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
        img = matplotlib.image.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert float(img[..., :3].std()) > 0.01  # not blank


def test_tiny_preset_prints_summary(tiny_run):
    _, out, stdout = tiny_run
    assert "Summary (curves" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("optimizer"))
    for col in ("final_train", "final_test", "epochs_to_target", "wall_s_to_target", "ms_per_step", "x_adam",
                "skipped"):
        assert col in header
    for label in ("K-BFGS(L)", "KFAC", "RMSprop", "SGD-m"):
        assert any(line.startswith(label) for line in stdout.splitlines())
    assert f"plots:   {out / 'train_loss_vs_epoch.png'}" in stdout
    adam_line = next(line for line in stdout.splitlines() if line.startswith("Adam "))
    assert adam_line.split()[-3] == "1"  # Adam's ms/step ratio to itself


# ------------------------------------------------------------------ configuration


def test_defaults_follow_the_spec():
    cfg = build_config()
    assert (cfg.epochs, cfg.batch_size, cfg.seed, cfg.optimizers, cfg.tau) == (100, 1000, 9999, ALL, 1e-5)
    kb, kf = cfg.settings["kbfgs"], cfg.settings["kfac"]
    assert (kb.lr, kb.damping, kb.momentum, kb.weight_decay, kb.warm_start) == (0.3, 0.3, 0.9, 1e-5, True)
    kl = cfg.settings["kbfgsl"]  # K-BFGS(L): K-BFGS's settings except lr 0.2 (0.3 diverged on 2 of 4 CURVES seeds)
    assert (kl.lr, kl.damping, kl.momentum, kl.weight_decay, kl.warm_start, kl.memory) == (0.2, 0.3, 0.9, 1e-5, True, 100)
    assert (kf.lr, kf.damping, kf.fisher, kf.inverse_update_freq, kf.inverse_warmup_steps, kf.factor_decay) == (
        1.0, 3.0, "mc", 20, 20, 0.9)
    assert (cfg.settings["adam"].eps, cfg.settings["adam"].beta2) == (1e-4, 0.9)
    assert cfg.settings["rmsprop"].warm_start and cfg.settings["rmsprop"].eps == 1e-4
    assert build_config(preset="tiny").n_train == 2000


def test_kfac_gets_the_datasets_likelihood():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    for dataset in ("faces", "curves"):
        ctx = BuildContext(likelihood=likelihood_for(dataset), loss_fn=loss_for(dataset))
        opt = make_settings("kfac").build(model, ctx)
        assert (opt.fisher, opt.likelihood) == ("mc", likelihood_for(dataset))
        assert opt.inverse_update_freq == 20 and opt.inverse_warmup_steps == 20


def test_precedence_preset_file_cli_set(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "tiny", "epochs": 3, "optimizers": ["kbfgs", "adam"],
                                "settings": {"kbfgs": {"lr": 0.1, "damping": 1}},
                                "grid_values": {"adam": {"lr": "1e-4:1e-3", "eps": [1e-8]}}}))
    cfg = build_config(config_file=path, cli={"epochs": 2, "seed": None}, sets=["kbfgs.lr=0.03"])
    assert cfg.preset == "tiny" and cfg.n_train == 2000 and cfg.epochs == 2 and cfg.seed == 9999
    assert cfg.optimizers == ("kbfgs", "adam")
    assert (cfg.settings["kbfgs"].lr, cfg.settings["kbfgs"].damping) == (0.03, 1.0)
    assert cfg.grid_for("adam") == {"lr": (1e-4, 3e-4, 1e-3), "eps": (1e-8,)}
    assert build_config(preset="quick", config_file=path).preset == "quick"
    # a config round-trips through its dict form
    again = build_config(config_file={k: v for k, v in cfg.to_dict().items()})
    assert again == cfg


def test_set_parsing():
    assert parse_set("kfac.fisher=empirical") == ("kfac", "fisher", "empirical")
    assert parse_set("kbfgs.warm_start=false") == ("kbfgs", "warm_start", False)
    assert parse_set("kbfgsl.memory=10") == ("kbfgsl", "memory", 10)
    cfg = build_config(sets=["kbfgs.lr=1", "rmsprop.second_moment_of=gradient"])
    assert cfg.settings["kbfgs"].lr == 1.0 and isinstance(cfg.settings["kbfgs"].lr, float)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cli": {"optimizers": "kbfgs,lbfgs"}}, "unknown optimizer 'lbfgs'"),
        ({"sets": ["lbfgs.lr=1"]}, "unknown optimizer 'lbfgs'"),
        ({"sets": ["kbfgs.lrr=1"]}, "unknown kbfgs setting 'lrr'"),
        ({"sets": ["kbfgs.memory=10"]}, "unknown kbfgs setting 'memory'"),
        ({"sets": ["kbfgs.lr=-1"]}, r"kbfgs\.lr must be > 0"),
        ({"sets": ["kbfgs.lr=fast"]}, r"kbfgs\.lr must be a finite number"),
        ({"sets": ["kbfgsl.memory=1.5"]}, r"kbfgsl\.memory must be an integer"),
        ({"sets": ["kfac.fisher=exact"]}, r"kfac\.fisher must be 'mc' or 'empirical'"),
        ({"sets": ["adam.beta2=1"]}, r"adam\.beta2 must be in \[0, 1\)"),
        ({"sets": ["kbfgs.lr"]}, "OPTIMIZER.KEY=VALUE"),
        ({"grid_sets": ["adam.lr=1:0.1"]}, "0 < lo <= hi"),
        ({"grid_sets": ["kfac.damping=-1,1"]}, r"kfac\.damping must be > 0"),
        ({"cli": {"epochs": 0}}, "epochs must be an integer >= 1"),
        ({"cli": {"n_train": 100, "batch_size": 1000}}, "n_train .* must be >= batch_size"),
        ({"cli": {"dataset": "cifar"}}, "dataset must be one of"),
        ({"cli": {"optimizers": "adam,adam"}}, "twice"),
        ({"cli": {"mnist_test_as_train": True}}, "needs dataset 'mnist'"),
        ({"preset": "huge"}, "preset must be one of"),
        ({"config_file": {"epoch": 3}}, "unknown key 'epoch'"),
        ({"config_file": {"settings": {"kbfgs": {"lambda": 1}}}}, "unknown kbfgs setting 'lambda'"),
        ({"config_file": {"grid_values": {"sgd": {"lr": [1]}}}}, "unknown optimizer 'sgd'"),
    ],
)
def test_configuration_errors_are_clear(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_config(**kwargs)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{epochs: 3}")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        build_config(config_file=bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        build_config(config_file=bad)
    bad.write_text('{"batch": 10}')
    with pytest.raises(ValueError, match=r"config file .*bad.json: unknown key 'batch'"):
        build_config(config_file=bad)
    with pytest.raises(ValueError, match="cannot read config file"):
        build_config(config_file=tmp_path / "missing.json")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["--optimizers", "kbfgs,newton", "--out", str(tmp_path)]) == 2
    assert "error: unknown optimizer 'newton'" in capsys.readouterr().err
    assert main(["--set", "kfac.dampin=3", "--out", str(tmp_path)]) == 2
    assert "unknown kfac setting 'dampin'" in capsys.readouterr().err
    assert main(["--list-settings"]) == 0
    assert "kbfgsl" in capsys.readouterr().out


def test_log_grid():
    assert log_grid(0.01, 1) == (0.01, 0.03, 0.1, 0.3, 1.0)
    assert log_grid(3e-5, 1e-4) == (3e-5, 1e-4)
    assert log_grid(0.3, 0.3) == (0.3,)


# ------------------------------------------------------------------ measurement pieces


def test_evaluate_is_l2_regularised_and_drops_the_remainder(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU(), torch.nn.Linear(3, 6)).to(device).double()
    x = torch.rand(25, 6, dtype=torch.float64, device=device)
    loss, err = evaluate(model, x, 10, summed_bce_with_logits, "bernoulli", tau=0.01)
    with torch.no_grad():
        want = 0.5 * (summed_bce_with_logits(model(x[:10]), x[:10]) + summed_bce_with_logits(model(x[10:20]), x[10:20]))
        want += 0.5 * 0.01 * sum((p**2).sum() for p in model.parameters())
        want_err = (torch.sigmoid(model(x[:20])) - x[:20]).pow(2).mean()
    assert loss == pytest.approx(float(want), rel=1e-12)
    assert err == pytest.approx(float(want_err), rel=1e-12)


def _record(name, losses, walls, ms):
    n = len(losses)
    return RunRecord(optimizer=name, tag="main", settings=make_settings(name).as_dict(), fingerprint={},
                     epoch=list(range(n)), train_loss=losses, test_loss=losses, train_error=[0.0] * n,
                     test_error=[0.0] * n, wall_time=walls, cpu_time=[2 * w for w in walls], epoch_wall=walls,
                     epoch_cpu=walls, steps=list(range(n)), skipped_steps=[0] * (n - 1) + [2],
                     reverted_steps=[0] * (n - 1) + [1], step_times_ms=[[]] + [ms] * (n - 1), stop_reason="epochs")


def test_summary_target_and_ratios():
    recs = {"kbfgs": _record("kbfgs", [500.0, 100.0, 50.0], [0.0, 2.0, 4.0], [40.0, 50.0, 60.0]),
            "adam": _record("adam", [500.0, 300.0, 200.0], [0.0, 1.0, 2.0], [10.0, 10.0, 30.0])}
    target, rule = default_target(recs)
    assert target == 200.0 and rule == BEST_FIRST_ORDER_RULE  # Adam's final loss, the only first-order run
    assert time_to_target(recs["kbfgs"], target) == (1, 2.0, 4.0)
    assert time_to_target(recs["adam"], target) == (2, 2.0, 4.0)
    assert time_to_target(recs["adam"], 10.0) == (None, None, None)
    rows = {r["optimizer"]: r for r in summary_rows(recs, target)}
    assert rows["K-BFGS"]["ms_per_step"] == 50.0 and rows["K-BFGS"]["x_adam"] == pytest.approx(5.0)
    assert rows["K-BFGS"]["skipped"] == 3 and rows["K-BFGS"]["settings"] == "lr=0.3 damping=0.3"


def test_default_target_is_the_best_first_order_final_loss():
    """The goal is what the best first-order baseline reaches in the whole budget (the smallest final
    loss among Adam, RMSprop, SGD-m), not a level every method passes; without a first-order run it
    falls back to the worst final loss × 1.05, and non-finite finals never set it."""
    recs = {"kbfgs": _record("kbfgs", [500.0, 100.0, 50.0], [0.0, 2.0, 4.0], [1.0]),
            "adam": _record("adam", [500.0, 300.0, 200.0], [0.0, 1.0, 2.0], [1.0]),
            "sgdm": _record("sgdm", [500.0, 400.0, 150.0], [0.0, 1.0, 2.0], [1.0]),
            "rmsprop": _record("rmsprop", [500.0, 400.0, math.nan], [0.0, 1.0, 2.0], [1.0])}
    assert default_target(recs) == (150.0, BEST_FIRST_ORDER_RULE)
    assert time_to_target(recs["adam"], 150.0) == (None, None, None)  # Adam never reaches SGD-m's final loss
    second_order = {"kbfgs": recs["kbfgs"], "kfac": _record("kfac", [500.0, 90.0, 80.0], [0.0, 1.0, 2.0], [1.0])}
    target, rule = default_target(second_order)
    assert target == pytest.approx(80.0 * 1.05) and rule == WORST_FINAL_RULE
    assert default_target({}) == (None, WORST_FINAL_RULE)


def test_divergence_rules():
    from benchmarks.experiment.runner import _divergence

    cfg = ExperimentConfig()
    ok = _record("kbfgs", [500.0, 100.0, 50.0], [0.0, 1.0, 2.0], [1.0])
    ok.skipped_steps, ok.reverted_steps, ok.steps = [0, 0, 1], [0, 0, 0], [0, 2, 4]
    assert _divergence(ok, cfg, False, True) is None
    assert _divergence(ok, cfg, False, False) == "non-finite weights"
    ok.train_loss[-1] = math.nan
    assert _divergence(ok, cfg, False, True) == "non-finite training loss"
    ok.train_loss[-1] = 5e5 + 1
    assert "> 1000 x the initial 500" in _divergence(ok, cfg, False, True)
    assert _divergence(ok, ExperimentConfig(divergence_factor=None), False, True) is None
    ok.train_loss[-1] = 50.0
    ok.skipped_steps, ok.reverted_steps = [0, 0, 1], [0, 0, 1]  # both steps of epoch 2 undone
    assert _divergence(ok, cfg, False, True) == "every step of epoch 2 was skipped or reverted"


# ------------------------------------------------------------------ grid search


def test_grid_records_every_run_and_selects_lowest_final_train_loss(tmp_path, micro_data):
    cfg = build_config(config_file={**MICRO, "epochs": 2, "optimizers": ["sgdm", "adam"], "grid": True,
                                    "grid_values": {"sgdm": {"lr": [1e-4, 1e-2, 1e6]},
                                                    "adam": {"lr": [1e-3, 1e-2], "eps": [1e-8, 1e-4]}}})
    res = run_experiment(cfg, tmp_path, progress=False, print_fn=None, data=micro_data)
    saved = json.loads((tmp_path / "results.json").read_text())
    for name, n_runs in (("sgdm", 3), ("adam", 4)):
        grid = saved["grid"][name]
        assert len(grid["runs"]) == n_runs and len({r["tag"] for r in grid["runs"]}) == n_runs
        finals = [math.inf if r["final_train_loss"] is None or r["stop_reason"] == "diverged"
                  else r["final_train_loss"] for r in grid["runs"]]
        best = grid["runs"][finals.index(min(finals))]
        assert grid["selected"] == best["tag"]
        assert saved["runs"][name]["tag"] == best["tag"] and saved["runs"][name]["settings"] == best["settings"]
        assert res.records[name].tag == best["tag"]
    assert {r["settings"]["lr"] for r in saved["grid"]["sgdm"]["runs"]} == {1e-4, 1e-2, 1e6}
    assert {(r["settings"]["lr"], r["settings"]["eps"]) for r in saved["grid"]["adam"]["runs"]} == {
        (1e-3, 1e-8), (1e-3, 1e-4), (1e-2, 1e-8), (1e-2, 1e-4)}
    huge = next(r for r in saved["grid"]["sgdm"]["runs"] if r["settings"]["lr"] == 1e6)
    assert huge["stop_reason"] == "diverged" and huge["error"] and huge["epoch"][-1] < 2
    assert saved["grid"]["sgdm"]["selected"] != huge["tag"]
    with open(tmp_path / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["optimizer"], r["run"]) for r in rows} == {(n, r["tag"]) for n in ("sgdm", "adam")
                                                          for r in saved["grid"][n]["runs"]}
    assert {(r["optimizer"], r["run"]) for r in rows if r["selected"] == "1"} == {
        ("sgdm", saved["grid"]["sgdm"]["selected"]), ("adam", saved["grid"]["adam"]["selected"])}


# ------------------------------------------------------------------ checkpoint / resume


def _strip_timing(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in TIMING_FIELDS and k != "median_step_ms"}


def test_resume_gives_the_same_curves(tmp_path, micro_data):
    base = {**MICRO, "optimizers": list(ALL)}
    cfg2 = build_config(config_file={**base, "epochs": 2})
    data = micro_data
    full = run_experiment(cfg2, tmp_path / "full", progress=False, print_fn=None, data=data)

    # 1 epoch, then --resume to 2 epochs
    run_experiment(build_config(config_file={**base, "epochs": 1}), tmp_path / "split", progress=False,
                   print_fn=None, data=data)
    resumed = run_experiment(cfg2, tmp_path / "split", resume=True, progress=False, print_fn=None, data=data)

    # killed in the middle of epoch 2, then --resume
    class Killed(Exception):
        pass

    def kill(name, tag, epoch, step):
        if name == "kfac" and epoch == 2 and step == 1:
            raise Killed

    with pytest.raises(Killed):
        run_experiment(cfg2, tmp_path / "killed", progress=False, print_fn=None, data=data, on_step=kill)
    assert not (tmp_path / "killed" / "runs" / "kfac" / "main" / "result.json").exists()
    after_kill = run_experiment(cfg2, tmp_path / "killed", resume=True, progress=False, print_fn=None, data=data)

    for name in ALL:
        want = _strip_timing(full.records[name].to_dict())
        assert want["epoch"] == [0, 1, 2]
        assert _strip_timing(resumed.records[name].to_dict()) == want, name
        assert _strip_timing(after_kill.records[name].to_dict()) == want, name
    a = json.loads((tmp_path / "full" / "results.json").read_text())["runs"]
    b = json.loads((tmp_path / "split" / "results.json").read_text())["runs"]
    assert {n: _strip_timing(r) for n, r in a.items()} == {n: _strip_timing(r) for n, r in b.items()}


def test_every_optimizer_trains_on_the_device(tmp_path, micro_data, device):
    cfg = build_config(config_file={**MICRO, "optimizers": list(ALL), "epochs": 1, "device": device.type})
    data = DataBundle(micro_data.train.to(device), micro_data.test.to(device), micro_data.source)
    res = run_experiment(cfg, tmp_path, progress=False, print_fn=None, checkpoint=False, data=data)
    for name, rec in res.records.items():
        assert rec.stop_reason == "epochs" and rec.steps == [0, 4], name
        assert rec.train_loss[1] < rec.train_loss[0], name
        assert len(rec.step_times_ms[1]) == 4 and all(t > 0 for t in rec.step_times_ms[1])


def test_resume_refuses_a_different_configuration(tmp_path, micro_data):
    base = {**MICRO, "optimizers": ["sgdm"], "epochs": 1, "settings": {"sgdm": {"lr": 0.01}}}
    run_experiment(build_config(config_file=base), tmp_path, progress=False, print_fn=None, data=micro_data)
    changed = build_config(config_file={**base, "epochs": 2}, sets=["sgdm.lr=0.1"])
    with pytest.raises(ValueError, match=r"different configuration \(settings\.lr: 0\.01 -> 0\.1\)"):
        run_experiment(changed, tmp_path, resume=True, progress=False, print_fn=None, data=micro_data)


def test_max_time_stops_a_run(tmp_path, micro_data):
    cfg = build_config(config_file={**MICRO, "optimizers": ["adam"], "epochs": 5, "max_time": 1e-9})
    threads = torch.get_num_threads()
    res = run_experiment(cfg, tmp_path, progress=False, print_fn=None, checkpoint=False, data=micro_data)
    assert torch.get_num_threads() == threads  # restored after the experiment
    assert res.records["adam"].epoch == [0, 1] and res.records["adam"].stop_reason == "max_time"


def test_same_initial_model_and_custom_widths():
    cfg = ExperimentConfig(widths=(784, 10, 784), optimizers=("adam",))
    a, b = build_model(cfg), build_model(cfg)
    assert [tuple(p.shape) for p in a.parameters()] == [(10, 784), (10,), (784, 10), (784,)]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    paper = build_model(ExperimentConfig())
    assert sum(p.numel() for p in paper.parameters()) == 842_340


def test_widths_must_match_the_data(tmp_path, micro_data):
    cfg = build_config(config_file={**MICRO, "widths": [784, 8, 784], "optimizers": ["adam"], "epochs": 1})
    with pytest.raises(ValueError, match="must start and end with the data dimension 196"):
        run_experiment(cfg, tmp_path, progress=False, print_fn=None, data=micro_data)


# ------------------------------------------------------------------ datasets


def test_mnist_runner_on_the_real_test_split(mnist_path, tmp_path, capsys):
    rc = main(["--dataset", "mnist", "--data-dir", str(mnist_path), "--mnist-test-as-train", "--n-train", "1000",
               "--n-test", "500", "--batch-size", "500", "--epochs", "1", "--optimizers", "kbfgsl,adam",
               "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["data"]["n_train"] == 1000 and res["data"]["n_test"] == 500 and res["data"]["dim"] == 784
    assert "MNIST test split" in res["data"]["source"]
    kb = res["runs"]["kbfgsl"]
    assert kb["warm_start_batches"] == 2 and kb["steps"] == [0, 2]
    assert 400 < kb["train_loss"][0] < 700  # summed BCE of an untrained MNIST autoencoder
    assert kb["train_loss"][1] < kb["train_loss"][0]
    assert "Summary (mnist" in capsys.readouterr().out


def test_missing_datasets_give_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="MNIST needs --data-dir"):
        load_data(build_config(cli={"dataset": "mnist"}))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        load_data(build_config(cli={"dataset": "mnist", "data_dir": str(tmp_path), "mnist_test_as_train": True}))
    with pytest.raises(DatasetError, match="newfaces_rot_single.mat"):
        load_data(build_config(cli={"dataset": "faces", "data_dir": str(tmp_path)}))


def test_matrix_free_optimizers_train_on_the_device(tmp_path, micro_data, device):
    """hf, sfn, lm are selectable like the paper's six and decrease the training loss in one epoch."""
    cfg = build_config(config_file={**MICRO, "optimizers": ["hf", "sfn", "lm"], "epochs": 1, "device": device.type},
                       sets=["hf.max_cg_iters=5", "sfn.k=4", "lm.max_cg_iters=5"])
    assert cfg.settings["hf"].max_cg_iters == 5 and cfg.settings["sfn"].k == 4
    data = DataBundle(micro_data.train.to(device), micro_data.test.to(device), micro_data.source)
    res = run_experiment(cfg, tmp_path, progress=False, print_fn=None, checkpoint=False, data=data)
    assert set(res.records) == {"hf", "sfn", "lm"}
    for name, rec in res.records.items():
        assert rec.stop_reason == "epochs" and rec.steps == [0, 4], name
        assert rec.train_loss[1] < rec.train_loss[0], name
    assert build_config().optimizers == ALL  # the matrix-free methods are opt-in
    with pytest.raises(ValueError, match="momentum"):
        make_settings("hf", {"momentum": 0.9})


def test_matrix_free_options_are_settings(device):
    """hf.preconditioner and lm.damping_matrix / lm.diagonal_samples reach the optimizers; bad values are rejected."""
    cfg = build_config(config_file={**MICRO, "optimizers": ["hf", "lm"], "device": device.type},
                       sets=["hf.preconditioner=martens", "lm.damping_matrix=max_diagonal", "lm.diagonal_samples=null"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).to(device)
    ctx = BuildContext(likelihood="bernoulli", loss_fn=summed_bce_with_logits, seed=0)
    hf = cfg.settings["hf"].build(model, ctx)
    lm = cfg.settings["lm"].build(model, ctx)
    assert hf.preconditioner == "martens"
    assert lm.damping_matrix == "max_diagonal" and lm.diagonal_samples is None
    with pytest.raises(ValueError, match="preconditioner"):
        make_settings("hf", {"preconditioner": "jacobi"})
    with pytest.raises(ValueError, match="damping_matrix"):
        make_settings("lm", {"damping_matrix": "diag"})
