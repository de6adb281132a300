"""Unit tests of curvature/factors.py against dense float64 oracles and hand values.

``test_factors.py`` and ``test_factor_ema.py`` check the factor strategies' mathematics; this file
pins what the mutation run of the module (issue 17) found them to leave open: the one-hot (embedding)
factor, the base class's ``observe_gram``, the sequential update path of the secant factors (taken
with a damping that is not :class:`~curvature.pair_damping.DoubleDamping`), the recovery handlers,
``reset_secant_memory`` and the state round trips.
"""

from __future__ import annotations

import pytest
import torch

from curvature.factors import (BFGSFactor, EMACovarianceFactor, Factor, HessianActionFactor, LBFGSFactor, OneHotCountFactor,
                               SecantFactor)
from curvature.pair_damping import DampedPair

F64 = torch.float64


def _one_hot_dense(tokens: list[int], dim: int) -> torch.Tensor:
    """The one-hot rows e_t as a dense float64 matrix (the oracle never uses bincount)."""
    X = torch.zeros(len(tokens), dim, dtype=F64)
    for i, t in enumerate(tokens):
        X[i, t] = 1.0
    return X


# ------------------------------------------------------------------------------- OneHotCountFactor
def test_one_hot_factor_defaults_and_config_errors(device):
    f = OneHotCountFactor(4, device=device)
    assert f.dim == 4 and f.decay == 0.9 and f.counts.dtype == torch.float32 and f.counts.device.type == torch.device(device).type
    assert torch.equal(f.counts.cpu(), torch.zeros(4)) and f.inverse is None
    assert f.initialized is False and f.updates == 0
    assert f.uses_statistics and f.applies_cached_inverse and f.statistic is None
    assert OneHotCountFactor(2, 0.0).decay == 0.0
    for decay in (-0.1, 1.0):
        with pytest.raises(ValueError, match=rf"^decay must be in \[0, 1\), got {decay}$"):
            OneHotCountFactor(2, decay)


def test_one_hot_factor_is_the_ema_of_the_scaled_gram_of_one_hot_rows(device):
    dim = 5
    batches = [([0, 2, 2, 4, 2], 0.2), ([1, 1, 3], 0.5), ([4, 0], 1.5)]  # token 3 and 1 absent at first, dim reached
    f = OneHotCountFactor(dim, 0.8, dtype=F64, device=device)
    oracle = None
    for k, (tokens, scale) in enumerate(batches, start=1):
        X = _one_hot_dense(tokens, dim)
        stat = scale * X.T @ X  # diagonal: the scaled token counts
        rows = torch.tensor(tokens, device=device).reshape(-1, 1)  # one index column
        f.observe_gram(rows, False, scale)
        oracle = stat if oracle is None else 0.8 * oracle + 0.2 * stat
        torch.testing.assert_close(f.counts.cpu(), torch.diagonal(oracle), rtol=1e-15, atol=0)
        assert f.initialized is True and f.updates == k
    with pytest.raises(ValueError, match="^a one-hot input has no homogeneous coordinate"):
        f.observe_gram(torch.tensor([[1]], device=device), True, 1.0)
    # a float32 factor keeps float32 counts whatever the scale
    g = OneHotCountFactor(3, dtype=torch.float32, device=device)
    g.observe_gram(torch.tensor([[2], [2]], device=device), False, 0.25)
    assert g.counts.dtype == torch.float32
    assert torch.equal(g.counts.cpu(), torch.tensor([0.0, 0.0, 0.5]))


def test_one_hot_factor_observe_diagonal_starts_at_the_first_observation(device):
    f = OneHotCountFactor(3, 0.5, dtype=F64, device=device)
    first = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32, device=device)
    f.observe_diagonal(first)
    assert torch.equal(f.counts.cpu(), first.cpu().double()) and f.updates == 1 and f.initialized is True
    f.observe_diagonal(torch.tensor([3.0, 0.0, 1.0], dtype=F64, device=device))
    assert torch.equal(f.counts.cpu(), torch.tensor([2.0, 1.0, 2.0], dtype=F64)) and f.updates == 2


