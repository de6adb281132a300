"""Setting up ``CurvatureOptimizer``, exactly: ``describe()``'s table, tied-weight diagnostics and
``add_param_group``'s per-parameter placement.

Oracles:

* ``describe()``: the full text, written out by hand from the documented layout (columns ``layer``,
  ``module``, ``adapter``, ``curvature``, ``parameters``, each left-justified to its widest entry, two
  spaces apart, no trailing blanks): every trainable parameter counted once, in the first row that
  holds it; fallback rows show the rule with the settings of the group of the module's first own
  parameter, and the reason when there is one.
* Tied weights: the full reason each member falls back with (or the one summed block).
* ``add_param_group``: adding a layer with ``block=recipe`` is the same as building the optimizer
  with that layer and group from the start (every step bit-identical, the same table); a
  parameter without a block gets the fallback rule (a module row, or a ``param_groups[i][j]`` row
  for a parameter outside the model); every rejection raises its full message and leaves the
  optimizer without the group.
"""

from __future__ import annotations

import copy
import re
from typing import Callable, Iterator

import pytest
import torch
from torch import nn

from curvature.adapters import LinearAdapter, UnsupportedLayerError, register_adapter, unregister_adapter
from optimizers import KBFGS, KFAC, CurvatureOptimizer, kbfgs_block, kbfgsl_block, kfac_block
from tests.optimizers.closures import mean_square_closure
from tests.optimizers.test_fallbacks import ScaledLinear
from tests.optimizers.test_param_groups import _problem
from tests.optimizers.test_tied_weights import TiedPair
from tests.optimizers.thread_world import ThreadComm, World

D = torch.float64
KFAC_TEXT = "kfac-expand[A: EMACovarianceFactor, G: EMACovarianceFactor]"
ADVICE = ("the optimizer cannot follow a changed model: build a new optimizer after changing the model "
          "(or add new parameters with add_param_group)")


def _base() -> tuple[nn.Sequential, KFAC]:
    """Linear(5, 6) → Tanh → Linear(6, 3) (float64) with KFAC, lr 0.1, momentum 0.9, one group."""
    model = _problem("cpu")[0]
    return model, KFAC(model, lr=0.1, damping=0.3)


def _lines(*rows: str) -> str:
    return "\n".join(rows)


# ------------------------------------------------------------------ describe() at construction
def test_describe_kfac_is_the_exact_table():
    """Header, one row per layer: Linear(5, 6) has 30 + 6 = 36 parameters, Linear(6, 3) 18 + 3 = 21."""
    assert _base()[1].describe() == _lines(
        "layer  module  adapter        curvature                                                    parameters",
        f"0      Linear  LinearAdapter  {KFAC_TEXT}  36",
        f"2      Linear  LinearAdapter  {KFAC_TEXT}  21",
    )


def test_describe_kbfgs_is_the_exact_table():
    model = _problem("cpu")[0]
    text = "kbfgs-expand[A: HessianActionFactor, G: BFGSFactor]"
    assert KBFGS(model, lr=0.1, damping=0.3).describe() == _lines(
        "layer  module  adapter        curvature                                            parameters",
        f"0      Linear  LinearAdapter  {text}  36",
        f"2      Linear  LinearAdapter  {text}  21",
    )


