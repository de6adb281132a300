"""After-step updates of many factors at once (curvature.update_batch, and the batched math it calls:
``DoubleDamping.prepare_many``, ``bfgs_inverse_updates``, ``prepare_guarded_updates``).

Oracles: the float64 product-form BFGS update and the spec's double damping (tests/curvature/strategies),
pair by pair; isolation: a pair's result does not depend on the other rows of its batch, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from curvature.bfgs import (bfgs_inverse_update, bfgs_inverse_updates, pair_scalar_tensors, pair_scalar_tensors_many,
                            prepare_guarded_update, prepare_guarded_updates)
from curvature.factors import BFGSFactor, HessianActionFactor, LBFGSFactor
from curvature.inverter import BatchedInverter
from curvature.linalg import read_scalars
from curvature.pair_damping import DoubleDamping
from curvature.update_batch import UpdateBatch
from tests.curvature.strategies import F64, bfgs_inverse_oracle, cos_pairs, dd_oracle, hyp, pairs, spd

VARIANTS = ["interpolate", "lm"]


def _problems(data, count, pair_strategy):
    out = []
    for _ in range(count):
        n = data.draw(st.integers(1, 7))
        H = data.draw(spd(n, 3.0))
        drawn = data.draw(pair_strategy(n))
        out.append((H, drawn[0], drawn[1]))
    return out


def _on(device, problems):
    return [tuple(t.to(device) for t in p) for p in problems]


def _nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.nan_to_num(a, nan=1.5, posinf=2.5, neginf=-2.5),
                       torch.nan_to_num(b, nan=1.5, posinf=2.5, neginf=-2.5)) and torch.equal(a.isnan(), b.isnan())


def _scalar_values(scalars):
    return read_scalars(list(scalars))


# ------------------------------------------------------------------------------ BFGS updates
@given(data=st.data(), count=st.integers(1, 5))
@hyp()
def test_batched_inverse_updates_match_the_product_form_oracle_and_are_bit_symmetric(device, data, count):
    problems = _on(device, _problems(data, count, lambda n: cos_pairs(n)))
    H, s, y = (list(t) for t in zip(*problems))
    for got, (h, si, yi) in zip(bfgs_inverse_updates(H, s, y), problems):
        expected = bfgs_inverse_oracle(h.cpu(), si.cpu(), yi.cpu())
        # relative to the largest term of the update (H and ρ s sᵀ), not to the result, which may cancel
        rho_ss = torch.outer(si.cpu(), si.cpu()) / float(si.cpu() @ yi.cpu())
        scale = max(float(expected.abs().max()), float(h.abs().max()), float(rho_ss.abs().max()))
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-9 * scale)
        assert torch.equal(got, got.T)
        # the secant equation H⁺y = s, to rounding relative to the terms of the product H⁺y
        terms = float((got.cpu().abs() @ yi.cpu().abs()).max())
        torch.testing.assert_close(got.cpu() @ yi.cpu(), si.cpu(), rtol=0, atol=1e-7 * max(terms, float(si.abs().max())))


def test_no_updates_is_an_empty_list():
    assert bfgs_inverse_updates([], [], []) == [] and prepare_guarded_updates([], [], [], []) == []
    assert pair_scalar_tensors_many([], [], []) == []
    assert DoubleDamping().prepare_many([], [], []) == []


@given(data=st.data(), count=st.integers(2, 5), bad=st.sampled_from(["nan", "inf", "zero", "negative", "nan_y"]))
@hyp()
def test_a_pairs_update_does_not_depend_on_the_other_rows_of_its_batch(device, data, count, bad):
    """Row isolation: replacing one pair by a non-finite, zero or negative-curvature pair of the same size
    leaves every other candidate and scalar bit for bit as it was (same batch, same padded width)."""
    problems = _on(device, _problems(data, count, lambda n: cos_pairs(n)))
    H, s, y = (list(t) for t in zip(*problems))
    refs = [si.norm() for si in s]
    victim = data.draw(st.integers(0, count - 1))
    s2, y2 = list(s), list(y)
    s2[victim] = {"nan": torch.full_like(s[victim], math.nan), "inf": torch.full_like(s[victim], math.inf),
                  "zero": torch.zeros_like(s[victim]), "negative": -s[victim], "nan_y": s[victim]}[bad]
    y2[victim] = {"zero": torch.zeros_like(y[victim]), "nan_y": torch.full_like(y[victim], math.nan)}.get(bad, y[victim])
    before = prepare_guarded_updates(H, s, y, refs)
    after = prepare_guarded_updates(H, s2, y2, refs)
    for i, ((u1, sc1), (u2, sc2)) in enumerate(zip(before, after)):
        if i == victim:
            continue
        assert torch.equal(u1, u2)
        assert all(_nan_equal(a, b) for a, b in zip(sc1, sc2))


@given(data=st.data(), count=st.integers(1, 5))
@hyp()
def test_batched_guard_scalars_match_each_pair_alone(device, data, count):
    """The guard's scalars ([finite(s, y), sᵀy, sᵀs, reference, finite(H⁺)]) per pair, in a batch and alone."""
    problems = _on(device, _problems(data, count, lambda n: pairs(n)))
    H, s, y = (list(t) for t in zip(*problems))
    refs = [si.norm() if i % 3 == 0 else (None if i % 3 == 1 else 2.5) for i, si in enumerate(s)]
    for (u, scalars), h, si, yi, ref in zip(prepare_guarded_updates(H, s, y, refs), H, s, y, refs):
        alone_u, alone = prepare_guarded_update(h, si, yi, ref)
        values, alone_values = _scalar_values(scalars), _scalar_values(alone)
        assert len(values) == (5 if isinstance(ref, torch.Tensor) else 4)
        assert values[0] == alone_values[0] == 1.0 and values[-1] == alone_values[-1]
        assert values[1] == pytest.approx(float(si.double() @ yi.double()), rel=1e-12, abs=1e-12 * float(si.norm() * yi.norm()))
        assert values[2] == pytest.approx(float(si.double() @ si.double()), rel=1e-12)
        if isinstance(ref, torch.Tensor):
            assert values[3] == float(ref)
        if values[-1]:
            torch.testing.assert_close(u, alone_u, rtol=1e-10, atol=1e-10 * float(alone_u.abs().max()))


