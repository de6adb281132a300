"""Exact unit tests of the driver's validators (issue 17, optimizers/driver.py mutants).

``_check_group`` (one parameter group's settings, checked at construction, by ``add_param_group`` and at
every step): every key's rule at its boundary values (0, the open and closed ends, bool, NaN, inf, one- and
two-element tensors, ints) and the full text of each rejection,
``"{where}['{key}'] must be {rule}, got {value!r}"``, anchored at both ends.

``CurvatureOptimizer._check_model`` (a model changed after construction): every kind of change (a layer
replaced or removed, a layer added, a new parameter in a known layer, a parameter removed or frozen) is an
error with its exact message, and nothing that is allowed (``train()``/``eval()``, ``.to`` the same dtype,
unfreezing again, parameters added with ``add_param_group``) raises.

The functions are called inside the tests (mutants are selected after import). Small float64 models.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from optimizers import KFAC, CurvatureOptimizer, kfac_block
from optimizers.driver import _check_group
from tests.optimizers.messages import exact as _exact

D = torch.float64

#: A valid group: every key ``_check_group`` reads, at a value inside its range.
VALID: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "damping": 1e-3,
                         "fallback_lr": None, "fallback_betas": None, "fallback_eps": 1e-8}

#: The rule each key's rejection states.
RULES = {
    "lr": "a finite number >= 0",
    "momentum": "a number in [0, 1)",
    "weight_decay": "a finite number >= 0",
    "damping": "a finite number > 0",
    "fallback_lr": "None or a finite number >= 0",
    "fallback_betas": "None or a pair (beta1, beta2) of numbers in [0, 1)",
    "fallback_eps": "a finite number > 0",
}

ADVICE = ("the optimizer cannot follow a changed model: build a new optimizer after changing the model "
          "(or add new parameters with add_param_group)")



def _group(**changes: Any) -> dict[str, Any]:
    """``VALID`` with some keys changed."""
    return {**VALID, **changes}


def _rejected(key: str, value: Any, where: str = "param_groups[3]") -> None:
    """``_check_group`` rejects ``value`` for ``key`` with exactly the documented message."""
    message = f"{where}['{key}'] must be {RULES[key]}, got {value!r}"
    with pytest.raises(ValueError, match=_exact(message)):
        _check_group(_group(**{key: value}), where)


def _accepted(key: str, value: Any) -> None:
    """``_check_group`` accepts ``value`` for ``key`` (returns None, raises nothing)."""
    assert _check_group(_group(**{key: value}), "param_groups[0]") is None


# ------------------------------------------------------------------ _check_group: accepted values

def test_valid_group_is_accepted():
    assert _check_group(dict(VALID), "the constructor") is None


@pytest.mark.parametrize("key,value", [
    # lr, weight_decay, fallback_lr: [0, inf)
    ("lr", 0.0), ("lr", 0), ("lr", 0.5), ("lr", 1.0), ("lr", 3), ("lr", 1e300),
    ("weight_decay", 0.0), ("weight_decay", 0), ("weight_decay", 0.5), ("weight_decay", 2.0),
    ("fallback_lr", 0.0), ("fallback_lr", 0), ("fallback_lr", 0.5), ("fallback_lr", 2.0),
    # momentum: [0, 1)
    ("momentum", 0.0), ("momentum", 0), ("momentum", 0.5), ("momentum", math.nextafter(1.0, 0.0)),
    # damping, fallback_eps: (0, inf)
    ("damping", 5e-324), ("damping", 0.5), ("damping", 1.0), ("damping", 2), ("damping", 3.0),
    ("fallback_eps", 5e-324), ("fallback_eps", 0.5), ("fallback_eps", 1), ("fallback_eps", 2.0),
])
def test_numbers_inside_their_range_are_accepted(key, value):
    _accepted(key, value)


@pytest.mark.parametrize("key,value", [
    ("lr", torch.tensor(0.5)), ("lr", torch.tensor([0.0])), ("momentum", torch.tensor(0.5, dtype=D)),
    ("weight_decay", torch.tensor(2.0)), ("damping", torch.tensor([[0.5]])), ("fallback_lr", torch.tensor(0.0)),
    ("fallback_eps", torch.tensor(1e-8, dtype=D)),
])
def test_one_element_tensors_read_as_numbers(key, value):
    """A scheduler may store a one-element tensor: it is read as its float."""
    _accepted(key, value)


@pytest.mark.parametrize("betas", [
    (0.0, 0.0), (0, 0), [0.9, 0.999], (0.5, math.nextafter(1.0, 0.0)), (math.nextafter(1.0, 0.0), 0), [0, 0.5],
])
def test_fallback_betas_pairs_in_range_are_accepted(betas):
    _accepted("fallback_betas", betas)


def test_fallback_lr_and_betas_may_be_none_or_absent():
    _accepted("fallback_lr", None)
    _accepted("fallback_betas", None)
    group = dict(VALID)
    del group["fallback_lr"], group["fallback_betas"]
    assert _check_group(group, "param_groups[0]") is None


# ------------------------------------------------------------------ _check_group: rejected values

NOT_NUMBERS = [None, True, False, "0.1", float("nan"), float("inf"), -float("inf"), [0.1], (0.1,),
               torch.tensor([0.1, 0.2]), torch.tensor(float("nan")), torch.tensor(float("inf"))]


@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay", "damping", "fallback_eps"])
@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
def test_a_required_number_that_is_not_a_finite_number_is_rejected(key, value):
    _rejected(key, value)


@pytest.mark.parametrize("value", [v for v in NOT_NUMBERS if v is not None], ids=repr)
def test_a_fallback_lr_that_is_not_a_finite_number_is_rejected(value):
    _rejected("fallback_lr", value)


def test_a_missing_required_key_is_rejected():
    for key in ("lr", "momentum", "weight_decay", "damping", "fallback_eps"):
        group = dict(VALID)
        del group[key]
        with pytest.raises(ValueError, match=_exact(f"the constructor['{key}'] must be {RULES[key]}, got None")):
            _check_group(group, "the constructor")


@pytest.mark.parametrize("key,value", [
    ("lr", -1e-300), ("lr", -1), ("lr", -0.5), ("lr", torch.tensor(-1.0)),
    ("weight_decay", -5e-324), ("weight_decay", -1), ("weight_decay", -2.0),
    ("fallback_lr", -5e-324), ("fallback_lr", -1), ("fallback_lr", torch.tensor([-0.5])),
    ("momentum", -5e-324), ("momentum", -1), ("momentum", 1.0), ("momentum", 1), ("momentum", 1.5),
    ("momentum", 2.0), ("momentum", torch.tensor(1.0)),
    ("damping", 0.0), ("damping", 0), ("damping", -0.0), ("damping", -1e-3), ("damping", torch.tensor(0.0)),
    ("fallback_eps", 0.0), ("fallback_eps", 0), ("fallback_eps", -1.0),
])
def test_numbers_outside_their_range_are_rejected(key, value):
    _rejected(key, value)


@pytest.mark.parametrize("betas", [
    0.9, "ab", (0.9,), (0.9, 0.999, 0.5), [], (0.5, 1.0), (1.0, 0.5), (1, 0), (0.5, 1.5), (-1e-300, 0.5),
    (0.5, -1), (True, 0.5), (0.5, False), ("0.5", 0.5), (0.5, None), (0.5, float("nan")), (float("nan"), 0.5),
    {0.5: 0.9, 0.6: 0.9}, (0.5, torch.tensor(0.5)), (2.0, 2.0),
], ids=repr)
def test_fallback_betas_outside_the_rule_are_rejected(betas):
    _rejected("fallback_betas", betas)


def test_the_first_bad_key_in_order_is_reported():
    """Keys are checked in the order lr, momentum, weight_decay, damping, fallback_lr, fallback_betas, eps."""
    order = ["lr", "momentum", "weight_decay", "damping", "fallback_lr", "fallback_betas", "fallback_eps"]
    bad = {key: -1.0 for key in order}
    for i, key in enumerate(order):
        group = {**VALID, **{k: bad[k] for k in order[i:]}}
        with pytest.raises(ValueError, match=_exact(f"g['{key}'] must be {RULES[key]}, got -1.0")):
            _check_group(group, "g")


def test_rejections_through_the_optimizer_name_the_group():
    """The constructor, ``add_param_group`` and ``step`` check groups with these messages."""
    model = nn.Sequential(nn.Linear(3, 2)).to(D)
    with pytest.raises(ValueError, match=_exact(f"the constructor['fallback_eps'] must be {RULES['fallback_eps']}, got 0.0")):
        CurvatureOptimizer(model, lr=0.1, blocks={nn.Linear: kfac_block()}, fallback_eps=0.0)
    with pytest.raises(ValueError, match=_exact(f"param_groups[0]['damping'] must be {RULES['damping']}, got 0")):
        CurvatureOptimizer(model, lr=0.1, blocks={nn.Linear: kfac_block()},
                           param_groups=[{"params": model.parameters(), "damping": 0}])
    opt = CurvatureOptimizer(model, lr=0.1, blocks={nn.Linear: kfac_block()})
    extra = nn.Parameter(torch.zeros(2, dtype=D))
    with pytest.raises(ValueError, match=_exact(f"param_groups[1]['momentum'] must be {RULES['momentum']}, got 1.0")):
        opt.add_param_group({"params": [extra], "momentum": 1.0})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["lr"] = -0.25
    with pytest.raises(ValueError, match=_exact(f"param_groups[0]['lr'] must be {RULES['lr']}, got -0.25")):
        opt.step(_closure(opt, model, *_batch()))


# ------------------------------------------------------------------ _check_model

class Net(nn.Module):
    """``body.0`` (Linear, K-FAC), ``body.2`` (LayerNorm, fallback rule), ``head`` (Linear, K-FAC), and a
    frozen root parameter ``temperature`` that is in no group."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)
        self.temperature = nn.Parameter(torch.ones(()), requires_grad=False)
        self.to(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)) / self.temperature


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g, dtype=D), torch.randn(8, 2, generator=g, dtype=D)


