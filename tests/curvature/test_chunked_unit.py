"""ChunkedBlock's bookkeeping against recording stand-in blocks (mutation run of curvature/chunked.py).

The math of a chunked block (per-chunk K-FAC against a dense solve) is tested in
test_chunked_attention.py and test_grouped_conv.py; here every delegation is checked exactly: which
chunk gets which rows, records, statistics and state, and what the block declares."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from curvature.chunked import ChunkedBlock

D = torch.float64


class Recorder:
    """A stand-in chunk block of shape (rows, a_dim) that records every call it receives."""

    def __init__(self, tag, rows, a_dim, *, kind="kfac", needs_second_pass=False, quadratic=True, cached=True,
                 approx=None, lo=0.0, hi=1.0):
        self.tag, self.shape, self.kind = tag, (rows, a_dim), kind
        self.needs_a = self.needs_g = True
        self.needs_second_pass, self.has_quadratic_form, self.applies_cached_inverse = needs_second_pass, quadratic, cached
        if approx is not None:
            self.approx = approx
        self.lo, self.hi = lo, hi
        self.calls = []
        self.loaded = None

    def update_statistics(self, record, grad):
        self.calls.append(("stats", record, grad.clone()))

    def warm_start(self, a, g):
        self.calls.append(("warm", a, g))

    def request_inverses(self, inverter, policy):
        self.calls.append(("inverses",))

    def update_after_step(self, before, after):
        self.calls.append(("after", before, after))

    def curvature_quadratic(self, delta):
        return delta.sum() * {"p": 1.0, "q": 10.0}[self.tag]

    def spectrum_bounds(self):
        return self.lo, self.hi

    def state_dict(self):
        return {"tag": self.tag}

    def load_state_dict(self, state):
        self.loaded = state

    def describe(self):
        return f"K-FAC[{self.tag}]"

    def diagnostics(self):
        return {}


def _adapter(g_dim=5, a_dim=3, has_bias=True, groups=None):
    return SimpleNamespace(g_dim=g_dim, a_dim=a_dim, has_bias=has_bias, groups=groups)


def _block(split=None, label=None, adapter=None, **kw):
    adapter = adapter or _adapter()
    p = Recorder("p", 2, adapter.a_dim, **kw.get("p", {}))
    q = Recorder("q", 3, adapter.a_dim, **kw.get("q", {}))
    extra = {} if label is None else {"label": label}  # the default label is "chunk"
    block = ChunkedBlock("layer", adapter, {"p": (slice(0, 2), p), "q": (slice(2, 5), q)}, split=split, **extra)
    return block, p, q


def test_declared_capabilities_and_defaults():
    block, p, q = _block(p={"kind": "kbfgs", "approx": "reduce"})
    assert block.name == "layer" and block.label == "chunk" and block.kind == "kbfgs" and block.approx == "reduce"
    assert block.first_inverse_due is True and block.needs_second_pass is False
    assert block.has_quadratic_form is True and block.applies_cached_inverse is True
    assert block.describe() == "K-FAC[p] per chunk (p, q)"
    block, _, _ = _block(q={"needs_second_pass": True, "quadratic": False, "cached": False})
    assert block.approx == "expand"  # the first block has no approx
    assert block.needs_second_pass is True and block.has_quadratic_form is False and block.applies_cached_inverse is False
    group, _, _ = _block(label="group")
    assert group.describe() == "K-FAC[p] per group (2 groups)"


def test_rejects_no_chunks_and_a_wrong_block_shape():
    adapter = _adapter()
    with pytest.raises(ValueError, match=r"^ChunkedBlock needs at least one chunk$"):
        ChunkedBlock("layer", adapter, {})
    bad = {"p": (slice(0, 2), Recorder("p", 2, 3)), "q": (slice(2, 5), Recorder("q", 2, 3))}
    with pytest.raises(ValueError, match=r"^chunk 'q': block of shape \(2, 3\), expected \(3, 3\)$"):
        ChunkedBlock("layer", adapter, bad)


def test_records_rows_and_second_pass_are_delegated_per_chunk():
    block, p, q = _block(q={"needs_second_pass": True})
    grad = torch.arange(15, dtype=D).reshape(5, 3)
    record = SimpleNamespace(parts={"p": "rec_p", "q": "rec_q"})
    block.update_statistics(record, grad)
    assert p.calls[0][:2] == ("stats", "rec_p") and torch.equal(p.calls[0][2], grad[0:2])
    assert q.calls[0][:2] == ("stats", "rec_q") and torch.equal(q.calls[0][2], grad[2:5])
    before, after = SimpleNamespace(parts={"p": "b_p", "q": "b_q"}), SimpleNamespace(parts={"p": "a_p", "q": "a_q"})
    block.update_after_step(before, after)
    assert q.calls[-1] == ("after", "b_q", "a_q") and p.calls[-1][0] == "stats"  # p needs no second pass
    with pytest.raises(RuntimeError, match=r"^layer 'layer': its chunked block needs the per-chunk records of a "
                                           r"chunked call \(e\.g\. cross-attention\), but the layer was called as "
                                           r"one projection$"):
        block.update_statistics(SimpleNamespace(), grad)
    # a split function is used only for a record without parts
    split_block, sp, _ = _block(split=lambda rec: {"p": ("split", rec), "q": ("split", rec)})
    split_block.update_statistics("whole", grad)
    assert sp.calls[-1][1] == ("split", "whole")
    split_block.update_statistics(record, grad)
    assert sp.calls[-1][1] == "rec_p"


def test_quadratic_bounds_and_inverse_flag():
    block, p, q = _block(p={"lo": -2.0, "hi": 3.0}, q={"lo": 0.5, "hi": 7.0})
    delta = torch.ones(5, 3, dtype=D)
    assert float(block.curvature_quadratic(delta)) == 6.0 * 1.0 + 9.0 * 10.0
    assert block.spectrum_bounds() == (-2.0, 7.0)
    block.request_inverses(None, None)
    assert block.first_inverse_due is False and p.calls[-1] == ("inverses",) and q.calls[-1] == ("inverses",)


def test_state_dict_round_trip():
    block, p, q = _block()
    block.request_inverses(None, None)
    state = block.state_dict()
    assert state == {"parts": {"p": {"tag": "p"}, "q": {"tag": "q"}}, "first_inverse_due": False}
    other, p2, q2 = _block()
    assert other.first_inverse_due is True
    other.load_state_dict(state)
    assert p2.loaded == {"tag": "p"} and q2.loaded == {"tag": "q"} and other.first_inverse_due is False
    other.load_state_dict({"parts": state["parts"], "first_inverse_due": 1})
    assert other.first_inverse_due is True


@pytest.mark.parametrize("has_bias", [True, False])
def test_warm_start_takes_each_groups_columns_and_rows(has_bias):
    """Grouped layer (split given, adapter.groups set): chunk j gets A's columns j*cols..(j+1)*cols-1
    (plus the homogeneous last one with a bias) and G's rows/columns of its slice."""
    a_dim = 3 if has_bias else 2  # 2 input columns per group
    adapter = _adapter(a_dim=a_dim, has_bias=has_bias, groups=2)
    block, p, q = _block(split=lambda rec: rec, adapter=adapter)
    n_a = 4 + int(has_bias)  # two groups of 2 columns (+ the homogeneous coordinate)
    A = torch.arange(n_a * n_a, dtype=D).reshape(n_a, n_a)
    G = torch.arange(25, dtype=D).reshape(5, 5) + 100
    block.warm_start(A, G)
    idx_p = [0, 1] + ([4] if has_bias else [])
    idx_q = [2, 3] + ([4] if has_bias else [])
    assert torch.equal(p.calls[-1][1], A[idx_p][:, idx_p]) and torch.equal(p.calls[-1][2], G[0:2, 0:2])
    assert torch.equal(q.calls[-1][1], A[idx_q][:, idx_q]) and torch.equal(q.calls[-1][2], G[2:5, 2:5])
    block.warm_start(None, G)
    assert p.calls[-1][1] is None and torch.equal(p.calls[-1][2], G[0:2, 0:2])
    block.warm_start(A, None)
    assert p.calls[-1][2] is None
    # no split, or an adapter without groups (None, or no such attribute): skipped
    no_groups = SimpleNamespace(g_dim=5, a_dim=a_dim, has_bias=has_bias)
    for b in (_block(adapter=_adapter(a_dim=a_dim, has_bias=has_bias, groups=2))[0],
              _block(split=lambda rec: rec, adapter=_adapter(a_dim=a_dim, has_bias=has_bias))[0],
              _block(split=lambda rec: rec, adapter=no_groups)[0]):
        b.warm_start(A, G)
        assert all(not blk.calls for _, blk in b.parts.values())