def test_one_hot_factor_warm_start_from_a_vector_or_a_diagonal_matrix(device):
    for statistic in (torch.tensor([1.0, 4.0, 2.0]), torch.tensor([[1.0, 9.0, 9.0], [9.0, 4.0, 9.0], [9.0, 9.0, 2.0]])):
        f = OneHotCountFactor(3, dtype=F64, device=device)
        f.set_statistic(statistic.to(device))
        assert torch.equal(f.counts.cpu(), torch.tensor([1.0, 4.0, 2.0], dtype=F64))
        assert f.initialized is True and f.updates == 0
        f.observe_diagonal(torch.tensor([2.0, 0.0, 2.0], dtype=F64, device=device))  # folded in, not a restart
        torch.testing.assert_close(f.counts.cpu(), torch.tensor([1.1, 3.6, 2.0], dtype=F64), rtol=1e-15, atol=0)


def test_one_hot_factor_inverse_apply_dense_and_bounds(device):
    f = OneHotCountFactor(3, dtype=F64, device=device)
    with pytest.raises(RuntimeError, match=r"^OneHotCountFactor.apply called before its inverse was computed$"):
        f.apply(torch.ones(3, 2, dtype=F64, device=device))
    for call in (f.to_dense, f.eigenvalue_bounds):
        with pytest.raises(RuntimeError, match=r"^OneHotCountFactor has no inverse yet$"):
            call()
    f.set_statistic(torch.tensor([1.0, 3.0, 0.0], dtype=F64, device=device))
    f.request_inverse(None, 1.0)
    dense = torch.linalg.inv(torch.diag(torch.tensor([1.0, 3.0, 0.0], dtype=F64)) + torch.eye(3, dtype=F64))
    torch.testing.assert_close(f.to_dense().cpu(), dense, rtol=1e-15, atol=0)
    V = torch.tensor([[1.0, 2.0], [4.0, -8.0], [3.0, 5.0]], dtype=torch.float32, device=device)
    out = f.apply(V)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), dense @ V.cpu().double(), rtol=1e-7, atol=0)
    assert f.eigenvalue_bounds() == (0.25, 1.0)


def test_one_hot_factor_state_round_trip_copies_and_casts(device):
    f = OneHotCountFactor(3, 0.7, dtype=torch.float32, device=device)
    f.observe_diagonal(torch.tensor([2.0, 0.0, 1.0], device=device))
    state = f.state_dict()
    assert set(state) == {"counts", "inverse", "initialized", "updates", "decay"}
    assert state["inverse"] is None and state["initialized"] is True and state["updates"] == 1 and state["decay"] == 0.7
    f.counts.add_(5.0)  # the state holds a copy
    assert torch.equal(state["counts"].cpu(), torch.tensor([2.0, 0.0, 1.0]))

    g = OneHotCountFactor(3, dtype=torch.float32, device=device)
    g.load_state_dict({"counts": torch.tensor([1.0, 2.0, 3.0], dtype=F64), "inverse": torch.tensor([0.5, 0.25, 0.125], dtype=F64),
                       "initialized": 1, "updates": 4.0, "decay": 0.5})
    assert g.counts.dtype == torch.float32 and g.inverse.dtype == torch.float32 and g.counts.device.type == torch.device(device).type
    assert g.inverse.device.type == torch.device(device).type
    assert torch.equal(g.counts.cpu(), torch.tensor([1.0, 2.0, 3.0])) and torch.equal(g.inverse.cpu(), torch.tensor([0.5, 0.25, 0.125]))
    assert g.initialized is True and g.updates == 4 and isinstance(g.updates, int) and g.decay == 0.5
    assert isinstance(g.decay, float)
    loaded = g.state_dict()
    g.load_state_dict(loaded)
    g.counts.mul_(0.0)
    g.inverse.mul_(0.0)  # loading copied: the state is untouched
    assert torch.equal(loaded["counts"].cpu(), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(loaded["inverse"].cpu(), torch.tensor([0.5, 0.25, 0.125]))
    h = OneHotCountFactor(3, device=device)
    h.load_state_dict({**loaded, "inverse": None, "initialized": 0})
    assert h.inverse is None and h.initialized is False


# ---------------------------------------------------------------------------------- Factor base
class _Recording(Factor):
    def __init__(self, dim):
        super().__init__(dim)
        self.seen = []

    def observe(self, statistic):
        self.seen.append(statistic.clone())


@pytest.mark.parametrize("with_ones", [False, True])
def test_base_observe_gram_forms_the_scaled_gram_statistic(device, with_ones):
    rows = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]], dtype=F64, device=device)
    f = _Recording(2 + int(with_ones))
    f.observe_gram(rows, with_ones, 0.5)
    full = torch.cat([rows.cpu(), torch.ones(3, 1, dtype=F64)], 1) if with_ones else rows.cpu()
    assert len(f.seen) == 1
    assert f.seen[0].dtype == F64 and f.seen[0].device.type == torch.device(device).type
    torch.testing.assert_close(f.seen[0].cpu(), 0.5 * full.T @ full, rtol=1e-15, atol=0)


