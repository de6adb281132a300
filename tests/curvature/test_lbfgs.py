"""CompactLBFGS (Byrd–Nocedal–Schnabel compact form): P13 (= two-loop = dense BFGS chain) and P14 (spectrum)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvature.bfgs import bfgs_inverse_update
from curvature.lbfgs import CompactLBFGS
from tests.curvature.strategies import (
    F64,
    bfgs_inverse_oracle,
    cos_pairs,
    eig_bounds,
    f64,
    hyp,
    matrices,
    rel_err,
    to_work,
    two_loop,
    work_dtype,
)


def _draw_pairs(data, n: int, count: int, cos_range=(0.2, 1.0), norm_exp=1.0):
    return [data.draw(cos_pairs(n, cos_range, norm_exp)) for _ in range(count)]


def _fill(device, n, memory, gamma, pair_list) -> CompactLBFGS:
    lb = CompactLBFGS(n, memory, gamma, dtype=work_dtype(device), device=device)
    for s, y in pair_list:
        lb.append(to_work(s, device), to_work(y, device))
    return lb


def _dense_chain(pair_list, gamma, n):
    H = gamma * torch.eye(n, dtype=F64)
    for s, y in pair_list:
        H = bfgs_inverse_oracle(H, s, y)
    return H


def _two_loop_matrix(pair_list, gamma, V):
    """The two-loop recursion (tests/curvature/strategies.py) applied column by column."""
    return torch.stack([two_loop(pair_list, gamma, V[:, j]) for j in range(V.shape[1])], dim=1)


def _chain_tol(device, kind: str = "apply") -> float:
    """Relative tolerances, calibrated on 1500 hypothesis cases per dtype (observed maxima in brackets):
    compact vs dense, pairs with cos ≥ 0.2 and norms 10^±1: 1e-12 in float64 [5e-15] (spec: ~1e-12),
    1e-4 in float32 [2.6e-6]; spectrum (cos ≥ 0.05, norms 10^±2): 1e-11 [2.7e-13] / 2e-3 [2e-4];
    symmetry ‖D − Dᵀ‖_F/‖D‖_F: 1e-13 [1.3e-15] / 1e-5 [4.8e-7]."""
    f64_ = work_dtype(device) == F64
    return {"apply": (1e-12, 1e-4), "spectrum": (1e-11, 2e-3), "symmetry": (1e-13, 1e-5)}[kind][0 if f64_ else 1]


# ------------------------------------------------------------------------------ P13
@given(data=st.data())
@hyp()
def test_p13_compact_equals_two_loop_and_dense_chain(device, data):
    n = data.draw(st.integers(1, 8))
    p = data.draw(st.integers(1, 6))
    extra = data.draw(st.sampled_from([0, 1, 3]))  # p + 3 exercises the wrap-around
    count = data.draw(st.integers(1, p)) if extra == 0 else p + extra
    gamma = 10.0 ** data.draw(st.floats(-1.0, 1.0))
    pair_list = _draw_pairs(data, n, count)
    lb = _fill(device, n, p, gamma, pair_list)
    kept = [(f64(to_work(s, device)), f64(to_work(y, device))) for s, y in pair_list[-p:]]
    assert lb.size == len(kept) == min(count, p)
    k = data.draw(st.integers(1, 4))
    V = to_work(data.draw(matrices(n, k)), device)
    out = lb.apply(V)
    assert out.shape == (n, k) and out.dtype == V.dtype
    V64 = f64(V)
    two = _two_loop_matrix(kept, gamma, V64)
    dense = _dense_chain(kept, gamma, n)
    tol = _chain_tol(device)
    assert rel_err(two, dense @ V64) <= _chain_tol("cpu")  # the two float64 oracles agree
    assert rel_err(out, two) <= tol
    assert rel_err(out, dense @ V64) <= tol
    # the library's own dense update chain (oldest → newest) from γI agrees as well
    H = to_work(gamma * torch.eye(n, dtype=F64), device)
    for s, y in kept:
        H = bfgs_inverse_update(H, to_work(s, device), to_work(y, device))
    assert rel_err(lb.to_dense(), f64(H)) <= tol
    # a single vector
    v = V[:, 0]
    out_v = lb.apply(v)
    assert out_v.shape == (n,)
    assert rel_err(out_v, two[:, 0]) <= tol


def test_p13_wrap_around_keeps_only_last_pairs(device):
    n, p = 4, 3
    g = torch.Generator().manual_seed(5)
    M = torch.randn(n, n, generator=g, dtype=F64)
    M = M @ M.T + n * torch.eye(n, dtype=F64)
    pair_list = []
    for _ in range(p + 3):
        s = torch.randn(n, generator=g, dtype=F64)
        pair_list.append((s, M @ s + 0.1 * torch.randn(n, generator=g, dtype=F64)))
    pair_list = [(f64(to_work(s, device)), f64(to_work(y, device))) for s, y in pair_list]  # as stored
    lb = _fill(device, n, p, 1.0, pair_list)
    assert lb.size == p
    kept = pair_list[-p:]
    assert torch.equal(f64(lb.S), torch.stack([s for s, _ in kept]))
    assert torch.equal(f64(lb.Y), torch.stack([y for _, y in kept]))
    S, Y = torch.stack([s for s, _ in kept]), torch.stack([y for _, y in kept])
    rtol = 1e-12 if work_dtype(device) == F64 else 1e-5
    torch.testing.assert_close(f64(lb.SY), S @ Y.T, rtol=rtol, atol=rtol * float(S.norm() * Y.norm()))
    torch.testing.assert_close(f64(lb.YY), Y @ Y.T, rtol=rtol, atol=rtol * float(Y.norm()) ** 2)
    fresh = _fill(device, n, p, 1.0, kept)
    torch.testing.assert_close(lb.to_dense(), fresh.to_dense(), rtol=1e-12 if work_dtype(device) == F64 else 1e-5, atol=0)
    # the dropped pairs matter: using all p+3 pairs gives a different matrix
    assert rel_err(_dense_chain(pair_list, 1.0, n), f64(lb.to_dense())) > 1e-6


def test_empty_memory_is_gamma_identity(device):
    lb = CompactLBFGS(3, 5, 2.5, dtype=work_dtype(device), device=device)
    assert lb.size == 0
    V = to_work(torch.arange(6, dtype=F64).reshape(3, 2), device)
    torch.testing.assert_close(f64(lb.apply(V)), 2.5 * f64(V))
    torch.testing.assert_close(f64(lb.to_dense()), 2.5 * torch.eye(3, dtype=F64))


@given(data=st.data())
@hyp(max_examples=100)
def test_to_dense_is_symmetric(device, data):
    n = data.draw(st.integers(1, 8))
    p = data.draw(st.integers(1, 6))
    pair_list = _draw_pairs(data, n, data.draw(st.integers(1, p + 3)))
    lb = _fill(device, n, p, 1.0, pair_list)
    D = f64(lb.to_dense())
    assert float((D - D.T).norm()) <= _chain_tol(device, "symmetry") * float(D.norm())


# ------------------------------------------------------------------------------ state
def test_state_dict_round_trip(device):
    dt = work_dtype(device)
    n = 5
    g = torch.Generator().manual_seed(9)
    pair_list = []
    for _ in range(6):
        s = torch.randn(n, generator=g, dtype=F64)
        pair_list.append((s, s + 0.3 * torch.randn(n, generator=g, dtype=F64)))
    lb = _fill(device, n, 4, 0.7, pair_list[:5])
    state = lb.state_dict()
    other = CompactLBFGS(n, 10, 3.0, dtype=dt, device=device)
    other.load_state_dict(state)
    assert other.memory == 4 and other.gamma == 0.7 and other.size == 4
    assert torch.equal(other.to_dense(), lb.to_dense())
    # the state is a copy: changing lb afterwards does not touch it
    lb.append(to_work(pair_list[5][0], device), to_work(pair_list[5][1], device))
    assert state["S"].shape[0] == 4 and not torch.equal(state["S"][-1], lb.S[-1])
    other.append(to_work(pair_list[5][0], device), to_work(pair_list[5][1], device))
    assert torch.equal(other.to_dense(), lb.to_dense())  # same wrap-around after loading
    with pytest.raises(ValueError):
        CompactLBFGS(n + 1, 4, dtype=dt, device=device).load_state_dict(state)


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"memory": 0}, {"gamma": 0.0}, {"gamma": -1.0}])
def test_config_errors(kwargs):
    args = {"dim": 3, "memory": 2, "gamma": 1.0, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CompactLBFGS(args["dim"], args["memory"], args["gamma"])


# ------------------------------------------------------------------------------ P14
@given(data=st.data())
@hyp()
def test_p14_spectrum_bounds(device, data):
    """spec(H) ⊂ [1/(1/h0 + Σ‖y_j‖²/s_jᵀy_j), q^p h0 + C_s (q^p − 1)/(q − 1)], q = (1+√(C_s C_y))²."""
    n = data.draw(st.integers(1, 8))
    p = data.draw(st.integers(1, 6))
    h0 = 10.0 ** data.draw(st.floats(-1.0, 1.0))
    pair_list = _draw_pairs(data, n, data.draw(st.integers(1, p + 3)), cos_range=(0.05, 1.0), norm_exp=2.0)
    lb = _fill(device, n, p, h0, pair_list)
    kept = [(f64(to_work(s, device)), f64(to_work(y, device))) for s, y in pair_list[-p:]]
    m = len(kept)
    cy = [float(y @ y) / float(s @ y) for s, y in kept]
    cs = [float(s @ s) / float(s @ y) for s, y in kept]
    C_s, C_y = max(cs), max(cy)
    q = (1 + math.sqrt(C_s * C_y)) ** 2
    lower = 1.0 / (1.0 / h0 + sum(cy))
    upper = q**m * h0 + C_s * (q**m - 1) / (q - 1)
    lo, hi = eig_bounds(f64(lb.to_dense()))
    tau = _chain_tol(device, "spectrum")
    assert lo >= lower - tau * hi
    assert hi <= upper + tau * hi
    assert lo > 0 or lower <= tau * hi


# ------------------------------------------------------------------------------ state invariants
def _pair(k: int, n: int = 3):
    s = torch.tensor([1.0 + k, 0.5, -0.25 * k][:n], dtype=F64)
    return s, s + torch.tensor([0.25, -0.5 * k, 0.125][:n], dtype=F64)


def test_defaults_are_k_bfgs_l_s():
    """Defaults as documented for K-BFGS(L) (README, optimizers/kbfgs.py): p = 100 pairs, H0 = I."""
    lb = CompactLBFGS(3)
    assert lb.memory == 100 and lb.gamma == 1.0
    assert torch.equal(lb.to_dense(), torch.eye(3))


def test_cached_matrices_have_the_memory_dtype_and_r_is_the_upper_triangle(device):
    """SY = SᵀY (m×m), YY = YᵀY and the cached R = triu(SᵀY), in the memory's dtype and on its device,
    from the empty memory on, after appends and after the memory wraps around."""
    lb = CompactLBFGS(3, 2, dtype=F64, device=device)
    for k in range(4):
        m = lb.size
        for name in ("SY", "YY", "R"):
            t = getattr(lb, name)
            assert t.shape == (m, m) and t.dtype == F64 and t.device == lb.S.device, (k, name)
        S, Y = f64(lb.S), f64(lb.Y)
        torch.testing.assert_close(f64(lb.SY), S @ Y.T, rtol=1e-15, atol=0)
        torch.testing.assert_close(f64(lb.YY), Y @ Y.T, rtol=1e-15, atol=0)
        assert torch.equal(lb.YY, lb.YY.T)  # each off-diagonal yᵢᵀyⱼ is computed once and mirrored
        assert torch.equal(lb.R, torch.triu(lb.SY))
        lb.append(*(v.to(device) for v in _pair(k)))


def test_a_large_memory_costs_nothing_until_pairs_enter(device):
    """Nothing of size memory × memory is allocated up front (a memory of 10⁷ pairs would need 10¹⁴ entries):
    SᵀY, YᵀY and R grow with the pairs stored, and R = triu(SᵀY) at every size, also after a load into
    another dtype."""
    lb = CompactLBFGS(3, 10**7, dtype=F64, device=device)
    for k in range(5):
        lb.append(*(v.to(device) for v in _pair(k)))
        assert torch.equal(lb.R, torch.triu(lb.SY)) and lb.R.shape == (k + 1, k + 1)
    other = CompactLBFGS(3, 4, dtype=torch.float32, device=device)
    other.load_state_dict(lb.state_dict())
    assert other.R.dtype == torch.float32 and torch.equal(other.R, torch.triu(other.SY))


def test_append_converts_a_pair_to_the_memory_dtype(device):
    """float32 pairs appended to a float64 memory are stored (and used) as float64."""
    lb = CompactLBFGS(3, 4, dtype=F64, device=device)
    pairs64 = [_pair(k) for k in range(2)]
    for s, y in pairs64:
        lb.append(s.float().to(device), y.float().to(device))
    assert lb.S.dtype == F64 and lb.Y.dtype == F64
    H = torch.eye(3, dtype=F64)
    for s, y in pairs64:
        H = bfgs_inverse_oracle(H, s.float().double(), y.float().double())
    assert rel_err(lb.to_dense(), H) <= 1e-12


def test_load_state_dict_converts_copies_and_names_the_mismatch(device):
    """A state is loaded into the memory's dtype and device, as a copy (changing the state dict
    afterwards does not change the memory); a state of another dimension is rejected with both sizes."""
    src = CompactLBFGS(3, 4, dtype=torch.float32)
    for k in range(2):
        src.append(*_pair(k))
    state = src.state_dict()
    lb = CompactLBFGS(3, 4, dtype=F64, device=device)
    lb.load_state_dict(state)
    for name in ("S", "Y", "SY", "YY", "R"):
        assert getattr(lb, name).dtype == F64 and getattr(lb, name).device == lb.S.device, name
    same = CompactLBFGS(3, 4, dtype=F64, device=device)  # same dtype and device: nothing to convert
    same.load_state_dict(lb.state_dict() | {"S": lb.S, "Y": lb.Y, "SY": lb.SY, "YY": lb.YY})
    before = same.to_dense().clone()
    for key in ("S", "Y", "SY", "YY"):
        getattr(lb, key).mul_(3.0)
    assert torch.equal(same.to_dense(), before)
    state4 = CompactLBFGS(4, 2).state_dict()
    with pytest.raises(ValueError, match=r"dimension torch\.Size\(\[4\]\) does not match dim 3"):
        CompactLBFGS(3, 2).load_state_dict(state4)


def test_apply_keeps_a_vector_a_vector_with_and_without_pairs(device):
    """``apply`` of a 1-D vector returns a 1-D vector: γv with an empty memory (H₀ = γI), and the dense
    BFGS product with pairs (the oracle: the inverse BFGS recursion in float64 from H₀)."""
    dt = torch.float64
    g = torch.Generator().manual_seed(5)
    lb = CompactLBFGS(4, 3, 2.5, dtype=dt, device=device)
    v = torch.randn(4, generator=g, dtype=dt).to(device)
    out = lb.apply(v)
    assert out.shape == (4,)
    torch.testing.assert_close(out, 2.5 * v, rtol=0, atol=0)
    H = 2.5 * torch.eye(4, dtype=dt)
    for _ in range(2):
        s = torch.randn(4, generator=g, dtype=dt)
        y = s + 0.1 * torch.randn(4, generator=g, dtype=dt)  # sᵀy > 0
        lb.append(s.to(device), y.to(device))
        rho = 1.0 / float(s @ y)
        E = torch.eye(4, dtype=dt) - rho * torch.outer(s, y)
        H = E @ H @ E.T + rho * torch.outer(s, s)
    out = lb.apply(v)
    assert out.shape == (4,)
    torch.testing.assert_close(out.cpu(), H @ v.cpu(), rtol=1e-10, atol=1e-12)
