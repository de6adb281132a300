"""Which layer gets which block when ``CurvatureOptimizer`` is built, exactly.

Oracles (all from the documented rules of ``CurvatureOptimizer`` and ``_check_blocks``):

* Precedence: a layer *name* in ``blocks`` wins over a module *type*; a key mapped to ``None`` means
  the fallback rule with the reason "blocks maps it to None", a layer no key matches falls back with
  "no block for this layer type". Every other fallback reason is the full documented sentence.
* A recipe is called as ``recipe(name, adapter, ctx)`` with the layer's name, its adapter and
  ``RecipeContext(weight dtype, weight device, damping of the weight's param group)``; the slot keeps
  that recipe and context (to rebuild per-chunk blocks later).
* A block that consumes captured rows (``needs_a`` or ``needs_g`` or ``needs_second_pass``) needs an
  adapter with rows, and its layer is hooked by the capture; any other block is not.
* A grouped convolution gets one block per group (``ChunkedBlock``, chunks ``name[g<j>]``), except under
  data-parallel training, where it falls back.
* Tied weights: when the shared block cannot be built, the first member falls back with the error and
  every other member with "tied weights shared with <first>, which falls back (<error>)".
* Every rejection of ``blocks=`` / ``param_groups=`` raises its full message (anchored ``^...$``).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from curvature.adapters import UnsupportedLayerError
from curvature.blocks import KroneckerBlock
from curvature.chunked import ChunkedBlock
from optimizers import KFAC, CurvatureOptimizer, diagonal_block, kbfgsl_block, kfac_block
from optimizers.recipes import RecipeContext
from tests.optimizers.test_fallbacks import ScaledLinear, Symmetric
from tests.optimizers.thread_world import ThreadComm, World
from tests.optimizers.messages import exact as _exact

D = torch.float64
CPU = torch.device("cpu")
KFAC_TEXT = "kfac-expand[A: EMACovarianceFactor, G: EMACovarianceFactor]"
NOT_A_RECIPE = ("is not a recipe: map it to a recipe such as kfac_block() or kbfgsl_block(memory=20) (a callable "
                "recipe(name, adapter, ctx) -> CurvatureBlock), or to None")
NO_CALL = ("cannot be called as a recipe: a recipe is called as recipe(name, adapter, ctx) and returns a "
           "CurvatureBlock; use kfac_block(), kbfgs_block(), ...")



def _mlp() -> nn.Sequential:
    """Linear(4, 5) → Tanh → Linear(5, 5) → LayerNorm(5) → Linear(5, 2), float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 2)).to(D)


class Recorder:
    """A recipe (kfac_block() underneath) that records every call ``(name, adapter, ctx)``."""

    def __init__(self) -> None:
        self.inner = kfac_block()
        self.calls: list[tuple[str, object, RecipeContext]] = []

    def __call__(self, name, adapter, ctx):
        self.calls.append((name, adapter, ctx))
        return self.inner(name, adapter, ctx)


def _flagged(needs_a: bool, needs_g: bool, second: bool) -> Callable:
    """A recipe of a diagonal (gradient-source, row-free) block that declares the given needs."""
    inner = diagonal_block(source="gradient")

    def build(name, adapter, ctx):
        block = inner(name, adapter, ctx)
        block.needs_a, block.needs_g, block.needs_second_pass = needs_a, needs_g, second
        return block

    return build