# ------------------------------------------------------------- secant factors, sequential update path
def _bfgs_by_hand(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H+ = (I - ρ s yᵀ) H (I - ρ y sᵀ) + ρ s sᵀ, ρ = 1/(sᵀy), in float64."""
    rho = 1.0 / float(s @ y)
    V = torch.eye(len(s), dtype=F64) - rho * torch.outer(y, s)
    return V.T @ H @ V + rho * torch.outer(s, s)


class _FixedDamping:
    """A damping policy that is not DoubleDamping (so the factor takes its sequential path): the pair as it
    is, with fixed θ's and step flags; it records ``H y`` through the factor's ``apply`` it is handed."""

    def __init__(self) -> None:
        self.seen_Hy: list[torch.Tensor] = []

    def __call__(self, s, y, apply_H, counters):
        counters.pairs += 1
        self.seen_Hy.append(apply_H(y).clone())
        return DampedPair(s, y, theta1=0.25, theta2=0.5, step1_active=False, step2_active=True)


# s1ᵀy1 = 4.5 > 0.5·‖s1‖²·ref = 0.5·1.25·2 = 1.25: used; s2ᵀy2 = 1.2 < 0.5·‖s2‖²·2 = 2.0 but > 1e-4·2·2: skipped
# only under the factor's own threshold 0.5; s3ᵀy3 = -1 <= 0: skipped under every rule
S1, Y1 = torch.tensor([1.0, 0.5, 0.0], dtype=F64), torch.tensor([4.0, 1.0, 2.0], dtype=F64)
S2, Y2 = torch.tensor([0.0, 1.0, 1.0], dtype=F64), torch.tensor([3.0, 0.2, 1.0], dtype=F64)
S3, Y3 = torch.tensor([1.0, 0.0, 0.0], dtype=F64), torch.tensor([-1.0, 5.0, 0.0], dtype=F64)


@pytest.mark.parametrize("cls", [BFGSFactor, LBFGSFactor])
def test_sequential_update_path_applies_the_factor_threshold(device, cls):
    damping = _FixedDamping()
    f = cls(3, damping, pair_decay=0.0, curvature_threshold=0.5, dtype=F64, device=device)
    assert f.curvature_threshold == 0.5
    ref = 2.0
    pair = f.observe_pair(S1.to(device), Y1.to(device), reference_norm=ref)
    assert not pair.skipped and f.updates == 1 and (pair.theta1, pair.theta2) == (0.25, 0.5)
    H1 = _bfgs_by_hand(torch.eye(3, dtype=F64), S1, Y1)
    torch.testing.assert_close(f.to_dense().cpu(), H1, rtol=1e-13, atol=1e-15)
    pair = f.observe_pair(S2.to(device), Y2.to(device), reference_norm=torch.tensor(ref, device=device))
    assert pair.skip_reason == "s^T y below the relative curvature threshold"
    # a skipped pair keeps what the damping reported
    assert torch.equal(pair.s.cpu(), S2) and torch.equal(pair.y.cpu(), Y2)
    assert (pair.theta1, pair.theta2, pair.step1_active, pair.step2_active) == (0.25, 0.5, False, True)
    assert f.last_pair is pair
    pair = f.observe_pair(S3.to(device), Y3.to(device), reference_norm=ref)
    assert pair.skip_reason == "s^T y <= 0"
    torch.testing.assert_close(f.to_dense().cpu(), H1, rtol=1e-13, atol=1e-15)  # the skips left H alone
    assert f.updates == 1 and f.counters.pairs == 3 and f.counters.skipped == 2
    assert f.counters.skip_reasons == {"s^T y below the relative curvature threshold": 1, "s^T y <= 0": 1}
    # without a reference the relative rule is off: the second pair is used
    pair = f.observe_pair(S2.to(device), Y2.to(device))
    assert not pair.skipped and f.updates == 2
    torch.testing.assert_close(f.to_dense().cpu(), _bfgs_by_hand(H1, S2, Y2), rtol=1e-12, atol=1e-14)
    # the damping saw the current H: I y1, then H1 y2, H1 y3, H1 y2
    expected = [Y1, H1 @ Y2, H1 @ Y3, H1 @ Y2]
    assert len(damping.seen_Hy) == 4
    for seen, want in zip(damping.seen_Hy, expected):
        torch.testing.assert_close(seen.cpu(), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("cls", [BFGSFactor, LBFGSFactor])
def test_undamped_split_path_applies_the_factor_threshold_with_a_float_reference(device, cls):
    """The undamped factors take the split path (one host read per pair); the relative rule reads a Python
    float reference and the factor's own threshold."""
    from benchmarks.syncs import SyncCounter

    f = cls(3, None, pair_decay=0.0, curvature_threshold=0.5, dtype=F64, device=device)
    with SyncCounter() as counter:
        assert not f.observe_pair(S1.to(device), Y1.to(device), reference_norm=2.0).skipped
    assert counter.count == 1, dict(counter.sites)
    pair = f.observe_pair(S2.to(device), Y2.to(device), reference_norm=2.0)
    assert pair.skip_reason == "s^T y below the relative curvature threshold"
    assert f.observe_pair(S3.to(device), Y3.to(device)).skip_reason == "s^T y <= 0"
    torch.testing.assert_close(f.to_dense().cpu(), _bfgs_by_hand(torch.eye(3, dtype=F64), S1, Y1), rtol=1e-13, atol=1e-15)
    assert f.updates == 1 and f.counters.pairs == 3
    assert f.counters.skip_reasons == {"s^T y below the relative curvature threshold": 1, "s^T y <= 0": 1}
    if cls is LBFGSFactor:
        assert f.lbfgs.memory == 100 and f.lbfgs.gamma == 1.0  # the defaults


def test_a_subclass_overriding_only_incorporate_keeps_the_sequential_path_and_so_do_its_subclasses(device):
    calls = []

    class Custom(BFGSFactor):
        def _incorporate(self, s, y, reference_norm):
            calls.append(reference_norm)
            return super()._incorporate(s, y, reference_norm)

    class Child(Custom):
        pass

    for cls in (Custom, Child):
        calls.clear()
        f = cls(3, None, pair_decay=0.0, dtype=F64, device=device)
        assert not f.observe_pair(S1.to(device), Y1.to(device), reference_norm=2.0).skipped
        assert calls == [2.0]
        torch.testing.assert_close(f.to_dense().cpu(), _bfgs_by_hand(torch.eye(3, dtype=F64), S1, Y1), rtol=1e-13, atol=1e-15)


def test_a_float32_pair_is_cast_to_the_factor_dtype(device):
    for cls in (BFGSFactor, LBFGSFactor):
        f = cls(3, None, pair_decay=0.0, dtype=F64, device=device)
        s32 = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float32, device=device)
        y32 = torch.tensor([4.0, 1.0, 2.0], dtype=torch.float32, device=device)
        pair = f.observe_pair(s32, y32)
        assert pair.s.dtype == F64 and pair.y.dtype == F64 and f.to_dense().dtype == F64
        torch.testing.assert_close(f.to_dense().cpu(), _bfgs_by_hand(torch.eye(3, dtype=F64), S1, Y1), rtol=1e-13, atol=1e-15)


