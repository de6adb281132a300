"""Kronecker identities P1–P4 (spec/theory.md §5) and KroneckerBlock against torch.kron oracles.

Orientation under test (kbfgs.md §1): the block preconditions the gradient matrix M (d_g × d_a) as
H_g M H_a, which must equal unvec_c((H_a ⊗ H_g) vec_c(M)) with column-major vec.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvature.blocks import KroneckerBlock, vec_c
from curvature.damping import FactoredPi, Tikhonov, pi_split
from curvature.factors import BFGSFactor, EMACovarianceFactor, HessianActionFactor
from curvature.inverter import BatchedInverter
from curvature.linalg import damped_inverse
from tests.curvature.strategies import (
    F64,
    assert_close_work,
    eig_bounds,
    eps_for,
    f64,
    hyp,
    matrices,
    psd,
    rel_err,
    spd,
    spread_for,
    to_work,
    work_dtype,
)

FACTOR_KINDS = ["ema", "bfgs"]


class FakeAdapter:
    """The two sizes a KroneckerBlock reads from its layer adapter."""

    def __init__(self, a_dim: int, g_dim: int) -> None:
        self.a_dim, self.g_dim = a_dim, g_dim


def unvec_c(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of column-major vec (written independently of the library)."""
    return v.reshape(cols, rows).T


def vec_c_oracle(X: torch.Tensor) -> torch.Tensor:
    return torch.cat([X[:, j] for j in range(X.shape[1])])


def make_factor(kind: str, H: torch.Tensor):
    """A factor whose inverse-curvature matrix is set directly to ``H``."""
    n = H.shape[0]
    if kind == "ema":
        f = EMACovarianceFactor(n, dtype=H.dtype, device=H.device)
        f.inverse = H
    elif kind == "action":  # secant pairs exist for the G side only; the A-side quasi-Newton factor
        f = HessianActionFactor(n, 1.0, dtype=H.dtype, device=H.device)
        f.H = H
    else:
        f = BFGSFactor(n, None, dtype=H.dtype, device=H.device)
        f.H = H
    return f


def make_block(H_a: torch.Tensor, H_g: torch.Tensor, kinds=("ema", "bfgs")) -> KroneckerBlock:
    adapter = FakeAdapter(H_a.shape[0], H_g.shape[0])
    return KroneckerBlock("layer", adapter, make_factor(kinds[0], H_a), make_factor(kinds[1], H_g))


def _kron_tol(device, *mats) -> float:
    n = 1
    kappa = 1.0
    for m in mats:
        lo, hi = eig_bounds(f64(m))
        n *= m.shape[0]
        kappa *= hi / lo
    return 100 * n * eps_for(device) * kappa


# ------------------------------------------------------------------------------------ P3
@given(data=st.data())
@hyp()
def test_p3_vec_identities(device, data):
    """(A⊗G) vec_c(X) = vec_c(G X Aᵀ) and (G⊗A) vec_r(X) = vec_r(G X Aᵀ), for general (non-symmetric) A, G."""
    da, dg = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    A, G, X = (to_work(data.draw(matrices(r, c)), device) for r, c in ((da, da), (dg, dg), (dg, da)))
    v = vec_c(X)
    assert torch.equal(f64(v), vec_c_oracle(f64(X)))
    assert torch.equal(unvec_c(v, dg, da), X)
    A64, G64, X64 = f64(A), f64(G), f64(X)
    rhs = G64 @ X64 @ A64.T
    scale = float((G64.abs() @ X64.abs() @ A64.abs().T).norm())
    tol = 100 * da * dg * eps_for(device) * scale
    lhs_c = torch.kron(A64, G64) @ f64(vec_c(X))
    assert float((lhs_c - vec_c_oracle(rhs)).norm()) <= tol
    lhs_r = torch.kron(G64, A64) @ X64.reshape(-1)  # vec_r = torch.flatten (row-major)
    assert float((lhs_r - rhs.reshape(-1)).norm()) <= tol
    # the library's vec_c of the library-side product matches as well
    assert float((f64(vec_c(G @ X @ A.T)) - lhs_c).norm()) <= tol


@pytest.mark.parametrize("kinds", [("ema", "bfgs"), ("action", "ema"), ("ema", "ema"), ("action", "bfgs")])
@given(data=st.data())
@hyp(max_examples=60)  # ×4/×2 factor-kind combinations
def test_p3_block_precondition_equals_kron_action(device, kinds, data):
    da, dg = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    sp = spread_for(device)
    H_a = to_work(data.draw(spd(da, sp / 2)), device)
    H_g = to_work(data.draw(spd(dg, sp / 2)), device)
    M = to_work(data.draw(matrices(dg, da)), device)
    block = make_block(H_a, H_g, kinds)
    assert block.shape == (dg, da)
    out = block.precondition(M)
    assert out.shape == (dg, da) and out.dtype == M.dtype
    K = torch.kron(f64(H_a), f64(H_g))
    expected = unvec_c(K @ vec_c_oracle(f64(M)), dg, da)
    scale = float((torch.kron(f64(H_a).abs(), f64(H_g).abs()) @ vec_c_oracle(f64(M)).abs()).norm())
    assert float((f64(out) - expected).norm()) <= 100 * da * dg * eps_for(device) * scale
    # also equals H_g M H_a (the reference code's orientation, kbfgs.md §1)
    torch.testing.assert_close(f64(out), f64(H_g) @ f64(M) @ f64(H_a), rtol=0, atol=100 * da * dg * eps_for(device) * scale)


