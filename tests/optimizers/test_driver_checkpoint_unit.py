"""Checkpoints of ``CurvatureOptimizer`` (``state_dict`` / ``load_state_dict``), exactly.

The oracle of a round trip is the optimizer itself: a fresh optimizer on freshly initialised weights
that loads a checkpoint (and the weights) must give back the very same ``state_dict`` and then follow
the very same trajectory, bit for bit (torch.optim semantics), for KFAC, K-BFGS, K-BFGS(L) and a
mixed composition with Adam fallback moments and a parameter outside the model; the caller's
checkpoint is never aliased. The oracle of a rejection is the documented message, in full, naming the
path, the entries or the shapes, and an optimizer left unchanged. Cross-attention layers that switched
to per-chunk blocks, and layers moved to the fallback rule at a step, are rebuilt on load.
"""

from __future__ import annotations

import copy
import re
from typing import Callable

import pytest
import torch
from torch import nn

from curvature.adapters import LayerAdapter, UnsupportedLayerError
from curvature.chunked import ChunkedBlock
from curvature.blocks import CurvatureBlock
from optimizers import KFAC, CurvatureOptimizer, diagonal_block, kbfgsl_block, kfac_block
from optimizers.driver import _compare_state
from optimizers.recipes import RecipeContext
from tests.optimizers.test_architectures import Cross, SelfAndCross
from tests.optimizers.closures import mean_square_closure
from tests.optimizers.test_errors import MAKERS, _closure, _problem, assert_same

D = torch.float64
Setup = tuple[list[nn.Parameter], CurvatureOptimizer, Callable[[], torch.Tensor]]
_DIFFERENT_MODEL = "; the checkpoint is from a different model"
_DIFFERENT_OPTIMIZER = "; the checkpoint is from a different optimizer"


