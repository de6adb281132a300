"""Exact unit tests of ``CurvatureOptimizer._apply_runtime_fallbacks``, ``_record_inputs`` and
``_configure_capture`` (optimizers/driver.py).

A layer whose block cannot be used at run time moves to the fallback rule at the first step that sees
it, before that step mutates anything: here an attention called both as self- and as cross-attention
(the adapter's ``runtime_fallback``), or a cross-attention whose recipe cannot build the per-chunk blocks.
The tests read which layers move, the exact reasons, the counters, the ``describe()`` row, the
fallback's state (it starts fresh: the curvature momentum matrix is dropped, also from the rollback
point) and the parameters, computed by hand from the gradient of the step.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from curvature.chunked import ChunkedBlock
from optimizers import KFAC, CurvatureOptimizer, kfac_block
from tests.optimizers.closures import mean_square_closure
from tests.optimizers.test_driver_checkpoint_unit import _whole_layers_only
from tests.optimizers.test_driver_setup_unit import DuckLinear, duck_adapter  # noqa: F401 (fixture)
from tests.optimizers.messages import exact as _exact

D = torch.float64
BOTH = ("called both as self-attention (query, key and value the same tensor) and as cross-attention; "
        "the packed block and the per-chunk blocks would each see only part of the calls")


def _no_chunks(name: str) -> str:
    return ("cross-attention: the packed q/k/v projection is applied in chunks to different inputs, and the "
            f"per-chunk blocks are not available ({name}[q] is a chunk)")



class TwoAttentions(nn.Module):
    """Attentions ``a`` and ``b`` (E = 4, 2 heads) then a Linear(4, 2) head. ``calls[name]`` lists how
    each attention is called in one forward, in order: "self" (query is key is value) or "cross" (key
    and value the memory); ``scale`` multiplies the output (NaN makes the loss non-finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.MultiheadAttention(4, 2, batch_first=True)
        self.b = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)
        self.calls: dict[str, list[str]] = {"a": ["self"], "b": ["self"]}
        self.scale = 1.0

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = x
        for name in ("a", "b"):
            attn = getattr(self, name)
            for how in self.calls[name]:
                h = attn(h, h, h, need_weights=False)[0] if how == "self" else attn(h, memory, memory,
                                                                                     need_weights=False)[0]
        return self.head(h) * self.scale


def _setup(**kwargs) -> tuple[TwoAttentions, KFAC, tuple[torch.Tensor, torch.Tensor]]:
    """TwoAttentions (float64) with KFAC lr 0.1, damping 0.3 (momentum 0.9, fallback 'sgd')."""
    torch.manual_seed(0)
    model = TwoAttentions().to(D)
    data = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 5, 4, dtype=D)
    return model, KFAC(model, lr=0.1, damping=0.3, **kwargs), data


def _row(opt: CurvatureOptimizer, name: str) -> str:
    """The describe() row of layer ``name`` (columns split on runs of two or more spaces)."""
    rows = [re.split(r"\s{2,}", line) for line in opt.describe().splitlines()]
    return " | ".join(next(r for r in rows if r[0] == name))


