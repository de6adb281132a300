"""curvature.linalg and curvature.inverter against float64 oracles (torch.linalg.inv / eigvalsh)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import curvature.inverter as inverter_module
from curvature.inverter import BatchedInverter
from curvature.linalg import (
    InversionError,
    InversionStats,
    add_to_diagonal,
    damped_inverse,
    symmetric_eigenvalue_bounds,
    symmetrize,
)
from tests.curvature.strategies import (
    F64,
    assert_close_work,
    eig_bounds,
    eps_for,
    f64,
    generator,
    hyp,
    orthogonal,
    psd,
    rel_err,
    spd_from,
    to_work,
    work_dtype,
)

METHODS = ["cholesky", "eigh"]


def _inv_oracle(F: torch.Tensor, lam: float) -> torch.Tensor:
    F = f64(F)
    return torch.linalg.inv(0.5 * (F + F.T) + lam * torch.eye(F.shape[-1], dtype=F64))


def _inv_tol(F: torch.Tensor, lam: float, device) -> float:
    """Relative tolerance k·n·eps·κ(F + λI)."""
    lo, hi = eig_bounds(f64(F) + lam * torch.eye(F.shape[-1], dtype=F64))
    return 200 * F.shape[-1] * eps_for(device) * hi / lo


# ----------------------------------------------------------------------------- helpers
def test_symmetrize_and_add_to_diagonal(device):
    dt = work_dtype(device)
    M = to_work(torch.randn(3, 4, 4, generator=generator(0), dtype=F64), device)
    S = symmetrize(M)
    assert torch.equal(S, S.transpose(-1, -2))
    assert_close_work(S, 0.5 * (f64(M) + f64(M).transpose(-1, -2)), device, k=2)
    lam = torch.tensor([0.5, 2.0, 3.0], dtype=dt, device=device)
    D = add_to_diagonal(M, lam)
    expected = f64(M) + torch.tensor([0.5, 2.0, 3.0], dtype=F64).reshape(3, 1, 1) * torch.eye(4, dtype=F64)
    assert_close_work(D, expected, device, k=2)
    assert_close_work(add_to_diagonal(M[0], 1.5), f64(M[0]) + 1.5 * torch.eye(4, dtype=F64), device, k=2)
    assert torch.equal(M, to_work(torch.randn(3, 4, 4, generator=generator(0), dtype=F64), device))  # not in place


@given(data=st.data())
@hyp()
def test_symmetric_eigenvalue_bounds(device, data):
    n = data.draw(st.integers(1, 8))
    M = to_work(data.draw(psd(n)) - data.draw(psd(n)), device)
    lo, hi = symmetric_eigenvalue_bounds(M)
    elo, ehi = eig_bounds(f64(M))
    tol = 100 * n * eps_for(device) * max(abs(elo), abs(ehi), 1e-300)
    assert abs(lo - elo) <= tol and abs(hi - ehi) <= tol


# ----------------------------------------------------------------------------- damped_inverse
@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
@hyp()
def test_damped_inverse_single_matches_inv(device, method, data):
    n = data.draw(st.integers(1, 8))
    F = to_work(data.draw(psd(n)), device)
    lam = 10.0 ** data.draw(st.floats(-2.0, 2.0))
    stats = InversionStats()
    inv = damped_inverse(F, lam, method, stats)
    assert inv.shape == (n, n) and inv.dtype == F.dtype and inv.device == F.device
    assert rel_err(inv, _inv_oracle(F, lam)) <= _inv_tol(F, lam, device)
    assert torch.equal(inv, inv.T)
    assert stats.calls == 1 and stats.float64_retries == 0 and stats.failures == 0


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
@hyp()
def test_damped_inverse_batched_per_entry_damping(device, method, data):
    n = data.draw(st.integers(1, 8))
    b = data.draw(st.integers(1, 4))
    Fs = torch.stack([data.draw(psd(n)) for _ in range(b)])
    lams = [10.0 ** data.draw(st.floats(-2.0, 2.0)) for _ in range(b)]
    F = to_work(Fs, device)
    stats = InversionStats()
    damping = torch.tensor(lams, dtype=work_dtype(device), device=device)
    inv = damped_inverse(F, damping, method, stats)
    assert inv.shape == (b, n, n)
    for i in range(b):
        lam_i = float(f64(damping[i]))
        assert rel_err(inv[i], _inv_oracle(F[i], lam_i)) <= _inv_tol(F[i], lam_i, device), i
    assert stats.calls == b and stats.float64_retries == 0


@pytest.mark.parametrize("method", METHODS)
def test_damped_inverse_scalar_damping_batched(device, method):
    F = to_work(torch.stack([spd_from(torch.tensor([1.0, 2.0, 5.0], dtype=F64), k) for k in range(3)]), device)
    inv = damped_inverse(F, 0.25, method)
    for i in range(3):
        assert rel_err(inv[i], _inv_oracle(F[i], 0.25)) <= _inv_tol(F[i], 0.25, device)


def _f32_hard_case(method: str, device) -> torch.Tensor:
    """A float32 matrix that is SPD as stored (float64 factorization succeeds) but whose float32
    factorization fails (κ ≈ 1e9 ≫ 1/eps32). Deterministic search over seeds."""
    n = 6
    evals = torch.tensor([1.0, 0.7, 0.4, 0.2, 0.1, 1e-9], dtype=F64)
    for seed in range(500):
        X = spd_from(evals, seed).float().to(device)
        X64 = X.double()
        if float(torch.linalg.eigvalsh(X64.cpu())[0]) < 1e-11:
            continue  # rounding to float32 made it (nearly) indefinite: not a valid case
        if method == "cholesky":
            fails32 = int(torch.linalg.cholesky_ex(X)[1]) != 0
        else:
            fails32 = bool((torch.linalg.eigh(X.unsqueeze(0))[0] <= 0).any())
        if fails32:
            return X
    pytest.fail("no float32-hard SPD matrix found in 500 seeds")


@pytest.mark.parametrize("method", METHODS)
def test_float32_failure_is_retried_in_float64(device, method):
    hard = _f32_hard_case(method, device)
    easy = spd_from(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=F64), 7).float().to(device)
    batch = torch.stack([easy, hard, easy])
    stats = InversionStats()
    inv = damped_inverse(batch, 0.0, method, stats)
    assert inv.dtype == torch.float32
    assert stats.float64_retries == 1 and stats.failures == 0 and stats.calls == 3
    assert torch.isfinite(inv).all()
    oracle_hard = torch.linalg.inv(f64(hard))
    assert rel_err(inv[1], oracle_hard) <= 1e-5
    oracle_easy = torch.linalg.inv(f64(easy))
    assert rel_err(inv[0], oracle_easy) <= 1e-5 and rel_err(inv[2], oracle_easy) <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_float64_retry_keeps_damping_that_float32_rounds_away(device, method):
    """(F + λI)^{-1} for F = [[1,1],[1,1]] (float32) and λ = 1e-9 is well defined (eigenvalues of F + λI are
    1e-9 and 2 + 1e-9, both representable) and computable in float64; in float32, 1 + 1e-9 rounds to 1 so
    the float32 factorization fails. The documented float64 retry must recover it."""
    F = torch.ones(2, 2, dtype=torch.float32, device=device)
    lam = 1e-9
    stats = InversionStats()
    inv = damped_inverse(F, lam, method, stats)
    oracle = torch.linalg.inv(torch.ones(2, 2, dtype=F64) + lam * torch.eye(2, dtype=F64))
    assert stats.float64_retries == 1
    assert rel_err(inv, oracle) <= 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_not_spd_even_in_float64_raises(device, method):
    F = to_work(-torch.eye(3, dtype=F64), device)
    stats = InversionStats()
    with pytest.raises(InversionError):
        damped_inverse(F, 0.5, method, stats)
    assert stats.failures == 1
    # an indefinite matrix inside a batch also raises (never a silently wrong inverse)
    batch = to_work(torch.stack([torch.eye(3, dtype=F64), torch.diag(torch.tensor([1.0, -4.0, 2.0], dtype=F64))]), device)
    with pytest.raises(InversionError):
        damped_inverse(batch, 1.0, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(device, method, bad):
    F = to_work(torch.eye(3, dtype=F64), device)
    F[1, 2] = bad
    stats = InversionStats()
    with pytest.raises(InversionError):
        damped_inverse(F, 1.0, method, stats)
    assert stats.failures == 1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_damping_raises_inversion_error(device, method, bad):
    """A finite F with a NaN (or inf: inf·0 = NaN off the diagonal) damping gives a non-finite damped
    matrix; the documented failure mode is InversionError, for either method."""
    with pytest.raises(InversionError):
        damped_inverse(to_work(torch.eye(3, dtype=F64), device), bad, method)


def test_invalid_method_raises(device):
    with pytest.raises(ValueError, match="method"):
        damped_inverse(to_work(torch.eye(2, dtype=F64), device), 1.0, "lu")


# ----------------------------------------------------------------------------- BatchedInverter
@pytest.mark.parametrize("method", METHODS)
def test_batched_inverter_groups_by_size_and_serves_callbacks(device, method, monkeypatch):
    calls: list[tuple[int, ...]] = []
    original = inverter_module.launch_inverses

    def recording(matrices, damping, method="cholesky"):
        calls.append(tuple(matrices.shape))
        return original(matrices, damping, method)

    monkeypatch.setattr(inverter_module, "launch_inverses", recording)
    g = generator(3)
    sizes = [2, 3, 2, 5, 3, 2]
    dampings = [0.1, 1.0, 2.0, 0.5, 3.0, 0.01]
    mats, received = [], {}
    inv = BatchedInverter(method=method)
    for i, (n, lam) in enumerate(zip(sizes, dampings)):
        x = torch.randn(n, n + 1, generator=g, dtype=F64)
        F = to_work(x @ x.T, device)
        mats.append(F)
        inv.request(F, lam, lambda res, i=i: received.__setitem__(i, res))
    assert inv.run() == len(sizes)
    assert sorted(calls) == sorted([(3, 2, 2), (2, 3, 3), (1, 5, 5)])
    assert inv.stats.calls == len(sizes)
    for i, (F, lam) in enumerate(zip(mats, dampings)):
        assert received[i].shape == F.shape and received[i].dtype == F.dtype
        assert rel_err(received[i], _inv_oracle(F, lam)) <= _inv_tol(F, lam, device), i
    # requests are consumed
    assert inv.run() == 0 and len(calls) == 3


def test_batched_inverter_separates_dtypes(device):
    inv = BatchedInverter()
    got = {}
    A = torch.diag(torch.tensor([1.0, 2.0], device=device))
    inv.request(A.double(), 1.0, lambda r: got.__setitem__("d", r))
    inv.request(A.float(), 1.0, lambda r: got.__setitem__("f", r))
    assert inv.run() == 2
    assert got["d"].dtype == torch.float64 and got["f"].dtype == torch.float32
    torch.testing.assert_close(f64(got["d"]), torch.diag(torch.tensor([0.5, 1 / 3], dtype=F64)))
    torch.testing.assert_close(f64(got["f"]), torch.diag(torch.tensor([0.5, 1 / 3], dtype=F64)), rtol=1e-6, atol=1e-7)


def test_batched_inverter_propagates_inversion_error(device):
    inv = BatchedInverter()
    inv.request(to_work(-torch.eye(2, dtype=F64), device), 0.1, lambda r: None)
    with pytest.raises(InversionError):
        inv.run()
    assert inv.stats.failures == 1


def test_orthogonal_helper_is_orthogonal():
    Q = orthogonal(5, 11)
    torch.testing.assert_close(Q.T @ Q, torch.eye(5, dtype=F64))


# ------------------------------------------------------------------------------ mutation-audit gaps
def test_finite_flag_contract(device):
    """finite_flag: a 0-dim bool on the tensors' device, False iff some floating element is not finite;
    non-floating tensors (and no tensors) count as finite; tensors of different dtypes are compared in
    their promoted dtype (a float32 sum of 1e30 next to a float16 tensor is finite)."""
    from curvature.linalg import all_finite, finite_flag

    empty = finite_flag()
    assert empty.dtype == torch.bool and empty.shape == () and bool(empty)
    ints = finite_flag(torch.arange(3, device=device))
    assert ints.dtype == torch.bool and ints.shape == () and ints.device == torch.device(device) and bool(ints)
    ok = torch.ones(2, dtype=F64, device=device)
    bad = torch.tensor([1.0, float("inf")], dtype=F64, device=device)
    assert bool(finite_flag(ok)) and not bool(finite_flag(bad))
    assert not bool(finite_flag(ok, bad)) and not bool(finite_flag(bad, ok)) and bool(finite_flag(ok, ok))
    half = torch.ones(2, dtype=torch.float16, device=device)
    big = torch.tensor([1e30], dtype=torch.float32, device=device)  # inf in float16
    assert bool(finite_flag(half, big)) and bool(finite_flag(big, half))
    # all_finite: no tensors -> True; a finite tensor whose sum overflows is confirmed finite exactly
    assert all_finite() is True
    assert all_finite(torch.tensor([1e308, 1e308], dtype=F64, device=device)) is True
    assert all_finite(bad) is False


def test_all_finite_reads_once_for_finite_tensors(device):
    from benchmarks.syncs import SyncCounter
    from curvature.linalg import all_finite

    with SyncCounter() as counter:  # the fused flag of both tensors: one read, not one per tensor
        assert all_finite(torch.ones(3, dtype=F64, device=device), torch.ones(2, dtype=F64, device=device))
    assert counter.count == 1


@pytest.mark.parametrize("method", METHODS)
def test_the_requested_factorization_is_used(device, method, monkeypatch):
    """method='cholesky' (the default of every entry point) factors with cholesky_ex, 'eigh' with eigh,
    also on the float64 retry path."""
    from curvature import linalg

    calls = {"cholesky": 0, "eigh": 0}
    chol, eigh = torch.linalg.cholesky_ex, torch.linalg.eigh

    def count_chol(*a, **k):
        calls["cholesky"] += 1
        return chol(*a, **k)

    def count_eigh(*a, **k):
        calls["eigh"] += 1
        return eigh(*a, **k)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", count_chol)
    monkeypatch.setattr(torch.linalg, "eigh", count_eigh)
    F = torch.eye(2, dtype=F64, device=device)
    other = "eigh" if method == "cholesky" else "cholesky"
    if method == "cholesky":  # the defaults
        linalg.damped_inverse(F, 1.0)
        linalg.damped_inverse_entries(F.unsqueeze(0), 1.0)
        linalg.finish_inverses(p := linalg.launch_inverses(F.unsqueeze(0), 1.0), p.ok.tolist())
        assert calls == {"cholesky": 3, "eigh": 0}
    calls.update(cholesky=0, eigh=0)
    linalg.damped_inverse(torch.ones(2, 2, dtype=torch.float32, device=device), 1e-9, method)  # float64 retry
    assert calls[method] == 2 and calls[other] == 0


def test_eigh_that_does_not_converge_fails_every_entry(device, monkeypatch):
    """torch.linalg.eigh raising LinAlgError: every entry of the batch is reported failed (NaN inverse,
    ok False) on the device, and the float64 retry is attempted; nothing is silently returned."""
    from curvature.linalg import _inverse_once

    def fail(*a, **k):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    batch = torch.eye(3, dtype=F64, device=device).expand(2, 3, 3).clone()
    inv, ok = _inverse_once(batch, "eigh")
    assert inv.shape == batch.shape and inv.dtype == F64 and bool(torch.isnan(inv).all())
    assert ok.shape == (2,) and ok.dtype == torch.bool and ok.device == batch.device and not bool(ok.any())
    stats = InversionStats()
    with pytest.raises(InversionError):
        damped_inverse(batch, 1.0, "eigh", stats)
    assert stats.float64_retries == 2 and stats.failures == 2


def test_one_overflowing_inverse_does_not_fail_its_batch(device):
    """F = diag(1e-310, 1), λ = 0: positive definite, but the inverse overflows (1e310): that entry
    fails (also in float64), the identity next to it succeeds without a retry."""
    from curvature.linalg import damped_inverse_entries

    bad = torch.diag(torch.tensor([1e-310, 1.0], dtype=F64))
    batch = torch.stack([bad, torch.eye(2, dtype=F64)]).to(device)
    stats = InversionStats()
    inv, ok = damped_inverse_entries(batch, 0.0, "cholesky", stats)
    assert ok.tolist() == [False, True]
    assert stats.calls == 2 and stats.float64_retries == 1 and stats.failures == 1
    assert stats.failed_shapes == [(2, 2, 2)]
    assert torch.equal(inv[1].cpu(), torch.eye(2, dtype=F64))
    # the counters accumulate over calls
    damped_inverse_entries(batch, 0.0, "cholesky", stats)
    assert stats.calls == 4 and stats.float64_retries == 2 and stats.failures == 2
    assert stats.failed_shapes == [(2, 2, 2), (2, 2, 2)]


def test_a_non_finite_entry_is_inverted_as_zero(device):
    """launch_inverses: a non-finite entry is replaced by zero before the factorization (so it cannot
    disturb the batched call): its candidate inverse is I/λ, and it is marked not finite and failed."""
    from curvature.linalg import launch_inverses

    batch = torch.eye(2, dtype=F64, device=device).expand(2, 2, 2).clone()
    batch[0, 0, 1] = float("nan")
    pending = launch_inverses(batch, torch.tensor([2.0, 4.0], dtype=F64, device=device))
    assert pending.finite.tolist() == [False, True] and pending.ok.tolist() == [False, True]
    torch.testing.assert_close(pending.inverses[0].cpu(), 0.5 * torch.eye(2, dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(pending.inverses[1].cpu(), 0.2 * torch.eye(2, dtype=F64), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="^method must be 'cholesky' or 'eigh', got 'lu'$"):
        launch_inverses(batch, 1.0, "lu")


def test_a_0_dim_tensor_damping_reaches_the_float64_retry(device):
    """A 0-dim tensor damping (like a float) is re-added in float64 on the retry path."""
    F = torch.ones(2, 2, dtype=torch.float32, device=device)
    stats = InversionStats()
    inv = damped_inverse(F, torch.tensor(1e-9, dtype=F64, device=device), "cholesky", stats)
    assert stats.float64_retries == 1
    oracle = torch.linalg.inv(torch.ones(2, 2, dtype=F64) + 1e-9 * torch.eye(2, dtype=F64))
    assert rel_err(inv, oracle) <= 1e-3


def test_failure_messages_and_counts(device):
    from curvature.linalg import damped_inverse_entries

    stats = InversionStats()
    batch = torch.eye(3, dtype=F64, device=device).expand(2, 3, 3)
    with pytest.raises(InversionError, match=r"^the damping nan is not finite$"):
        damped_inverse_entries(batch, float("nan"), "cholesky", stats)
    with pytest.raises(InversionError):
        damped_inverse_entries(batch, float("inf"), "cholesky", stats)
    assert stats.failures == 4 and stats.failed_shapes == [(2, 3, 3), (2, 3, 3)]
    with pytest.raises(InversionError, match=r"^damped factor of size 3 is not finite or not positive definite "
                                             r"even in float64; increase the damping$"):
        damped_inverse(-torch.eye(3, dtype=F64, device=device), 0.5)


def test_read_scalars_mixed_dtypes_in_order_exact_one_read(monkeypatch):
    """read_scalars: every value of bool, half, bfloat16, float32, float64 and integer (up to 2**53)
    0-dim tensors, in the given order, as Python floats equal to a float64 cast of each, in one read."""
    from curvature.linalg import read_scalars

    scalars = [torch.tensor(True), torch.tensor(1.0 / 3.0, dtype=torch.float32), torch.tensor(False),
               torch.tensor(1.0 / 3.0, dtype=F64), torch.tensor(2**53, dtype=torch.int64),
               torch.tensor(0.1, dtype=torch.float16), torch.tensor(float("nan")), torch.tensor(-float("inf"), dtype=F64),
               torch.tensor(0.1, dtype=torch.bfloat16), torch.tensor(1e-40, dtype=torch.float32), torch.tensor(7, dtype=torch.int32)]
    expected = [t.double().item() for t in scalars]
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or original(self))
    values = read_scalars(scalars)
    assert len(reads) == 1
    assert all(type(v) is float for v in values)
    assert [repr(v) for v in values] == [repr(v) for v in expected]  # NaN and signed values compared too
    assert read_scalars([]) == [] and read_scalars([torch.tensor(True)]) == [1.0]
    assert read_scalars([torch.tensor(2.5, dtype=torch.float16)] * 3) == [2.5] * 3


# ------------------------------------------------------------------------------ mutation run of linalg.py at b5a1b6e
def test_finite_flag_adds_the_sums(device):
    """finite_flag adds the per-tensor sums: two finite tensors whose sums cancel read True (their
    difference, 6e38, would overflow float32), and a sum that does overflow reads False (conservative)."""
    from curvature.linalg import finite_flag

    a = torch.tensor([3e38], dtype=torch.float32, device=device)
    assert bool(finite_flag(a, -a)) and bool(finite_flag(-a, a))
    assert not bool(finite_flag(a, a))


def test_read_scalars_two_dtypes_without_float64_exact():
    """read_scalars keeps each dtype apart: an int64 2**24 + 1 next to a float32 scalar reads exactly
    (one stack of both would promote to float32, where it rounds to 2**24)."""
    from curvature.linalg import read_scalars

    scalars = [torch.tensor(2**24 + 1), torch.tensor(0.5, dtype=torch.float32), torch.tensor(-(2**24) - 3)]
    assert read_scalars(scalars) == [16777217.0, 0.5, -16777219.0]
    assert read_scalars(scalars[::-1]) == [-16777219.0, 0.5, 16777217.0]


@pytest.mark.parametrize("with_ones", [True, False])
def test_accumulate_gram_beta_zero_ignores_nan_target(device, with_ones):
    """accumulate_gram with beta = 0 overwrites the target (a NaN-filled one included): the result is
    alpha * [X 1]^T [X 1] (or alpha * X^T X), formed densely in float64 as the oracle; with beta != 0
    it is beta * T + alpha * [X 1]^T [X 1]."""
    from curvature.linalg import accumulate_gram

    g = torch.Generator().manual_seed(3)
    X = torch.randn(7, 4, generator=g, dtype=F64).to(device)
    Xh = torch.cat([X, torch.ones(7, 1, dtype=F64, device=device)], dim=1) if with_ones else X
    n = Xh.shape[1]
    target = torch.full((n, n), float("nan"), dtype=F64, device=device)
    accumulate_gram(target, X, with_ones, alpha=0.25, beta=0.0)
    torch.testing.assert_close(target, 0.25 * (Xh.T @ Xh), rtol=1e-12, atol=1e-12)
    T0 = torch.randn(n, n, generator=g, dtype=F64).to(device)
    T0 = T0 + T0.T
    target = T0.clone()
    accumulate_gram(target, X, with_ones, alpha=0.5, beta=0.9)
    torch.testing.assert_close(target, 0.9 * T0 + 0.5 * (Xh.T @ Xh), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- gram (panels)
@given(n=st.integers(1, 12), d=st.integers(1, 11), panels=st.integers(1, 14), seed=st.integers(0, 2**16))
@hyp()
def test_gram_in_panels_is_x_transpose_x_and_exactly_symmetric(device, n, d, panels, seed):
    """Any panel count (more panels than columns included) gives XᵀX (dense float64 oracle), and the
    panel form (k > 1) is bit-symmetric; k = 1 is the plain GEMM."""
    from curvature.linalg import gram

    X = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device)
    G = gram(X, panels)
    torch.testing.assert_close(G, X.T @ X, rtol=1e-12, atol=1e-12)
    if min(panels, d) > 1:
        assert torch.equal(G, G.T)
    else:
        assert torch.equal(G, torch.mm(X.T, X))


def test_gram_panel_counts_by_size_and_device():
    from curvature.linalg import gram_panels

    cpu = torch.device("cpu")
    assert [gram_panels(512, d, cpu) for d in (191, 192, 319, 320, 1000)] == [1, 3, 3, 4, 4]
    assert [gram_panels(256, d, cpu) for d in (192, 639, 640, 1000)] == [1, 1, 4, 4]
    assert [gram_panels(n, 1000, cpu) for n in (255, 256, 511, 512)] == [1, 4, 4, 4]
    assert gram_panels(100_000, 4096, torch.device("cuda", 0)) == 1


@pytest.mark.parametrize("panels", [0, -1, 1.5, True, "2"])
def test_gram_rejects_a_panel_count_that_is_not_a_positive_integer(panels):
    from curvature.linalg import gram

    with pytest.raises(ValueError, match=rf"^panels must be an integer >= 1, got {panels!r}$"):
        gram(torch.ones(3, 2), panels)


def test_gram_default_uses_panels_on_large_cpu_inputs():
    """A 512 × 200 float64 input takes the three-panel path by default: XᵀX to rounding, bit-symmetric."""
    from curvature.linalg import gram

    X = torch.randn(512, 200, generator=torch.Generator().manual_seed(0), dtype=F64)
    G = gram(X)
    torch.testing.assert_close(G, X.T @ X, rtol=1e-12, atol=1e-10)
    assert torch.equal(G, G.T) and torch.equal(G, gram(X, 3))


@pytest.mark.parametrize("with_ones", [True, False])
def test_accumulate_gram_with_panels_matches_the_dense_update(with_ones):
    """The panel path of accumulate_gram (CPU, 512 rows, width 200): beta = 0 overwrites a NaN target,
    beta = 0.9 gives 0.9·T + α·[X 1]ᵀ[X 1]; float64 oracle."""
    from curvature.linalg import accumulate_gram

    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 200, generator=g, dtype=F64)
    Xh = torch.cat([X, torch.ones(512, 1, dtype=F64)], dim=1) if with_ones else X
    n = Xh.shape[1]
    target = torch.full((n, n), float("nan"), dtype=F64)
    accumulate_gram(target, X, with_ones, alpha=0.25, beta=0.0)
    torch.testing.assert_close(target, 0.25 * (Xh.T @ Xh), rtol=1e-12, atol=1e-10)
    assert torch.equal(target, target.T)
    T0 = torch.randn(n, n, generator=g, dtype=F64)
    T0 = T0 + T0.T
    target = T0.clone()
    accumulate_gram(target, X, with_ones, alpha=0.5, beta=0.9)
    torch.testing.assert_close(target, 0.9 * T0 + 0.5 * (Xh.T @ Xh), rtol=1e-12, atol=1e-10)


def test_sums_finite_is_elementwise_isfinite(device):
    """The finiteness test of finite_flag's total, elementwise (row sums, one sum per matrix)."""
    from curvature.linalg import sums_finite

    sums = torch.tensor([1.0, math.inf, -math.inf, math.nan, 3e38, -0.0], device=device)
    assert torch.equal(sums_finite(sums), torch.isfinite(sums))
    assert sums_finite(torch.tensor(2.0, device=device)).dim() == 0


def test_finite_flag_of_parameters_builds_no_graph(device):
    """The flag of tensors that require grad is a plain tensor: no autograd graph kept alive by the step's flags."""
    from curvature.linalg import finite_flag

    w = torch.ones(3, device=device, requires_grad=True)
    flag = finite_flag(w, 2 * w)
    assert not flag.requires_grad and flag.grad_fn is None and bool(flag)
