"""The optional packages a command line needs, checked before it does anything: a missing one is one line naming the
extra to install (exit status 2), not a traceback from deep inside a run."""

from __future__ import annotations

import importlib.util

# What `pip install 'kd-trainers[eval]'` brings that kd-eval and kd-study import: metrics, statistics, plots.
EVAL_MODULES = ("evaluate", "nltk", "sacrebleu", "rouge_score", "pingouin", "scipy", "matplotlib")


def missing_eval_extra(command: str) -> str | None:
    """The line to print when a module of the `eval` extra is missing for `command`, else None."""
    missing = [name for name in EVAL_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"{command} needs the evaluation packages ({', '.join(missing)} not installed): "
            "pip install 'kd-trainers[eval]' (in a clone: pip install -e '.[eval]').")