# ------------------------------------------------------------------ an attention called both ways
def test_a_layer_called_both_ways_moves_with_its_reason_and_a_fresh_fallback_state():
    """Step 0 (self-attention only) gives ``a`` a curvature step and its momentum matrix. Step 1 calls
    ``a`` both ways: before that step changes anything ``a`` moves to the fallback rule ('sgd', lr 0.1,
    momentum 0.9, weight decay 1e-5), its momentum matrix is dropped (also from the rollback point of
    step 0, which does not hold ``a`` yet) and the sgd momentum starts from zero:
    buf = (1 - 0.9)(g + 1e-5 W), W ← W − 0.1 · buf."""
    model, opt, (x, m) = _setup()
    w, b = model.a.in_proj_weight, model.a.in_proj_bias
    opt.step(mean_square_closure(opt, model, x, m))
    assert set(opt.state[w]) == {"momentum_matrix"} and opt.counters["runtime_fallbacks"] == 0
    model.calls["a"] = ["self", "cross"]
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt.step(mean_square_closure(opt, model, x, m))
    assert list(opt.slots) == ["a.out_proj", "b", "b.out_proj", "head"]
    assert opt.runtime_fallbacks == {"a": BOTH} and opt.fallback_reasons == {"a": BOTH}
    assert opt.counters["runtime_fallbacks"] == 1 and opt.counters["chunked_layers"] == 0
    assert opt.counters["skipped_steps"] == 0 and opt.steps == 2
    assert "a" not in opt.capture.layers and list(opt.capture.layers) == list(opt.slots)
    assert list(opt.fallback_modules) == ["a"] and opt.fallback_modules["a"] is model.a
    assert _row(opt, "a") == f"a | MultiheadAttention | - | fallback (sgd, lr=0.1, momentum=0.9): {BOTH} | 60"
    for p, p0 in ((w, w0), (b, b0)):
        assert set(opt.state[p]) == {"momentum"}
        buf = 0.1 * (p.grad + 1e-5 * p0)
        torch.testing.assert_close(opt.state[p]["momentum"], buf, rtol=0, atol=1e-16)
        torch.testing.assert_close(p.detach(), p0 - 0.1 * buf, rtol=0, atol=1e-16)

    opt.step(mean_square_closure(opt, model, x, m))  # nothing moves again
    assert opt.counters["runtime_fallbacks"] == 1 and list(opt.runtime_fallbacks) == ["a"]
    model.calls["b"] = ["cross", "self"]
    opt.step(mean_square_closure(opt, model, x, m))
    assert opt.runtime_fallbacks == {"a": BOTH, "b": BOTH} and opt.counters["runtime_fallbacks"] == 2
    assert list(opt.slots) == ["a.out_proj", "b.out_proj", "head"]


def test_fallback_error_raises_before_the_step_changes_anything():
    """With fallback='error' the first layer to move raises the exact message, and the step leaves the
    parameters, the per-parameter state, the slots, the steps and the counters as they were."""
    model, opt, (x, m) = _setup(fallback="error")
    opt.step(mean_square_closure(opt, model, x, m))
    model.calls["a"] = ["cross", "self"]
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy({id(p): s for p, s in opt.state.items()})
    counters, slots = copy.deepcopy(opt.counters), list(opt.slots)
    with pytest.raises(Exception, match=_exact(
            f"layer 'a' (MultiheadAttention): {BOTH}, and fallback='error'; exclude the layer (exclude=[...]) "
            "or use a fallback rule")) as info:
        opt.step(mean_square_closure(opt, model, x, m))
    assert type(info.value).__name__ == "UnsupportedLayerError"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert {id(p): set(s) for p, s in opt.state.items()} == {k: set(s) for k, s in state.items()}
    assert all(torch.equal(opt.state[p][k], state[id(p)][k]) for p in opt.state for k in opt.state[p])
    assert opt.counters == counters and list(opt.slots) == slots and opt.steps == 1
    assert opt.runtime_fallbacks == {} and opt.fallback_reasons == {}


def test_the_rollback_point_loses_the_momentum_matrix_of_a_moved_layer():
    """Steps 0 and 1 are accepted (the rollback point of step 1 holds ``a``'s momentum matrix). Step 2
    calls ``a`` both ways with a NaN loss: ``a`` moves, the step is skipped. Step 3 is NaN again on finite
    inputs: the optimizer rolls back to the point, where ``a``'s weight has no state left."""
    model, opt, (x, m) = _setup()
    w = model.a.in_proj_weight
    for _ in range(2):
        opt.step(mean_square_closure(opt, model, x, m))
    model.calls["a"], model.scale = ["self", "cross"], float("nan")
    opt.step(mean_square_closure(opt, model, x, m))
    assert "a" not in opt.slots and opt.counters["skipped_steps"] == 1 and set(opt.state[w]) == set()
    opt.step(mean_square_closure(opt, model, x, m))
    assert opt.counters["rollbacks"] == 1
    assert dict(opt.state[w]) == {} and set(opt.state[model.b.in_proj_weight]) == {"momentum_matrix"}


