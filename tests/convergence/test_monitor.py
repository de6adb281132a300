"""TrainingMonitor: no behaviour change, records that match independent oracles, theory-mode detection."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

from convergence import problems
from convergence.monitor import (
    OperatorSnapshot,
    TrainingMonitor,
    iid_loader,
    theory_mode_kwargs,
    theory_mode_violations,
)
from curvature.blocks import vec_c
from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer, diagonal_block


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


def _batches(problem, n, bs=16, seed=3):
    gen = torch.Generator().manual_seed(seed)
    loader = iid_loader(problem.dataset, bs, gen, num_samples=n * bs)
    return list(loader)


def _make(cls, model, **kw):
    if cls is KFAC:
        kw.setdefault("inverse_update_freq", 3)
        kw.setdefault("inverse_warmup_steps", 1)
    return cls(model, lr=0.2, damping=0.3, **kw)


def _train(cls, device, monitor_kwargs=None, steps=6, **kw):
    prob = problems.tanh_mlp(n=64, dtype=_dtype(device), device=device)
    opt = _make(cls, prob.model, **kw)
    mon = TrainingMonitor(opt, **monitor_kwargs) if monitor_kwargs is not None else None
    make = prob.make_closure(opt)
    for b in _batches(prob, steps):
        opt.step(make(b))
    return prob, opt, mon


def _state_tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _state_tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _state_tensors(v, f"{prefix}/{i}")


@pytest.mark.parametrize("cls", [KFAC, KBFGS, KBFGSL])
def test_monitored_run_is_bit_identical_to_unmonitored(device, cls):
    prob_a, opt_a, _ = _train(cls, device)
    prob_b, opt_b, mon = _train(cls, device, monitor_kwargs={"record_operators": True, "keep_pairs": True})
    assert len(mon.records) == 6
    for (na, pa), (nb, pb) in zip(prob_a.model.named_parameters(), prob_b.model.named_parameters()):
        assert torch.equal(pa, pb), na
    state_a = dict(_state_tensors(opt_a.state_dict()))
    state_b = dict(_state_tensors(opt_b.state_dict()))
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_records_match_independent_oracles(device):
    dtype = _dtype(device)
    prob = problems.tanh_mlp(n=64, dtype=dtype, device=device)
    opt = KBFGS(prob.model, lr=0.2, damping=0.3, mu1=0.9, **theory_mode_kwargs())
    mon = TrainingMonitor(opt, record_operators=True)
    seen = {}

    def oracle(info):  # a second, independent step hook
        seen[info.step] = {
            "before": {n: p.detach().clone() for n, p in prob.model.named_parameters()},
            "dot": sum(float((info.inputs[n].double() * info.directions[n].double()).sum()) for n in info.directions),
        }

    params_before = []
    opt.register_step_hook(oracle)
    make = prob.make_closure(opt)
    for b in _batches(prob, 5):
        params_before.append({n: p.detach().clone() for n, p in prob.model.named_parameters()})
        opt.step(make(b))
    params_before.append({n: p.detach().clone() for n, p in prob.model.named_parameters()})
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for k, rec in enumerate(mon.records):
        assert rec.step == k and rec.alpha == pytest.approx(0.2)
        # the applied step: the parameter change, measured independently
        moved = math.sqrt(sum(float((params_before[k + 1][n] - params_before[k][n]).double().pow(2).sum())
                              for n in params_before[k]))
        assert rec.step_norm == pytest.approx(moved, rel=tol)
        assert rec.descent_input == pytest.approx(seen[k]["dot"], rel=tol, abs=1e-12)
        for name, layer in rec.layers.items():
            dense = layer.operator
            evals = torch.linalg.eigvalsh(0.5 * (dense + dense.T))
            assert layer.lmin == pytest.approx(float(evals[0]), rel=1e-8, abs=1e-12)
            assert layer.lmax == pytest.approx(float(evals[-1]), rel=1e-8)
            # the pair record uses H *before* the update: y~'H y~ with the H applied at this step
            pair = layer.g.pair
            assert pair is not None and pair.vectors is not None
            s, y = pair.vectors["s"].to(device), pair.vectors["y"].to(device)
            h_before = layer.g.dense
            assert pair.yHy == pytest.approx(float(y @ h_before @ y), rel=1e-9)
            if pair.incorporated:
                h_after = opt.blocks[name].g_factor.H.double() if k == len(mon.records) - 1 else \
                    mon.records[k + 1].layers[name].g.dense
                torch.testing.assert_close(h_after @ y, s, rtol=1e-6 if dtype == torch.float64 else 1e-3,
                                           atol=1e-9 if dtype == torch.float64 else 1e-4)  # secant equation H+ y = s
                assert layer.g.updated and layer.g.lmin_after is not None
    fired = [l.g.pair.step1_active for r in mon.records for l in r.layers.values()]
    assert any(fired), "mu1 = 0.9 should make Powell's step 1 fire on this net"


def test_interval_detach_json_and_series(device):
    prob = problems.least_squares(n=64, dtype=_dtype(device), device=device)
    opt = KBFGSL(prob.model, lr=0.05, damping=0.3, **theory_mode_kwargs())
    mon = TrainingMonitor(opt, interval=3, keep_pairs=False)
    make = prob.make_closure(opt)
    batches = _batches(prob, 10)
    for b in batches[:7]:
        opt.step(make(b))
    mon.detach()
    for b in batches[7:]:
        opt.step(make(b))
    assert [r.step for r in mon.records] == [0, 3, 6]
    series = mon.spectrum_series()
    assert series["step"] == [0, 3, 6] and len(series["layers"][""]["g_lmax"]) == 3
    lo, hi = mon.kappa_observed()
    assert 0 < lo <= hi and lo == min(series["kappa_lo"])
    text = json.dumps(mon.to_json())
    assert '"records"' in text and mon.records[0].layers[""].g.pair.vectors is None
    assert mon.pair_series("", "a")[0][0] == 0


def test_kfac_refreshes_record_the_damping_they_used(device):
    prob = problems.least_squares(n=64, d=3, outputs=2, dtype=_dtype(device), device=device)
    opt = KFAC(prob.model, lr=0.1, damping=0.09, inverse_update_freq=3, inverse_warmup_steps=0, **theory_mode_kwargs())
    mon = TrainingMonitor(opt)
    make = prob.make_closure(opt)
    for b in _batches(prob, 7):
        opt.step(make(b))
    for rec in mon.records:
        a = rec.layers[""].a
        assert a.inverse_damping == pytest.approx(0.3)
        assert a.inverse_step == 3 * (rec.step // 3)
        assert a.refreshed == (rec.step % 3 == 0)
        # independent oracle: lambda_max of the refreshed inverse is 1/(lambda_min(F_refresh) + 0.3) <= 1/0.3
        assert a.lmax <= 1 / 0.3 * (1 + (1e-9 if prob.inputs.dtype == torch.float64 else 1e-4))


def test_kfac_refresh_after_an_inversion_failure_records_the_boosted_damping(device):
    """After a failed inversion the factor inverts with damping x10 (then relaxes by 1/2 per refresh): the monitor
    records the damping of the inverse actually applied (factor.inverse_damping), so E4's damped-inverse interval
    [1/(lambda_max(F) + lambda), 1/lambda] is the right one. With the policy's 0.3 it was a false FAIL."""
    from convergence.checks.preconditioner import check_preconditioner

    prob = problems.least_squares(n=64, d=3, outputs=2, dtype=_dtype(device), device=device)
    opt = KFAC(prob.model, lr=0.1, damping=0.09, inverse_update_freq=3, inverse_warmup_steps=0, **theory_mode_kwargs())
    a_factor = opt.blocks[""].a_factor
    a_factor.damping_boost = a_factor.BOOST  # the state a failed inversion leaves behind
    mon = TrainingMonitor(opt)
    make = prob.make_closure(opt)
    for b in _batches(prob, 7):
        opt.step(make(b))
    used = {0: 0.3 * 10, 3: 0.3 * 5, 6: 0.3 * 2.5}  # boost 10, relaxed by RELAX = 1/2 after each refresh
    tol = 1e-9 if prob.inputs.dtype == torch.float64 else 1e-4
    for rec in mon.records:
        a = rec.layers[""].a
        assert a.inverse_damping == pytest.approx(used[a.inverse_step])
        # independent oracle: the inverse's spectrum lies in [1/(lambda_max(F) + used), 1/used]
        assert a.lmax <= 1 / used[a.inverse_step] * (1 + tol)
        assert a.lmin >= 1 / (a.inverse_stat_lmax + used[a.inverse_step]) * (1 - tol)
        assert rec.layers[""].g.inverse_damping == pytest.approx(0.3)
    assert check_preconditioner(mon).verdict.value == "PASS"


