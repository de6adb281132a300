"""The bookkeeping of curvature/blocks.py against recording stand-in factors and hand values
(mutation run of curvature/blocks.py, issue 17).

The math of the blocks against float64 oracles is in test_blocks.py and test_kronecker.py; here every
delegation, declared capability, error message and small formula is checked exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from curvature.blocks import (
    CurvatureBlock,
    DiagonalBlock,
    KroneckerBlock,
    a_rows_and_scale,
    a_statistic,
    chain_finishers,
    check_approx,
    g_rows_and_scale,
    g_statistic,
    revert_state,
    vec_c,
)
from curvature.capture import LayerRecord

D = torch.float64


class Factor:
    """A stand-in factor: ``H`` a fixed dense matrix; records every call; capabilities set per test."""

    def __init__(self, H, **caps):
        self.H = H
        self.dim = H.shape[0]
        self.calls = []
        self.loaded = None
        for k, v in caps.items():
            setattr(self, k, v)

    def request_inverse(self, inverter, damping):
        self.calls.append(("inverse", inverter, damping))

    def apply(self, V):
        return self.H @ V

    def to_dense(self):
        return self.H

    def state_dict(self):
        return {"H": self.H}

    def load_state_dict(self, state):
        self.loaded = state

    def observe_gram(self, rows, bias, scale):
        self.calls.append(("gram", rows, bias, scale))

    def observe_gradient(self, g):
        self.calls.append(("gradient", g))

    def set_statistic(self, s):
        self.calls.append(("set", s))


def _adapter(a_dim, g_dim, **kw):
    return SimpleNamespace(a_dim=a_dim, g_dim=g_dim, **kw)


def _block(a, g, **kw):
    return KroneckerBlock("l", _adapter(a.dim, g.dim), a, g, **kw)


def _eye(n):
    return torch.eye(n, dtype=D)


def test_exact_error_messages():
    with pytest.raises(ValueError, match=r"^approx must be 'expand' or 'reduce', got 'x'$"):
        check_approx("x")
    assert check_approx("reduce") == "reduce" and check_approx("expand") == "expand"
    a, g = Factor(_eye(2)), Factor(_eye(3))
    with pytest.raises(ValueError, match=r"^layer 'l': KFAC-reduce averages one-hot inputs into dense rows; use "
                                         r"approx='expand' for embeddings$"):
        KroneckerBlock("l", _adapter(2, 3, one_hot_input=True), a, g, approx="reduce")
    KroneckerBlock("l", _adapter(2, 3, one_hot_input=True), a, g, approx="expand")  # allowed
    KroneckerBlock("l", _adapter(2, 3), a, g, approx="reduce")  # no one_hot_input attribute: allowed

    class NotAFactor:
        dim = 2

        def apply(self, V):
            return V

    with pytest.raises(TypeError, match=r"^a_factor \(NotAFactor\) is not a factor: it lacks \['request_inverse', "
                                        r"'to_dense', 'state_dict', 'load_state_dict'\] \(see "
                                        r"curvature.protocols.FactorProtocol\)$"):
        KroneckerBlock("l", _adapter(2, 3), NotAFactor(), g)
    with pytest.raises(TypeError, match=r"^g_factor \(NotAFactor\) is not a factor"):
        KroneckerBlock("l", _adapter(2, 2), a, NotAFactor())
    with pytest.raises(ValueError, match=r"^factor sizes \(2, 3\) do not match layer 'l' \(a_dim=2, g_dim=4\)$"):
        KroneckerBlock("l", _adapter(2, 4), a, g)
    with pytest.raises(ValueError, match=r"^factor sizes \(2, 3\) do not match layer 'l' \(a_dim=5, g_dim=3\)$"):
        KroneckerBlock("l", _adapter(5, 3), a, g)
    with pytest.raises(ValueError, match=r"^Factor uses secant pairs, which exist for the G side only; pass it as "
                                         r"g_factor$"):
        _block(Factor(_eye(2), uses_secant_pairs=True), g)
    with pytest.raises(ValueError, match=r"^Factor uses a matrix-action update on the mean input, which exists for "
                                         r"the A side only; pass it as a_factor$"):
        _block(a, Factor(_eye(3), uses_matrix_action=True))


@pytest.mark.parametrize("a_caps,g_caps,expected", [
    ({}, {}, (False, False, False, False, False)),
    ({"uses_statistics": True}, {}, (True, False, False, False, False)),
    ({"uses_matrix_action": True}, {}, (True, False, True, False, False)),
    ({}, {"uses_statistics": True}, (False, True, False, False, False)),
    ({}, {"uses_secant_pairs": True}, (False, False, True, False, False)),
    ({"has_quadratic_form": True}, {}, (False, False, False, False, False)),
    ({}, {"has_quadratic_form": True}, (False, False, False, False, False)),
    ({"has_quadratic_form": True}, {"has_quadratic_form": True}, (False, False, False, True, False)),
    ({"applies_cached_inverse": True}, {}, (False, False, False, False, False)),
    ({}, {"applies_cached_inverse": True}, (False, False, False, False, False)),
    ({"applies_cached_inverse": True}, {"applies_cached_inverse": True}, (False, False, False, False, True)),
])
def test_declared_capabilities(a_caps, g_caps, expected):
    b = _block(Factor(_eye(2), **a_caps), Factor(_eye(3), **g_caps), kind="kk")
    got = (b.needs_a, b.needs_g, b.needs_second_pass, b.has_quadratic_form, b.applies_cached_inverse)
    assert got == expected
    assert all(type(v) is bool for v in got)
    assert b.kind == "kk" and b.approx == "expand" and b.name == "l" and b.shape == (3, 2)
    assert b.describe() == "kk-expand[A: Factor, G: Factor]"
    assert _block(Factor(_eye(2)), Factor(_eye(3))).describe() == "kronecker-expand[A: Factor, G: Factor]"


def _record():
    rec = LayerRecord(batch_size=2)
    rec.input_rows = torch.tensor([[1.0, 2.0], [3.0, 5.0], [7.0, 11.0], [13.0, 17.0]], dtype=D)
    rec.has_bias = True
    rec.grad_rows = torch.tensor([[1.0, -1.0, 2.0], [0.5, 3.0, -2.0], [4.0, 1.0, 1.0], [2.0, 2.0, -1.0]], dtype=D)
    rec.grad_scale = 2.0
    rec.reduce_scale = 3.0
    rec.rows_per_sample = 2
    return rec


def test_rows_and_scales_by_hand():
    rec = _record()
    rows, scale = a_rows_and_scale(rec)
    assert rows is rec.input_rows and scale == 0.5  # 1/N, N = 2
    rows, scale = a_rows_and_scale(rec, "reduce")  # groups = 2: rows (0, 1) and (2, 3)
    torch.testing.assert_close(rows, torch.tensor([[2.0, 3.5], [10.0, 14.0]], dtype=D))
    assert scale == 0.5
    rows, scale = g_rows_and_scale(rec)
    assert rows is rec.grad_rows and scale == 1.0  # s² / R = 4 / 4
    rows, scale = g_rows_and_scale(rec, "reduce")
    torch.testing.assert_close(rows, torch.tensor([[1.5, 2.0, 0.0], [6.0, 3.0, 0.0]], dtype=D))
    assert scale == 4.5  # 3² / 2
    rec.groups = 4
    assert a_rows_and_scale(rec, "reduce")[1] == 0.25 and g_rows_and_scale(rec, "reduce")[1] == 9.0 / 4
    with pytest.raises(ValueError, match="approx must be"):
        a_rows_and_scale(rec, "bad")
    with pytest.raises(ValueError, match="approx must be"):
        g_rows_and_scale(rec, "bad")
    empty = LayerRecord(batch_size=1)
    for fn, what in ((a_rows_and_scale, "a"), (g_rows_and_scale, "g")):
        with pytest.raises(RuntimeError, match=rf"^no captured '{what}' rows for this layer: run forward and backward "
                                               r"\(or pass a closure\) before step\(\), with gradients enabled$"):
            fn(empty)


def test_statistics_by_hand():
    rec = _record()
    abar = torch.cat([rec.input_rows, torch.ones(4, 1, dtype=D)], 1)
    A = a_statistic(rec)
    torch.testing.assert_close(A, sum(torch.outer(r, r) for r in abar) * 0.5)
    rec.has_bias = False
    torch.testing.assert_close(a_statistic(rec), sum(torch.outer(r, r) for r in rec.input_rows) * 0.5)
    g = rec.grad_rows
    torch.testing.assert_close(g_statistic(rec), sum(torch.outer(r, r) for r in g) * 1.0)
    hat = torch.tensor([[1.5, 2.0, 0.0], [6.0, 3.0, 0.0]], dtype=D)
    torch.testing.assert_close(g_statistic(rec, "reduce"), sum(torch.outer(r, r) for r in hat) * 4.5)
    # one-hot input given as indices: the diagonal counts, scaled by 1/N
    idx = LayerRecord(batch_size=4)
    idx.input_rows = torch.tensor([[0], [2], [2], [1]])
    torch.testing.assert_close(a_statistic(idx), torch.tensor([0.25, 0.25, 0.5], dtype=D))
    torch.testing.assert_close(a_statistic(idx, _adapter(5, 1)), torch.tensor([0.25, 0.25, 0.5, 0.0, 0.0], dtype=D))
    assert a_statistic(idx).dtype == D


def test_vec_c_and_chain_finishers():
    m = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert vec_c(m).tolist() == [1, 4, 2, 5, 3, 6]
    got = []
    finish = chain_finishers([(2, lambda v: got.append(("p", v))), (0, lambda v: got.append(("q", v))),
                              (3, lambda v: got.append(("r", v)))])
    assert finish([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert got == [("p", [1.0, 2.0]), ("q", []), ("r", [3.0, 4.0, 5.0])]


def test_revert_state_prefers_the_method():
    class WithRevert:
        def revert_state(self):
            return {"revert": 1}

        def state_dict(self):
            return {"state": 1}

    assert revert_state(WithRevert()) == {"revert": 1}
    plain = Factor(_eye(1))
    assert revert_state(plain)["H"] is plain.H
    a, g = Factor(_eye(2)), Factor(_eye(3))
    a.revert_state = lambda: {"r": "a"}
    b = _block(a, g)
    rs = b.revert_state()
    assert set(rs) == {"a", "g"} and rs["a"] == {"r": "a"} and rs["g"]["H"] is g.H
    sd = b.state_dict()
    assert set(sd) == {"a", "g"} and sd["a"]["H"] is b.a_factor.H and sd["g"]["H"] is b.g_factor.H
    b.load_state_dict({"a": "A", "g": "G"})
    assert b.a_factor.loaded == "A" and b.g_factor.loaded == "G"


def test_update_statistics_dispatch():
    rec = _record()
    grad = torch.arange(6, dtype=D).reshape(3, 2)
    a = Factor(_eye(2), uses_statistics=True, uses_gradient=True)
    g = Factor(_eye(3), uses_statistics=True, uses_gradient=True)
    b = _block(a, g, approx="reduce")
    b.update_statistics(rec, grad)
    (_, rows, bias, scale), (_, gt) = a.calls
    torch.testing.assert_close(rows, torch.tensor([[2.0, 3.5], [10.0, 14.0]], dtype=D))
    assert bias is True and scale == 0.5
    torch.testing.assert_close(gt, grad.T)
    (_, rows, bias, scale), (_, gg) = g.calls
    torch.testing.assert_close(rows, torch.tensor([[1.5, 2.0, 0.0], [6.0, 3.0, 0.0]], dtype=D))
    assert bias is False and scale == 4.5
    torch.testing.assert_close(gg, grad)
    quiet_a, quiet_g = Factor(_eye(2)), Factor(_eye(3))
    _block(quiet_a, quiet_g).update_statistics(LayerRecord(batch_size=1), grad)  # no rows needed, nothing called
    assert quiet_a.calls == [] and quiet_g.calls == []


def test_warm_start_dispatch():
    a, g = Factor(_eye(2), uses_statistics=True), Factor(_eye(3), uses_statistics=True)
    b = _block(a, g)
    b.warm_start("A", "G")
    assert a.calls == [("set", "A")] and g.calls == [("set", "G")]
    b.warm_start(None, None)
    assert len(a.calls) == 1 and len(g.calls) == 1
    qa, qg = Factor(_eye(2)), Factor(_eye(3))
    _block(qa, qg).warm_start("A", "G")
    assert qa.calls == [] and qg.calls == []


def test_request_inverses_passes_each_side_its_damping():
    a, g = Factor(_eye(2), statistic="SA"), Factor(_eye(3))
    seen = []
    policy = SimpleNamespace(factor_damping=lambda sa, sg: seen.append((sa, sg)) or (0.25, 4.0))
    _block(a, g).request_inverses("inv", policy)
    assert seen == [("SA", None)]
    assert a.calls == [("inverse", "inv", 0.25)] and g.calls == [("inverse", "inv", 4.0)]


def test_precondition_is_hg_m_ha():
    Ha = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=D)
    Hg = torch.tensor([[1.0, 0.5, 0.0], [0.5, 2.0, 1.0], [0.0, 1.0, 4.0]], dtype=D)
    M = torch.tensor([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0]], dtype=D)
    b = _block(Factor(Ha), Factor(Hg))
    torch.testing.assert_close(b.precondition(M), Hg @ M @ Ha)
    torch.testing.assert_close(b.to_dense(), torch.kron(Ha, Hg))
    # (Ha ⊗ Hg) vec_c(M) = vec_c(Hg M Ha)
    torch.testing.assert_close(b.to_dense() @ vec_c(M), vec_c(b.precondition(M)))


def test_curvature_quadratic_and_its_absence():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=D)
    G = torch.tensor([[1.0, 0.5, 0.0], [0.5, 2.0, 1.0], [0.0, 1.0, 4.0]], dtype=D)
    d = torch.tensor([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0]], dtype=D)
    b = _block(Factor(_eye(2), has_quadratic_form=True, statistic=A), Factor(_eye(3), has_quadratic_form=True, statistic=G))
    v = vec_c(d)
    torch.testing.assert_close(b.curvature_quadratic(d), v @ torch.kron(A, G) @ v)
    with pytest.raises(NotImplementedError, match=r"^KroneckerBlock has no quadratic model$"):
        _block(Factor(_eye(2), has_quadratic_form=True, statistic=A), Factor(_eye(3), statistic=G)).curvature_quadratic(d)


def test_spectrum_bounds_are_the_extreme_products():
    a = Factor(_eye(2), eigenvalue_bounds=lambda: (-2.0, 3.0))
    g = Factor(_eye(3), eigenvalue_bounds=lambda: (-5.0, 0.5))
    assert _block(a, g).spectrum_bounds() == (-15.0, 10.0)  # 3·-5, -2·-5
    a2 = Factor(_eye(2), eigenvalue_bounds=lambda: (1.0, 2.0))
    assert _block(a2, g).spectrum_bounds() == (-10.0, 1.0)
    g2 = Factor(torch.diag(torch.tensor([0.5, 4.0, 2.0], dtype=D)))  # no eigenvalue_bounds: from to_dense
    lo, hi = _block(a2, g2).spectrum_bounds()
    assert lo == pytest.approx(0.5) and hi == pytest.approx(8.0)


def test_diagnostics_are_prefixed_per_side():
    a = Factor(_eye(2), diagnostics=lambda: {"x": 1, "y": 2})
    g = Factor(_eye(3), diagnostics=lambda: {"x": 3})
    assert _block(a, g).diagnostics() == {"a_x": 1, "a_y": 2, "g_x": 3}
    assert _block(Factor(_eye(2)), g).diagnostics() == {"g_x": 3}


class SecantFactor(Factor):
    def observe_pair(self, s, y, reference_norm):
        self.calls.append(("pair", s, y, reference_norm))

    def hessian_action_update(self, m):
        self.calls.append(("action", m))


def _second_pass_records():
    before, after = LayerRecord(batch_size=2), LayerRecord(batch_size=2)
    before.input_rows = torch.tensor([[1.0, 3.0], [3.0, 5.0]], dtype=D)
    before.has_bias = True
    before.h_rows = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], dtype=D)
    after.h_rows = torch.tensor([[2.0, 2.0, 5.0], [4.0, 6.0, 5.0]], dtype=D)
    before.grad_rows = torch.tensor([[3.0, 0.0, 4.0], [3.0, 0.0, 4.0]], dtype=D)
    after.grad_rows = torch.tensor([[4.0, 1.0, 4.0], [6.0, 1.0, 6.0]], dtype=D)
    for r in (before, after):
        r.grad_scale = 1.0
    return before, after


def test_second_pass_without_split_factors():
    before, after = _second_pass_records()
    a = SecantFactor(_eye(3), uses_matrix_action=True)
    g = SecantFactor(_eye(3), uses_secant_pairs=True)
    b = KroneckerBlock("l", _adapter(3, 3), a, g)
    scalars, finish = b.prepare_after_step(before, after)
    assert scalars == [] and a.calls == [] and g.calls == []
    finish([])
    (_, s, y, r), = g.calls
    torch.testing.assert_close(s, torch.tensor([1.0, 1.0, 1.0], dtype=D))  # mean h after − before
    torch.testing.assert_close(y, torch.tensor([2.0, 1.0, 1.0], dtype=D))  # mean g after − before
    torch.testing.assert_close(r, torch.tensor(5.0, dtype=D))  # |mean g before| = |(3, 0, 4)|
    (_, m), = a.calls
    torch.testing.assert_close(m, torch.tensor([2.0, 4.0, 1.0], dtype=D))  # mean input with the 1
    b.update_after_step(before, after)
    assert len(g.calls) == 2 and len(a.calls) == 2


def test_second_pass_with_split_factors_reads_in_order():
    before, after = _second_pass_records()
    log = []

    class SplitG(SecantFactor):
        def prepare_pair(self, s, y, reference_norm):
            log.append(("g-prepare", s.tolist(), y.tolist(), float(reference_norm)))
            return [torch.tensor(7.0), torch.tensor(8.0)], lambda v: log.append(("g-finish", v))

    class SplitA(SecantFactor):
        def prepare_action_update(self, m):
            log.append(("a-prepare", m.tolist()))
            return [torch.tensor(9.0)], lambda v: log.append(("a-finish", v))

    b = KroneckerBlock("l", _adapter(3, 3), SplitA(_eye(3), uses_matrix_action=True),
                       SplitG(_eye(3), uses_secant_pairs=True))
    scalars, finish = b.prepare_after_step(before, after)
    assert [float(x) for x in scalars] == [7.0, 8.0, 9.0]
    assert log == [("g-prepare", [1.0, 1.0, 1.0], [2.0, 1.0, 1.0], 5.0), ("a-prepare", [2.0, 4.0, 1.0])]
    finish([7.0, 8.0, 9.0])
    assert log[2:] == [("g-finish", [7.0, 8.0]), ("a-finish", [9.0])]
    log.clear()
    b.update_after_step(before, after)
    assert log[2:] == [("g-finish", [7.0, 8.0]), ("a-finish", [9.0])]


@pytest.mark.parametrize("drop,what", [("grad_rows@before", "g"), ("grad_rows@after", "g"), ("h_rows@after", "h"),
                                       ("h_rows@before", "h")])
def test_second_pass_requires_the_rows(drop, what):
    before, after = _second_pass_records()
    attr, which = drop.split("@")
    setattr(before if which == "before" else after, attr, None)
    b = KroneckerBlock("l", _adapter(3, 3), Factor(_eye(3)), SecantFactor(_eye(3), uses_secant_pairs=True))
    with pytest.raises(RuntimeError, match=rf"^no captured '{what}' rows"):
        b.prepare_after_step(before, after)


def test_second_pass_action_requires_input_rows():
    before, after = _second_pass_records()
    before.input_rows = None
    b = KroneckerBlock("l", _adapter(3, 3), SecantFactor(_eye(3), uses_matrix_action=True), Factor(_eye(3)))
    with pytest.raises(RuntimeError, match=r"^no captured 'a' rows"):
        b.prepare_after_step(before, after)


def test_base_block_defaults():
    blk = CurvatureBlock("n", _adapter(4, 3))
    assert blk.shape == (3, 4) and blk.name == "n" and blk.describe() == "CurvatureBlock"
    assert (blk.needs_a, blk.needs_g, blk.needs_second_pass, blk.has_quadratic_form, blk.applies_cached_inverse) == (
        False, False, False, False, False)
    assert blk.kind is None and blk.diagnostics() == {}
    assert blk.update_statistics(None, None) is None and blk.warm_start(None, None) is None
    assert blk.request_inverses(None, None) is None and blk.update_after_step(None, None) is None
    with pytest.raises(NotImplementedError, match=r"^CurvatureBlock has no quadratic model$"):
        blk.curvature_quadratic(None)
    for call in (lambda: blk.precondition(None), blk.to_dense, blk.spectrum_bounds, blk.state_dict,
                 lambda: blk.load_state_dict({})):
        with pytest.raises(NotImplementedError):
            call()

    class Named(CurvatureBlock):
        kind = "named"

    assert Named("n", _adapter(1, 1)).describe() == "named"


def test_diagonal_block_errors_and_defaults():
    ad = _adapter(2, 3)
    with pytest.raises(ValueError, match=r"^source must be 'empirical_fisher' or 'gradient', got 'x'$"):
        DiagonalBlock("d", ad, source="x")
    with pytest.raises(ValueError, match=r"^decay must be in \[0, 1\), got 1.0$"):
        DiagonalBlock("d", ad, decay=1.0)
    with pytest.raises(ValueError, match=r"^decay must be in \[0, 1\), got -0.5$"):
        DiagonalBlock("d", ad, decay=-0.5)
    DiagonalBlock("d", ad, decay=0.0)
    with pytest.raises(ValueError, match=r"^power must be > 0, got 0$"):
        DiagonalBlock("d", ad, power=0)
    b = DiagonalBlock("d", ad)
    assert (b.decay, b.power, b.source, b.needs_a, b.needs_g, b.initialized, b.scale) == (
        0.9, 1.0, "empirical_fisher", True, True, False, None)
    assert b.v.dtype == torch.float32 and b.v.shape == (3, 2) and b.v.abs().sum() == 0
    assert b.has_quadratic_form and b.applies_cached_inverse and b.kind == "diagonal"
    assert b.describe() == "diagonal[empirical_fisher, power=1.0]"
    gb = DiagonalBlock("d", ad, source="gradient", power=0.5, dtype=D)
    assert (gb.needs_a, gb.needs_g, gb.v.dtype) == (False, False, D)
    assert gb.describe() == "diagonal[gradient, power=0.5]"
    for call, msg in ((lambda: b.precondition(torch.ones(3, 2)),
                       r"^DiagonalBlock.precondition called before its damped inverse was computed$"),
                      (b.to_dense, r"^DiagonalBlock has no damped inverse yet$"),
                      (b.spectrum_bounds, r"^DiagonalBlock has no damped inverse yet$")):
        with pytest.raises(RuntimeError, match=msg):
            call()


def test_diagonal_block_ema_inverse_and_state_by_hand():
    b = DiagonalBlock("d", _adapter(2, 1), decay=0.75, power=0.5, source="gradient", dtype=D)
    b.update_statistics(None, torch.tensor([[1.0, 2.0]], dtype=D))  # first: v = g²
    assert b.v.tolist() == [[1.0, 4.0]] and b.initialized is True
    b.fold_statistic(torch.tensor([[5.0, 8.0]]))  # float32 in, cast to v's dtype
    assert b.v.tolist() == [[0.75 + 1.25, 3.0 + 2.0]] and b.v.dtype == D  # 0.75 v + 0.25 stat
    b.request_inverses(None, SimpleNamespace(damping=2.0))
    assert b.scale.tolist() == [[0.5, 1.0 / 7 ** 0.5]]  # (v + 2)^-1/2 = (4, 7)^-1/2
    assert b.precondition(torch.tensor([[2.0, 7.0]], dtype=D)).tolist() == [[1.0, 7.0 / 7 ** 0.5]]
    assert b.spectrum_bounds() == (1.0 / 7 ** 0.5, 0.5)
    assert b.curvature_quadratic(torch.tensor([[1.0, 2.0]], dtype=D)).item() == 2.0 + 5.0 * 4
    b2 = DiagonalBlock("d", _adapter(2, 2), source="gradient", dtype=D)
    b2.v = torch.tensor([[0.0, 1.0], [3.0, 7.0]], dtype=D)
    b2.initialized = True
    b2.request_inverses(None, SimpleNamespace(damping=1.0))
    torch.testing.assert_close(b2.to_dense(), torch.diag(torch.tensor([1.0, 0.25, 0.5, 0.125], dtype=D)))
    state = b.state_dict()
    assert state["initialized"] is True and state["v"] is not b.v and state["scale"] is not b.scale
    torch.testing.assert_close(state["v"], b.v)
    torch.testing.assert_close(state["scale"], b.scale)
    fresh = DiagonalBlock("d", _adapter(2, 1), source="gradient", dtype=D)
    fresh.load_state_dict(state)
    assert fresh.v is not state["v"] and fresh.scale is not state["scale"] and fresh.initialized is True
    torch.testing.assert_close(fresh.v, b.v)
    torch.testing.assert_close(fresh.scale, b.scale)
    empty = DiagonalBlock("d", _adapter(2, 1), dtype=D).state_dict()
    assert empty["scale"] is None and empty["initialized"] is False
    fresh.load_state_dict(empty)
    assert fresh.scale is None and fresh.initialized is False
    f32 = DiagonalBlock("d", _adapter(2, 1))
    f32.load_state_dict(state)  # cast to the block's dtype
    assert f32.v.dtype == torch.float32 and f32.scale.dtype == torch.float32


def test_diagonal_empirical_fisher_statistic_by_hand():
    b = DiagonalBlock("d", _adapter(2, 1), dtype=D)
    rec = LayerRecord(batch_size=2, a_rows=torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=D),
                      g_rows=torch.tensor([[2.0], [1.0]], dtype=D))
    # per-sample gradients g_i a_iᵀ: (2, 4), (3, 1); mean of squares: (13/2, 17/2)
    assert b.batch_statistic(rec, None).tolist() == [[6.5, 8.5]]
    rec2 = LayerRecord(batch_size=1, rows_per_sample=2, a_rows=torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=D),
                       g_rows=torch.tensor([[2.0], [1.0]], dtype=D))
    # one sample of two rows: gradient (2·1 + 1·3, 2·2 + 1·1) = (5, 5), squared (25, 25)
    assert b.batch_statistic(rec2, None).tolist() == [[25.0, 25.0]]
    rec2.sample_major = False
    with pytest.raises(RuntimeError, match=r"^layer 'd': the exact empirical-Fisher diagonal needs each sample's "
                                           r"rows together, but this Linear-like layer was called several times in "
                                           r"one forward; use diagonal_block\(source='gradient'\)$"):
        b.batch_statistic(rec2, None)
    rec.sample_major = False  # one row per sample: the order does not matter
    assert b.batch_statistic(rec, None).tolist() == [[6.5, 8.5]]
    with pytest.raises(RuntimeError, match=r"^no captured 'a' rows"):
        b.batch_statistic(LayerRecord(batch_size=1, g_rows=torch.ones(1, 1)), None)
    with pytest.raises(RuntimeError, match=r"^no captured 'g' rows"):
        b.batch_statistic(LayerRecord(batch_size=1, a_rows=torch.ones(1, 2)), None)


def test_second_pass_expand_means_are_over_rows_not_groups():
    """expand: the means are over rows, whatever the weight-sharing groups (here of unequal sizes)."""
    before, after = _second_pass_records()
    before.input_rows = None
    before.h_rows = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [3.0, 4.0, 5.0]], dtype=D)
    before.grad_rows = torch.tensor([[3.0, 0.0, 4.0], [3.0, 0.0, 4.0], [3.0, 0.0, 4.0]], dtype=D)
    after.h_rows = torch.tensor([[2.0, 2.0, 5.0], [4.0, 6.0, 5.0], [4.0, 6.0, 5.0]], dtype=D)
    after.grad_rows = torch.tensor([[4.0, 1.0, 4.0], [6.0, 1.0, 6.0], [5.0, 1.0, 5.0]], dtype=D)
    for r in (before, after):  # groups of 1 and 2 rows: group means of h differ from the row means
        r.groups, r.group_rows = 2, [(1, 1), (1, 2)]
    g = SecantFactor(_eye(3), uses_secant_pairs=True)
    KroneckerBlock("l", _adapter(3, 3), Factor(_eye(3)), g).update_after_step(before, after)
    (_, s, y, r), = g.calls
    torch.testing.assert_close(s, torch.tensor([1.0, 4.0 / 3, 2.0 / 3], dtype=D))  # (10/3, 14/3, 5) − (7/3, 10/3, 13/3)
    torch.testing.assert_close(y, torch.tensor([2.0, 1.0, 1.0], dtype=D))  # (5, 1, 5) − (3, 0, 4)
    torch.testing.assert_close(r, torch.tensor(5.0, dtype=D))
    a = SecantFactor(_eye(3), uses_matrix_action=True)
    before.input_rows = torch.tensor([[1.0, 3.0], [3.0, 5.0], [3.0, 5.0]], dtype=D)  # group means (1, 3), (3, 5)
    KroneckerBlock("l", _adapter(3, 3), a, Factor(_eye(3))).update_after_step(before, after)
    (_, m), = a.calls
    torch.testing.assert_close(m, torch.tensor([7.0 / 3, 13.0 / 3, 1.0], dtype=D))  # the row mean, not (2, 4, 1)