# ------------------------------------------------------------------ per-chunk blocks
def test_cross_attentions_get_per_chunk_blocks_counted_per_layer_until_one_moves():
    """Both attentions cross: two layers get per-chunk blocks at step 0. When ``a`` is then also called
    as self-attention it moves to the fallback rule and leaves ``runtime_chunked``."""
    model, opt, (x, m) = _setup()
    model.calls = {"a": ["cross"], "b": ["cross"]}
    opt.step(mean_square_closure(opt, model, x, m))
    assert opt.runtime_chunked == ["a", "b"] and opt.counters["chunked_layers"] == 2
    assert isinstance(opt.blocks["a"], ChunkedBlock) and isinstance(opt.blocks["b"], ChunkedBlock)
    model.calls["a"] = ["cross", "self"]
    opt.step(mean_square_closure(opt, model, x, m))
    assert opt.runtime_chunked == ["b"] and opt.runtime_fallbacks == {"a": BOTH}
    assert opt.counters["chunked_layers"] == 2 and opt.counters["runtime_fallbacks"] == 1


def test_per_chunk_blocks_the_recipe_rejects_move_every_such_layer_with_its_reason():
    torch.manual_seed(0)
    model = TwoAttentions().to(D)
    model.calls = {"a": ["cross"], "b": ["cross"]}
    x, m = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 5, 4, dtype=D)
    opt = CurvatureOptimizer(model, 0.1, {nn.MultiheadAttention: _whole_layers_only, nn.Linear: kfac_block()},
                             damping=0.3)
    opt.step(mean_square_closure(opt, model, x, m))
    assert opt.runtime_fallbacks == {"a": _no_chunks("a"), "b": _no_chunks("b")}
    assert opt.fallback_reasons == opt.runtime_fallbacks and opt.runtime_chunked == []
    assert opt.counters["runtime_fallbacks"] == 2 and opt.counters["chunked_layers"] == 0
    assert list(opt.slots) == ["a.out_proj", "b.out_proj", "head"]


def test_given_chunked_names_skip_unknown_and_already_chunked_layers():
    """``chunked`` (as from a checkpoint) may name a layer that is not preconditioned or one that already
    has per-chunk blocks: both are skipped, the others still switch."""
    _, opt, _ = _setup()
    opt._apply_runtime_fallbacks(chunked=["missing", "a", "a", "b"])
    assert opt.runtime_chunked == ["a", "b"] and opt.counters["chunked_layers"] == 2
    assert isinstance(opt.blocks["a"], ChunkedBlock) and isinstance(opt.blocks["b"], ChunkedBlock)
    assert opt.runtime_fallbacks == {} and opt.counters["runtime_fallbacks"] == 0


def test_a_checkpoint_from_before_the_runtime_counters_counts_from_zero():
    """A version-1 checkpoint written before the ``runtime_fallbacks``/``chunked_layers`` counters (and
    lists) existed loads; the first switch and the first move then count 1 each."""
    model, opt, (x, m) = _setup()
    saved = opt.state_dict()
    for key in ("runtime_fallbacks", "chunked_layers"):
        del saved["secondorder"]["counters"][key]
    for key in ("runtime_fallbacks", "runtime_chunked"):
        del saved["secondorder"][key]
    opt.load_state_dict(saved)
    model.calls = {"a": ["cross"], "b": ["self", "cross"]}
    opt.step(mean_square_closure(opt, model, x, m))
    assert opt.counters["chunked_layers"] == 1 and opt.counters["runtime_fallbacks"] == 1
    assert opt.runtime_chunked == ["a"] and opt.runtime_fallbacks == {"b": BOTH}