def test_operator_snapshot_applies_what_the_block_applies(device):
    dtype = _dtype(device)
    prob = problems.tanh_mlp(n=64, dtype=dtype, device=device)
    opt = CurvatureOptimizer(prob.model, 0.1, {"0": diagonal_block(), nn.Linear: None}, damping=0.1,
                             **theory_mode_kwargs())
    opt2_prob = problems.tanh_mlp(n=64, dtype=dtype, device=device)
    opt2 = KBFGSL(opt2_prob.model, lr=0.1, damping=0.3, **theory_mode_kwargs())
    for o, p in ((opt, prob), (opt2, opt2_prob)):
        make = p.make_closure(o)
        for b in _batches(p, 2):
            o.step(make(b))
        for name, block in o.blocks.items():
            snap = OperatorSnapshot.from_block(block)
            m = torch.randn(block.shape, dtype=dtype, device=device)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(snap.apply(m), block.precondition(m).double(), rtol=tol, atol=tol)
            torch.testing.assert_close(snap.to_dense() @ vec_c(m.double()), vec_c(block.precondition(m).double()),
                                       rtol=tol, atol=tol)
            lo, hi = snap.bounds()
            ev = torch.linalg.eigvalsh(snap.to_dense())
            assert lo == pytest.approx(float(ev[0]), rel=1e-6) and hi == pytest.approx(float(ev[-1]), rel=1e-6)


