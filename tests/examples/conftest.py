"""Load the example files as a user would run them, and keep the adapter registry clean around them."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from curvature import register_adapter, registered_adapters, unregister_adapter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def example():
    """``example("shampoo_factor")`` runs ``examples/shampoo_factor.py`` and returns its globals."""
    saved = registered_adapters()
    yield lambda name: runpy.run_path(str(EXAMPLES / f"{name}.py"))
    for module_type in set(registered_adapters()) - set(saved):
        unregister_adapter(module_type)
    for module_type, adapter in saved.items():
        register_adapter(module_type, adapter, replace=True)