@given(data=st.data(), count=st.integers(1, 5))
@hyp()
def test_batched_pair_checks_match_the_oracle_and_each_pair_alone(device, data, count):
    """The skip rules' scalars ([finite(s, y), sᵀy, sᵀs, reference]) of a batch of checks: against float64 sums,
    and the same decisions' inputs as :func:`pair_scalar_tensors` of each pair alone."""
    problems = _on(device, _problems(data, count, lambda n: pairs(n)))
    s, y = [p[1] for p in problems], [p[2] for p in problems]
    refs = [si.norm() if i % 3 == 0 else (None if i % 3 == 1 else 2.5) for i, si in enumerate(s)]
    batch = UpdateBatch()
    checks = [batch.add_check(si, yi, ref) for si, yi, ref in zip(s, y, refs)]
    batch.receive(read_scalars(batch.prepare()))
    for check, si, yi, ref in zip(checks, s, y, refs):
        alone = _scalar_values(pair_scalar_tensors(si, yi, ref))
        assert len(check.values) == len(alone) == (4 if isinstance(ref, torch.Tensor) else 3)
        assert check.values[0] == alone[0] == 1.0
        assert check.values[1] == pytest.approx(float(si.double() @ yi.double()), rel=1e-12,
                                                abs=1e-12 * float(si.norm() * yi.norm()))
        assert check.values[2] == pytest.approx(float(si.double() @ si.double()), rel=1e-12)
        assert check.values[1] == pytest.approx(alone[1], rel=1e-12, abs=1e-12 * float(si.norm() * yi.norm()))
        if isinstance(ref, torch.Tensor):
            assert check.values[3] == float(ref)