def test_a_non_finite_pair_is_reported_as_given(device):
    f = BFGSFactor(2, None, dtype=F64, device=device)
    s = torch.tensor([float("nan"), 1.0], dtype=F64, device=device)
    y = torch.tensor([1.0, 2.0], dtype=F64, device=device)
    pair = f.observe_pair(s, y)
    assert pair.skip_reason == "non-finite pair" and f.last_pair is pair
    assert torch.equal(pair.y, y) and torch.isnan(pair.s[0]) and pair.s[1] == 1.0


def test_lbfgs_split_path_accepts_a_finite_pair_whose_fused_finiteness_sum_overflows(device):
    """The fused finiteness flag reads False for a finite pair whose sum overflows; the exact check then keeps it."""
    f = LBFGSFactor(2, None, pair_decay=0.0, dtype=F64, device=device)
    big = 1e308
    s = torch.tensor([big, big], dtype=F64, device=device)  # sum = inf, every entry finite
    y = torch.tensor([1e-300, 1e-300], dtype=F64, device=device)
    pair = f.observe_pair(s, y)
    assert not pair.skipped and f.updates == 1 and f.lbfgs.size == 1
    # the dense factor's update of that pair overflows: skipped as such, not as a non-finite pair
    b = BFGSFactor(2, None, pair_decay=0.0, dtype=F64, device=device)
    assert b.observe_pair(s, y).skip_reason == "non-finite update"
    assert torch.equal(b.to_dense().cpu(), torch.eye(2, dtype=F64))


