"""Matching an error message exactly in ``pytest.raises(..., match=...)``.

Not a test module: the optimizer tests that pin full messages import it."""

from __future__ import annotations

import re


def exact(message: str) -> str:
    """A ``match=`` pattern for exactly ``message``: escaped and anchored at both ends (``re.escape`` alone
    also matches a message with text added before or after it)."""
    return "^" + re.escape(message) + "$"
