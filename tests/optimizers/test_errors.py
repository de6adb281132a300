"""Atomic steps and errors that say what to do: a step that raises leaves parameters, momentum and
every factor bit-identical (snapshot tests); model drift, bad closures, empty batches, bad recipes,
``blocks`` keys that can never apply, checkpoints of another optimizer or model; docstrings."""

from __future__ import annotations

import copy
import inspect
import math
import pydoc

import pytest
import torch
from torch import nn

import optimizers
from curvature import capture as capture_module
from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer, diagonal_block, kbfgs_block, kfac_block

D = torch.float64


def _problem(device, width=8, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=D).to(device)
    y = torch.randn(n, 3, generator=g, dtype=D).to(device)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)).to(D).to(device)
    return model, x, y


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    return closure


MAKERS = {
    "kfac": lambda m: KFAC(m, lr=0.1, damping=0.3, inverse_update_freq=1),
    "kbfgs": lambda m: KBFGS(m, lr=0.1, damping=0.3),
    "kbfgsl": lambda m: KBFGSL(m, lr=0.1, damping=0.3, memory=3),
}


def snapshot(opt, model):
    """Everything a step may change, apart from the counters: parameters, optimizer state, blocks."""
    state = opt.state_dict()
    state["secondorder"].pop("counters")
    state["secondorder"].pop("steps")
    return copy.deepcopy({"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "opt": state})


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), path


def _trained(device, kind):
    model, x, y = _problem(device)
    opt = MAKERS[kind](model)
    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
    return model, x, y, opt


@pytest.mark.parametrize("kind", list(MAKERS))
def test_closure_returning_none_is_an_error_before_any_mutation(device, kind):
    model, x, y, opt = _trained(device, kind)
    before = snapshot(opt, model)

    def forgets_return():
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()

    if kind == "kfac":  # a closure is optional for KFAC: None is allowed
        opt.step(forgets_return)
        return
    with pytest.raises(TypeError, match="return the loss"):
        opt.step(forgets_return)
    assert_same(before, snapshot(opt, model))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_closure_that_forgets_backward_is_an_error_before_any_mutation(device, kind):
    model, x, y, opt = _trained(device, kind)
    before = snapshot(opt, model)

    def forgets_backward():
        opt.zero_grad()
        return 0.5 * ((model(x) - y) ** 2).sum(1).mean()

    with pytest.raises(RuntimeError, match="backward"):
        opt.step(forgets_backward)
    assert_same(before, snapshot(opt, model))


def test_non_scalar_loss_is_an_error(device):
    model, x, y, opt = _trained(device, "kbfgs")
    before = snapshot(opt, model)

    def vector_loss():
        opt.zero_grad()
        per_sample = 0.5 * ((model(x) - y) ** 2).sum(1)
        per_sample.mean().backward()
        return per_sample

    with pytest.raises(ValueError, match=r"shape \(16,\); return a scalar"):
        opt.step(vector_loss)
    assert_same(before, snapshot(opt, model))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_second_pass_that_raises_leaves_everything_bit_identical(device, kind):
    """A closure that raises on its second call: the step is undone before the error propagates."""
    model, x, y, opt = _trained(device, kind)
    if kind == "kfac":
        opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()}, damping=__import__("curvature.damping",
                                 fromlist=["AdaptiveLM"]).AdaptiveLM(0.3))  # KFAC with a second pass
        opt.step(_closure(opt, model, x, y))
    before = snapshot(opt, model)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("user interrupt during the second pass")
        return _closure(opt, model, x, y)()

    with pytest.raises(KeyboardInterrupt):
        opt.step(flaky)
    assert_same(before, snapshot(opt, model))


def test_inversion_failure_leaves_everything_bit_identical(device, monkeypatch):
    model, x, y, opt = _trained(device, "kfac")
    before = snapshot(opt, model)
    from curvature import inverter

    def fail(self):
        raise RuntimeError("inversion failed")

    monkeypatch.setattr(inverter.BatchedInverter, "run", fail)
    with pytest.raises(RuntimeError, match="inversion failed"):
        opt.step(_closure(opt, model, x, y))
    assert_same(before, snapshot(opt, model))


@pytest.mark.parametrize("change", ["added", "removed", "replaced", "frozen"])
def test_model_drift_is_an_error_naming_the_layer(device, change):
    model, x, y, opt = _trained(device, "kfac")
    if change == "added":
        model.add_module("3", nn.Linear(3, 3).to(D).to(device))
        name = "'3'"
    elif change == "removed":
        del model[2]
        model.add_module("2", nn.Identity())
        name = "'2'"
    elif change == "replaced":
        model[0] = nn.Linear(5, 8).to(D).to(device)
        name = "'0'"
    else:
        model[2].weight.requires_grad_(False)
        name = "'2'"
    before = snapshot(opt, model) if change != "replaced" else None
    with pytest.raises(RuntimeError, match=f"(?s){name}.*(rebuild|build a new)"):
        opt.step(_closure(opt, model, x[:, :5], y if change != "added" else y))
    if before is not None and change != "removed":
        assert_same(before, snapshot(opt, model))