def _closure(opt: CurvatureOptimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Zero the gradients, mean squared error, backward, return the loss."""
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    return closure


def _built(**kwargs: Any) -> tuple[Net, CurvatureOptimizer]:
    model = Net()
    opt = CurvatureOptimizer(model, lr=0.1, blocks={nn.Linear: kfac_block()}, damping=0.1, **kwargs)
    assert set(opt.slots) == {"body.0", "head"} and set(opt.fallback_modules) == {"body.2"}
    return model, opt


def _step(opt: CurvatureOptimizer, model: nn.Module) -> None:
    opt.step(_closure(opt, model, *_batch()))


def _drift(opt: CurvatureOptimizer, model: nn.Module, message: str) -> None:
    """The next step raises exactly ``message`` and leaves the parameters untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=_exact(message)):
        _step(opt, model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_replaced_layer_is_named():
    model, opt = _built()
    _step(opt, model)
    model.head = nn.Linear(4, 2).to(D)
    _drift(opt, model, f"layer 'head' was replaced after the optimizer was built; {ADVICE}")


def test_a_replaced_nested_layer_is_named():
    model, opt = _built()
    model.body[0] = nn.Linear(3, 4).to(D)
    _drift(opt, model, f"layer 'body.0' was replaced after the optimizer was built; {ADVICE}")


def test_a_removed_layer_is_named():
    model, opt = _built()
    del model.head
    _drift(opt, model, f"layer 'head' was removed after the optimizer was built; {ADVICE}")


def test_an_added_layer_is_named():
    model, opt = _built()
    model.body.add_module("3", nn.Linear(4, 4).to(D))
    _drift(opt, model, f"layer 'body.3' was added after the optimizer was built; {ADVICE}")


@pytest.mark.parametrize("layer", ["head", "body.2"])
def test_a_new_parameter_of_a_known_layer_is_named(layer):
    """A layer with a block (``head``) or on the fallback rule (``body.2``) that gained a parameter."""
    model, opt = _built()
    model.get_submodule(layer).scale = nn.Parameter(torch.ones(2, dtype=D))
    _drift(opt, model, f"layer {layer!r} has a new parameter '{layer}.scale' after the optimizer was built; {ADVICE}")


def test_a_removed_parameter_is_named():
    model, opt = _built()
    model.head.bias = None
    _drift(opt, model, f"a parameter of layer 'head' was removed from the model after the optimizer was built; {ADVICE}")


@pytest.mark.parametrize("name", ["head.weight", "body.2.bias"])
def test_a_parameter_frozen_after_construction_is_named(name):
    model, opt = _built()
    model.get_parameter(name).requires_grad_(False)
    layer = name.rpartition(".")[0]
    _drift(opt, model, f"a parameter of layer {layer!r} was frozen (requires_grad=False) after the optimizer was "
                       f"built; {ADVICE} (or set its group's lr to 0 to keep it fixed)")


def test_allowed_operations_raise_nothing():
    """Mode switches, ``.to`` the same dtype and device, a no-op ``requires_grad_``: the same parameters."""
    model, opt = _built()
    _step(opt, model)
    for change in (model.eval, model.train, lambda: model.to(D), lambda: model.to("cpu"), model.zero_grad):
        change()
        _step(opt, model)
    assert opt.counters["steps"] == 6 and opt.counters["skipped_steps"] == 0


def test_unfreezing_a_managed_parameter_is_allowed_and_refreezing_it_is_not():
    """A parameter frozen at construction but in a group may be unfrozen (the signature then follows the model);
    freezing it again is a change like any other. The frozen root parameter in no group never counts."""
    model = Net()
    model.body[2].weight.requires_grad_(False)
    model.body[2].bias.requires_grad_(False)
    groups = [{"params": [p for n, p in model.named_parameters() if n != "temperature"]}]
    opt = CurvatureOptimizer(model, lr=0.1, blocks={nn.Linear: kfac_block()}, damping=0.1, param_groups=groups)
    _step(opt, model)
    model.body[2].weight.requires_grad_(True)
    w = model.body[2].weight.detach().clone()
    _step(opt, model)
    assert not torch.equal(w, model.body[2].weight)  # now trained
    _step(opt, model)  # still allowed at the next step
    model.body[2].weight.requires_grad_(False)
    _drift(opt, model, f"a parameter of layer 'body.2' was frozen (requires_grad=False) after the optimizer was "
                       f"built; {ADVICE} (or set its group's lr to 0 to keep it fixed)")


def test_parameters_added_with_add_param_group_are_followed():
    """A free tensor and a new layer's parameters added with ``add_param_group`` are no drift; removing that
    layer afterwards is (the free tensor's group, owned by no layer, comes before it and is passed over)."""
    model, opt = _built()
    _step(opt, model)
    free = nn.Parameter(torch.zeros(3, dtype=D))
    opt.add_param_group({"params": [free]})
    model.body.add_module("3", nn.Linear(4, 4).to(D))
    opt.add_param_group({"params": model.body[3].parameters()})
    _step(opt, model)
    model.body[3] = nn.Identity()
    _drift(opt, model, f"a parameter of layer 'body.3' was removed from the model after the optimizer was built; "
                       f"{ADVICE}")
