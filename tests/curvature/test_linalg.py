"""curvature.linalg and curvature.inverter against float64 oracles (torch.linalg.inv / eigvalsh)."""

from __future__ import annotations

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
