"""A teacher cache's folder, by name: its files, its block size and its format version, and the key that says what
a cache was made from. Reading a cache is `cache.py`; checking one is whole, `integrity.py`; writing one, `writer.py`.
"""

from __future__ import annotations

import hashlib
import json


INFO, PLAN = "cache_info.json", "cache_plan.json"
FORMAT_VERSION = 2  # 2: the tail's mass at each stored temperature
BLOCK_ROWS = 256


def digest(value) -> str:
    """A short sha256 of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(components: dict) -> str:
    return digest(components)


def block_name(index: int) -> str:
    return f"block-{index:06d}"
