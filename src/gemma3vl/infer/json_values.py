"""What a value read from JSON (a request body, a batch line, a template or processor option) is: an integer, or
a finite number. JSON's ``true`` is Python's ``True``, an ``int``: neither counts it."""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A finite JSON number (Python's json reads NaN, Infinity and 1e400 = inf too; an integer too large for a float,
    1 followed by 400 zeros, is not one either)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
