"""The command lines, the top layer: `kd-train` (`train.py`), `kd-eval` (`evaluate.py`), `kd-study` (`study.py`),
`kd-serve-teacher` (`serve.py`) and `kd-quickstart` (`quickstart.py`). Each imports what it runs only when it runs it,
so `--help` and bad input answer without importing torch."""

from ..runtime.lazy import lazy_getattr

_EXPORTS = {"main": ".train"}  # `kd_trainers.cli.main` is kd-train's, as before the command lines were a package
__all__ = ["main"]
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
