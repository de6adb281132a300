"""``check_float`` / ``check_int`` (:mod:`optimizers.validation`): which values pass at the ends of the
interval, and the interval written in the error in standard notation ([ closed, ( open, inf unbounded)."""

from __future__ import annotations

import re

import pytest

from optimizers.validation import check_float, check_int


@pytest.mark.parametrize("value, lo, hi, kw, ok", [
    (0.0, 0.0, 1.0, {}, True),  # default: [lo, hi)
    (1.0, 0.0, 1.0, {}, False),
    (0.999, 0.0, 1.0, {}, True),
    (0.0, 0.0, 1.0, {"lo_open": True}, False),
    (1.0, 0.0, 1.0, {"hi_open": False}, True),
    (1.0 + 1e-12, 0.0, 1.0, {"hi_open": False}, False),
    (1.0, 0.0, 1.0, {"hi_open": True}, False),
    (-1e-300, 0.0, None, {}, False),
    (1e300, 0.0, None, {}, True),
    (3, 0.0, None, {}, True),  # an int is a number
])
def test_check_float_interval_ends(value, lo, hi, kw, ok):
    if ok:
        out = check_float("x", value, lo, hi, **kw)
        assert out == value and type(out) is float
    else:
        with pytest.raises(ValueError, match="x must be a finite number"):
            check_float("x", value, lo, hi, **kw)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), True, False, "1", None])
def test_check_float_rejects_non_finite_and_non_numbers_with_a_value_error(value):
    with pytest.raises(ValueError, match=r"^lr must be a finite number in \[0.0, inf\), got " + re.escape(repr(value)) + "$"):
        check_float("lr", value, 0.0)


@pytest.mark.parametrize("kw, interval", [
    ({}, "[0.0, 1.0)"), ({"lo_open": True}, "(0.0, 1.0)"), ({"hi_open": False}, "[0.0, 1.0]"),
    ({"lo_open": True, "hi_open": False}, "(0.0, 1.0]"),
])
def test_check_float_error_names_the_interval(kw, interval):
    with pytest.raises(ValueError) as err:
        check_float("momentum", 2.0, 0.0, 1.0, **kw)
    assert str(err.value) == f"momentum must be a finite number in {interval}, got 2.0"


def test_check_float_unbounded_interval_is_written_with_inf():
    with pytest.raises(ValueError) as err:
        check_float("damping", 0.0, 0.0, None, lo_open=True)
    assert str(err.value) == "damping must be a finite number in (0.0, inf), got 0.0"


@pytest.mark.parametrize("value, ok", [(1, True), (0, False), (5, True), (True, False), (1.0, False), ("2", False)])
def test_check_int(value, ok):
    if ok:
        assert check_int("n", value, 1) == value
    else:
        with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got " + re.escape(repr(value)) + "$"):
            check_int("n", value, 1)
