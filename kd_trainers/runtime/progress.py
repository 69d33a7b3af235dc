"""Plain progress lines with an ETA, for long runs read in a terminal or a log file (a study, the quickstart), and
`quiet_libraries()`, which leaves the terminal to them.

A reporter is installed for a block of work (`reporting_to(log)`); code deep below (generation, a trainer's callback)
asks for a `ProgressLine` and advances it without knowing who prints. With no reporter installed nothing is printed,
so library calls stay silent.

    with reporting_to(print):
        line = progress_line("generating", total=180, unit="prompts")
        for ...: line.advance(32)      # prints at 25%, 50%, 75% and the end: "generating: 90/180 prompts (50%),
                                       # 3 s, ETA 3 s"
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
import warnings
from typing import Callable

import datasets
import torch
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging


_QUIETED = False
_REPORTER: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar("kd_progress", default=None)


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


class ProgressLine:
    """One task's progress (`done` of `total` units), printed each time it crosses another quarter, with the time so
    far and the time left at the rate so far. A task that takes under `quiet_seconds` prints nothing."""

    quiet_seconds = 3.0

    def __init__(self, label: str, total: int, unit: str, log: Callable[[str], None] | None, every: float = 0.25,
                 done: int = 0):
        self.label, self.total, self.unit, self.log, self.every = label, max(int(total), 1), unit, log, every
        # A task taken up part-way (a resumed run) is timed from where it was taken up.
        self.done = self.first = min(int(done), self.total)
        self.start = time.monotonic()
        self.next_report = every * (int(self.done / self.total / every) + 1)

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)

    def update(self, done: int) -> None:
        self.done = min(int(done), self.total)
        fraction = self.done / self.total
        if self.log is None or fraction < self.next_report:
            return
        while self.next_report <= fraction:
            self.next_report += self.every
        elapsed = time.monotonic() - self.start
        if elapsed < self.quiet_seconds:
            return
        left = elapsed * (self.total - self.done) / max(self.done - self.first, 1)
        eta = "done" if self.done >= self.total else f"ETA {format_seconds(left)}"
        self.log(f"  {self.label}: {self.done}/{self.total} {self.unit} ({fraction:.0%}), "
                 f"{format_seconds(elapsed)}, {eta}")


def progress_line(label: str, total: int, unit: str, done: int = 0) -> ProgressLine:
    """A progress line printed through the installed reporter (silent when none is installed)."""
    return ProgressLine(label, total, unit, _REPORTER.get(), done=done)


@contextlib.contextmanager
def reporting_to(log: Callable[[str], None] | None):
    """Progress lines inside the block are printed with `log`."""
    token = _REPORTER.set(log)
    try:
        yield
    finally:
        _REPORTER.reset(token)


class TrainingProgress(TrainerCallback):
    """The training steps as a progress line, in place of the trainer's per-log dictionaries (they still go to
    `trainer_state.json` and the run's loggers): "training: 400/800 steps (50%), 30 s, ETA 30 s"."""

    def __init__(self, label: str = "training"):
        self.label, self.line = label, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.line = progress_line(self.label, state.max_steps, "steps", done=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.line is not None:
            self.line.update(state.global_step)


def quiet_libraries(transformers_warnings: bool = False) -> None:
    """Only errors from transformers, datasets and DeepSpeed (no download or map bars, no detection notices, no
    deprecation notices about library internals): for the CLIs that print their own plan and progress (`kd-study`,
    `kd-quickstart`, `kd-eval`). `transformers_warnings=True` (`kd-train`) keeps transformers' warnings, and with
    them the trainer's own progress bar (it shows unless transformers logs errors only)."""
    global _QUIETED
    _QUIETED = True
    if not torch.cuda.is_available():  # what DeepSpeed would detect anyway, without its warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the package chose TRL's experimental GKD, not the user
    # transformers 5 renamed gradient checkpointing; TRL's on-policy generation (GKD) still calls the old names.
    warnings.filterwarnings("ignore", message=r"`\w+` is deprecated and will be removed in v6", category=FutureWarning)
    hf_logging.set_verbosity_warning() if transformers_warnings else hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    datasets.disable_progress_bars()


def libraries_quieted() -> bool:
    """Whether `quiet_libraries()` ran in this process (a study's workers then run it too)."""
    return _QUIETED
