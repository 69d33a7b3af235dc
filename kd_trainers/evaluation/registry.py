"""The metrics `score` computes, read from the local `evaluate` modules' own registrations: each `modules/<name>.py`
declares, as plain literals, the metric columns it gives (`KD_METRICS`: column -> its output key, what it compares
against, its suite) and, if it needs them, the `compute` keywords it takes from `score`'s (`KD_OPTIONS`), corpus-level
keys (`KD_CORPUS`) and keys kept in the frame's `attrs` (`KD_ATTRS`). They are read from the files' text, not
imported (`import evaluate` takes seconds, and a recipe's metric names are checked before anything loads). A new
metric is one module file with its registration; nothing here changes."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modules")
AGAINST = ("references", "teacher_predictions")
_NAMES = ("KD_METRICS", "KD_OPTIONS", "KD_CORPUS", "KD_ATTRS")


@dataclass(frozen=True)
class MetricModule:
    """One local `evaluate` module's registration."""

    name: str
    metrics: dict          # column -> {"key": output key, "against": references | teacher_predictions, "suite": name}
    options: dict          # compute() keyword -> score() keyword
    corpus: tuple = ()     # corpus-level output keys (frame.attrs["corpus"])
    attrs: tuple = ()      # output keys copied into frame.attrs


def read_registration(path: str) -> MetricModule | None:
    """The registration of the module at `path`, or None when it declares no `KD_METRICS` (a helper file)."""
    values = {}
    with open(path, encoding="utf-8") as file:
        source = file.read()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in _NAMES:
            values[node.targets[0].id] = ast.literal_eval(node.value)
    if "KD_METRICS" not in values:
        return None
    name = os.path.splitext(os.path.basename(path))[0]
    for column, entry in values["KD_METRICS"].items():
        if set(entry) != {"key", "against", "suite"} or entry["against"] not in AGAINST:
            raise ValueError(f"{path}: KD_METRICS[{column!r}] must be {{key, against, suite}} with against one of "
                             f"{list(AGAINST)}, got {entry!r}.")
    return MetricModule(name, values["KD_METRICS"], values.get("KD_OPTIONS", {}), tuple(values.get("KD_CORPUS", ())),
                        tuple(values.get("KD_ATTRS", ())))


def discover(folder: str = MODULES_DIR) -> dict[str, MetricModule]:
    """`{module name: registration}` of every module in `folder`, in file-name order; a column given twice fails."""
    modules, owners = {}, {}
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".py") or file.startswith("_"):
            continue
        module = read_registration(os.path.join(folder, file))
        if module is None:
            continue
        for column in module.metrics:
            if column in owners:
                raise ValueError(f"The metric {column!r} is registered by both {owners[column]} and {module.name}.")
            owners[column] = module.name
        modules[module.name] = module
    return modules


MODULES = discover()
# metric column -> (module, key in its output, what it compares against)
METRICS: dict[str, tuple[str, str, str]] = {
    column: (module.name, entry["key"], entry["against"])
    for module in MODULES.values() for column, entry in module.metrics.items()}
SUITES: dict[str, list[str]] = {}
for _module in MODULES.values():
    for _column, _entry in _module.metrics.items():
        SUITES.setdefault(_entry["suite"], []).append(_column)
