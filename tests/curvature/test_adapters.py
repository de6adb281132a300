"""The public adapter registry: registration, replacement, most-specific resolution, errors."""

from __future__ import annotations

import pytest
from torch import nn

from curvature import (
    AdapterProtocol,
    Conv2dAdapter,
    LinearAdapter,
    adapter_for,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)


class MyLinear(nn.Linear):
    pass


class MyLinearAdapter(LinearAdapter):
    pass


class Gadget(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.init.zeros_(nn.Linear(2, 2).weight.detach().clone()))


def test_shipped_adapters_are_registered_and_follow_the_protocol():
    assert registered_adapters()[nn.Linear] is LinearAdapter and registered_adapters()[nn.Conv2d] is Conv2dAdapter
    assert isinstance(adapter_for(nn.Linear(2, 3)), AdapterProtocol)
    assert isinstance(adapter_for(nn.Conv2d(2, 3, 3)), AdapterProtocol)
    for module in (nn.Embedding(4, 2), nn.LayerNorm(3), nn.MultiheadAttention(4, 2), nn.Conv1d(1, 2, 3)):
        assert isinstance(adapter_for(module), AdapterProtocol)
    assert adapter_for(nn.PReLU()) is None


def test_subclasses_use_the_most_specific_registration(clean_registry):
    assert type(adapter_for(MyLinear(2, 3))) is LinearAdapter  # inherited from nn.Linear
    register_adapter(MyLinear, MyLinearAdapter)
    assert type(adapter_for(MyLinear(2, 3))) is MyLinearAdapter
    assert type(adapter_for(nn.Linear(2, 3))) is LinearAdapter
    unregister_adapter(MyLinear)
    assert type(adapter_for(MyLinear(2, 3))) is LinearAdapter


def test_registration_errors_say_what_to_do(clean_registry):
    with pytest.raises(ValueError, match="replace=True"):
        register_adapter(nn.Linear, MyLinearAdapter)
    assert registered_adapters()[nn.Linear] is LinearAdapter  # unchanged by the failed call
    register_adapter(nn.Linear, MyLinearAdapter, replace=True)
    assert type(adapter_for(nn.Linear(2, 2))) is MyLinearAdapter
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_adapter(int, LinearAdapter)
    with pytest.raises(TypeError, match="callable"):
        register_adapter(Gadget, "not an adapter")
    with pytest.raises(KeyError):
        unregister_adapter(Gadget)


def test_registered_adapters_is_a_copy(clean_registry):
    copy = registered_adapters()
    copy[Gadget] = LinearAdapter
    assert adapter_for(Gadget()) is None