def test_empty_batch_is_an_error_that_says_what_to_do(device):
    model, x, y, opt = _trained(device, "kfac")
    before = snapshot(opt, model)
    opt.zero_grad()
    (0.5 * ((model(x[:0]) - y[:0]) ** 2).sum()).backward()
    with pytest.raises(RuntimeError, match="empty batch"):
        opt.step()
    assert_same(before, snapshot(opt, model))


@pytest.mark.parametrize("recipe,match", [
    (kfac_block, r"nn.Linear.*kfac_block\(\)"),
    ("kfac", r"nn.Linear.*recipe"),
    (lambda name: None, r"nn.Linear.*\(name, adapter, ctx\)"),
    (lambda name, adapter, ctx: "not a block", r"'0'.*CurvatureBlock"),
])
def test_a_recipe_that_is_not_a_recipe_names_the_key_and_the_right_form(recipe, match):
    model, _, _ = _problem("cpu")
    with pytest.raises(TypeError, match=match):
        CurvatureOptimizer(model, 0.1, {nn.Linear: recipe})


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.body(x))


@pytest.mark.parametrize("key,match", [
    ("body", "no parameters of its own"),
    ("body.1", "no parameters of its own"),
    (nn.PReLU, "blocks key nn.PReLU: there is no adapter"),  # not even in the model
    (3, "module type .* or a layer name"),
])
def test_blocks_keys_that_can_never_apply_are_errors(key, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CurvatureOptimizer(Encoder(), 0.1, {key: kfac_block()})


def test_kbfgs_memory_points_to_kbfgsl():
    model, _, _ = _problem("cpu")
    with pytest.raises(ValueError, match="KBFGSL"):
        KBFGS(model, memory=5)
    assert KBFGSL(model, memory=5).blocks["0"].kind == "kbfgsl"


@pytest.mark.parametrize("source,target,match", [
    ("kbfgs", "kfac", "kbfgs"),
    ("kfac", "kfac-wide", r"'0'.*shape"),
])
def test_load_state_dict_validates_at_load_time(device, source, target, match):
    model, x, y, opt = _trained(device, source)
    state = opt.state_dict()
    if target == "kfac-wide":
        other = MAKERS["kfac"](_problem(device, width=9)[0])
    else:
        other = MAKERS[target](_problem(device)[0])
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(state)
    assert_same(before, other.state_dict())


def test_load_state_dict_names_missing_and_unexpected_layers(device):
    model, x, y, opt = _trained(device, "kfac")
    state = opt.state_dict()
    state["secondorder"]["blocks"]["9"] = state["secondorder"]["blocks"].pop("2")
    with pytest.raises(ValueError, match=r"(?s)'2'.*'9'"):
        MAKERS["kfac"](_problem(device)[0]).load_state_dict(state)


def _generated(name: str) -> bool:
    """Functions a mutation run adds beside each original (``x__f__mutmut_3``); not part of the API."""
    return "__mutmut_" in name


def _public(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or _generated(name) or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield name, obj


def test_every_public_class_and_function_has_a_docstring():
    modules = [capture_module] + [__import__(f"optimizers.{m}", fromlist=["x"])
                                  for m in ("driver", "kfac", "kbfgs", "recipes", "fallback", "likelihoods")]
    missing = []
    for module in modules:
        for name, obj in _public(module):
            if not (obj.__doc__ or "").strip():
                missing.append(f"{module.__name__}.{name}")
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") or _generated(attr):
                        continue
                    fn = member.fget if isinstance(member, property) else member
                    if (inspect.isfunction(fn) or isinstance(member, property)) and not (fn.__doc__ or "").strip():
                        missing.append(f"{module.__name__}.{name}.{attr}")
    assert not missing, f"no docstring: {missing}"


@pytest.mark.parametrize("cls", [KFAC, KBFGS, KBFGSL, CurvatureOptimizer])
def test_help_shows_the_constructor_arguments(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    for arg in ("lr", "damping", "momentum", "weight_decay", "param_groups", "fallback_lr"):
        assert f"{arg}:" in text or f"{arg}," in text, f"help({cls.__name__}) does not document {arg}"
    assert "Args:" in text
    assert optimizers.__doc__


@pytest.mark.parametrize("kind", ["kfac", "kbfgs"])
def test_a_sparse_gradient_is_a_clear_error_before_any_mutation(device, kind):
    """An nn.Embedding(sparse=True) left to the fallback rule: the step says what to do, nothing changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)).to(D).to(device)
    opt = (KFAC if kind == "kfac" else KBFGS)(model, blocks={nn.Embedding: None})
    x = torch.tensor([[1, 2], [3, 4]], device=device)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss

    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="sparse=False"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.steps == 0 and opt.counters["skipped_steps"] == 0 and not opt.state
