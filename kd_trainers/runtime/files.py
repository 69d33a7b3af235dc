"""Atomic small-file writes and the `done.json` marker shared by every resumable step (study cells, cached teacher
predictions, Seq-KD's generated sets): a reader sees a whole file or none, never half of one."""

from __future__ import annotations

import json
import os

from .smoke import smoke_run

DONE = "done.json"


def write_atomically(path: str, text: str) -> None:
    """`text` into `path` through a temporary file of this process and a rename (atomic on one filesystem; two
    processes writing the same file each rename a whole one)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def write_done(directory: str, info: dict) -> None:
    """`directory/done.json`, written last: the marker that what the folder holds is complete (`"smoke": true` when
    written by a smoke run, `kd_trainers.smoke`)."""
    write_atomically(os.path.join(directory, DONE), json.dumps({**info, **({"smoke": True} if smoke_run() else {})},
                                                                indent=2))


def done_by_smoke(directory: str) -> bool:
    """Whether `directory/done.json` was written by a smoke run."""
    try:
        with open(os.path.join(directory, DONE)) as handle:
            return json.load(handle).get("smoke") is True
    except (OSError, ValueError, AttributeError):
        return False


def is_done(directory: str) -> bool:
    """Whether `directory` holds complete work for this process: its `done.json`, and not one a smoke run wrote
    unless this is a smoke run too (a real run never takes a smoke run's 2 steps for its own finished run)."""
    return os.path.isfile(os.path.join(directory, DONE)) and (smoke_run() or not done_by_smoke(directory))


def user_cache_dir(kind: str) -> str:
    """`$KD_TRAINERS_CACHE/<kind>` (default `~/.cache/kd_trainers/<kind>`): where work keyed by its content is kept
    between runs (Seq-KD's generated sets, a study's cached prepare steps)."""
    root = os.environ.get("KD_TRAINERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kd_trainers")
    return os.path.join(root, kind)