def test_a_pairs_check_does_not_depend_on_the_other_rows_of_its_batch(device):
    """A NaN pair is flagged in its own row; the other pairs' scalars are bit for bit those of a batch without it."""
    s = [torch.tensor([1.0, 2.0, 3.0], dtype=F64, device=device), torch.tensor([0.5, -1.0], dtype=F64, device=device)]
    y = [torch.tensor([2.0, 1.0, 0.5], dtype=F64, device=device), torch.tensor([1.0, -3.0], dtype=F64, device=device)]
    clean = pair_scalar_tensors_many(s, y, [None, None])
    bad = pair_scalar_tensors_many([torch.full_like(s[0], math.nan), s[1]], y, [None, None])
    assert _scalar_values(bad[0])[0] == 0.0 and _scalar_values(clean[0])[0] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(clean[1], bad[1]))
    assert _scalar_values(clean[1]) == [1.0, 3.5, 1.25]


def test_non_finite_pairs_and_updates_are_flagged_row_by_row(device):
    H = [torch.eye(3, dtype=F64, device=device), torch.eye(2, dtype=F64, device=device)]
    s = [torch.tensor([1.0, math.nan, 0.0], dtype=F64, device=device), torch.tensor([1.0, 2.0], dtype=F64, device=device)]
    y = [torch.tensor([1.0, 1.0, 1.0], dtype=F64, device=device), torch.tensor([2.0, 1.0], dtype=F64, device=device)]
    (_, bad), (good_u, good) = prepare_guarded_updates(H, s, y, [None, None])
    assert _scalar_values(bad)[0] == 0.0 and _scalar_values(bad)[-1] == 0.0
    assert _scalar_values(good)[0] == 1.0 and _scalar_values(good)[-1] == 1.0
    torch.testing.assert_close(good_u, bfgs_inverse_update(H[1], s[1], y[1]), rtol=0, atol=0)


# ------------------------------------------------------------------------------ double damping
@given(data=st.data(), count=st.integers(1, 5), variant=st.sampled_from(VARIANTS),
       mu1=st.floats(0.05, 0.95), mu2=st.floats(0.05, 0.95))
@hyp()
def test_batched_double_damping_matches_the_spec_oracle_pair_by_pair(device, data, count, variant, mu1, mu2):
    problems = _on(device, _problems(data, count, lambda n: pairs(n, ("random", "neg_parallel", "pos_parallel", "orth"))))
    H, s, y = (list(t) for t in zip(*problems))
    dd = DoubleDamping(mu1, mu2, variant)
    drafts = dd.prepare_many(s, y, [h @ yi for h, yi in zip(H, y)])
    for draft, h, si, yi in zip(drafts, H, s, y):
        oracle = dd_oracle(si.cpu(), yi.cpu(), h.cpu(), mu1, mu2, variant)
        assume(abs(oracle["margin1"]) > 1e-9 * oracle["scale1"] and abs(oracle["margin2"]) > 1e-9 * oracle["scale2"])
        scale = float(max(si.abs().max(), yi.abs().max(), (h @ yi).abs().max()))
        torch.testing.assert_close(draft.s1.cpu(), oracle["s"], rtol=1e-8, atol=1e-8 * scale)
        values = _scalar_values(draft.scalars)
        assert bool(values[3]) == oracle["active1"] and bool(values[6]) == oracle["active2"]
        if oracle["active1"]:
            assert values[4] == pytest.approx(oracle["theta1"], rel=1e-8)
        assert values[1] == pytest.approx(float(si.norm()), rel=1e-12) and values[2] == pytest.approx(float(yi.norm()), rel=1e-12)


@given(data=st.data(), count=st.integers(2, 5), variant=st.sampled_from(VARIANTS))
@hyp()
def test_a_pairs_damping_does_not_depend_on_the_other_rows_of_its_batch(device, data, count, variant):
    """Any pairs (zero, parallel, tiny, NaN): changing one row leaves the others' drafts bit for bit."""
    problems = _on(device, _problems(data, count, lambda n: pairs(n)))
    H, s, y = (list(t) for t in zip(*problems))
    Hy = [h @ yi for h, yi in zip(H, y)]
    victim = data.draw(st.integers(0, count - 1))
    s2, y2 = list(s), list(y)
    bad = data.draw(st.sampled_from(["nan_s", "zero_s", "nan_y"]))
    if bad == "nan_y":
        y2[victim] = torch.full_like(y[victim], math.nan)
    else:
        s2[victim] = torch.full_like(s[victim], math.nan) if bad == "nan_s" else torch.zeros_like(s[victim])
    dd = DoubleDamping(variant=variant)
    for i, (a, b) in enumerate(zip(dd.prepare_many(s, y, Hy), dd.prepare_many(s2, y2, Hy))):
        if i != victim:
            assert _nan_equal(a.s1, b.s1) and _nan_equal(a.y2, b.y2)
            assert all(_nan_equal(x, z) for x, z in zip(a.scalars, b.scalars))