def test_a_protocol_only_adapter_without_runtime_fallback_keeps_its_block(duck_adapter):  # noqa: F811
    """An adapter with only the protocol's members has no ``runtime_fallback``: it never moves."""
    torch.manual_seed(0)
    model = nn.Sequential(DuckLinear(3, 2)).to(D)
    opt = CurvatureOptimizer(model, 0.1, {DuckLinear: kfac_block()}, damping=0.3)
    x = torch.randn(4, 3, dtype=D)
    opt.step(lambda: _sum_loss(opt, model, x))
    assert list(opt.slots) == ["0"] and opt.runtime_fallbacks == {} and opt.counters["runtime_fallbacks"] == 0


def _sum_loss(opt: CurvatureOptimizer, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = model(x).pow(2).sum()
    loss.backward()
    return loss


# ------------------------------------------------------------------ _record_inputs
def _linear(**kwargs) -> tuple[nn.Module, KFAC]:
    """Linear(3, 2) (float64) with KFAC lr 0.1, damping 0.3; the MC Fisher samples a Gaussian likelihood."""
    if kwargs.get("fisher") == "mc":
        kwargs["likelihood"] = "gaussian"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).to(D)
    return model, KFAC(model, lr=0.1, damping=0.3, **kwargs)


def test_a_non_finite_input_batch_is_named_as_the_skip_reason():
    model, opt = _linear()
    x = torch.randn(4, 3, dtype=D)
    x[1, 2] = float("nan")
    opt.step(lambda: _sum_loss(opt, model, x))
    assert opt.counters["skip_reasons"] == {"non-finite input batch": 1}


def test_a_forward_without_gradients_is_not_part_of_the_input_batch():
    """The closure evaluates a NaN batch under no_grad (not a training input) and then has a non-finite
    loss on finite inputs: the skip reason is the loss's, not the input batch's."""
    model, opt = _linear()
    x, bad = torch.randn(4, 3, dtype=D), torch.full((4, 3), float("nan"), dtype=D)

    def closure() -> torch.Tensor:
        with torch.no_grad():
            model(bad)
        return _sum_loss(opt, model, x) * float("nan")
    opt.step(closure)
    assert opt.counters["skip_reasons"] == {"non-finite loss": 1}


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_recorded_inputs_are_the_gradient_forwards_and_only_mc_keeps_them_for_sampling(fisher):
    model, opt = _linear(fisher=fisher)
    x, y = torch.randn(4, 3, dtype=D), torch.randn(2, 3, dtype=D)
    with torch.no_grad():
        model(y)
    model(x)
    assert [(a[0] is x, k) for a, k in opt._batch_inputs] == [(True, {})]
    assert [(a[0] is x, k) for a, k in opt._inputs] == ([(True, {})] if fisher == "mc" else [])


def test_a_forward_without_gradients_starts_no_capture_pass():
    """Forward with gradients (pass 1: Linear sees 4 samples), a forward under no_grad, then the layer
    called directly with gradients: that call still belongs to pass 1 (one pass of 4 samples, 2 calls
    with 4 rows each), as no backward and no gradient forward of the model came between."""
    model, opt = _linear()
    x = torch.randn(4, 3, dtype=D)
    model(x)
    with torch.no_grad():
        model(x)
    model[0](x)
    record = opt.capture.records["0"]
    assert (record.batch_size, record.calls, record.group_rows) == (4, 2, [(4, 2)])


# ------------------------------------------------------------------ _configure_capture
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_capture_flags_follow_the_statistics_schedule(fisher):
    """curvature_update_freq=2: rows are captured at steps 0, 2, ... only; G rows only for the
    empirical Fisher (the MC Fisher samples its own pass); no H rows (no second pass)."""
    model, opt = _linear(fisher=fisher, curvature_update_freq=2)
    x = torch.randn(4, 3, dtype=D)
    flags = []
    for _ in range(3):
        cfg = opt.capture.config
        flags.append((cfg.a, cfg.g, cfg.h))
        opt.step(lambda: _sum_loss(opt, model, x))
    g = fisher == "empirical"
    assert flags == [(True, g, False), (False, False, False), (True, g, False)]
    assert opt.steps == 3 and opt.counters["skipped_steps"] == 0