@pytest.mark.parametrize("cls", [BFGSFactor, LBFGSFactor])
def test_secant_factors_on_their_device_after_a_reset(cls):
    """Every buffer is created on the factor's device, and reset_secant_memory keeps it there (meta: shapes only)."""
    f = cls(3, None, dtype=F64, device="meta")
    buffers = lambda: [f.s_avg, f.y_avg, f.to_dense()] + ([f.lbfgs.S, f.lbfgs.Y] if cls is LBFGSFactor else [])  # noqa: E731
    assert all(t.device.type == "meta" and t.dtype == F64 for t in buffers())
    f.reset_secant_memory()
    assert all(t.device.type == "meta" and t.dtype == F64 for t in buffers())


def test_reset_secant_memory_back_to_the_initial_matrix_and_a_zero_ema(device):
    f = LBFGSFactor(3, None, pair_decay=0.5, memory=7, gamma=2.5, dtype=F64, device=device)
    f.observe_pair(S1.to(device), Y1.to(device))
    assert f.lbfgs.size == 1
    f.reset_secant_memory()
    assert f.lbfgs.size == 0 and f.lbfgs.memory == 7 and f.lbfgs.gamma == 2.5
    torch.testing.assert_close(f.to_dense().cpu(), 2.5 * torch.eye(3, dtype=F64), rtol=0, atol=0)
    assert torch.equal(f.s_avg.cpu(), torch.zeros(3, dtype=F64)) and torch.equal(f.y_avg.cpu(), torch.zeros(3, dtype=F64))
    b = BFGSFactor(3, None, pair_decay=0.0, init_scale=0.5, dtype=F64, device=device)
    b.observe_pair(S1.to(device), Y1.to(device))
    b.reset_secant_memory()
    torch.testing.assert_close(b.to_dense().cpu(), 0.5 * torch.eye(3, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [BFGSFactor, LBFGSFactor])
def test_secant_state_loads_in_the_factor_dtype_and_copies(device, cls):
    f = cls(3, None, pair_decay=0.5, dtype=F64, device=device)
    f.observe_pair(S1.to(device), Y1.to(device))
    state = f.state_dict()
    g = cls(3, None, pair_decay=0.5, dtype=torch.float32, device=device)
    g.load_state_dict(state)
    assert g.s_avg.dtype == torch.float32 and g.y_avg.dtype == torch.float32 and g.to_dense().dtype == torch.float32
    torch.testing.assert_close(g.s_avg.cpu().double(), 0.5 * S1, rtol=1e-7, atol=0)
    torch.testing.assert_close(g.to_dense().cpu().double(), _bfgs_by_hand(torch.eye(3, dtype=F64), 0.5 * S1, 0.5 * Y1),
                               rtol=1e-6, atol=1e-7)
    same = cls(3, None, pair_decay=0.5, dtype=F64, device=device)
    same.load_state_dict(state)
    loaded = same.to_dense().clone()
    for t in _tensors(state):
        t.mul_(0.0)  # the caller reuses its dict: the loaded factor must not change
    assert torch.equal(same.to_dense(), loaded)
    assert torch.equal(same.s_avg.cpu(), 0.5 * S1) and torch.equal(same.y_avg.cpu(), 0.5 * Y1)


def _tensors(state):
    for v in state.values():
        if isinstance(v, dict):
            yield from _tensors(v)
        elif isinstance(v, torch.Tensor):
            yield v


# ------------------------------------------------------------------------------ EMACovarianceFactor
def test_eigenbasis_dtype_and_its_error(device):
    f = EMACovarianceFactor(2, dtype=torch.float32, device=device)
    f.set_statistic(torch.tensor([[2.0, 1.0], [1.0, 2.0]], device=device))
    evals, evecs = f.eigenbasis()
    assert evals.dtype == torch.float32 and evecs.dtype == torch.float32
    torch.testing.assert_close(evals.cpu(), torch.tensor([1.0, 3.0]), rtol=1e-6, atol=0)
    f.F[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"^EMACovarianceFactor.eigenbasis: the statistic contains NaN or inf$"):
        f.eigenbasis()


def test_ema_inversion_failures_boost_reset_and_count(device):
    """F = -50 I: λ = 1 and the retry at 10 fail, 100 succeeds; a non-finite F is dropped each time it fails."""
    from curvature.inverter import BatchedInverter

    f = EMACovarianceFactor(2, dtype=F64, device=device)
    f.set_statistic(-50.0 * torch.eye(2, dtype=F64, device=device))
    inverter = BatchedInverter()
    f.request_inverse(inverter, 1.0)
    assert inverter.run() == 1
    assert f.inversion_failures == 2 and f.damping_boost == 100.0 * 0.5  # boosted twice, relaxed once
    assert f.statistic_resets == 0 and f.initialized is True  # a finite F is kept
    torch.testing.assert_close(f.to_dense().cpu(), torch.eye(2, dtype=F64) / 50.0, rtol=1e-14, atol=0)
    assert f.inverse_damping == 100.0
    for k in (1, 2):
        f.F.fill_(float("nan"))
        f.initialized = True
        assert f._inversion_failed(1.0, [1.0]) is None  # an inverse exists: keep it
        assert f.statistic_resets == k and f.initialized is False and torch.equal(f.F.cpu(), torch.zeros(2, 2, dtype=F64))
    assert f.inversion_failures == 4


def test_ema_state_round_trip_of_every_counter_and_old_states(device):
    from curvature.inverter import BatchedInverter

    f = EMACovarianceFactor(2, 0.8, dtype=F64, device=device)
    f.set_statistic(-50.0 * torch.eye(2, dtype=F64, device=device))
    inverter = BatchedInverter()
    f.request_inverse(inverter, 1.0)
    inverter.run()
    f.F.fill_(float("inf"))
    f._inversion_failed(1.0, [1.0])
    state = f.state_dict()
    expected = {"inverse_damping": 100.0, "refreshes": 1, "damping_boost": 500.0, "inversion_failures": 3,
                "statistic_resets": 1}
    assert {k: state[k] for k in expected} == expected
    g = EMACovarianceFactor(2, dtype=torch.float32, device=device)
    g.load_state_dict(state)
    assert {k: getattr(g, k) for k in expected} == expected
    assert g.F.dtype == torch.float32 and g.inverse.dtype == torch.float32 and g.decay == 0.8
    torch.testing.assert_close(g.inverse.cpu(), torch.eye(2) / 50.0, rtol=1e-7, atol=0)
    same = EMACovarianceFactor(2, dtype=F64, device=device)
    same.load_state_dict(state)
    state["inverse"].mul_(0.0)
    state["F"].fill_(1.0)
    torch.testing.assert_close(same.inverse.cpu(), torch.eye(2, dtype=F64) / 50.0, rtol=1e-14, atol=0)
    assert torch.equal(same.F.cpu(), torch.zeros(2, 2, dtype=F64))
    # a state saved before the recovery counters existed loads with their neutral values
    old = {k: state[k] for k in ("F", "inverse", "initialized", "updates", "decay")}
    h = EMACovarianceFactor(2, dtype=F64, device=device)
    h.load_state_dict(old)
    assert (h.inverse_damping, h.refreshes, h.damping_boost, h.inversion_failures, h.statistic_resets) == (None, 0, 1.0, 0, 0)


# ------------------------------------------------------------------------------ HessianActionFactor
def test_hessian_action_warm_start_skips_the_first_fold(device):
    f = HessianActionFactor(2, 1.0, decay=0.5, dtype=F64, device=device)
    f.set_statistic(torch.eye(2, dtype=F64, device=device))
    assert f.warm_started is True
    f.observe(3.0 * torch.eye(2, dtype=F64, device=device))  # before the initial inversion: not folded in
    f.observe_gram(torch.ones(4, 2, dtype=F64, device=device), False, 1.0)
    assert torch.equal(f.statistic.cpu(), torch.eye(2, dtype=F64))
    from curvature.inverter import BatchedInverter

    inverter = BatchedInverter()
    f.request_inverse(inverter)
    inverter.run()
    torch.testing.assert_close(f.to_dense().cpu(), torch.eye(2, dtype=F64) / 2.0, rtol=1e-15, atol=0)
    f.observe(3.0 * torch.eye(2, dtype=F64, device=device))  # after it: the EMA runs
    torch.testing.assert_close(f.statistic.cpu(), 2.0 * torch.eye(2, dtype=F64), rtol=1e-15, atol=0)


def test_hessian_action_inversion_failures(device):
    from curvature.inverter import BatchedInverter

    f = HessianActionFactor(2, 1.0, dtype=F64, device=device)
    f.set_statistic(-50.0 * torch.eye(2, dtype=F64, device=device))
    inverter = BatchedInverter()
    f.request_inverse(inverter)
    assert inverter.run() == 1
    # λ = 1 and 10 fail on the finite F (kept), 100 succeeds: H = (F + 100 I)^-1
    assert f.inversion_failures == 2 and f.covariance.statistic_resets == 0
    torch.testing.assert_close(f.to_dense().cpu(), torch.eye(2, dtype=F64) / 50.0, rtol=1e-14, atol=0)
    g = HessianActionFactor(2, 1.0, dtype=F64, device=device)
    g.set_statistic(torch.full((2, 2), float("nan"), dtype=F64, device=device))
    g.request_inverse(inverter)
    assert inverter.run() == 1
    # the NaN statistic is dropped, the retry inverts (0 + 10 I)
    assert g.inversion_failures == 1 and g.covariance.statistic_resets == 1 and g.covariance.initialized is False
    torch.testing.assert_close(g.to_dense().cpu(), torch.eye(2, dtype=F64) / 10.0, rtol=1e-15, atol=0)
    g.covariance.F.fill_(float("inf"))
    g.covariance.initialized = True
    assert g._inversion_failed(2.0) == 20.0
    assert g.inversion_failures == 2 and g.covariance.statistic_resets == 2 and g.covariance.initialized is False


def test_hessian_action_state_round_trip(device):
    from curvature.inverter import BatchedInverter

    f = HessianActionFactor(2, 1.0, dtype=F64, device=device)
    f.set_statistic(-50.0 * torch.eye(2, dtype=F64, device=device))
    inverter = BatchedInverter()
    f.request_inverse(inverter)
    inverter.run()
    state = f.state_dict()
    assert state["warm_started"] is True and state["inversion_failures"] == 2
    g = HessianActionFactor(2, 3.0, dtype=torch.float32, device=device)
    g.load_state_dict(state)
    assert g.warm_started is True and g.inversion_failures == 2 and g.damping == 1.0
    assert g.H.dtype == torch.float32
    torch.testing.assert_close(g.H.cpu(), torch.eye(2) / 50.0, rtol=1e-7, atol=0)
    same = HessianActionFactor(2, 3.0, dtype=F64, device=device)
    same.load_state_dict(state)
    state["H"].mul_(0.0)
    torch.testing.assert_close(same.H.cpu(), torch.eye(2, dtype=F64) / 50.0, rtol=1e-14, atol=0)
    # before the initial inversion (H None), and a state saved before the warm-start flag and the counter existed
    fresh = HessianActionFactor(2, 1.0, dtype=F64, device=device).state_dict()
    assert fresh["H"] is None
    old = {k: v for k, v in state.items() if k not in ("warm_started", "inversion_failures")}
    h = HessianActionFactor(2, 1.0, dtype=F64, device=device)
    h.load_state_dict({**old, "H": None})
    assert h.H is None and h.warm_started is False and h.inversion_failures == 0
    h.load_state_dict(fresh)
    assert h.H is None


def test_hessian_action_messages_before_h(device):
    f = HessianActionFactor(2, 1.0, dtype=F64, device=device)
    with pytest.raises(RuntimeError, match=r"^HessianActionFactor.apply called before H was initialized$"):
        f.apply(torch.ones(2, 1, dtype=F64, device=device))
    with pytest.raises(RuntimeError, match=r"^HessianActionFactor has no H yet$"):
        f.to_dense()


@pytest.mark.parametrize("with_ones", [False, True])
def test_ema_observe_gram_counts_updates_and_casts_the_rows(device, with_ones):
    f = EMACovarianceFactor(3 + int(with_ones), 0.5, dtype=F64, device=device)
    rows32 = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], dtype=torch.float32, device=device)
    full = rows32.cpu().double()
    full = torch.cat([full, torch.ones(2, 1, dtype=F64)], 1) if with_ones else full
    stat = 0.25 * full.T @ full
    for k in (1, 2, 3):
        f.observe_gram(rows32, with_ones, 0.25)
        assert f.updates == k and f.F.dtype == F64
        torch.testing.assert_close(f.F.cpu(), stat, rtol=1e-15, atol=1e-15)  # a constant statistic is its own EMA