@given(data=st.data(), count=st.integers(1, 4), variant=st.sampled_from(VARIANTS))
@hyp()
def test_batched_damping_decides_like_each_pair_alone(device, data, count, variant):
    """The skip decisions and flags of :meth:`DoubleDamping.finish` from a batch equal those of each pair
    damped alone (margins away from a threshold, where rounding cannot flip a decision)."""
    problems = _on(device, _problems(data, count, lambda n: pairs(n)))
    H, s, y = (list(t) for t in zip(*problems))
    dd = DoubleDamping(variant=variant)
    drafts = dd.prepare_many(s, y, [h @ yi for h, yi in zip(H, y)])
    for draft, h, si, yi in zip(drafts, H, s, y):
        oracle = dd_oracle(si.cpu(), yi.cpu(), h.cpu(), dd.mu1, dd.mu2, variant)
        assume(abs(oracle["margin1"]) > 1e-9 * oracle["scale1"] and abs(oracle["margin2"]) > 1e-9 * oracle["scale2"])
        alone = dd.prepare(si, yi, lambda v, h=h: h @ v)
        a = dd.finish(draft, _scalar_values(draft.scalars))
        b = dd.finish(alone, _scalar_values(alone.scalars))
        assert (a.skip_reason, a.step1_active, a.step2_active) == (b.skip_reason, b.step1_active, b.step2_active)


# ------------------------------------------------------------------------------ the batch
def _dd_factor(cls, n, device, **kw):
    return cls(n, DoubleDamping(), dtype=F64, device=device, **kw)


def test_the_batch_computes_dampings_then_updates_and_hands_back_each_requests_values(device):
    batch = UpdateBatch()
    s, y = torch.tensor([1.0, 2.0], dtype=F64, device=device), torch.tensor([2.0, 1.0], dtype=F64, device=device)
    seen = []

    def then(draft):
        seen.append(draft)
        batch.add_update(torch.eye(2, dtype=F64, device=device), draft.s1, draft.y2)
        return [draft.s1.sum()]

    first = batch.add_update(torch.eye(2, dtype=F64, device=device), s, y, reference_norm=s.norm())
    damping = batch.add_damping(DoubleDamping(), s, y, y.clone(), then)
    check = batch.add_check(s, -y)
    scalars = batch.prepare()
    assert len(seen) == 1 and damping.draft is seen[0]
    assert len(damping.scalars) == 11 and len(first.scalars) == 5 and len(check.scalars) == 3
    assert len(batch.pending) == 4
    assert len(scalars) == 5 + 11 + 3 + 4  # request by request, in the order they were added
    values = read_scalars(scalars)
    batch.receive(values)
    assert first.values == values[:5] and damping.values == values[5:16] and check.values == values[16:19]
    assert batch.pending[3].values == values[19:]
    assert damping.values[-1] == pytest.approx(float(damping.draft.s1.sum()))
    assert check.values == [1.0, -4.0, 5.0]  # finite, sᵀy = -(2 + 2), sᵀs


def test_a_continuation_may_add_a_check(device):
    batch = UpdateBatch()
    s, y = torch.tensor([1.0, 2.0], dtype=F64, device=device), torch.tensor([2.0, 1.0], dtype=F64, device=device)
    added = []
    batch.add_damping(DoubleDamping(), s, y, y.clone(), lambda draft: added.append(batch.add_check(draft.s1, draft.y2)) or [])
    batch.receive(read_scalars(batch.prepare()))
    (check,) = added
    assert check.values[1] == pytest.approx(float(check.s @ check.y), rel=1e-14)


