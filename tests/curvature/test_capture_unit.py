"""curvature.capture member by member: LayerRecord's defaults, slicing and gradient hand-over, ChunkedRecord,
adding/removing layers (hooks, calls and the cached records), and the functional-linear watcher's entry,
exit and row-view matching, against hand-made records and counted hook calls (mutation run of
curvature/capture.py, issue 17)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature import capture
from curvature.adapters import AttentionInProjAdapter, Conv2dAdapter, LinearAdapter
from curvature.capture import CaptureConfig, ChunkedRecord, LayerCapture, LayerRecord, watch_functional_linear


# ------------------------------------------------------------------------------ LayerRecord
def test_layer_record_defaults_and_direct_rows():
    record = LayerRecord()
    assert (record.batch_size, record.rows_per_sample, record.groups) == (0, 1, 0)
    assert record.h_rows is None and record.input_rows is None and record.grad_rows is None
    assert record.a_rows is None and record.g_rows is None and record.group_rows is None
    assert record.has_bias is False and record.sample_major is True
    assert (record.grad_scale, record.reduce_scale, record.calls, record.missing_grads) == (1.0, 1.0, 1, 0)
    a, h, g = torch.ones(3, 2), torch.zeros(3, 4), torch.full((3, 4), 2.0)
    record = LayerRecord(batch_size=3, rows_per_sample=1, a_rows=a, h_rows=h, g_rows=g)
    assert record.groups == 3 and record.h_rows is h
    assert record.a_rows is a and record.input_rows is a and record.has_bias is False
    assert record.g_rows is g and record.grad_rows is g and record.grad_scale == 1.0


def test_sliced_keeps_the_bookkeeping_and_selects_columns():
    record = LayerRecord(batch_size=2, rows_per_sample=3)
    record.input_rows = torch.arange(24.0).reshape(6, 4)
    record.h_rows = torch.arange(30.0).reshape(6, 5)
    record.grad_rows = -torch.arange(30.0).reshape(6, 5)
    record.has_bias, record.grad_scale, record.reduce_scale, record.calls, record.missing_grads = True, 2.0, 4.0, 3, 1
    record.groups, record.group_rows, record.sample_major = 2, [(2, 3)], False
    part = record.sliced(slice(1, 3), slice(2, 5))
    assert (part.batch_size, part.rows_per_sample, part.groups, part.group_rows) == (2, 3, 2, [(2, 3)])
    assert (part.has_bias, part.grad_scale, part.reduce_scale, part.calls, part.missing_grads, part.sample_major) == (
        True, 2.0, 4.0, 3, 1, False)
    assert torch.equal(part.input_rows, record.input_rows[:, 1:3])
    assert torch.equal(part.h_rows, record.h_rows[:, 2:5])
    assert torch.equal(part.grad_rows, record.grad_rows[:, 2:5])
    assert torch.equal(part.a_rows, torch.cat([record.input_rows[:, 1:3], torch.ones(6, 1)], 1))
    empty = LayerRecord(batch_size=2).sliced(slice(0, 1), slice(0, 1))
    assert empty.input_rows is None and empty.h_rows is None and empty.grad_rows is None


def test_take_grads_hands_over_the_rows_and_both_scales():
    record, other = LayerRecord(batch_size=2, g_rows=torch.ones(2, 3)), LayerRecord(batch_size=2)
    other.grad_rows, other.grad_scale, other.reduce_scale = torch.full((2, 3), 3.0), 2.0, 5.0
    assert torch.equal(record.g_rows, torch.ones(2, 3))  # cached before the hand-over
    record.take_grads(other)
    assert record.grad_rows is other.grad_rows and (record.grad_scale, record.reduce_scale) == (2.0, 5.0)
    assert torch.equal(record.g_rows, torch.full((2, 3), 6.0))


def _part(batch: int, calls: int, missing: int, grads: torch.Tensor | None, has_bias: bool) -> LayerRecord:
    part = LayerRecord(batch_size=batch)
    part.calls, part.missing_grads, part.has_bias, part.grad_rows = calls, missing, has_bias, grads
    return part


def test_chunked_record_summarizes_its_parts():
    q = _part(4, 1, 0, torch.ones(4, 2), True)
    k = _part(6, 2, 1, torch.full((6, 2), 2.0), False)
    record = ChunkedRecord({"q": q, "k": k})
    assert (record.batch_size, record.calls, record.missing_grads, record.has_bias) == (4, 3, 1, True)
    assert record.input_rows is None and record.h_rows is None
    assert torch.equal(record.grad_rows, torch.cat([torch.ones(4, 2), torch.full((6, 2), 2.0)]))
    assert record.grad_scale == 1.0
    assert ChunkedRecord({"q": q, "k": _part(6, 1, 1, None, True)}).grad_rows is None
    other = ChunkedRecord({"q": _part(4, 1, 0, torch.full((4, 2), 5.0), True),
                           "k": _part(6, 1, 0, torch.full((6, 2), 7.0), True)})
    other.parts["k"].grad_scale = 3.0
    record.take_grads(other)
    assert record.parts["q"].grad_rows is other.parts["q"].grad_rows and record.parts["k"].grad_scale == 3.0
    assert torch.equal(record.grad_rows, torch.cat([torch.full((4, 2), 5.0), torch.full((6, 2), 7.0)]))


# ------------------------------------------------------------------------------ adding and removing layers
def test_add_layer_and_share_check_the_name():
    first, second = nn.Linear(2, 3), nn.Linear(2, 3)
    cap = LayerCapture({})
    cap.set(a=True)
    adapter = LinearAdapter(first)
    cap.add_layer("first", adapter)
    assert cap.layers == {"first": adapter}
    x = torch.randn(4, 2)
    first(x)
    assert list(cap.records) == ["first"] and torch.equal(cap.records["first"].input_rows, x)
    with pytest.raises(ValueError, match=r"^layer 'first' is already captured$"):
        cap.add_layer("first", LinearAdapter(second))
    with pytest.raises(ValueError, match=r"^layer 'second' is not captured$"):
        cap.share("second", LinearAdapter(second))
    cap.remove()


def _two_layer_capture():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    cap = LayerCapture({"a": LinearAdapter(a), "b": LinearAdapter(b)})
    return a, b, cap


def test_remove_layer_drops_its_hooks_calls_and_cached_record():
    a, b, cap = _two_layer_capture()
    cap.set(a=True)
    x = torch.randn(3, 2)
    a(x), b(x)
    assert sorted(cap.records) == ["a", "b"]  # cached
    cap.remove_layer("a")
    assert "a" not in cap.layers and sorted(cap.records) == ["b"]
    a(x)  # its hook is gone
    assert sorted(cap.records) == ["b"]
    cap.remove_layer("never captured")  # nothing to remove: no error
    assert sorted(cap.layers) == ["b"]
    cap.remove()
    cap.remove()  # twice: nothing left to remove


@pytest.mark.parametrize("cached_before", ["first call", "set"])
def test_remove_layer_invalidates_a_cache_taken_one_change_earlier(cached_before):
    """The cached records are keyed by a version counter: removing a layer with calls must move it past every
    version a cache may hold (a cache taken just before the last call, or right after ``set``)."""
    a, b, cap = _two_layer_capture()
    cap.set(a=True)
    x = torch.randn(3, 2)
    if cached_before == "set":
        assert cap.records == {}
        b(x), a(x)
    else:
        a(x)
        assert sorted(cap.records) == ["a"]
        b(x)
    cap.remove_layer("a")
    assert sorted(cap.records) == ["b"]


def test_remove_layer_of_a_cross_attention_forgets_its_chunks():
    attention = nn.MultiheadAttention(4, 2)
    cap = LayerCapture({"attn": AttentionInProjAdapter(attention)})
    cap.set(a=True)
    q, kv = torch.randn(3, 2, 4), torch.randn(5, 2, 4)
    attention(q, kv, kv)
    assert list(cap.records) == ["attn"] and isinstance(cap.records["attn"], ChunkedRecord)
    cap.remove_layer("attn")
    assert cap.records == {} and cap.layers == {}
    attention(q, kv, kv)
    assert cap.records == {}


# ------------------------------------------------------------------------------ the functional-linear watcher
def _restored() -> bool:
    return F.linear is capture._original_linear and not capture._watched and not capture._watched_rows


def test_self_attention_called_with_keywords_is_watched_and_restored():
    attention = nn.MultiheadAttention(4, 2)
    adapter = AttentionInProjAdapter(attention)
    cap = LayerCapture({"attn": adapter})
    cap.set(a=True)
    x = torch.randn(3, 2, 4)
    attention(query=x, key=x, value=x)
    assert adapter.modes == {"self"} and cap.records["attn"].input_rows.shape == (6, 4)
    assert _restored()
    cap.remove()


class _Outer(nn.Module):
    """Calls ``F.linear`` on ``w_outer`` after running ``inner`` (whose forward uses rows of ``w_inner``)."""

    def __init__(self, inner: nn.Module, w_outer: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.w_outer = inner, w_outer

    def forward(self, x):
        h = self.inner(x)  # before F.linear is looked up: the outer call must still be watched after inner's exit
        return F.linear(h, self.w_outer)


class _RowUser(nn.Module):
    def __init__(self, weight: torch.Tensor, view) -> None:
        super().__init__()
        self.weight, self.view = weight, view

    def forward(self, x):
        return F.linear(x, self.view(self.weight))


def _counting(calls: list):
    def hook(module, inputs, output, columns=None):
        calls.append(columns)
    return hook


def _unwatch(handles: list) -> None:
    for handle in handles:
        handle.remove()


def test_an_outer_watch_survives_the_end_of_an_inner_row_watch():
    w_inner, w_outer = torch.randn(6, 4), torch.randn(2, 6)
    inner = _RowUser(w_inner, lambda w: w[:])  # a row view of all rows
    outer = _Outer(inner, w_outer)
    inner_calls, outer_calls = [], []
    handles = watch_functional_linear(outer, w_outer, _counting(outer_calls))
    handles += watch_functional_linear(inner, w_inner, _counting(inner_calls), rows=(0, 2))
    outer(torch.randn(3, 4))
    assert inner_calls == [slice(0, 2)] and outer_calls == [None]
    assert _restored()
    _unwatch(handles)


@pytest.mark.parametrize("view, expected", [
    (lambda w: w[2:4], [slice(0, 2)]),        # the watched rows 2-3, a row view
    (lambda w: w.T.T[2:6], [slice(0, 2)]),    # same strides through other views
    (lambda w: w[:, 1:], []),                 # starts inside a row: not a row view
    (lambda w: w[:4].T, []),                  # other strides
    (lambda w: w[3:6], []),                   # does not contain row 2
])
def test_row_views_are_matched_by_offset_and_strides(view, expected):
    weight = torch.randn(6, 4)
    user = _RowUser(weight, view)
    calls = []
    handles = watch_functional_linear(user, weight, _counting(calls), rows=(2, 4))
    x = torch.randn(3, view(weight).shape[1])
    user(x)
    assert calls == expected and _restored()
    _unwatch(handles)


def test_a_view_of_an_unwatched_tensor_inside_a_watched_forward_is_ignored():
    weight, other = torch.randn(2, 4), torch.randn(6, 4)

    class Mixed(nn.Module):
        def forward(self, x):
            return F.linear(x, weight) + F.linear(x, other[:2])

    calls = []
    module = Mixed()
    handles = watch_functional_linear(module, weight, _counting(calls))
    module(torch.randn(3, 4))
    assert calls == [None] and _restored()
    _unwatch(handles)


def test_the_watch_ends_when_the_forward_raises():
    weight = torch.randn(2, 4)

    class Failing(nn.Module):
        def forward(self, x):
            F.linear(x, weight)
            raise RuntimeError("boom")

    calls = []
    module = Failing()
    handles = watch_functional_linear(module, weight, _counting(calls))
    with pytest.raises(RuntimeError, match="boom"):
        module(torch.randn(3, 4))
    assert calls == [None] and _restored()
    _unwatch(handles)


def test_the_same_weight_watched_by_an_outer_and_an_inner_module():
    weight = torch.randn(4, 4)
    inner = _RowUser(weight, lambda w: w)
    outer = _Outer(inner, weight)
    inner_calls, outer_calls = [], []
    handles = watch_functional_linear(outer, weight, _counting(outer_calls))
    handles += watch_functional_linear(inner, weight, _counting(inner_calls))
    outer(torch.randn(3, 4))
    # the inner call is seen by both watches; the outer call after inner's exit by the outer one only
    assert inner_calls == [None] and outer_calls == [None, None] and _restored()
    _unwatch(handles)


def test_a_call_that_fails_before_the_forward_leaves_no_trace():
    weight = torch.randn(2, 4)
    user = _RowUser(weight, lambda w: w)

    def refuse(args, kwargs):
        raise ValueError("not this call")

    handles = watch_functional_linear(user, weight, _counting([]), on_enter=refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="not this call"):
            user(torch.randn(3, 4))
    assert [str(w.message) for w in caught] == [] and _restored()  # the exit hook itself raised nothing
    _unwatch(handles)


# ------------------------------------------------------------------------------ how calls become a record
def _linear_capture(loss_reduction: str = "mean", **flags: bool) -> tuple[nn.Linear, LayerCapture]:
    """A ``Linear(2, 2)`` captured as layer "l", with ``flags`` set."""
    layer = nn.Linear(2, 2)
    cap = LayerCapture({"l": LinearAdapter(layer)}, loss_reduction=loss_reduction)
    cap.set(**flags)
    return layer, cap


def test_a_capture_configured_at_construction_records_from_the_first_call():
    layer = nn.Linear(2, 3)
    cap = LayerCapture({"l": LinearAdapter(layer)}, config=CaptureConfig(a=True))
    x = torch.randn(4, 2)
    layer(x)
    record = cap.records["l"]
    assert torch.equal(record.input_rows, x) and (record.batch_size, record.groups, record.calls) == (4, 4, 1)
    cap.remove()


class _DuckAdapter:
    """The required adapter members only: no num_samples/num_groups, functional_weight, observe_call."""

    one_hot_input = False

    def __init__(self, module):
        self.module, self.has_bias = module, True

    def input_rows(self, x):
        return x.reshape(-1, x.shape[-1])

    output_rows = input_rows


def test_an_adapter_without_the_optional_members_counts_the_leading_dimension():
    layer = nn.Linear(5, 2)
    cap = LayerCapture({"l": _DuckAdapter(layer)})
    cap.set(a=True)
    layer(torch.randn(3, 5))
    record = cap.records["l"]
    assert (record.batch_size, record.groups, record.group_rows) == (3, 3, [(3, 1)])
    cap.remove()


class _FunctionalDuck(_DuckAdapter):
    """A functionally applied weight without observe_call."""

    def __init__(self, module):
        super().__init__(module)
        self.hook_module, self.functional_weight = module, module.weight


def test_a_functional_adapter_without_observe_call_is_watched():
    user = _RowUser(torch.randn(2, 5), lambda w: w)
    user.weight = nn.Parameter(user.weight)
    user.bias = None
    cap = LayerCapture({"u": _FunctionalDuck(user)})
    cap.set(a=True)
    x = torch.randn(3, 5)
    user(x)
    assert torch.equal(cap.records["u"].input_rows, x) and _restored()
    cap.remove()


def test_version_cache_after_clear_and_after_backward():
    layer, cap = _linear_capture(a=True)
    x1, x2 = torch.randn(3, 2), torch.randn(3, 2)
    layer(x1)
    assert torch.equal(cap.records["l"].input_rows, x1)
    cap.clear()
    layer(x2)
    assert torch.equal(cap.records["l"].input_rows, x2)  # not the cache from before the clear
    cap.set(g=True)
    assert cap.records == {}
    layer(x1).sum().backward()
    record = cap.records["l"]  # the backward's rows (∂L/∂h = 1), scaled by N = 3 for a mean loss
    assert torch.equal(record.grad_rows, torch.ones(3, 2)) and torch.equal(record.g_rows, torch.full((3, 2), 3.0))
    cap.remove()


def test_two_calls_in_one_pass_are_joined_group_major_with_their_counts():
    layer, cap = _linear_capture(a=True)
    x1 = torch.arange(12.0).reshape(2, 3, 2)  # [B = 2 sequences, S = 3, D = 2]
    x2 = 100 + x1
    layer(x1), layer(x2)
    record = cap.records["l"]
    expected = torch.cat([x1[0], x2[0], x1[1], x2[1]])  # group 0's rows of both calls, then group 1's
    assert torch.equal(record.input_rows, expected)
    assert (record.batch_size, record.groups, record.group_rows, record.calls) == (6, 2, [(2, 6)], 2)
    assert record.sample_major is False and record.rows_per_sample == 2  # 12 rows over 6 samples
    cap.clear()
    layer(x1[0]), layer(x2[0])  # 2-D inputs: one row per sample in each call
    record = cap.records["l"]
    assert record.sample_major is True and record.group_rows == [(3, 2)]
    assert torch.equal(record.input_rows, torch.stack([x1[0], x2[0]], 1).reshape(6, 2))
    cap.remove()


def test_different_batch_sizes_within_one_pass_are_refused_with_both_sizes():
    layer, cap = _linear_capture(a=True)
    layer(torch.randn(2, 2)), layer(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match=r"^layer 'l': a layer was called with different batch sizes \(2 and 3\) "
                                           r"within one forward pass; every call of a layer in one forward must see "
                                           r"the same samples$"):
        cap.records
    cap.remove()


def test_a_forward_without_backward_records_no_rows_and_its_counts():
    layer, cap = _linear_capture(g=True)
    layer(torch.randn(1, 2))
    record = cap.records["l"]
    assert record.grad_rows is None and record.missing_grads == 1 and record.has_bias is False
    assert (record.batch_size, record.group_rows, record.rows_per_sample) == (1, [(1, 0)], 1)
    cap.remove()


def test_an_empty_batch_and_the_bias_flag_without_input_rows():
    layer, cap = _linear_capture(a=True)
    layer(torch.zeros(0, 2))
    record = cap.records["l"]
    assert (record.batch_size, record.groups, record.group_rows, record.rows_per_sample) == (0, 0, [(0, 0)], 1)
    cap.set(h=True)
    layer(torch.randn(2, 2))
    assert cap.records["l"].has_bias is False  # no input rows: no homogeneous coordinate either
    cap.set(a=True)
    layer(torch.randn(2, 2))
    assert cap.records["l"].has_bias is True
    cap.remove()


@pytest.mark.parametrize("reduction, scales", [("mean", (4.0, 2.0)), ("sum", (1.0, 1.0))])
def test_per_sample_and_per_group_scales(reduction, scales):
    layer, cap = _linear_capture(g=True, loss_reduction=reduction)
    layer(torch.randn(2, 2, 2)).sum().backward()  # 2 groups of 2 rows: 4 samples
    record = cap.records["l"]
    assert (record.grad_scale, record.reduce_scale) == scales
    cap.remove()


def test_rows_per_sample_of_one_image_and_of_unequal_images():
    conv = nn.Conv2d(1, 1, 2)
    cap = LayerCapture({"c": Conv2dAdapter(conv)})
    cap.set(a=True)
    conv(torch.randn(1, 1, 3, 3))  # one image, 2x2 = 4 locations
    assert cap.records["c"].rows_per_sample == 4
    cap.begin_pass()
    conv(torch.randn(1, 1, 4, 4))  # a second pass: one image, 3x3 = 9 locations
    record = cap.records["c"]
    assert record.batch_size == 2 and record.rows_per_sample == 6.5 and record.group_rows == [(1, 4), (1, 9)]
    cap.remove()


def test_half_precision_rows_are_widened_to_the_weight_dtype():
    first, layer = nn.Linear(3, 3), nn.Linear(3, 2)
    cap = LayerCapture({"l": LinearAdapter(layer)})
    cap.set(a=True, h=True, g=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = first(torch.randn(4, 3))  # bfloat16: the captured layer's input rows need widening too
        out = layer(x)
    assert x.dtype == out.dtype == torch.bfloat16
    out.float().sum().backward()
    record = cap.records["l"]
    assert record.input_rows.dtype == record.h_rows.dtype == record.grad_rows.dtype == torch.float32
    assert torch.equal(record.input_rows, x.detach().float()) and torch.equal(record.h_rows, out.detach().float())
    cap.remove()


# ------------------------------------------------------------------------------ group means
def test_group_index_and_means_with_one_group_and_with_an_empty_group():
    record = LayerRecord(batch_size=1)
    record.input_rows = torch.arange(8.0).reshape(4, 2)
    record.has_bias = True
    assert torch.equal(record.group_index(), torch.zeros(4, dtype=torch.long))
    assert torch.equal(record.a_mean(), torch.tensor([3.0, 4.0, 1.0]))
    record.groups, record.group_rows = 3, [(2, 2), (1, 0)]  # the third group has no rows
    assert torch.equal(record.group_index(), torch.tensor([0, 0, 1, 1]))
    means = record.group_mean(record.input_rows)
    assert torch.equal(means[:2], torch.tensor([[1.0, 2.0], [5.0, 6.0]])) and bool(means[2].isnan().all())


def test_expand_is_the_default_and_reduce_averages_group_means():
    record = LayerRecord(batch_size=2)
    record.groups, record.group_rows = 2, [(1, 1), (1, 3)]  # unequal groups: the two means differ
    record.input_rows = torch.tensor([[0.0], [4.0], [4.0], [4.0]])
    record.h_rows = 2 * record.input_rows
    record.grad_rows, record.grad_scale, record.reduce_scale = record.input_rows.clone(), 2.0, 3.0
    assert torch.equal(record.a_mean(), torch.tensor([3.0])) and torch.equal(record.a_mean("reduce"), torch.tensor([2.0]))
    assert torch.equal(record.h_mean(), torch.tensor([6.0])) and torch.equal(record.h_mean("reduce"), torch.tensor([4.0]))
    assert torch.equal(record.g_mean(), torch.tensor([6.0]))
    assert torch.equal(record.g_mean("reduce"), torch.tensor([18.0]))  # sums 0 and 12, their mean 6, times 3
