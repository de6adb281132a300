"""Shared fixtures: device parametrization and hypothesis profiles.

Every test that touches tensors takes the ``device`` fixture, so it runs on the CPU always and on
CUDA when a GPU is present (the CUDA instance is skipped cleanly otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a tensor test runs on: CPU, and CUDA when available."""
    return torch.device(request.param)


def mnist_dir() -> Path | None:
    """The shared MNIST test split (IDX files), or None when it is not beside the checkout."""
    env = os.environ.get("SECONDORDER_MNIST_DIR")
    candidates = [Path(env)] if env else []
    root = Path(__file__).resolve().parents[1]
    candidates += [root.parent / "shared" / "data" / "mnist", root / "shared" / "data" / "mnist"]
    for path in candidates:
        if (path / "t10k-images-idx3-ubyte.gz").exists():
            return path
    return None


@pytest.fixture
def mnist_path() -> Path:
    path = mnist_dir()
    if path is None:
        pytest.skip("MNIST test split not found (../shared/data/mnist)")
    return path


@pytest.fixture
def one_torch_thread():
    """Run the test on one torch thread (bit-reproducible reductions, no oversubscription); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
