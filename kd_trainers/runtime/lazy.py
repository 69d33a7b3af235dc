"""Lazy package exports (PEP 562): a package's `__getattr__` that imports a name's module on first use, so that
importing the package (for a CLI's `--help`, or one light module of it) does not import torch, transformers and TRL."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(package: str, namespace: dict, exports: dict[str, str]) -> Callable[[str], object]:
    """The `__getattr__` of `package`: `exports` maps a name to the relative module that defines it; the value is
    cached in the package's `namespace` once loaded."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
