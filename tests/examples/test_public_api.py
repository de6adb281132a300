"""The extension examples use public names only, and the extension points are exported and typed."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Protocol

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXTENSION_EXAMPLES = ["ekfac_block", "shampoo_factor", "scale_layer"]
LINE_LIMITS = {"ekfac_block": 80, "shampoo_factor": 60, "scale_layer": 40}


def _library_imports(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("curvature", "optimizers"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] in ("curvature", "optimizers") for a in node.names), \
                f"{path.name}: import the public names from the package, not a module"
    return found


@pytest.mark.parametrize("name", EXTENSION_EXAMPLES)
def test_examples_import_only_names_in_the_packages_all(name):
    path = EXAMPLES / f"{name}.py"
    imports = _library_imports(path)
    assert imports, f"{name} uses no library name at all"
    for module, symbol in imports:
        assert module in ("curvature", "optimizers"), f"{name}: imports from the submodule {module}"
        assert symbol in importlib.import_module(module).__all__, f"{name}: {symbol} is not public in {module}"
    assert len(path.read_text().splitlines()) <= LINE_LIMITS[name]


def test_extension_points_are_exported_and_typed():
    import curvature
    import optimizers

    for symbol in curvature.__all__:
        assert hasattr(curvature, symbol), symbol
    for symbol in optimizers.__all__:
        assert hasattr(optimizers, symbol), symbol
    for proto in (curvature.FactorProtocol, curvature.BlockProtocol, curvature.AdapterProtocol):
        assert issubclass(proto, Protocol) and getattr(proto, "_is_runtime_protocol", False)
    assert set(curvature.FACTOR_CAPABILITIES) == {"uses_statistics", "uses_gradient", "uses_secant_pairs",
                                                   "uses_matrix_action", "has_quadratic_form", "has_eigenbasis",
                                                   "applies_cached_inverse", "joins_update_batch"}
    for name in ("register_adapter", "unregister_adapter", "registered_adapters", "LayerRecord", "declares"):
        assert name in curvature.__all__
    assert "Recipe" in optimizers.__all__ and "RecipeContext" in optimizers.__all__
