"""The value checks every layer's refusals share (a field, a recipe key, an argument), so that each is written once."""

from __future__ import annotations


def is_positive_integer(value) -> bool:
    """An `int` of 1 or more (a `bool` is not one: `True` would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