def test_describe_mixed_composition_with_a_fallback_in_its_own_group():
    """K-BFGS(L) by name, KFAC by type, LayerNorm without a recipe: SGD fallback with the settings of
    the LayerNorm's group (lr 0.05, momentum 0.5), not the defaults (lr 0.1, momentum 0.9)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    groups = [{"params": [*model[0].parameters(), *model[3].parameters()]},
              {"params": model[1].parameters(), "lr": 0.05, "momentum": 0.5}]
    opt = CurvatureOptimizer(model, 0.1, {"0": kbfgsl_block(memory=3), nn.Linear: kfac_block()}, damping=0.3,
                             param_groups=groups)
    assert opt.describe() == _lines(
        "layer  module     adapter        curvature                                                            parameters",
        "0      Linear     LinearAdapter  kbfgsl-expand[A: HessianActionFactor, G: LBFGSFactor]                48",
        "3      Linear     LinearAdapter  kfac-expand[A: EMACovarianceFactor, G: EMACovarianceFactor]          27",
        "1      LayerNorm  -              fallback (sgd, lr=0.05, momentum=0.5): no block for this layer type  16",
    )


def test_describe_lists_the_other_member_of_a_summed_tied_block_with_zero_parameters():
    opt = KFAC(TiedPair(), lr=0.1)
    assert opt.describe() == _lines(
        "layer  module  adapter        curvature                                                    parameters",
        f"a      Linear  LinearAdapter  {KFAC_TEXT}  12",
        "b      Linear  LinearAdapter  one summed block with 'a' (tied weights)                     0",
    )


class Gated(nn.Module):
    """A module with a parameter of its own (``gate``, 2 entries) and a child Linear(2, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(2))
        self.inner = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.gate


def test_describe_counts_a_fallback_container_by_its_own_parameters_only():
    """``Gated`` has no adapter and its child is mapped to None: both fall back, ``Gated`` with its
    own 2 parameters (not its child's 6), the child with its 6."""
    model = nn.Sequential(Gated()).to(D)
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: None})
    assert opt.describe() == _lines(
        "layer    module  adapter  curvature                                                           parameters",
        "0        Gated   -        fallback (sgd, lr=0.1, momentum=0.9): no block for this layer type  2",
        "0.inner  Linear  -        fallback (sgd, lr=0.1, momentum=0.9): blocks maps it to None        6",
    )


