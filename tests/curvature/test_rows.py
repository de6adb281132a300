"""Vectors of several lengths as padded rows (curvature.rows): against the same work vector by vector."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from curvature.rows import column, padded, row_dot, split_rows, unpadded
from tests.curvature.strategies import F64, hyp
from tests.curvature.test_update_batch import _CountOps

lengths = st.lists(st.integers(1, 9), min_size=1, max_size=6)


def _vectors(lens, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=F64).to(device) for n in lens]


@given(lens=lengths, seed=st.integers(0, 2**16))
@hyp()
def test_padded_rows_hold_each_vector_then_zeros(device, lens, seed):
    vs = _vectors(lens, device, seed)
    P = padded(vs)
    assert P.shape == (len(vs), max(lens)) and P.device.type == device.type
    for row, v in zip(P, vs):
        assert torch.equal(row[:v.shape[0]], v)
        assert torch.equal(row[v.shape[0]:], torch.zeros_like(row[v.shape[0]:]))


@given(lens=lengths, seed=st.integers(0, 2**16))
@hyp()
def test_row_dot_is_each_pairs_inner_product(device, lens, seed):
    a, b = _vectors(lens, device, seed), _vectors(lens, device, seed + 1)
    got = row_dot(padded(a), padded(b))
    expected = torch.stack([torch.dot(x, y) for x, y in zip(a, b)])
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    assert row_dot(a[0], b[0]).dim() == 0  # a 1-D pair gives a 0-dim tensor


@given(lens=lengths, seed=st.integers(0, 2**16))
@hyp()
def test_split_rows_returns_the_real_parts_in_order(device, lens, seed):
    vs = _vectors(lens, device, seed)
    parts = split_rows(padded(vs), lens)
    assert len(parts) == len(vs)
    for part, v in zip(parts, vs):
        assert torch.equal(part, v)
    assert torch.equal(unpadded(padded(vs), lens), torch.cat(vs))


def test_unpadded_without_padding_is_a_view(device):
    rows = torch.arange(12.0, device=device).reshape(3, 4)
    flat = unpadded(rows, [4, 4, 4])
    assert flat.data_ptr() == rows.data_ptr() and torch.equal(flat, rows.reshape(-1))
    assert torch.equal(unpadded(rows, [1, 4, 2]), torch.tensor([0.0, 4, 5, 6, 7, 8, 9], device=device))


def test_rows_of_one_length_are_stacked_in_one_kernel(device):
    """No padding needed: one stack (the padded form scatters a concatenation into zeros: four kernels)."""
    counter = _CountOps()
    vs = _vectors([3, 3], device)
    with counter:
        P = padded(vs)
    assert counter.count == 1 and torch.equal(P, torch.stack(vs))


def test_column_scales_each_row_by_its_own_scalar(device):
    rows = torch.ones(3, 2, device=device)
    assert torch.equal(column(torch.tensor([1.0, 2.0, 3.0], device=device)) * rows,
                       torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], device=device))
    assert column(torch.tensor(2.0, device=device)).shape == (1,)
