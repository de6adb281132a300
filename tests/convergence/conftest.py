"""Convergence tests run single-threaded: their many small HVPs and eigensolves are far faster that way
(and no slower on an idle machine), and timings do not depend on other jobs' threads."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
