"""Convergence tests run single-threaded: their many small HVPs and eigensolves are far faster that way
(and no slower on an idle machine), and timings do not depend on other jobs' threads."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every convergence test runs on one torch thread (``one_torch_thread``, tests/conftest.py)."""
