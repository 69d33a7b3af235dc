"""Faults for tests: a kill at the end of a training step (in process), and a real SIGKILL at the N-th call of any
function (in a fresh process)."""

import subprocess
import sys

from transformers import TrainerCallback


class StopAt(TrainerCallback):
    """Simulates a kill: raises at the end of step `step` (after the checkpoints before it were written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("killed")


def killed_during(target: str, call: int, argv: list[str], module: str = "kd_trainers") -> int:
    """Runs `python -m module argv` in a fresh process that SIGKILLs itself at the `call`-th call of `target`
    (`package.module:Class.method` or `package.module:function`); returns the exit status (-9 when killed)."""
    script = f"""
import importlib, os, runpy, signal, sys
module_name, attribute = {target!r}.split(":")
owner = importlib.import_module(module_name)
*parents, name = attribute.split(".")
for parent in parents:
    owner = getattr(owner, parent)
original, calls = getattr(owner, name), []
def dies(*args, **kwargs):
    calls.append(1)
    if len(calls) == {call}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, name, dies)
sys.argv = [{module!r}] + {argv!r}
runpy.run_module({module!r}, run_name="__main__")
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).returncode
