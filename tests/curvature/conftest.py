"""Fixtures shared by the curvature tests."""

from __future__ import annotations

import pytest

from curvature.adapters import register_adapter, registered_adapters, unregister_adapter


@pytest.fixture
def clean_registry():
    saved = registered_adapters()
    yield
    for module_type in set(registered_adapters()) - set(saved):
        unregister_adapter(module_type)
    for module_type, adapter in saved.items():
        register_adapter(module_type, adapter, replace=True)