def test_theory_mode_violations_and_kwargs(device):
    prob = problems.least_squares(n=40, dtype=_dtype(device), device=device)
    practical = KBFGS(prob.model, lr=0.1, damping=0.3)
    found = " | ".join(theory_mode_violations(practical))
    assert "momentum" in found and "weight_decay" in found and "lag_factors" in found
    assert theory_mode_violations(practical, weight_decay_in_objective=True) != theory_mode_violations(practical)
    theory = KBFGS(problems.least_squares(n=40, dtype=_dtype(device), device=device).model, lr=0.1, damping=0.3,
                   **theory_mode_kwargs())
    assert theory_mode_kwargs() == {"momentum": 0.0, "weight_decay": 0.0, "lag_factors": True}
    ds = prob.dataset
    gen = torch.Generator().manual_seed(0)
    assert theory_mode_violations(theory, iid_loader(ds, 8, gen)) == []
    assert any("RandomSampler(replacement=False)" in v for v in theory_mode_violations(theory, DataLoader(ds, 8, shuffle=True)))
    assert any("SequentialSampler" in v for v in theory_mode_violations(theory, DataLoader(ds, 8)))
    assert any("last batch" in v for v in theory_mode_violations(theory, DataLoader(ds, 16, sampler=RandomSampler(ds, replacement=True))))
    weighted = WeightedRandomSampler(torch.arange(1.0, 41.0), num_samples=40)
    assert any("non-uniform" in v for v in theory_mode_violations(theory, weighted))
    uniform = WeightedRandomSampler(torch.ones(40), num_samples=40)
    assert theory_mode_violations(theory, uniform) == []
    assert any("cannot be verified" in v for v in theory_mode_violations(theory, object()))
    clipped = KFAC(problems.least_squares(n=40).model, kl_clip=1e-3, **theory_mode_kwargs())
    assert any("kl_clip" in v for v in theory_mode_violations(clipped))


def test_iid_loader_draws_with_replacement_in_fixed_size_batches():
    ds = TensorDataset(torch.arange(10.0), torch.zeros(10))
    loader = iid_loader(ds, 4, torch.Generator().manual_seed(0), num_samples=400)
    assert isinstance(loader.sampler, RandomSampler) and loader.sampler.replacement
    batches = [x for x, _ in loader]
    assert all(len(b) == 4 for b in batches) and len(batches) == 100
    counts = torch.bincount(torch.cat(batches).long(), minlength=10)
    assert any(len(set(b.tolist())) < 4 for b in batches)  # repeats within a batch: with replacement
    assert int(counts.min()) > 20  # every example drawn, roughly uniformly (expected 40 each)
    again = [x for x, _ in iid_loader(ds, 4, torch.Generator().manual_seed(0), num_samples=400)]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="batch_size"):
        iid_loader(ds, 0)
    with pytest.raises(ValueError, match="interval"):
        TrainingMonitor(KFAC(nn.Linear(2, 2)), interval=0)