def test_to_dense_places_each_chunk_on_its_rows_in_column_major_order():
    """Oracle: P(M) built row chunk by row chunk, vec_c(P(M)) = D vec_c(M) for the dense D."""
    class Dense(Recorder):
        def __init__(self, tag, rows, a_dim, seed):
            super().__init__(tag, rows, a_dim)
            n = rows * a_dim
            self.mat = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=D)

        def to_dense(self):
            return self.mat

    adapter = _adapter(g_dim=5, a_dim=3)
    p, q = Dense("p", 2, 3, 1), Dense("q", 3, 3, 2)
    block = ChunkedBlock("layer", adapter, {"q": (slice(2, 5), q), "p": (slice(0, 2), p)})
    M = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=D)
    vec_c = lambda X: X.T.reshape(-1)  # noqa: E731 column-major vec
    out = torch.zeros(5, 3, dtype=D)
    out[0:2] = (p.mat @ vec_c(M[0:2])).reshape(3, 2).T
    out[2:5] = (q.mat @ vec_c(M[2:5])).reshape(3, 3).T
    torch.testing.assert_close(block.to_dense() @ vec_c(M), vec_c(out), rtol=1e-12, atol=1e-12)
    one = Dense("all", 5, 3, 4)
    single = ChunkedBlock("layer", adapter, {"all": (slice(0, 5), one)})
    torch.testing.assert_close(single.to_dense(), one.mat, rtol=0, atol=0)