def test_describe_a_fallback_layer_frozen_after_the_build_has_zero_parameters():
    """A fallback module with no trainable parameter left is listed with 0 and the default settings."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)).to(D)
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()})
    model[1].requires_grad_(False)
    assert opt.describe() == _lines(
        "layer  module     adapter        curvature                                                           parameters",
        "0      Linear     LinearAdapter  kfac-expand[A: EMACovarianceFactor, G: EMACovarianceFactor]         6",
        "1      LayerNorm  -              fallback (sgd, lr=0.1, momentum=0.9): no block for this layer type  0",
    )


# ------------------------------------------------------------------ tied weights
PARTIAL = ("partial tie between ['0', '2']: they share some but not all of their weight/bias (one summed block "
           "for tied weights needs the very same weight and bias in every layer)")
TRANSPOSED = ("tied weights shared between ['0', '1']: an embedding's gradient matrix is the transpose of a "
              "Linear-like layer's (its A is the token side, the other's A the input side), so the two Kronecker "
              "structures are transposed and cannot be summed in one block")


def test_partial_tie_reason_is_exact():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    model[2].weight = model[0].weight
    assert KFAC(model, lr=0.1).fallback_reasons == {"0": PARTIAL, "2": PARTIAL}


def test_embedding_tied_with_a_linear_head_reason_is_exact():
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    assert KFAC(nn.Sequential(emb, head), lr=0.1).fallback_reasons == {"0": TRANSPOSED, "1": TRANSPOSED}


def test_tied_attention_projections_fall_back_with_the_reason():
    """Two MultiheadAttention holding the same in_proj weight and bias: a full tie of one adapter kind
    and shapes, refused because the projections are applied functionally; the out_proj keep blocks."""
    model = nn.ModuleDict({"a": nn.MultiheadAttention(4, 2), "b": nn.MultiheadAttention(4, 2)})
    model.b.in_proj_weight, model.b.in_proj_bias = model.a.in_proj_weight, model.a.in_proj_bias
    opt = KFAC(model, lr=0.1)
    reason = "tied weights shared between ['a', 'b']: tied attention projections are not supported"
    assert opt.fallback_reasons == {"a": reason, "b": reason}
    assert list(opt.slots) == ["a.out_proj", "b.out_proj"]


class DuckLinear(nn.Linear):
    """A Linear whose registered adapter is :class:`DuckAdapter`."""


class DuckAdapter:
    """An adapter by the protocol only (no ``LayerAdapter`` base): it has none of the optional
    ``one_hot_input``, ``functional_weight`` and ``hook_module``; everything else is a LinearAdapter's."""

    def __init__(self, module: nn.Module) -> None:
        self._inner = LinearAdapter(module)
        self.module, self.has_bias = module, self._inner.has_bias

    weight = property(lambda self: self._inner.weight)
    bias = property(lambda self: self._inner.bias)
    a_dim = property(lambda self: self._inner.a_dim)
    g_dim = property(lambda self: self._inner.g_dim)

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self._inner.input_rows(x)

    def output_rows(self, h: torch.Tensor) -> torch.Tensor:
        return self._inner.output_rows(h)

    def parameters(self) -> list[nn.Parameter]:
        return self._inner.parameters()

    def grad_matrix(self) -> torch.Tensor:
        return self._inner.grad_matrix()

    def weight_matrix(self) -> torch.Tensor:
        return self._inner.weight_matrix()

    def split_matrix(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._inner.split_matrix(matrix)

    def to_matrix(self, weight_like: torch.Tensor, bias_like: torch.Tensor | None) -> torch.Tensor:
        return self._inner.to_matrix(weight_like, bias_like)


@pytest.fixture
def duck_adapter() -> Iterator[None]:
    register_adapter(DuckLinear, DuckAdapter)
    try:
        yield
    finally:
        unregister_adapter(DuckLinear)


def _tied(first: nn.Module, second: nn.Module) -> nn.ModuleDict:
    second.weight, second.bias = first.weight, first.bias
    return nn.ModuleDict({"a": first, "b": second})


def test_tie_of_two_adapter_kinds_without_one_hot_input_reason_is_exact(duck_adapter):
    """A protocol-only adapter has no ``one_hot_input``: it counts as not one-hot, so the reason is the
    generic one with the sorted adapter kinds."""
    opt = CurvatureOptimizer(_tied(nn.Linear(3, 3), DuckLinear(3, 3)), 0.1, {nn.Linear: kfac_block()})
    reason = ("tied weights shared between ['a', 'b'], layers of different kinds (['DuckAdapter', 'LinearAdapter']); "
              "no common Kronecker block")
    assert opt.fallback_reasons == {"a": reason, "b": reason}


def test_full_tie_of_protocol_only_adapters_gets_one_summed_block(duck_adapter):
    """No ``functional_weight`` on the adapter means no functional projection: one summed block."""
    opt = CurvatureOptimizer(_tied(DuckLinear(3, 3), DuckLinear(3, 3)), 0.1, {nn.Linear: kfac_block()})
    assert opt.describe() == _lines(
        "layer  module      adapter      curvature                                                    parameters",
        f"a      DuckLinear  DuckAdapter  {KFAC_TEXT}  12",
        "b      DuckLinear  DuckAdapter  one summed block with 'a' (tied weights)                     0",
    )


# ------------------------------------------------------------------ add_param_group: a layer with a block
GROUP = {"lr": 0.2, "damping": 0.5, "momentum": 0.5, "weight_decay": 0.01}


def _two_ways(recipe: Callable[[], Callable]) -> tuple[nn.Sequential, CurvatureOptimizer, nn.Sequential,
                                                        CurvatureOptimizer]:
    """The base model extended by layer "3" = Linear(3, 2): (model, optimizer given the layer by
    ``add_param_group`` with ``block=recipe()`` and GROUP's settings) and its twin (reference)
    built with the layer and the same group from the start."""
    model = _problem("cpu")[0]
    layer = nn.Linear(3, 2).to(D)
    twin = copy.deepcopy(nn.Sequential(*model, layer))
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()}, damping=0.3)
    model.add_module("3", layer)
    opt.add_param_group({"params": [layer.weight, layer.bias], "block": recipe(), **GROUP})
    ref = CurvatureOptimizer(twin, 0.1, {nn.Linear: kfac_block(), "3": recipe()}, damping=0.3,
                             param_groups=[{"params": [p for m in twin[:3] for p in m.parameters()]},
                                           {"params": twin[3].parameters(), **GROUP}])
    return model, opt, twin, ref