def test_the_batch_rejects_a_wrong_protocol(device):
    batch = UpdateBatch()
    s = torch.ones(2, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"^UpdateBatch\.receive before prepare: prepare the batch and read its scalars first$"):
        batch.receive([])
    batch.add_update(torch.eye(2, dtype=F64, device=device), s, 2 * s)
    batch.prepare()
    with pytest.raises(RuntimeError, match=r"^UpdateBatch\.prepare called twice$"):
        batch.prepare()
    late = r"^UpdateBatch: a request added while prepared; add every request before prepare \(a damping's continuation"
    with pytest.raises(RuntimeError, match=late):
        batch.add_update(torch.eye(2, dtype=F64, device=device), s, 2 * s)
    with pytest.raises(RuntimeError, match=late):
        batch.add_check(s, 2 * s)
    with pytest.raises(RuntimeError, match=late):
        batch.add_damping(DoubleDamping(), s, s, s, lambda draft: [])
    with pytest.raises(ValueError, match=r"^UpdateBatch\.receive needs the 4 values of prepare's scalars, got 2$"):
        batch.receive([1.0, 2.0])
    assert batch.pending[0].values is None  # nothing handed out by a rejected receive


def test_a_continuation_may_not_add_a_damping(device):
    batch = UpdateBatch()
    s = torch.ones(2, dtype=F64, device=device)
    batch.add_damping(DoubleDamping(), s, 2 * s, 2 * s, lambda draft: batch.add_damping(DoubleDamping(), s, s, s, list))
    with pytest.raises(RuntimeError, match=r"^UpdateBatch: a request added while preparing;"):
        batch.prepare()
    assert batch.state == "prepared"


def test_dampings_of_another_class_are_prepared_by_that_class(device):
    """A subclass of DoubleDamping with the same settings is a group of its own: its own prepare_many runs."""
    calls = []

    class Recorded(DoubleDamping):
        def prepare_many(self, s, y, Hy):
            calls.append(len(s))
            return super().prepare_many(s, y, Hy)

    batch = UpdateBatch()
    s = torch.tensor([1.0, 2.0], dtype=F64, device=device)
    plain = batch.add_damping(DoubleDamping(), s, 2 * s, 2 * s, lambda draft: [])
    recorded = batch.add_damping(Recorded(), s, 2 * s, 2 * s, lambda draft: [])
    batch.prepare()
    assert calls == [1] and plain.draft is not None and recorded.draft is not None


def test_requests_of_other_dtypes_and_damping_settings_are_computed_in_their_own_groups(device):
    batch = UpdateBatch()
    s64 = torch.tensor([1.0, 2.0, 3.0], dtype=F64, device=device)
    s32 = torch.tensor([1.0, 2.0], dtype=torch.float32, device=device)
    u64 = batch.add_update(torch.eye(3, dtype=F64, device=device), s64, 2 * s64)
    u32 = batch.add_update(torch.eye(2, dtype=torch.float32, device=device), s32, 3 * s32)
    s, y = torch.tensor([1.0, 0.0, 0.0], dtype=F64, device=device), torch.tensor([0.1, 1.0, 0.0], dtype=F64, device=device)
    # step 1 inactive (sᵀy = 0.1 > μ1·yᵀHy with Hy = 0.01·y), step 2 active (sᵀy < μ2‖s‖²) for both μ2
    d1 = batch.add_damping(DoubleDamping(mu2=0.5), s, y, 0.01 * y, lambda draft: [])
    d2 = batch.add_damping(DoubleDamping(mu2=0.9), s, y, 0.01 * y, lambda draft: [])
    c64, c32 = batch.add_check(s64, 2 * s64), batch.add_check(s32, 3 * s32)
    batch.prepare()
    assert u64.updated.dtype == F64 and u32.updated.dtype == torch.float32
    assert all(x.dtype == F64 for x in c64.scalars[1:]) and all(x.dtype == torch.float32 for x in c32.scalars[1:])
    torch.testing.assert_close(u32.updated, bfgs_inverse_update(torch.eye(2, dtype=torch.float32, device=device), s32, 3 * s32))
    # each damping used its own μ2: s̃ᵀỹ = μ2‖s̃‖² when step 2 is active
    for pending, mu2 in ((d1, 0.5), (d2, 0.9)):
        s1, y2 = pending.draft.s1, pending.draft.y2
        assert float(s1 @ y2) == pytest.approx(mu2 * float(s1 @ s1), rel=1e-12)