def _mixed(seed: int = 0, extra: bool = True) -> Setup:
    """Linear(5, 8) with K-BFGS(L) -> LayerNorm (Adam fallback) -> Tanh -> Linear(8, 3) with KFAC; with
    ``extra``, a scale vector outside the model (its own param group, Adam fallback) multiplies the output."""
    _, x, y = _problem("cpu")
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    scale = nn.Parameter(torch.ones(2, dtype=D) + seed)
    opt = CurvatureOptimizer(model, 0.1, {"0": kbfgsl_block(memory=3), nn.Linear: kfac_block()}, damping=0.3,
                             fallback="adam")
    if extra:
        opt.add_param_group({"params": [scale]})

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = model(x) * scale.sum() if extra else model(x)
        loss = 0.5 * ((out - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    return [*model.parameters()] + ([scale] if extra else []), opt, closure


def _setup(kind: str, seed: int = 0) -> Setup:
    """The parameters, optimizer and closure of one optimizer under test (``seed``: the initial weights)."""
    if kind == "mixed":
        return _mixed(seed)
    model = _problem("cpu", seed=seed)[0]
    _, x, y = _problem("cpu")  # the same batch whatever the seed
    opt = MAKERS[kind](model)
    return list(model.parameters()), opt, _closure(opt, model, x, y)


def _nan_closure(closure: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``closure`` whose loss is NaN (the optimizer skips the step and counts the reason)."""
    return lambda: closure() * float("nan")


def _copy_weights(source: list[nn.Parameter], target: list[nn.Parameter]) -> None:
    """What loading the model's state_dict does: ``target`` takes ``source``'s values."""
    with torch.no_grad():
        for p, q in zip(source, target):
            q.copy_(p)


def _rejects(opt: CurvatureOptimizer, state: dict, message: str) -> None:
    """Loading ``state`` raises ValueError with exactly ``message`` and leaves ``opt`` unchanged."""
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        opt.load_state_dict(state)
    assert_same(before, opt.state_dict())


# ------------------------------------------------------------------ state_dict: what a checkpoint holds
def test_state_dict_holds_exactly_the_documented_secondorder_entries():
    params, opt, closure = _setup("kfac")
    opt.step(_nan_closure(closure))
    for _ in range(2):
        opt.step(closure)
    extra = opt.state_dict()["secondorder"]
    assert sorted(extra) == ["blocks", "counters", "damping", "generator", "inversion_recovered", "kinds",
                             "recovery", "runtime_chunked", "runtime_fallbacks", "steps", "version"]
    assert extra["version"] == 1 and extra["steps"] == 2  # a skipped step is no step
    assert extra["counters"] == opt.counters and extra["counters"]["skip_reasons"] == {"non-finite loss": 1}
    assert extra["counters"]["skip_reasons"] is not opt.counters["skip_reasons"]  # a copy, not the live dict
    assert extra["inversion_recovered"] == 0 and extra["runtime_fallbacks"] == {} and extra["runtime_chunked"] == []


# ------------------------------------------------------------------ round trips and trajectories
@pytest.mark.parametrize("kind", ["kfac", "kbfgs", "kbfgsl", "mixed"])
def test_a_fresh_optimizer_continues_the_same_trajectory_bit_identically(kind):
    """After 4 steps (one of them skipped: 3 steps), a fresh optimizer on other initial weights loads the weights
    and the checkpoint: its state_dict equals the checkpoint, and the next 3 steps give the same losses,
    weights and state, bit for bit; the caller's checkpoint is not changed by those steps."""
    params, opt, closure = _setup(kind)
    opt.step(closure)
    opt.step(_nan_closure(closure))
    for _ in range(2):
        opt.step(closure)
    checkpoint = copy.deepcopy(opt.state_dict())
    pristine = copy.deepcopy(checkpoint)
    params2, opt2, closure2 = _setup(kind, seed=1)
    _copy_weights(params, params2)
    opt2.load_state_dict(checkpoint)
    assert_same(pristine, opt2.state_dict())
    assert opt2.steps == 3 and opt2.counters == pristine["secondorder"]["counters"]
    assert opt2.counters["skipped_steps"] == 1 and opt2.counters["skip_reasons"] == {"non-finite loss": 1}
    for _ in range(3):
        assert opt.step(closure).item() == opt2.step(closure2).item()
    assert all(torch.equal(p, q) for p, q in zip(params, params2))
    assert_same(opt.state_dict(), opt2.state_dict())
    assert_same(pristine, checkpoint)  # the loaded optimizer shares no tensor with the caller's checkpoint


def test_the_restored_counters_are_the_optimizers_own():
    """Skips after a load count in the loaded optimizer only, never in the checkpoint it came from."""
    params, opt, closure = _setup("kfac")
    opt.step(_nan_closure(closure))
    checkpoint = copy.deepcopy(opt.state_dict())
    params2, opt2, closure2 = _setup("kfac", seed=1)
    opt2.load_state_dict(checkpoint)
    opt2.step(_nan_closure(closure2))
    assert opt2.counters["skip_reasons"] == {"non-finite loss": 2} and opt2.counters["skipped_steps"] == 2
    assert checkpoint["secondorder"]["counters"]["skip_reasons"] == {"non-finite loss": 1}


def test_recovered_inversions_are_restored_and_default_to_zero():
    """A factor that cannot be inverted (F = -10 I planted, as in test_recovery) counts one recovered
    inversion; a checkpoint restores that count, and one without the entry (older checkpoints) gives 0."""
    params, opt, closure = _setup("kfac")
    opt.step(closure)
    factor = opt.blocks["0"].a_factor
    factor.F.copy_(-10.0 * torch.eye(factor.dim, dtype=D))
    opt.step(closure)
    assert opt.inversion_stats.recovered == 1
    checkpoint = opt.state_dict()
    assert checkpoint["secondorder"]["inversion_recovered"] == 1
    _, opt2, _ = _setup("kfac", seed=1)
    opt2.load_state_dict(copy.deepcopy(checkpoint))
    assert opt2.inversion_stats.recovered == 1
    del checkpoint["secondorder"]["inversion_recovered"]
    opt2.load_state_dict(checkpoint)
    assert opt2.inversion_stats.recovered == 0


# ------------------------------------------------------------------ rejections: full messages
def test_a_torch_optim_state_dict_is_rejected():
    params, opt, _ = _setup("kfac")
    _rejects(opt, torch.optim.SGD(params, lr=0.1).state_dict(),
             "not a secondorder optimizer state_dict (missing the 'secondorder' entry)")


def test_a_checkpoint_without_blocks_names_every_missing_layer():
    _, opt, closure = _setup("kfac")
    opt.step(closure)
    state = opt.state_dict()
    del state["secondorder"]["blocks"]
    _rejects(_setup("kfac", seed=1)[1], state,
             "the checkpoint's curvature layers do not match this optimizer's: missing ['0', '2'], unexpected []; "
             "load it into an optimizer built the same way on the same model")


def test_a_checkpoint_missing_one_layer_is_rejected():
    _, opt, closure = _setup("kfac")
    opt.step(closure)
    state = opt.state_dict()
    del state["secondorder"]["blocks"]["2"]
    _rejects(_setup("kfac", seed=1)[1], state,
             "the checkpoint's curvature layers do not match this optimizer's: missing ['2'], unexpected []; "
             "load it into an optimizer built the same way on the same model")


def test_block_state_of_another_optimizer_is_named_by_its_entries():
    """Without the block kinds (which would reject it first), the state itself tells a diagonal or a
    K-BFGS checkpoint from KFAC: the first block whose entries differ, at the top or one level down."""
    model, x, y = _problem("cpu")
    diagonal = CurvatureOptimizer(model, 0.1, {nn.Linear: diagonal_block()}, damping=0.3)
    diagonal.step(_closure(diagonal, model, x, y))
    state = diagonal.state_dict()
    del state["secondorder"]["kinds"]
    _rejects(_setup("kfac")[1], state,
             "layer '0': block state has entries ['initialized', 'scale', 'v'], expected ['a', 'g']"
             + _DIFFERENT_OPTIMIZER)

    _, kbfgs, closure = _setup("kbfgs")
    kbfgs.step(closure)
    state = kbfgs.state_dict()
    del state["secondorder"]["kinds"]
    _rejects(_setup("kfac")[1], state,
             "layer '0': block state.a has entries ['H', 'covariance', 'damping', 'inversion_failures', 'skips', "
             "'updates', 'warm_started'], expected ['F', 'damping_boost', 'decay', 'initialized', 'inverse', "
             f"'inverse_damping', 'inversion_failures', 'refreshes', 'statistic_resets', 'updates']{_DIFFERENT_OPTIMIZER}")


def test_a_wider_model_is_named_by_the_first_factor_shape():
    """Hidden width 8 saved, 9 loaded: layer 0's A (6 x 6) fits, its G (8 x 8) does not."""
    _, opt, closure = _setup("kfac")
    opt.step(closure)
    wide = MAKERS["kfac"](_problem("cpu", width=9)[0])
    _rejects(wide, opt.state_dict(),
             f"layer '0': block state.g.F has shape (8, 8) but this model needs (9, 9){_DIFFERENT_MODEL}")


def test_param_groups_that_differ_are_rejected_with_their_sizes():
    _, opt, closure = _setup("kfac")
    opt.step(closure)
    state = opt.state_dict()
    del state["param_groups"]
    _rejects(_setup("kfac", seed=1)[1], state, "the checkpoint has param groups of sizes [], this optimizer [4]")

    _, before_add, closure = _mixed(extra=False)  # saved before add_param_group
    before_add.step(closure)
    _rejects(_mixed(seed=1)[1], before_add.state_dict(),
             "the checkpoint has param groups of sizes [6], this optimizer [6, 1]")


def test_a_checkpoint_without_per_parameter_state_is_torchs_key_error():
    """The per-parameter state is torch.optim's: a checkpoint without it fails as torch.optim does."""
    _, opt, closure = _setup("kfac")
    opt.step(closure)
    state = opt.state_dict()
    del state["state"]
    with pytest.raises(KeyError, match="^'state'$"):
        _setup("kfac", seed=1)[1].load_state_dict(state)


def _trained_mixed() -> dict:
    _, opt, closure = _mixed()
    for _ in range(2):
        opt.step(closure)
    return opt.state_dict()


@pytest.mark.parametrize("index,key,shape,message", [
    (0, "momentum_matrix", (6, 8), "layer '0': the checkpoint's 'momentum_matrix' has shape (6, 8) but this model "
                                   "needs (8, 6)"),
    (4, "momentum_matrix", (3, 8), "layer '3': the checkpoint's 'momentum_matrix' has shape (3, 8) but this model "
                                   "needs (3, 9)"),
    (2, "exp_avg", (9,), "layer '1': the checkpoint's 'exp_avg' has shape (9,) but this model needs (8,)"),
    (3, "exp_avg_sq", (8, 1), "layer '1': the checkpoint's 'exp_avg_sq' has shape (8, 1) but this model needs (8,)"),
    (6, "exp_avg", (3,), "layer 'parameter 6': the checkpoint's 'exp_avg' has shape (3,) but this model needs (2,)"),
], ids=["momentum-matrix-transposed", "momentum-matrix-without-bias", "adam-layernorm", "adam-layernorm-2d",
        "adam-outside-the-model"])
def test_per_parameter_state_of_another_shape_names_layer_entry_and_shapes(index, key, shape, message):
    """Momentum matrices are [grad W | grad b] (g x a, bias column included); fallback moments have the
    parameter's shape; a parameter outside the model is named by its index."""
    state = _trained_mixed()
    state["state"][index][key] = torch.zeros(shape, dtype=D)
    _rejects(_mixed(seed=1)[1], state, message + _DIFFERENT_MODEL)


def test_every_entry_of_a_parameters_state_is_checked_whatever_its_order():
    """The Adam step count (an int) may come first: the moments after it are still checked."""
    state = _trained_mixed()
    moments = state["state"][2]
    state["state"][2] = {"adam_step": moments["adam_step"], "exp_avg": torch.zeros(9, dtype=D),
                         "exp_avg_sq": moments["exp_avg_sq"]}
    _rejects(_mixed(seed=1)[1], state,
             f"layer '1': the checkpoint's 'exp_avg' has shape (9,) but this model needs (8,){_DIFFERENT_MODEL}")


# ------------------------------------------------------------------ _compare_state
def test_compare_state_names_a_value_where_entries_are_expected():
    with pytest.raises(ValueError, match="^" + re.escape(
            f"layer '0': block state.a has entries Tensor, expected ['F']{_DIFFERENT_OPTIMIZER}") + "$"):
        _compare_state({"a": torch.zeros(2, 2)}, {"a": {"F": torch.zeros(2, 2)}}, "layer '0': block state")


@pytest.mark.parametrize("saved,current,message", [
    ({"s_avg": torch.zeros(8)}, {"s_avg": torch.zeros(9)}, "p.s_avg has shape (8,) but this model needs (9,)"),
    ({"S": torch.zeros(2, 9)}, {"S": torch.zeros(0, 8)}, "p.S has shape (2, 9) but this model needs (0, 8)"),
    ({"SY": torch.zeros(4)}, {"SY": torch.zeros(2, 2)}, "p.SY has shape (4,) but this model needs (2, 2)"),
    ({"YY": torch.zeros(1, 3, 3)}, {"YY": torch.zeros(3, 3)}, "p.YY has shape (1, 3, 3) but this model needs (3, 3)"),
], ids=["leading-size", "pair-width", "pair-gram-rank", "pair-gram-extra-dim"])
def test_compare_state_rejects_every_size_but_the_pair_counts(saved, current, message):
    """Only the leading sizes of the L-BFGS pair stacks (S, Y: count x n; SY, YY: count x count) may
    differ; every other size, and the number of dimensions, must match."""
    with pytest.raises(ValueError, match="^" + re.escape(message + _DIFFERENT_MODEL) + "$"):
        _compare_state(saved, current, "p")


def test_compare_state_accepts_other_pair_counts_and_missing_tensors():
    saved = {"S": torch.zeros(2, 8), "Y": torch.zeros(2, 8), "SY": torch.zeros(2, 2), "YY": torch.zeros(2, 2),
             "inverse": None, "gamma": 1.0}
    current = {"S": torch.zeros(0, 8), "Y": torch.zeros(0, 8), "SY": torch.zeros(0, 0), "YY": torch.zeros(3, 3),
               "inverse": torch.eye(3), "gamma": 2.0}
    assert _compare_state(saved, current, "p") is None


# ------------------------------------------------------------------ per-chunk blocks and runtime fallbacks
def _attention(model_type: type[nn.Module], steps: int) -> tuple[nn.Module, KFAC, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = model_type().double()
    x, m = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 5, 4, dtype=D)
    opt = KFAC(model, lr=0.1, damping=0.3)
    for _ in range(steps):
        opt.step(mean_square_closure(opt, model, x, m))
    return model, opt, (x, m)


def _continue_together(a: tuple[nn.Module, KFAC], b: tuple[nn.Module, KFAC], data, steps: int = 2) -> None:
    """Both (model, optimizer) pairs take ``steps`` steps: same weights and state, bit for bit."""
    for _ in range(steps):
        for model, opt in (a, b):
            opt.step(mean_square_closure(opt, model, *data))
    assert all(torch.equal(p, q) for p, q in zip(a[0].parameters(), b[0].parameters()))
    assert_same(a[1].state_dict(), b[1].state_dict())


def test_per_chunk_blocks_are_rebuilt_on_load_and_continue_bit_identically():
    model, opt, data = _attention(Cross, 2)
    assert opt.runtime_chunked == ["attn"]
    checkpoint = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = KFAC(model2, lr=0.1, damping=0.3)
    opt2.load_state_dict(copy.deepcopy(checkpoint))
    assert isinstance(opt2.blocks["attn"], ChunkedBlock) and opt2.runtime_chunked == ["attn"]
    assert opt2.counters["chunked_layers"] == 1
    assert_same(checkpoint, opt2.state_dict())
    _continue_together((model, opt), (model2, opt2), data)


def test_reloading_a_checkpoint_into_its_own_chunked_optimizer_changes_nothing():
    model, opt, data = _attention(Cross, 2)
    checkpoint = copy.deepcopy(opt.state_dict())
    model2, opt2, _ = _attention(Cross, 2)
    block = opt.blocks["attn"]
    opt.load_state_dict(copy.deepcopy(checkpoint))
    assert opt.blocks["attn"] is block and opt.runtime_chunked == ["attn"]
    assert_same(checkpoint, opt.state_dict())
    _continue_together((model, opt), (model2, opt2), data)


def _whole_layers_only(name: str, adapter: LayerAdapter, ctx: RecipeContext) -> CurvatureBlock:
    """KFAC for whole layers; rejects the per-chunk layers ``attn[q]`` etc."""
    if "[" in name:
        raise UnsupportedLayerError(f"{name} is a chunk")
    return kfac_block()(name, adapter, ctx)


def test_per_chunk_blocks_that_the_recipe_cannot_build_are_rejected():
    _, opt, _ = _attention(Cross, 1)
    torch.manual_seed(0)
    other = CurvatureOptimizer(Cross().double(), 0.1, {nn.MultiheadAttention: _whole_layers_only,
                                                       nn.Linear: kfac_block()}, damping=0.3)
    _rejects(other, opt.state_dict(), "layer 'attn': the checkpoint holds per-chunk blocks, which this optimizer "
                                      "cannot build (attn[q] is a chunk)")


def test_a_layer_moved_to_the_fallback_rule_moves_on_load_and_continues_bit_identically():
    model, opt, data = _attention(SelfAndCross, 2)
    assert "attn" not in opt.slots and list(opt.runtime_fallbacks) == ["attn"]
    checkpoint = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = KFAC(model2, lr=0.1, damping=0.3)
    opt2.load_state_dict(copy.deepcopy(checkpoint))
    assert "attn" not in opt2.slots and opt2.runtime_fallbacks == opt.runtime_fallbacks
    assert opt2.counters == opt.counters and opt2.describe() == opt.describe()
    assert_same(checkpoint, opt2.state_dict())
    _continue_together((model, opt), (model2, opt2), data)


def test_a_checkpoint_from_before_the_first_step_loads_after_a_forward_pass():
    """An evaluation pass before resuming shows the attention its cross-attention calls; the packed
    block of the step-0 checkpoint is loaded as it is, and the first step switches to per-chunk blocks
    exactly as the original optimizer's first step does."""
    model, opt, data = _attention(Cross, 0)
    checkpoint = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = KFAC(model2, lr=0.1, damping=0.3)
    with torch.no_grad():
        model2(*data)
    opt2.load_state_dict(checkpoint)
    assert not isinstance(opt2.blocks["attn"], ChunkedBlock) and opt2.runtime_chunked == []
    _continue_together((model, opt), (model2, opt2), data)
    assert opt2.runtime_chunked == ["attn"] and opt2.counters["chunked_layers"] == 1
