"""Validation of scalar configuration values, shared by every optimizer: a bad value raises a
``ValueError`` that names the parameter and the allowed range."""

from __future__ import annotations

import math
from typing import Any


def check_float(name: str, value: Any, lo: float, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = True) -> float:
    """Return ``float(value)`` if it is a finite number in the interval from ``lo`` to ``hi``
    (``hi=None``: unbounded; ``lo_open``/``hi_open`` exclude the ends), else raise ``ValueError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
    if not ok:
        lo_b, hi_b = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be a finite number in {lo_b}{lo}, {'inf' if hi is None else hi}{hi_b}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an integer (not a bool) ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
