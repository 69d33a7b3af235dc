"""Old import paths of modules that moved into the layers' packages keep working: `import kd_trainers.generation` is
`kd_trainers.models.generation` (the same module object, with a `DeprecationWarning` naming the new path), and
`python -m kd_trainers.real_models` runs `kd_trainers.models.real_models`. Nothing is imported until an old path is."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old path -> new path, for the modules that moved out of the package's top level (0.1.0.dev0)
MOVED_MODULES = {
    "kd_trainers.errors": "kd_trainers.runtime.errors",
    "kd_trainers.lazy": "kd_trainers.runtime.lazy",
    "kd_trainers.suggest": "kd_trainers.runtime.suggest",
    "kd_trainers.tokenizer": "kd_trainers.models.tokenizer",
    "kd_trainers.hidden_states": "kd_trainers.models.hidden_states",
    "kd_trainers.generation": "kd_trainers.models.generation",
    "kd_trainers.real_models": "kd_trainers.models.real_models",
    "kd_trainers.prompt_completion": "kd_trainers.data.prompt_completion",
    "kd_trainers.teacher_completions": "kd_trainers.data.teacher_completions",
    "kd_trainers.stats": "kd_trainers.evaluation.stats",
    "kd_trainers.publish": "kd_trainers.recipe.publish",
    "kd_trainers.eval_cli": "kd_trainers.cli.evaluate",
    "kd_trainers.study_cli": "kd_trainers.cli.study",
    "kd_trainers.serve_cli": "kd_trainers.cli.serve",
    "kd_trainers.quickstart": "kd_trainers.cli.quickstart",
    "kd_trainers.dskd.data": "kd_trainers.data.dual_tokenization",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder for the old paths only: it hands back the module already at its new path, so a class imported through
    either path is the same class."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED_MODULES[spec.name]}; import it from there.", DeprecationWarning,
                      stacklevel=2)
        module = importlib.import_module(MOVED_MODULES[spec.name])
        spec.loader_state = module.__spec__  # importlib sets `__spec__` to the old path's next: put back in exec_module
        return module

    def exec_module(self, module) -> None:
        """The module ran at its new path already; it keeps its own spec (`runpy`, `reload` and pickling read it)."""
        module.__spec__ = module.__spec__.loader_state

    def get_code(self, name):
        """`python -m OLD`: run the new module as `__main__` (its relative imports need its own package)."""
        return compile(f"import runpy\nrunpy.run_module({MOVED_MODULES[name]!r}, run_name='__main__', alter_sys=True)",
                       f"<{name}, moved to {MOVED_MODULES[name]}>", "exec")


def install() -> None:
    """Add the finder once, after the standard ones: a path that still exists is found where it is."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