class Gain(nn.Module):
    """y = x·g with a parameter of its own and no adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(3, dtype=D))

    def forward(self, x):
        return x * self.g


# ------------------------------------------------------------------ precedence
def test_name_beats_type_and_none_means_the_fallback_with_its_reason():
    """Linear by type → KFAC; "2" by name → K-BFGS(L) (over the type); "4" by name → None (fallback,
    over the type); the LayerNorm matches no key."""
    model = _mlp()
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block(), "2": kbfgsl_block(memory=3), "4": None},
                             damping=0.3)
    assert list(opt.slots) == ["0", "2"]
    assert opt.blocks["0"].describe() == KFAC_TEXT
    assert opt.blocks["2"].describe() == "kbfgsl-expand[A: HessianActionFactor, G: LBFGSFactor]"
    assert opt.fallback_modules == {"3": model[3], "4": model[4]}
    assert opt.fallback_reasons == {"3": "no block for this layer type", "4": "blocks maps it to None"}


def test_a_type_mapped_to_none_is_the_fallback_with_its_reason():
    model = _mlp()
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: None, nn.LayerNorm: diagonal_block(source="gradient")}, damping=0.3)
    assert list(opt.slots) == ["3"]
    assert opt.fallback_reasons == {n: "blocks maps it to None" for n in ("0", "2", "4")}


def test_recipe_gets_the_layer_name_adapter_and_its_groups_context_and_the_slot_keeps_them():
    """Groups: "0" and "4" in a group with damping 0.05, "2" and the LayerNorm in the defaults'
    group (damping 0.3): ctx.damping follows the weight's group."""
    model = _mlp()
    rec = Recorder()
    groups = [{"params": [*model[0].parameters(), *model[4].parameters()], "damping": 0.05},
              {"params": [*model[2].parameters(), *model[3].parameters()]}]
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: rec}, damping=0.3, param_groups=groups)
    want = {"0": RecipeContext(D, CPU, 0.05), "2": RecipeContext(D, CPU, 0.3), "4": RecipeContext(D, CPU, 0.05)}
    assert [(n, c) for n, _, c in rec.calls] == list(want.items())
    for name, adapter, ctx in rec.calls:
        slot = opt.slots[name]
        assert (slot.name, slot.adapter, slot.block.name, slot.recipe, slot.ctx) == (name, adapter, name, rec, ctx)
        assert slot.ctx.device == CPU and slot.ctx.damping == want[name].damping


# ------------------------------------------------------------------ fallback reasons
def test_every_fallback_reason_is_the_full_sentence():
    """A parametrized weight, a frozen bias, a parameter the adapter does not cover, a module with no
    adapter (named in blocks), and a LayerNorm (no key) — the Linear "ok" keeps its block."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"param": nn.Linear(3, 3), "frozen": nn.Linear(3, 3), "scaled": ScaledLinear(3, 3),
                           "gain": Gain(), "norm": nn.LayerNorm(3), "ok": nn.Linear(3, 3)}).to(D)
    parametrize.register_parametrization(model["param"], "weight", Symmetric())
    model["frozen"].bias.requires_grad_(False)
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block(), "gain": kfac_block()})
    assert list(opt.slots) == ["ok"]
    assert opt.fallback_reasons == {
        "param": "parametrized weight (torch.nn.utils.parametrize)",
        "param.parametrizations.weight": "parametrized weight (torch.nn.utils.parametrize)",
        "frozen": "part of its weight/bias is frozen",
        "scaled": "parameters ['scale'] that LinearAdapter does not cover",
        "gain": "no adapter for Gain",
        "norm": "no block for this layer type",
    }


def test_a_linear_with_a_child_layer_keeps_its_block_and_the_child_is_on_its_own():
    """Only the module's *own* parameters must be covered by its adapter; the child LayerNorm is a
    separate module (here without a block)."""
    torch.manual_seed(0)
    outer = nn.Linear(3, 3)
    outer.add_module("norm", nn.LayerNorm(3))
    model = nn.Sequential(outer).to(D)
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()})
    assert list(opt.slots) == ["0"]
    assert opt.fallback_reasons == {"0.norm": "no block for this layer type"}


def test_fallback_error_names_the_layer_its_type_and_the_reason():
    with pytest.raises(UnsupportedLayerError,
                       match=_exact("layer '3' (LayerNorm): no block for this layer type, and fallback='error'")):
        CurvatureOptimizer(_mlp(), 0.1, {nn.Linear: kfac_block()}, fallback="error")


def test_lazy_layers_are_rejected_with_the_full_message():
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=_exact("layers ['0'] are lazy and not initialized yet: run one forward pass "
                                                "on a batch before building the optimizer")):
        CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()})


# ------------------------------------------------------------------ blocks that need captured rows
def _rows_reason(block_text: str) -> str:
    return (f"{block_text} needs captured rows, which NormAffineAdapter has none of "
            "(use diagonal_block(source='gradient'), which needs only the gradient)")


def test_a_row_consuming_block_on_a_normalization_layer_falls_back_and_later_layers_keep_theirs():
    model = _mlp()
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block(), "3": kfac_block()})
    assert list(opt.slots) == ["0", "2", "4"]
    assert opt.fallback_reasons == {"3": _rows_reason(KFAC_TEXT)}


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, False, False)])
def test_any_declared_need_for_rows_is_checked_and_hooks_the_layer(needs):
    """On a LayerNorm (no rows) each need alone makes the block fall back; on a Linear each need alone
    makes the capture hook the layer, and a block with none is not hooked."""
    model = _mlp()
    opt = CurvatureOptimizer(model, 0.1, {"0": _flagged(*needs), "3": _flagged(*needs)})
    text = "diagonal[gradient, power=1.0]"
    if any(needs):
        assert list(opt.slots) == ["0"]
        assert opt.fallback_reasons == {"2": "no block for this layer type", "3": _rows_reason(text),
                                        "4": "no block for this layer type"}
        assert list(opt.capture.layers) == ["0"]
    else:
        assert list(opt.slots) == ["0", "3"]
        assert list(opt.capture.layers) == []


class TiedNorms(nn.Module):
    """LayerNorms ``a`` and ``b`` holding the very same weight and bias, then a Linear ``c``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.LayerNorm(3), nn.LayerNorm(3), nn.Linear(3, 2)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_tied_members_fall_back_together_when_their_shared_block_cannot_be_built():
    model = TiedNorms().to(D)
    opt = CurvatureOptimizer(model, 0.1, {nn.LayerNorm: kfac_block(), nn.Linear: kfac_block()})
    reason = _rows_reason(KFAC_TEXT)
    assert list(opt.slots) == ["c"]
    assert list(opt.fallback_modules) == ["a", "b"]
    assert opt.fallback_modules["a"] is model.a and opt.fallback_modules["b"] is model.b
    assert opt.fallback_reasons == {"a": reason, "b": f"tied weights shared with 'a', which falls back ({reason})"}
    with pytest.raises(UnsupportedLayerError, match=_exact(f"layer 'a' (LayerNorm): {reason}, and fallback='error'")):
        CurvatureOptimizer(TiedNorms().to(D), 0.1, {nn.LayerNorm: kfac_block()}, fallback="error")


