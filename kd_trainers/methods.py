"""The method registry: a training method registers itself from its own folder, and recipes find it by name.

A method is a folder of the package (`kd/`, `dskd/`, `seqkd/`, `gkd/`, `sft/`, or a new one) with a `method.py` that
calls `register_method` with the name a recipe writes (`method: kd`), where its config and trainer classes live (as
`"module:Class"` text, imported only when a recipe uses the method) and whether it needs a teacher:

    # kd_trainers/mymethod/method.py
    from ..methods import register_method

    register_method("mymethod", config="kd_trainers.mymethod.config:MyConfig",
                    trainer="kd_trainers.mymethod.trainer:MyTrainer")

Nothing central changes when a method is added: `available_methods()` reads every folder's `method.py` (light files,
no torch), and a recipe imports the trainer of its own method only.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Method:
    """A registered method: `config` and `trainer` are `"module:Class"` references, loaded on first use."""

    name: str
    config: str
    trainer: str
    needs_teacher: bool = True

    @staticmethod
    def _load(reference: str) -> type:
        module, _, name = reference.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def config_class(self) -> type:
        return self._load(self.config)

    @property
    def trainer_class(self) -> type:
        return self._load(self.trainer)


_REGISTRY: dict[str, Method] = {}
_DISCOVERED = False  # every folder's method.py imported


def register_method(name: str, config: str, trainer: str, needs_teacher: bool = True) -> Method:
    """Registers a method under `name` (what a recipe's `method:` says). Registering a name twice is an error."""
    method = Method(name, config, trainer, needs_teacher)
    if name in _REGISTRY and _REGISTRY[name] != method:
        raise ValueError(f"Method {name!r} is registered twice ({_REGISTRY[name]} and {method}).")
    _REGISTRY[name] = method
    return method


def available_methods() -> dict[str, Method]:
    """Every method of the package: each folder's `method.py` is imported (they are light) and registers itself."""
    global _DISCOVERED
    if not _DISCOVERED:  # once per process: recipes ask for their method several times
        for entry in sorted(os.listdir(_PACKAGE_DIR)):
            if os.path.isfile(os.path.join(_PACKAGE_DIR, entry, "method.py")):
                importlib.import_module(f"kd_trainers.{entry}.method")
        _DISCOVERED = True
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> Method | None:
    return available_methods().get(name)