def _closure(opt: CurvatureOptimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("recipe, kind", [(kfac_block, "kfac"), (kbfgs_block, "kbfgs")])
def test_added_layer_with_a_block_is_the_layer_built_with_its_group(recipe, kind):
    """Weight and bias of the added layer form one block of its group (lr, damping, momentum and
    weight decay of GROUP; K-BFGS fixes λ_A = μ2 = √0.5 from the group's damping): three steps
    are bit-identical to the optimizer built with that layer and group from the start."""
    model, opt, twin, ref = _two_ways(recipe)
    assert opt.describe() == ref.describe() and list(opt.fallback_modules) == []
    assert opt.blocks["3"].kind == kind and opt.blocks["3"].name == "3"
    assert opt.require_closure is (kind == "kbfgs")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g, dtype=D), torch.randn(16, 2, generator=g, dtype=D)
    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
        ref.step(_closure(ref, twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_added_kbfgs_layer_makes_a_kfac_optimizer_need_a_closure_and_keeps_its_build_damping():
    model, opt, _, _ = _two_ways(kbfgs_block)
    with pytest.raises(RuntimeError, match=r"^CurvatureOptimizer needs step\(closure\): "):
        opt.step()
    opt.param_groups[1]["damping"] = 0.25
    x, y = torch.zeros(4, 5, dtype=D), torch.zeros(4, 2, dtype=D)
    message = ("layer '3': kbfgs fixed lambda_A and mu2 from damping=0.5 when the optimizer was built, but "
               "param_groups[1]['damping'] is now 0.25; build a new optimizer with the new damping (or pass "
               "lambda_a= and mu2= explicitly) instead of changing it")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        opt.step(_closure(opt, model, x, y))


def test_added_block_lives_on_its_weights_device_whatever_the_default_device():
    """The block's factors are allocated on the weight's device, not on the ambient default device."""
    model, opt = _base()
    model.add_module("3", nn.Linear(3, 2).to(D))
    with torch.device("meta"):
        opt.add_param_group({"params": model[3].parameters(), "block": kfac_block()})
    block = opt.blocks["3"]
    assert (block.a_factor.F.device, block.g_factor.F.device) == (torch.device("cpu"), torch.device("cpu"))


def test_describe_after_adding_a_block_layer_an_outside_parameter_and_a_plain_layer():
    """Group 1: layer "3" with a block, then a parameter outside the model (its own row, labelled by
    its place, with group 1's lr 0.2); group 2: a LayerNorm without a block (fallback, no reason,
    with group 2's lr 0.05 and momentum 0.5)."""
    model, opt = _base()
    model.add_module("3", nn.Linear(3, 2).to(D))
    model.add_module("4", nn.LayerNorm(2).to(D))
    temperature = nn.Parameter(torch.ones(2, dtype=D))
    opt.add_param_group({"params": [model[3].weight, model[3].bias, temperature], "block": kfac_block(), "lr": 0.2})
    opt.add_param_group({"params": model[4].parameters(), "lr": 0.05, "momentum": 0.5})
    assert list(opt.slots) == ["0", "2", "3"] and list(opt.fallback_modules) == ["4"]
    assert opt.fallback_modules["4"] is model[4]
    assert opt.describe() == _lines(
        "layer               module     adapter        curvature                                                    parameters",
        f"0                   Linear     LinearAdapter  {KFAC_TEXT}  36",
        f"2                   Linear     LinearAdapter  {KFAC_TEXT}  21",
        f"3                   Linear     LinearAdapter  {KFAC_TEXT}  8",
        "4                   LayerNorm  -              fallback (sgd, lr=0.05, momentum=0.5)                        4",
        "param_groups[1][2]  Parameter  -              fallback (sgd, lr=0.2, momentum=0.9)                         2",
    )


class Gain(nn.Module):
    """A parameter ``gain`` and no ``weight`` or ``bias`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3, dtype=D))


class Shift(nn.Module):
    """A parameter named ``bias`` and no ``weight`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2, dtype=D))


def test_parameters_that_are_no_layer_weight_get_the_fallback_even_in_a_group_with_a_block():
    model, opt = _base()
    model.add_module("g", Gain())
    model.add_module("s", Shift())
    opt.add_param_group({"params": [model.g.gain, model.s.bias], "block": kfac_block(), "lr": 0.2})
    assert list(opt.slots) == ["0", "2"] and list(opt.fallback_modules) == ["g", "s"]
    assert opt.describe().splitlines()[3:] == [
        "g      Gain    -              fallback (sgd, lr=0.2, momentum=0.9)                         3",
        "s      Shift   -              fallback (sgd, lr=0.2, momentum=0.9)                         2",
    ]


def test_added_layer_with_a_parameter_its_adapter_does_not_cover():
    """ScaledLinear: W|b get the block (8 parameters), ``scale`` the fallback rule; the fallback row
    counts only ``scale`` (2), the block's parameters being counted in the block's row."""
    model, opt = _base()
    model.add_module("3", ScaledLinear(3, 2).to(D))
    opt.add_param_group({"params": model[3].parameters(), "block": kfac_block(), "lr": 0.2})
    assert list(opt.slots) == ["0", "2", "3"] and list(opt.fallback_modules) == ["3"]
    assert opt.describe().splitlines()[3:] == [
        f"3      ScaledLinear  LinearAdapter  {KFAC_TEXT}  8",
        "3      ScaledLinear  -              fallback (sgd, lr=0.2, momentum=0.9)                         2",
    ]


def test_a_module_shared_by_two_parents_is_named_by_its_first_place():
    """``named_modules`` lists a shared module once, at its first place ("a.0"), not at a parent."""
    model, opt = _base()
    shared = nn.Linear(2, 2).to(D)
    model.add_module("a", nn.Sequential(shared))
    model.add_module("b", nn.Sequential(shared))
    opt.add_param_group({"params": shared.parameters(), "lr": 0.05})
    assert list(opt.fallback_modules) == ["a.0"] and opt.fallback_modules["a.0"] is shared
    assert opt.describe().splitlines()[-1] == \
        "a.0    Linear  -              fallback (sgd, lr=0.05, momentum=0.9)                        6"


def test_freezing_an_added_parameter_is_reported_with_its_layer():
    model, opt = _base()
    model.add_module("3", nn.Linear(3, 2).to(D))
    opt.add_param_group({"params": model[3].parameters(), "block": kfac_block()})
    model[3].weight.requires_grad_(False)
    message = (f"a parameter of layer '3' was frozen (requires_grad=False) after the optimizer was built; {ADVICE} "
               "(or set its group's lr to 0 to keep it fixed)")
    x = torch.zeros(4, 5, dtype=D)
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        opt.step(_closure(opt, model, x, torch.zeros(4, 2, dtype=D)))


# ------------------------------------------------------------------ add_param_group: rejections
class Scale(nn.Module):
    """A ``weight`` parameter but no adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, dtype=D))


def _rejected(opt: CurvatureOptimizer, group: dict, error: type[Exception], message: str) -> None:
    """``add_param_group(group)`` raises ``error(message)`` and leaves the optimizer as it was."""
    groups, slots, fallback = len(opt.param_groups), list(opt.slots), list(opt.fallback_modules)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        opt.add_param_group(group)
    assert (len(opt.param_groups), list(opt.slots), list(opt.fallback_modules)) == (groups, slots, fallback)


def test_add_param_group_rejections_have_their_full_messages():
    model, opt = _base()
    model.add_module("3", nn.Linear(3, 2).to(D))
    model.add_module("s", Scale())
    _rejected(opt, {"params": model[3].parameters(), "block": "kfac"}, TypeError,
              "param_groups[1]['block'] must be a recipe such as kfac_block(), got 'kfac'")
    _rejected(opt, {"params": [model.s.weight], "block": kfac_block()}, UnsupportedLayerError,
              "layer 's': no adapter for Scale, so it cannot get a block")
    _rejected(opt, {"params": [model[3].weight], "block": kfac_block()}, ValueError,
              "layer '3': put its weight and bias in the same new group to give it a block")
    outside = nn.Parameter(torch.ones(2, dtype=D))  # a recipe that is no recipe, even where no layer would use it
    _rejected(opt, {"params": [outside], "block": "kfac"}, TypeError,
              "param_groups[1]['block'] must be a recipe such as kfac_block(), got 'kfac'")
    model.add_module("m", nn.MultiheadAttention(4, 2, add_bias_kv=True).to(D))  # the adapter's own refusal
    _rejected(opt, {"params": model.m.parameters(), "block": kfac_block()}, UnsupportedLayerError,
              "MultiheadAttention with add_bias_kv is not supported")


def test_fallback_error_names_the_parameter_without_a_block():
    """A model layer by its name; a parameter outside the model by its place in the groups."""
    model = _problem("cpu")[0]
    opt = KFAC(model, lr=0.1, fallback="error")
    model.add_module("3", nn.Linear(3, 2).to(D))
    tail = ("has no curvature block and fallback='error': pass a 'block' recipe in the group, or build the "
            "optimizer with fallback='sgd' or 'adam'")
    _rejected(opt, {"params": model[3].parameters()}, UnsupportedLayerError, f"parameter of '3' {tail}")
    extra = nn.Parameter(torch.ones(2, dtype=D))
    _rejected(opt, {"params": [model[3].weight, model[3].bias, extra], "block": kfac_block()}, UnsupportedLayerError,
              f"parameter of 'param_groups[1][2]' {tail}")


def test_grouped_convolution_added_under_data_parallel_training_is_rejected():
    """Per-group blocks have no data-parallel reduction (a rank of a 2-rank world; no collective runs)."""
    model = nn.Sequential(nn.Linear(4, 4)).to(D)
    opt = KFAC(model, lr=0.1, distributed=ThreadComm(World(2), 0))
    model.add_module("1", nn.Conv2d(4, 4, 3, groups=2).to(D))
    _rejected(opt, {"params": model[1].parameters(), "block": kfac_block()}, UnsupportedLayerError,
              "per-group blocks of a grouped convolution have no data-parallel reduction")


# ------------------------------------------------------------------ add_param_group: an attention with a block
class Attending(nn.Module):
    """``pre`` = Linear(4, 4), then (once added as ``attn``) a MultiheadAttention(4, 2) called as
    self-attention (``how="self"``) or as cross-attention on a memory (``how="kv"``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.how = how

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        if not hasattr(self, "attn"):
            return h
        kv = h if self.how == "self" else memory
        return self.attn(h, kv, kv, need_weights=False)[0]


@pytest.mark.parametrize("how", ["self", "kv"])
def test_added_attention_with_a_block_is_the_attention_built_with_its_group(how):
    """The packed in_proj (an adapter whose weight is ``in_proj_weight``, not ``module.weight``) and
    the functionally applied out_proj (its contextual adapter) get the blocks they get when the model
    is built with them: the same table, and three bit-identical steps (cross-attention switches the
    in_proj to per-chunk blocks built by the group's recipe at the first step)."""
    torch.manual_seed(0)
    model = Attending(how).to(D)
    attn = nn.MultiheadAttention(4, 2, batch_first=True).to(D)
    twin = copy.deepcopy(model)
    twin.attn = copy.deepcopy(attn)
    opt = KFAC(model, lr=0.1, damping=0.3)
    model.attn = attn
    opt.add_param_group({"params": [attn.in_proj_weight, attn.in_proj_bias, *attn.out_proj.parameters()],
                         "block": kfac_block(), **GROUP})
    ref = KFAC(twin, lr=0.1, damping=0.3,
               param_groups=[{"params": twin.pre.parameters()}, {"params": twin.attn.parameters(), **GROUP}])
    assert opt.describe() == ref.describe() and list(opt.fallback_modules) == []
    g = torch.Generator().manual_seed(1)
    x, memory = torch.randn(2, 3, 4, generator=g, dtype=D), torch.randn(2, 5, 4, generator=g, dtype=D)
    for _ in range(3):
        for o, m in ((opt, model), (ref, twin)):
            o.step(mean_square_closure(o, m, x, memory))
    assert opt.describe() == ref.describe()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