def test_fresh_factors_state_and_messages():
    e = EMACovarianceFactor(2, dtype=F64)
    assert e.inverse is None and e.inverse_damping is None and e.refreshes == 0 and e.updates == 0
    assert e.initialized is False and e.damping_boost == 1.0 and e.inversion_failures == 0 and e.statistic_resets == 0
    with pytest.raises(RuntimeError, match=r"^EMACovarianceFactor.apply called before its inverse was computed$"):
        e.apply(torch.ones(2, 1, dtype=F64))
    with pytest.raises(RuntimeError, match=r"^EMACovarianceFactor has no inverse yet$"):
        e.to_dense()
    h = HessianActionFactor(2, 1.0, dtype=F64)
    assert h.H is None and h.warm_started is False and h.last_pair is None and h.updates == 0 and h.skips == {}
    with pytest.raises(RuntimeError, match=r"^HessianActionFactor.hessian_action_update called before H was initialized$"):
        h.hessian_action_update(torch.ones(2, dtype=F64))
    for f in (BFGSFactor(2, None), LBFGSFactor(2, None)):
        assert f.last_pair is None and f.last_raw_pair is None and f.updates == 0


def test_statistic_factors_on_their_device():
    e = EMACovarianceFactor(2, dtype=F64, device="meta")
    h = HessianActionFactor(2, 1.0, dtype=F64, device="meta")
    o = OneHotCountFactor(2, dtype=F64, device="meta")
    assert e.F.device.type == "meta" and h.statistic.device.type == "meta" and h.statistic.dtype == F64
    assert o.counts.device.type == "meta" and o.counts.dtype == F64


