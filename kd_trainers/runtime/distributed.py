"""Process-group teardown and exit for launched runs.

A process that exits with a gloo process group still up can abort at interpreter exit ("terminate called without an
active exception", SIGABRT): gloo's worker threads still hold work objects when Python is torn down. Every entry point
that may run under `accelerate launch` therefore destroys the group itself before returning.

Destroying the group was not enough: a ZeRO-3 GKD run was still seen to abort at exit on one rank after training and
saving had completed, so the launcher reported a failure for a finished run. The abort happens while the interpreter
tears down the C++ objects that DeepSpeed, gloo and torch keep in module globals, in an order none of them controls.
A launched worker therefore leaves the way multi-process frameworks' workers do: its work is finished, written and
flushed, the group is destroyed, the `atexit` handlers have run; then `os._exit` ends the process without the
teardown, with the run's own exit status.
"""

from __future__ import annotations

import atexit
import os
import sys


def end_process_group() -> None:
    """Destroys the default process group if one is up (no barrier: a rank that failed must not hang the others)."""
    import torch.distributed as dist  # lazy: `kd-train --help` and bad input answer without importing torch

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_launched_worker(status: int) -> None:
    """Ends a process started by `accelerate launch` (WORLD_SIZE > 1) with `status`, skipping interpreter teardown.

    Returns (and lets the caller exit normally) in a single process, where there is nothing to tear down.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    end_process_group()
    atexit._run_exitfuncs()  # what a normal exit runs first: loggers, trackers, multiprocessing children
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)