# ------------------------------------------------------------------ attention, grouped convolutions
def test_an_attention_gets_its_block_and_its_out_proj_the_contextual_adapter():
    """A single attention is no tie (its functionally applied projections are fine on their own)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2)}).to(D)
    opt = CurvatureOptimizer(model, 0.1, {nn.MultiheadAttention: kfac_block(), nn.Linear: kfac_block()})
    assert {n: type(s.adapter).__name__ for n, s in opt.slots.items()} == {
        "attn": "AttentionInProjAdapter", "attn.out_proj": "AttentionOutProjAdapter"}
    assert opt.fallback_reasons == {}


def _grouped_conv() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)).to(D)


def test_a_grouped_convolution_gets_one_named_block_per_group_and_steps():
    model = _grouped_conv()
    opt = KFAC(model, lr=0.1, damping=0.3)
    block = opt.blocks["0"]
    assert isinstance(block, ChunkedBlock)
    assert block.name == "0" and block.label == "group"
    assert {c: (r, b.name) for c, (r, b) in block.parts.items()} == {"g0": (slice(0, 2), "0[g0]"),
                                                                    "g1": (slice(2, 4), "0[g1]")}
    assert all(isinstance(b, KroneckerBlock) for _, b in block.parts.values())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, 3, 3, generator=g, dtype=D), torch.randn(6, 2, generator=g, dtype=D)
    before = model[0].weight.detach().clone()
    opt.zero_grad()
    (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
    opt.step()
    assert opt.counters["steps"] == 1 and opt.counters["skipped_steps"] == 0
    assert not torch.equal(model[0].weight, before) and bool(torch.isfinite(model[0].weight).all())


def test_a_grouped_convolution_falls_back_under_data_parallel_training():
    """A rank of a 2-rank world (building runs no collective)."""
    opt = KFAC(_grouped_conv(), lr=0.1, distributed=ThreadComm(World(2), 0))
    assert list(opt.slots) == ["2"]
    assert opt.fallback_reasons == {"0": "per-group blocks of a grouped convolution have no data-parallel reduction"}


# ------------------------------------------------------------------ blocks= validation
def _rejects(blocks: dict, error: type[Exception], message: str, model: nn.Module | None = None) -> None:
    with pytest.raises(error, match=_exact(message)):
        CurvatureOptimizer(_mlp() if model is None else model, 0.1, blocks)


def _wrong_arity(name):
    return None


def _returns_a_number(name, adapter, ctx):
    return 42


def test_blocks_key_and_recipe_rejections_have_their_full_messages():
    _rejects({"x": kfac_block()}, ValueError, "blocks names layers that the model does not have: ['x']")
    _rejects({3: kfac_block()}, TypeError,
             "blocks key 3 must be a module type (e.g. nn.Linear) or a layer name (e.g. 'encoder.0')")
    _rejects({Gain: kfac_block()}, ValueError,
             "blocks key Gain: there is no adapter for Gain, so a block can never apply to it; map it to None for "
             "the fallback rule, or register an adapter with curvature.register_adapter")
    _rejects({nn.LayerNorm: kfac_block}, TypeError,
             "blocks[nn.LayerNorm] = kfac_block: call the factory, e.g. {nn.LayerNorm: kfac_block()}")
    _rejects({"0": 3}, TypeError, f"blocks['0'] = 3 {NOT_A_RECIPE}")
    _rejects({nn.Linear: KroneckerBlock}, TypeError, f"blocks[nn.Linear] = {KroneckerBlock!r} {NOT_A_RECIPE}")
    _rejects({nn.Linear: _wrong_arity}, TypeError, f"blocks[nn.Linear] = {_wrong_arity!r} {NO_CALL}")
    _rejects({nn.Linear: _returns_a_number}, TypeError,
             "the recipe for layer '0' returned int, not a curvature block (a CurvatureBlock, or any object with "
             "the members of curvature.BlockProtocol)")


def test_a_key_mapped_to_none_does_not_end_the_validation():
    _rejects({nn.Linear: None, "x": kfac_block()}, ValueError, "blocks names layers that the model does not have: ['x']")


def test_a_container_key_names_up_to_three_of_its_layers():
    """Sequential "0" holds four Linear layers (and a Tanh): its own parameters are none."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    _rejects({"0": kfac_block()}, ValueError,
             "blocks key '0' names a Sequential with no parameters of its own, so a block can never apply to it; "
             "name its layers instead (e.g. ['0.0', '0.2', '0.3']) or use a module type as the key",
             model=nn.Sequential(inner).to(D))