def test_p3_orientation_negative_control(device):
    """The transposed convention (H_a on the left / kron(H_g, H_a) on vec_c) gives a different answer."""
    H_a = to_work(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=F64), device)
    H_g = to_work(torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0], [0.5, 0.0, 4.0]], dtype=F64), device)
    M = to_work(torch.arange(6, dtype=F64).reshape(3, 2) + 1, device)
    out = f64(make_block(H_a, H_g).precondition(M))
    right = unvec_c(torch.kron(f64(H_a), f64(H_g)) @ vec_c_oracle(f64(M)), 3, 2)
    assert_close_work(out, right, device)
    wrong = (torch.kron(f64(H_g), f64(H_a)) @ vec_c_oracle(f64(M))).reshape(2, 3).T
    assert float((out - wrong).norm()) > 1e-3


@pytest.mark.parametrize("kinds", [("ema", "bfgs"), ("action", "ema")])
@given(data=st.data())
@hyp(max_examples=60)  # ×4/×2 factor-kind combinations
def test_block_to_dense_equals_torch_kron(device, kinds, data):
    da, dg = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    sp = spread_for(device)
    H_a = to_work(data.draw(spd(da, sp / 2)), device)
    H_g = to_work(data.draw(spd(dg, sp / 2)), device)
    dense = make_block(H_a, H_g, kinds).to_dense()
    assert dense.shape == (da * dg, da * dg)
    expected = torch.kron(f64(H_a), f64(H_g))
    assert rel_err(dense, expected) <= 10 * eps_for(device)


# ------------------------------------------------------------------------------------ P1, P2
@given(data=st.data())
@hyp()
def test_p1_kron_of_inverses_is_inverse(device, data):
    """(A⊗G)(A^{-1}⊗G^{-1}) = I, via two blocks: precondition(precondition(M)) = M and to_dense products."""
    da, dg = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    sp = spread_for(device)
    A64, G64 = data.draw(spd(da, sp / 2)), data.draw(spd(dg, sp / 2))
    A, G = to_work(A64, device), to_work(G64, device)
    Ainv, Ginv = to_work(torch.linalg.inv(f64(A)), device), to_work(torch.linalg.inv(f64(G)), device)
    fwd, back = make_block(A, G), make_block(Ainv, Ginv, ("action", "ema"))
    tol = _kron_tol(device, A, G)
    prod = f64(fwd.to_dense()) @ f64(back.to_dense())
    assert float((prod - torch.eye(da * dg, dtype=F64)).norm()) <= tol * (da * dg) ** 0.5
    M = to_work(data.draw(matrices(dg, da)), device)
    assert rel_err(back.precondition(fwd.precondition(M)), f64(M)) <= tol


@given(data=st.data())
@hyp()
def test_p2_kron_spectrum_is_products_and_spectrum_bounds(device, data):
    da, dg = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    sp = spread_for(device)
    A, G = to_work(data.draw(spd(da, sp / 2)), device), to_work(data.draw(spd(dg, sp / 2)), device)
    block = make_block(A, G)
    ea, eg = torch.linalg.eigvalsh(f64(A)), torch.linalg.eigvalsh(f64(G))
    products = torch.sort(torch.outer(ea, eg).reshape(-1)).values
    eig = torch.linalg.eigvalsh(f64(block.to_dense()))
    lam_max = float(ea[-1] * eg[-1])
    tau = 100 * da * dg * eps_for(device)
    assert float((eig - products).abs().max()) <= tau * lam_max
    lo, hi = block.spectrum_bounds()
    assert abs(lo - float(products[0])) <= tau * lam_max
    assert abs(hi - float(products[-1])) <= tau * lam_max


# ------------------------------------------------------------------------------------ P4
@given(data=st.data())
@hyp()
def test_p4_spectral_formula_of_damped_kron_inverse(device, data):
    """(A⊗G + λI)^{-1} = (Q_A⊗Q_G) diag(1/(α_iβ_j + λ)) (Q_A⊗Q_G)ᵀ, against damped_inverse of the kron."""
    da, dg = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    A = to_work(data.draw(psd(da, (-1.0, 1.0))), device)
    G = to_work(data.draw(psd(dg, (-1.0, 1.0))), device)
    lam = 10.0 ** data.draw(st.floats(-2.0, 1.0))
    a, Qa = torch.linalg.eigh(f64(A))
    g, Qg = torch.linalg.eigh(f64(G))
    Q = torch.kron(Qa, Qg)
    spectral = (Q / (torch.kron(a, g) + lam)) @ Q.T
    K = torch.kron(f64(A), f64(G))
    torch.testing.assert_close(spectral, torch.linalg.inv(K + lam * torch.eye(da * dg, dtype=F64)), rtol=1e-9, atol=1e-9 / lam)
    for method in ("cholesky", "eigh"):
        got = damped_inverse(torch.kron(A, G), lam, method)
        kappa = (float(a.clamp_min(0).max() * g.clamp_min(0).max()) + lam) / lam
        assert rel_err(got, spectral) <= 200 * da * dg * eps_for(device) * kappa


