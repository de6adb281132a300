"""curvature.adapters member by member: sizes and sample/group counts by hand, gradients of absent parameters,
unbatched inputs, the attention projections' call bookkeeping, and the exact error messages (mutation run of
curvature/adapters.py, issue 17)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from curvature.adapters import (
    AttentionChunkAdapter,
    AttentionInProjAdapter,
    AttentionOutProjAdapter,
    Conv1dAdapter,
    Conv2dAdapter,
    ConvGroupAdapter,
    EmbeddingAdapter,
    LayerAdapter,
    LinearAdapter,
    NormAffineAdapter,
    UnsupportedLayerError,
    contextual_adapters,
    register_adapter,
    unregister_adapter,
)


class Gadget(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 2))


# ------------------------------------------------------------------------------ LayerAdapter defaults
def test_the_base_adapter_counts_the_leading_dimension_as_samples_and_groups():
    adapter = LayerAdapter(nn.Linear(2, 3))
    x = torch.zeros(4, 5, 2)
    assert adapter.num_samples(x) == 4 and adapter.num_groups(x) == 4


def test_grad_matrix_puts_zeros_where_a_gradient_is_none(device):
    layer = nn.Linear(2, 3).to(device)
    adapter = LinearAdapter(layer)
    assert torch.equal(adapter.grad_matrix(), torch.zeros(3, 3, device=device))
    layer.bias.grad = torch.tensor([1.0, 2.0, 3.0], device=device)
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 3.0]], device=device)
    assert torch.equal(adapter.grad_matrix(), expected)
    layer.bias.grad = None
    layer.weight.grad = torch.arange(6.0, device=device).reshape(3, 2)
    expected = torch.tensor([[0.0, 1.0, 0.0], [2.0, 3.0, 0.0], [4.0, 5.0, 0.0]], device=device)
    assert torch.equal(adapter.grad_matrix(), expected)


# ------------------------------------------------------------------------------ Linear
def test_linear_samples_and_groups_by_input_shape():
    adapter = LinearAdapter(nn.Linear(4, 2))
    assert (adapter.num_samples(torch.zeros(4)), adapter.num_groups(torch.zeros(4))) == (1, 1)  # one unbatched sample
    assert (adapter.num_samples(torch.zeros(5, 4)), adapter.num_groups(torch.zeros(5, 4))) == (5, 5)
    assert (adapter.num_samples(torch.zeros(2, 3, 4)), adapter.num_groups(torch.zeros(2, 3, 4))) == (6, 2)


# ------------------------------------------------------------------------------ convolutions
def test_convolution_configurations_are_rejected_with_the_layer_kind():
    with pytest.raises(UnsupportedLayerError, match=r"^Conv2d with padding_mode='reflect' is not supported$"):
        Conv2dAdapter(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(UnsupportedLayerError,
                       match=r"^Conv1d with string padding \('same'/'valid'\) is not supported; use integers$"):
        Conv1dAdapter(nn.Conv1d(1, 2, 3, padding="same"))


@pytest.mark.parametrize("make, shape", [(lambda: nn.Conv2d(3, 2, 2), (3, 4, 5)), (lambda: nn.Conv1d(3, 2, 2), (3, 6))])
def test_an_unbatched_convolution_input_is_one_sample(device, make, shape):
    conv = make().to(device)
    adapter = Conv2dAdapter(conv) if isinstance(conv, nn.Conv2d) else Conv1dAdapter(conv)
    x = torch.randn(*shape, device=device)
    assert adapter.num_samples(x) == 1 and adapter.num_groups(x) == 1
    assert torch.equal(adapter.input_rows(x), adapter.input_rows(x.unsqueeze(0)))
    h = conv(x)
    assert torch.equal(adapter.output_rows(h), adapter.output_rows(h.unsqueeze(0)))
    assert adapter.output_rows(h).shape == (h[0].numel(), 2)


def test_group_adapters_are_numbered_and_read_the_whole_layer():
    conv = nn.Conv2d(4, 6, 3, groups=2)
    whole = Conv2dAdapter(conv)
    groups = whole.chunk_adapters()
    assert list(groups) == ["g0", "g1"]
    assert [g.index for g in groups.values()] == [0, 1]
    group = groups["g1"]
    assert isinstance(group, ConvGroupAdapter) and group.module is conv and group.has_bias is True
    assert group.weight is conv.weight and group.bias is conv.bias
    assert (group.a_dim, group.g_dim) == (2 * 9 + 1, 3)


# ------------------------------------------------------------------------------ Embedding
def test_embedding_rows_groups_and_messages():
    adapter = EmbeddingAdapter(nn.Embedding(7, 3))
    assert adapter.has_bias is False and adapter.bias is None
    assert adapter.num_groups(torch.zeros(4, dtype=torch.long)) == 1
    assert adapter.num_groups(torch.zeros(2, 5, dtype=torch.long)) == 2
    assert adapter.num_groups(torch.zeros(2, 5, 3, dtype=torch.long)) == 2
    tokens = torch.tensor([[1, 4], [6, 0]])
    assert torch.equal(adapter.input_rows(tokens), torch.tensor([[1], [4], [6], [0]]))
    with pytest.raises(UnsupportedLayerError,
                       match=r"^Embedding with max_norm rewrites its weight during forward; not supported$"):
        EmbeddingAdapter(nn.Embedding(4, 2, max_norm=1.0))
    with pytest.raises(UnsupportedLayerError, match=r"^Embedding with sparse=True has sparse gradients; not supported$"):
        EmbeddingAdapter(nn.Embedding(4, 2, sparse=True))


# ------------------------------------------------------------------------------ normalization affine
def test_norm_affine_errors_and_matrix_without_bias(device):
    with pytest.raises(UnsupportedLayerError, match=r"^LayerNorm without affine weight has no block$"):
        NormAffineAdapter(nn.LayerNorm(3, elementwise_affine=False))
    with pytest.raises(UnsupportedLayerError, match=r"^Identity without affine weight has no block$"):
        NormAffineAdapter(nn.Identity())  # no weight attribute at all
    adapter = NormAffineAdapter(nn.LayerNorm(3, bias=False).to(device))
    gamma = torch.tensor([1.0, 2.0, 3.0], device=device)
    assert adapter.has_bias is False and adapter.a_dim == 1
    assert torch.equal(adapter.to_matrix(gamma, None), gamma.reshape(3, 1))
    message = r"^normalization layers have no Kronecker rows; use diagonal_block\(source='gradient'\)$"
    with pytest.raises(UnsupportedLayerError, match=message):
        adapter.input_rows(torch.zeros(2, 3))
    with pytest.raises(UnsupportedLayerError, match=message):
        adapter.output_rows(torch.zeros(2, 3))


# ------------------------------------------------------------------------------ attention
def test_attention_configurations_are_rejected_with_exact_messages():
    with pytest.raises(UnsupportedLayerError, match=r"^MultiheadAttention with kdim/vdim != embed_dim uses separate "
                                                    r"q/k/v weights; not supported$"):
        AttentionInProjAdapter(nn.MultiheadAttention(4, 2, kdim=3, vdim=3))
    with pytest.raises(UnsupportedLayerError, match=r"^MultiheadAttention with add_bias_kv is not supported$"):
        AttentionInProjAdapter(nn.MultiheadAttention(4, 2, add_bias_kv=True))


def test_in_proj_adapter_is_the_attention_and_its_chunks_are_module_hooked_views():
    attention = nn.MultiheadAttention(4, 2)
    adapter = AttentionInProjAdapter(attention)
    assert adapter.module is attention and adapter.hook_module is attention
    assert adapter.functional_weight is attention.in_proj_weight
    chunks = adapter.chunk_adapters()
    assert [c.index for c in chunks.values()] == [0, 1, 2]
    assert all(isinstance(c, AttentionChunkAdapter) and c.functional_weight is None for c in chunks.values())
    assert chunks["v"].weight_rows() == (8, 12)


def _call_kinds(calls) -> tuple[set, str | None]:
    adapter = AttentionInProjAdapter(nn.MultiheadAttention(4, 2))
    for args, kwargs in calls:
        adapter.observe_call(args, kwargs)
    return adapter.modes, adapter.runtime_fallback


def test_observe_call_tells_self_from_cross_attention_by_identity_in_args_and_kwargs():
    x, y = torch.zeros(3, 1, 4), torch.zeros(3, 1, 4)
    assert _call_kinds([((x, x, x), {})]) == ({"self"}, None)
    assert _call_kinds([((), {"query": x, "key": x, "value": x})]) == ({"self"}, None)
    assert _call_kinds([((x,), {"key": x, "value": x})]) == ({"self"}, None)
    assert _call_kinds([((x, x), {"value": x})]) == ({"self"}, None)
    assert _call_kinds([((x, x, y), {})])[0] == {"cross"}  # query is key, value differs
    assert _call_kinds([((x, y, y), {})])[0] == {"cross"}  # key is value, query differs
    assert _call_kinds([((), {"query": y, "key": x, "value": x})])[0] == {"cross"}


def test_observe_call_sets_the_fallback_once_both_kinds_were_seen():
    x, y = torch.zeros(3, 1, 4), torch.zeros(3, 1, 4)
    modes, fallback = _call_kinds([((x, x, x), {}), ((x, x, x), {})])
    assert modes == {"self"} and fallback is None
    modes, fallback = _call_kinds([((x, x, x), {}), ((x, y, y), {})])
    assert modes == {"self", "cross"}
    assert fallback == ("called both as self-attention (query, key and value the same tensor) and as cross-attention; "
                        "the packed block and the per-chunk blocks would each see only part of the calls")


def test_out_proj_reads_the_batch_from_the_query():
    attention = nn.MultiheadAttention(4, 2)
    adapter = AttentionOutProjAdapter(attention.out_proj, attention)
    assert adapter.num_groups(torch.zeros(6, 4)) == 1  # before any call
    adapter.observe_call((torch.zeros(5, 3, 4), torch.zeros(7, 2, 4)), {})  # [S, B, E]: B = 3, not the key's
    assert adapter.num_groups(torch.zeros(15, 4)) == 3
    adapter.observe_call((), {"query": torch.zeros(5, 2, 4)})
    assert adapter.num_groups(torch.zeros(10, 4)) == 2
    adapter.observe_call((torch.zeros(5, 4),), {})  # unbatched
    assert adapter.num_groups(torch.zeros(5, 4)) == 1
    first = nn.MultiheadAttention(4, 2, batch_first=True)
    adapter = AttentionOutProjAdapter(first.out_proj, first)
    adapter.observe_call((torch.zeros(3, 5, 4),), {})  # [B, S, E]
    assert adapter.num_groups(torch.zeros(15, 4)) == 3


def test_contextual_adapters_map_each_out_proj_to_its_adapter_or_its_error():
    model = nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 4), nn.MultiheadAttention(4, 2, add_bias_kv=True))
    found = contextual_adapters(model)
    assert set(found) == {id(model[0].out_proj), id(model[2].out_proj)}
    good = found[id(model[0].out_proj)]
    assert isinstance(good, AttentionOutProjAdapter) and good.module is model[0].out_proj and good.attention is model[0]
    bad = found[id(model[2].out_proj)]
    assert isinstance(bad, UnsupportedLayerError) and "add_bias_kv" in str(bad)


# ------------------------------------------------------------------------------ registry messages
def test_registration_conflict_names_the_registered_adapter(clean_registry):
    with pytest.raises(ValueError, match=r"^Linear already has the adapter LinearAdapter; pass replace=True to "
                                         r"replace it$"):
        register_adapter(nn.Linear, LinearAdapter)
    register_adapter(Gadget, functools.partial(LinearAdapter))  # a factory without __name__: its type's name
    with pytest.raises(ValueError, match=r"^Gadget already has the adapter partial; "):
        register_adapter(Gadget, LinearAdapter)


def test_unregistering_an_unknown_type_names_it(clean_registry):
    with pytest.raises(KeyError) as info:
        unregister_adapter(Gadget)
    assert info.value.args == ("Gadget has no registered adapter",)
    with pytest.raises(KeyError) as info:
        unregister_adapter(5)  # not a type: named by its value
    assert info.value.args == ("5 has no registered adapter",)