class _SplitAlone(BFGSFactor):
    """A user's factor whose split update computes its own scalars and does not join batches."""

    _incorporates_in_batch = False
    _incorporate = BFGSFactor._incorporate  # same owner as _prepare_incorporate: the split is used

    def _prepare_incorporate(self, s, y, reference_norm):
        return super()._prepare_incorporate(s, y, reference_norm)


class _Sequential(BFGSFactor):
    """A user's factor that overrides only ``_incorporate``: no split, its update reads on its own in finish (and
    it is the override that runs, ``calls`` counts it)."""

    calls = 0

    def _incorporate(self, s, y, reference_norm):
        self.calls += 1
        return super()._incorporate(s, y, reference_norm)


def _pair_steps(device):
    """Six ordinary pairs (curvature of both signs), one whose reference norm makes the relative curvature
    threshold fire, one with a NaN in s, one with a NaN in y: (s, y, reference norm)."""
    torch.manual_seed(0)
    steps = []
    for step in range(9):
        s = torch.randn(5, dtype=F64, device=device)
        y = (0.3 if step % 2 else -0.5) * s + 0.2 * torch.randn(5, dtype=F64, device=device)
        ref = y.norm() * (1e9 if step == 6 else 1.0)
        if step == 7:
            s[2] = math.nan
        if step == 8:
            y[0] = math.nan
        steps.append((s, y, ref))
    return steps


def _decide(factor, s, y, ref, batch):
    """One pair through ``prepare_pair``, with ``batch`` (prepared and read with the pair's scalars) or without."""
    scalars, finish = factor.prepare_pair(s, y, ref, updates=batch)
    extra = batch.prepare() if batch is not None else []
    values = read_scalars(scalars + extra)
    if batch is not None:
        batch.receive(values[len(scalars):])
    return finish(values[:len(scalars)]), len(scalars)


@pytest.mark.parametrize("cls", [BFGSFactor, LBFGSFactor, _SplitAlone, _Sequential])
@pytest.mark.parametrize("damped", ["interpolate", "lm", None])
def test_a_secant_factor_decides_and_commits_the_same_in_a_batch(device, cls, damped):
    """prepare_pair with an UpdateBatch against the factor's own path (BFGSFactor alone): same pairs, same H, same
    counters, for the library's factors and for a user's factor that does not join batches (its own scalars) or
    does not split; with double damping and without damping; ordinary pairs, a relative-curvature skip and a
    non-finite raw pair."""
    make = (lambda c: c(5, DoubleDamping(variant=damped), dtype=F64, device=device)) if damped else (
        lambda c: c(5, None, dtype=F64, device=device))
    alone = make(LBFGSFactor if cls is LBFGSFactor else BFGSFactor)
    batched = make(cls)
    reasons = []
    for s, y, ref in _pair_steps(device):
        expected, _ = _decide(alone, s, y, ref, None)
        got, own_scalars = _decide(batched, s, y, ref, UpdateBatch())
        if cls in (BFGSFactor, LBFGSFactor):
            assert own_scalars == 1  # the raw pair's flag; the damping's and the update's are the batch's
        assert (got.skip_reason, got.step1_active, got.step2_active) == (expected.skip_reason, expected.step1_active,
                                                                          expected.step2_active)
        assert got.s is s if got.skip_reason == "non-finite pair" else True
        torch.testing.assert_close(got.s, expected.s, rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(batched.to_dense(), alone.to_dense(), rtol=1e-10, atol=1e-12)
        reasons.append(got.skip_reason)
    assert batched.counters.as_dict() == alone.counters.as_dict() and batched.updates == alone.updates
    assert reasons[7] == reasons[8] == "non-finite pair" and "relative curvature" in (reasons[6] or "")
    torch.testing.assert_close(batched.s_avg, alone.s_avg, rtol=1e-12, atol=1e-12)  # no NaN folded into the EMA
    if cls is _Sequential:  # its own _incorporate made the updates, not the library's split of BFGSFactor's
        assert batched.calls >= batched.updates > 0


def test_an_undamped_factor_adds_its_update_to_the_callers_batch(device):
    """Without double damping the pair goes straight to the update: it is the caller's batch that holds it."""
    factor = BFGSFactor(3, None, pair_decay=0.0, dtype=F64, device=device)
    batch = UpdateBatch()
    s = torch.tensor([1.0, 2.0, 0.5], dtype=F64, device=device)
    scalars, finish = factor.prepare_pair(s, 2 * s, updates=batch)
    assert len(scalars) == 1 and len(batch.pending) == 1 and batch.pending[0].s is s
    batch.receive(read_scalars(batch.prepare()))
    assert finish(read_scalars(scalars)).skip_reason is None
    torch.testing.assert_close(factor.H, bfgs_inverse_update(torch.eye(3, dtype=F64, device=device), s, 2 * s))


@pytest.mark.parametrize("cls", [BFGSFactor, LBFGSFactor])
def test_a_damped_pair_outside_a_batch_is_decided_with_one_read(device, cls):
    """observe_pair (no caller batch): the damping, the update and their decisions read the host once."""
    from benchmarks.syncs import SyncCounter

    factor = cls(4, DoubleDamping(), dtype=F64, device=device)
    s = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=F64, device=device)
    for y in (0.5 * s, -0.2 * s + 0.1):  # step 2 inactive, then active
        with SyncCounter() as counter:
            pair = factor.observe_pair(s, y, reference_norm=y.norm())
        assert counter.count == 1 and pair.skip_reason is None, (counter.sites, pair)
    assert factor.updates == 2


