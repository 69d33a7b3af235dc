"""The closest valid key, for error messages about a typo in a recipe or study file."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """`" Did you mean 'x'?"` for the closest key in `valid`, or `""` when none is close."""
    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f" Did you mean {match[0]!r}?" if match else ""