# ------------------------------------------------------------------ param_groups
def test_param_groups_rejections_have_their_full_messages():
    model = _mlp()
    ps = list(model.parameters())
    shape = "param_groups must be a list of dicts like [{'params': [...], 'lr': 0.1}, ...]"
    for bad in ({"params": ps}, ps[0]):
        with pytest.raises(TypeError, match=_exact(shape)):
            CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()}, param_groups=bad)
    with pytest.raises(TypeError, match=_exact("param_groups[1] must be a dict with a 'params' entry, like "
                                               "{'params': model.head.parameters(), 'lr': 0.01}")):
        CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()}, param_groups=[{"params": ps}, {"lr": 0.1}])
    with pytest.raises(ValueError, match=_exact("parameters ['4.weight', '4.bias'] are trainable but in no entry of "
                                                "param_groups: add them to a group, or set requires_grad=False to "
                                                "freeze them")):
        CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()}, param_groups=[{"params": ps[:-2]}])


def test_a_group_may_hold_one_tensor_instead_of_a_list():
    model = _mlp()
    w = model[0].weight
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()}, damping=0.3,
                             param_groups=[{"params": w, "damping": 0.05},
                                           {"params": [p for p in model.parameters() if p is not w]}])
    assert len(opt.param_groups[0]["params"]) == 1 and opt.param_groups[0]["params"][0] is w
    assert opt.slots["0"].ctx == RecipeContext(D, CPU, 0.05)


def test_an_added_group_with_a_bad_setting_names_its_index():
    model = _mlp()
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()})
    extra = nn.Parameter(torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match=_exact("param_groups[1]['lr'] must be a finite number >= 0, got -1.0")):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    assert len(opt.param_groups) == 1