@given(data=st.data())
@hyp()
def test_p4_factored_tikhonov_ordering_with_pi_split(device, data):
    """(A + λ_A I)⊗(G + λ_G I) ⪰ A⊗G + λI for λ_A, λ_G from pi_split (λ_A λ_G = λ)."""
    da, dg = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    A, G = to_work(data.draw(psd(da)), device), to_work(data.draw(psd(dg)), device)
    lam = 10.0 ** data.draw(st.floats(-4.0, 2.0))
    lam_a, lam_g = pi_split(lam, A, G)
    assert lam_a > 0 and lam_g > 0
    assert abs(lam_a * lam_g - lam) <= 1e-12 * lam
    A64, G64 = f64(A), f64(G)
    Ia, Ig = torch.eye(da, dtype=F64), torch.eye(dg, dtype=F64)
    diff = torch.kron(A64 + lam_a * Ia, G64 + lam_g * Ig) - (torch.kron(A64, G64) + lam * torch.eye(da * dg, dtype=F64))
    lo, _ = eig_bounds(diff)
    scale = (eig_bounds(A64)[1] + lam_a) * (eig_bounds(G64)[1] + lam_g)
    assert lo >= -100 * da * dg * eps_for(device) * scale  # inputs rounded to the work dtype may be slightly indefinite


@pytest.mark.parametrize("policy", [FactoredPi(0.3), Tikhonov(0.3)])
@given(data=st.data())
@hyp(max_examples=50)
def test_kfac_block_inverse_and_damped_bound(device, policy, data):
    """A KFAC block (two EMA factors) inverted through BatchedInverter: to_dense = ((A+λ_A I)⊗(G+λ_G I))^{-1},
    and with the factored split its largest eigenvalue is ≤ 1/λ (theory.md E4)."""
    da, dg = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    A, G = to_work(data.draw(psd(da)), device), to_work(data.draw(psd(dg)), device)
    dt = work_dtype(device)
    fa = EMACovarianceFactor(da, dtype=dt, device=device)
    fg = EMACovarianceFactor(dg, dtype=dt, device=device)
    fa.observe(A)
    fg.observe(G)
    block = KroneckerBlock("l", FakeAdapter(da, dg), fa, fg)
    assert block.has_quadratic_form
    inverter = BatchedInverter()
    block.request_inverses(inverter, policy)
    assert inverter.run() == 2
    lam_a, lam_g = policy.factor_damping(A, G)
    A64, G64 = f64(A), f64(G)
    expected = torch.linalg.inv(torch.kron(A64 + lam_a * torch.eye(da, dtype=F64), G64 + lam_g * torch.eye(dg, dtype=F64)))
    kappa = (eig_bounds(A64)[1] + lam_a) / lam_a * (eig_bounds(G64)[1] + lam_g) / lam_g
    assert rel_err(block.to_dense(), expected) <= 200 * da * dg * eps_for(device) * kappa
    _, hi = eig_bounds(f64(block.to_dense()))
    assert hi <= (1 + 100 * da * dg * eps_for(device) * kappa) / policy.damping
    # the quadratic model vec_c(δ)ᵀ (A⊗G) vec_c(δ)
    delta = to_work(data.draw(matrices(dg, da)), device)
    q = float(block.curvature_quadratic(delta))
    v = vec_c_oracle(f64(delta))
    q_exp = float(v @ torch.kron(A64, G64) @ v)
    scale = float(v.abs() @ torch.kron(A64.abs(), G64.abs()) @ v.abs())
    assert abs(q - q_exp) <= 100 * da * dg * eps_for(device) * scale


def test_block_rejects_mismatched_factor_sizes(device):
    dt = work_dtype(device)
    with pytest.raises(ValueError, match="do not match"):
        KroneckerBlock("l", FakeAdapter(3, 2), EMACovarianceFactor(2, dtype=dt), EMACovarianceFactor(2, dtype=dt))


def test_block_state_dict_round_trip(device):
    dt = work_dtype(device)
    H_a = to_work(torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64), device)
    H_g = to_work(torch.tensor([[3.0]], dtype=F64), device)
    block = make_block(H_a, H_g)
    state = block.state_dict()
    other = KroneckerBlock("l", FakeAdapter(2, 1), EMACovarianceFactor(2, dtype=dt, device=device),
                           BFGSFactor(1, None, dtype=dt, device=device))
    other.load_state_dict(state)
    assert torch.equal(other.to_dense(), block.to_dense())