def test_secant_factor_base_defaults():
    """A strategy built on SecantFactor without passing the EMA decay or threshold gets 0.9 and 1e-4."""

    class Minimal(SecantFactor):
        def apply(self, V):
            return V

    f = Minimal(2, None)
    assert f.pair_decay == 0.9 and f.curvature_threshold == 1e-4 and f.s_avg.dtype == torch.float32


def _identity_action_factor(device, threshold, lam=0.5):
    """A = I (warm start), λ_A = lam: M = (1 + lam) I, H = M⁻¹, s = H v, y = M s = v."""
    from curvature.inverter import BatchedInverter

    f = HessianActionFactor(2, lam, curvature_threshold=threshold, dtype=F64, device=device)
    f.set_statistic(torch.eye(2, dtype=F64, device=device))
    inverter = BatchedInverter()
    f.request_inverse(inverter)
    inverter.run()
    return f


def test_hessian_action_relative_threshold_uses_the_activation_norm(device):
    """v = (3, 0): s = v/1.5, sᵀy = 1.5‖s‖², ‖v‖ = 3. Threshold 1: 1.5‖s‖² <= 3‖s‖², skipped (twice, counted);
    threshold 0 (falsy, still a number): never skipped; None: no relative rule."""
    v = torch.tensor([3.0, 0.0], dtype=F64, device=device)
    f = _identity_action_factor(device, 1.0)
    H = f.H
    reason = "s^T y below the relative curvature threshold"
    assert f.hessian_action_update(v) == reason and f.hessian_action_update(v) == reason
    assert f.H is H and f.skips == {reason: 2} and f.updates == 0
    for threshold in (0.0, None):
        g = _identity_action_factor(device, threshold)
        assert g.hessian_action_update(v) is None and g.updates == 1
        # s = (2, 0), y = (3, 0): the BFGS update of (1/1.5) I by hand
        torch.testing.assert_close(g.H.cpu(), _bfgs_by_hand(torch.eye(2, dtype=F64) / 1.5, torch.tensor([2.0, 0.0], dtype=F64),
                                                            torch.tensor([3.0, 0.0], dtype=F64)), rtol=1e-14, atol=1e-15)


def test_hessian_action_update_casts_the_activation_and_survives_an_overflowing_flag(device):
    f = _identity_action_factor(device, None, lam=1.0)  # M = 2 I, H = I / 2
    assert f.hessian_action_update(torch.tensor([2.0, 0.0], dtype=torch.float32, device=device)) is None
    assert f.last_pair[0].dtype == F64
    g = _identity_action_factor(device, 1e-4, lam=1.0)
    H = g.H
    big = torch.tensor([1e308, 1e308], dtype=F64, device=device)  # finite; the fused finiteness sum overflows
    reason = g.hessian_action_update(big)
    assert reason is not None and reason != "non-finite pair" and g.H is H and g.skips == {reason: 1}
