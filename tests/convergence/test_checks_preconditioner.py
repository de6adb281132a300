"""E4 (AS.3): theory-mode K-BFGS(L) and KFAC pass; an indefinite factor, undamped BFGS fed sᵀy < 0,
an asymmetric factor and the Powell sign bug fail."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from convergence import problems
from convergence.checks.preconditioner import check_preconditioner, factor_interval, theoretical_kappa
from convergence.monitor import TrainingMonitor, iid_loader, theory_mode_kwargs
from convergence.results import Verdict
from curvature.bfgs import bfgs_inverse_update
from curvature.blocks import KroneckerBlock
from curvature.factors import BFGSFactor, HessianActionFactor
from curvature.pair_damping import DoubleDamping
from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer


def _dtype(device):
    return torch.float64 if device.type == "cpu" else torch.float32


def _train(opt, prob, steps, seed=0, hook=None):
    mon = TrainingMonitor(opt, keep_pairs=False)
    make = prob.make_closure(opt)
    for k, b in enumerate(iid_loader(prob.dataset, 16, torch.Generator().manual_seed(seed), num_samples=16 * steps)):
        if hook is not None:
            hook(k, opt)
        opt.step(make(b))
    mon.detach()
    return mon


@pytest.mark.parametrize("problem,cls", [("least_squares", KBFGSL), ("softmax_regression", KBFGSL),
                                         ("tanh_mlp", KBFGS), ("softmax_regression", KFAC)])
def test_theory_mode_runs_pass(device, problem, cls):
    prob = getattr(problems, problem)(n=96, dtype=_dtype(device), device=device)
    kw = {"inverse_update_freq": 4, "inverse_warmup_steps": 1} if cls is KFAC else {}
    opt = cls(prob.model, lr=0.2, damping=0.3, **kw, **theory_mode_kwargs())
    mon = _train(opt, prob, 12)
    res = check_preconditioner(mon)
    assert res.verdict is Verdict.PASS, res.evidence["violations"][:3]
    ev = res.evidence
    assert 0 < ev["kappa_lo_obs"] <= ev["kappa_hi_obs"] < math.inf
    assert ev["rules"]["positivity"]["checked"] == 12 * len(opt.blocks)
    assert ev["rules"]["symmetry"]["checked"] == 24 * len(opt.blocks)
    if cls is KBFGSL:
        assert ev["rules"]["lbfgs"]["checked"] > 0 and ev["rules"]["dd_lemma"]["checked"] > 0
    if cls is KFAC:
        assert ev["rules"]["damped_inverse"]["checked"] == 4 * 12 * len(opt.blocks)  # 2 factors x (lower, upper)
    # wherever the theory gives an interval for every layer, the observed spectrum lies inside it
    series = ev["series"]
    rel = 1e-7 if _dtype(device) == torch.float64 else 1e-3
    for lo_obs, hi_obs, lo_th, hi_th in zip(series["kappa_lo_obs"], series["kappa_hi_obs"], series["kappa_lo_th"],
                                             series["kappa_hi_th"]):
        if lo_th is not None:
            assert lo_th * (1 - rel) <= lo_obs and hi_obs <= hi_th * (1 + rel)
    if cls is not KBFGS:
        assert all(v is not None for v in series["kappa_lo_th"])


def test_indefinite_factor_fails(device):
    prob = problems.tanh_mlp(n=64, dtype=_dtype(device), device=device)
    opt = KBFGS(prob.model, lr=0.2, damping=0.3, **theory_mode_kwargs())

    def corrupt(k, o):
        if k == 4:  # make H_g of the first layer indefinite
            g = o.blocks["0"].g_factor
            e = torch.zeros(g.dim, dtype=g.H.dtype, device=g.H.device)
            e[0] = 1.0
            g.H = g.H - 3.0 * float(torch.linalg.eigvalsh(g.H)[-1]) * torch.outer(e, e)

    mon = _train(opt, prob, 6, hook=corrupt)
    res = check_preconditioner(mon)
    assert res.verdict is Verdict.FAIL
    bad = [v for v in res.evidence["violations"] if v["rule"].startswith("positive definite")]
    assert bad and bad[0]["step"] == 4 and bad[0]["layer"] == "0" and bad[0]["observed"] < 0
    assert check_preconditioner(mon.records[:4]).verdict is Verdict.PASS


class UndampedBFGSFactor(BFGSFactor):
    """BFGS on raw pairs: no double damping and no skip rule, so sᵀy < 0 is used as it comes."""

    def _incorporate(self, s, y, reference_norm):
        self.H = bfgs_inverse_update(self.H, s, y)
        return None


def _undamped(name, adapter, ctx):
    kw = {"dtype": ctx.dtype, "device": ctx.device}
    return KroneckerBlock(name, adapter, HessianActionFactor(adapter.a_dim, 0.5, **kw),
                          UndampedBFGSFactor(adapter.g_dim, None, pair_decay=0.0, **kw), kind="kbfgs")


def test_bfgs_fed_undamped_negative_curvature_pairs_fails(device):
    prob = problems.tanh_mlp(n=64, dtype=_dtype(device), device=device)
    opt = CurvatureOptimizer(prob.model, 0.2, {nn.Linear: _undamped}, damping=0.25, **theory_mode_kwargs())
    mon = _train(opt, prob, 15, seed=3)
    negative = [r.step for r in mon.records for l in r.layers.values() if l.g.pair is not None and l.g.pair.sy < 0]
    assert negative, "the tanh net must produce pairs with s'y < 0"
    res = check_preconditioner(mon)
    assert res.verdict is Verdict.FAIL
    first_bad = min(v["step"] for v in res.evidence["violations"] if v["rule"].startswith("positive definite"))
    assert first_bad == negative[0] + 1  # the H built from the first negative pair is applied at the next step
    # the same net with double damping stays positive definite
    prob2 = problems.tanh_mlp(n=64, dtype=_dtype(device), device=device)
    opt2 = KBFGS(prob2.model, lr=0.2, damping=0.25, pair_decay=0.0, **theory_mode_kwargs())
    assert check_preconditioner(_train(opt2, prob2, 15, seed=3)).verdict is Verdict.PASS


def test_asymmetric_factor_and_sign_bug_fail(device):
    prob = problems.tanh_mlp(n=64, dtype=_dtype(device), device=device)
    opt = KBFGS(prob.model, lr=0.2, damping=0.3, **theory_mode_kwargs())

    def skew(k, o):
        if k == 2:
            g = o.blocks["2"].g_factor
            g.H = g.H + 1e-3 * torch.triu(torch.ones_like(g.H), 1)

    res = check_preconditioner(_train(opt, prob, 3, hook=skew))
    assert res.verdict is Verdict.FAIL
    assert [v["rule"][:8] for v in res.evidence["violations"]] == ["symmetry"]

    def buggy(name, adapter, ctx):
        kw = {"dtype": ctx.dtype, "device": ctx.device}
        dd = DoubleDamping(mu1=0.9, mu2=0.5, powell_sign=-1)
        return KroneckerBlock(name, adapter, HessianActionFactor(adapter.a_dim, 0.5, **kw),
                              BFGSFactor(adapter.g_dim, dd, **kw), kind="kbfgs")

    prob = problems.tanh_mlp(n=64, dtype=_dtype(device), device=device)
    opt = CurvatureOptimizer(prob.model, 0.2, {nn.Linear: buggy}, damping=0.25, **theory_mode_kwargs())
    res = check_preconditioner(_train(opt, prob, 6))
    assert res.verdict is Verdict.FAIL and res.evidence["rules"]["dd_lemma"]["violations"] > 0


def test_factor_interval_sources(device):
    prob = problems.least_squares(n=64, dtype=_dtype(device), device=device)
    opt = KBFGS(prob.model, lr=0.1, damping=0.3, **theory_mode_kwargs())
    mon = _train(opt, prob, 3)
    r0, r1 = mon.records[0], mon.records[1]
    assert factor_interval(r0.layers[""].a)[2] == "A-factor initial inverse"
    assert factor_interval(r0.layers[""].g) == (1.0, 1.0, "initial H = h0 I")
    assert factor_interval(r1.layers[""].a, r0.layers[""].a)[2].startswith("A-factor one update")
    assert factor_interval(r1.layers[""].g, r0.layers[""].g)[2].startswith("DD one update")
    assert factor_interval(r1.layers[""].a) is None  # no previous record: no interval
    assert theoretical_kappa(r1, r0) is not None and theoretical_kappa(r1, None) is None
    empty = check_preconditioner([])
    assert empty.verdict is Verdict.NOT_APPLICABLE