def test_a_hessian_action_factor_updates_the_same_in_a_batch(device):
    torch.manual_seed(1)
    factors = [HessianActionFactor(4, damping=0.1, dtype=F64, device=device) for _ in range(2)]
    A = torch.randn(8, 4, dtype=F64, device=device)
    for f in factors:
        f.observe(A.T @ A / 8)
        f.request_inverse(inverter := BatchedInverter())
        inverter.run()
    mean = torch.randn(4, dtype=F64, device=device)
    scalars, finish = factors[0].prepare_action_update(mean)
    assert finish(read_scalars(scalars)) is None
    batch = UpdateBatch()
    scalars, finish = factors[1].prepare_action_update(mean, updates=batch)
    assert scalars == []
    batch.receive(read_scalars(batch.prepare()))
    assert finish([]) is None
    torch.testing.assert_close(factors[1].H, factors[0].H, rtol=1e-12, atol=1e-14)
    assert factors[0].updates == factors[1].updates == 1


def test_a_hessian_action_factor_without_a_threshold_reads_no_reference_norm(device):
    factor = HessianActionFactor(3, damping=0.1, curvature_threshold=None, dtype=F64, device=device)
    factor.observe(torch.eye(3, dtype=F64, device=device))
    factor.request_inverse(inverter := BatchedInverter())
    inverter.run()
    scalars, finish = factor.prepare_action_update(torch.tensor([1.0, 0.5, -1.0], dtype=F64, device=device))
    assert len(scalars) == 4  # finite(s, y), sᵀy, sᵀs, finite(H⁺): no reference norm
    assert finish(read_scalars(scalars)) is None and factor.updates == 1


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", [BFGSFactor, LBFGSFactor])
def test_the_batched_work_grows_by_a_few_kernels_per_factor(cls):
    """The point of the batch: a factor more adds its matrix products, rank-2 update (BFGS) and a few flags, not the
    ~150 small kernels of its damping and guard computed on their own (ATen ops of the whole preparation)."""
    def ops(layers: int, batched: bool) -> int:
        torch.manual_seed(2)
        factors = [cls(3 + i, DoubleDamping(), pair_decay=0.0, dtype=F64) for i in range(layers)]
        pairs_ = [(torch.randn(f.dim, dtype=F64), torch.randn(f.dim, dtype=F64)) for f in factors]
        with _CountOps() as counter:
            batch = UpdateBatch() if batched else None
            for f, (s, y) in zip(factors, pairs_):
                f.prepare_pair(s, y, y.norm(), updates=batch)
            if batched:
                batch.prepare()
        return counter.count

    batched, alone = ((ops(8, b) - ops(2, b)) / 6 for b in (True, False))
    assert batched <= 20 and alone >= 5 * batched, (batched, alone)
