"""`KD_TRAINERS_SMOKE=1`: every command runs, nothing measures.

A smoke run checks that commands run end to end (the README's blocks, in `tests/test_readme.py`) without their
cost. With the variable set to `1`:

- every training run of the package's trainers stops after `STEPS` optimizer steps (`max_steps` capped; a recipe's
  resolved `max_steps` says so, so a cached prepare step or an output folder never mixes with a real run's);
- every evaluation scores at most `EXAMPLES` examples of its split, and at most `EXAMPLES` items of each
  lm-evaluation-harness task;
- the teacher answers at most `PROMPTS` prompts before training (Seq-KD, a `prompt_dataset`, a recipe's `prompts:`);
- a study trains the first of its seeds only;
- the benchmarks run their smallest cell once, into `benchmarks/results/smoke/`.

Each process that caps something says so once, on one line; a finished smoke run's `done.json` has `"smoke": true`,
and a run without the variable does not take it for its own finished run. Its numbers are not results.
"""

from __future__ import annotations

import os
import sys


SMOKE_ENV = "KD_TRAINERS_SMOKE"
STEPS = 2
EXAMPLES = 4
PROMPTS = 32  # what 2 steps of 16 rows read

_announced = False


def smoke_run() -> bool:
    """Whether this process runs under `KD_TRAINERS_SMOKE=1`. Any other value than `0`, `1` or unset is refused, so a
    typo never runs a whole experiment believed to be a smoke run, or the reverse."""
    value = os.environ.get(SMOKE_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{SMOKE_ENV}={value!r}: set it to 1 for a smoke run (every run capped at {STEPS} steps and "
                         f"{EXAMPLES} evaluated examples), or 0 / unset for a real run.")
    return value == "1"


def announce() -> None:
    """One line, once a process, saying that what it runs is capped."""
    global _announced
    if not _announced:
        _announced = True
        print(f"{SMOKE_ENV}=1: a smoke run: training stops after {STEPS} steps and evaluation scores at most "
              f"{EXAMPLES} examples; its numbers are not results.", file=sys.stderr, flush=True)


def capped_steps(max_steps: int) -> int:
    """`max_steps` under a smoke run (-1, train by epochs, becomes `STEPS`); unchanged otherwise."""
    if not smoke_run():
        return max_steps
    announce()
    return STEPS if max_steps is None or max_steps < 0 else min(max_steps, STEPS)


def capped_limit(limit: int | None) -> int | None:
    """How many examples (or harness items) an evaluation scores: `limit` (None: all), at most `EXAMPLES` in a smoke
    run."""
    if not smoke_run():
        return limit
    announce()
    return EXAMPLES if limit is None else min(limit, EXAMPLES)


def capped_prompts(count: int) -> int:
    """How many prompts the teacher answers before training: `count`, at most `PROMPTS` in a smoke run."""
    if not smoke_run() or count <= PROMPTS:
        return count
    announce()
    return PROMPTS


def capped_seeds(seeds: list) -> list:
    """A study's seeds: the first only, in a smoke run."""
    if not smoke_run() or len(seeds) <= 1:
        return seeds
    announce()
    return seeds[:1]
