"""Process-group teardown for launched runs.

A process that exits with a gloo process group still up can abort at interpreter exit ("terminate called without an
active exception", SIGABRT): gloo's worker threads still hold work objects when Python is torn down. Every entry point
that may run under `accelerate launch` therefore destroys the group itself before returning.
"""

from __future__ import annotations


def end_process_group() -> None:
    """Destroys the default process group if one is up (no barrier: a rank that failed must not hang the others)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
