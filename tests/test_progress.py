"""Progress lines: quarters, elapsed time and ETA from the rate so far, silence without a reporter or when quick."""

from kd_trainers.runtime import progress
from kd_trainers.runtime.progress import ProgressLine, progress_line, reporting_to


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_line_prints_each_quarter_with_the_eta_at_the_rate_so_far(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    printed = []
    line = ProgressLine("training", 800, "steps", printed.append)
    for step in (100, 200, 300, 400, 800):
        clock.now += 10  # 100 steps every 10 s until step 400, then 400 steps in 10 s
        line.update(step)
    assert printed == ["  training: 200/800 steps (25%), 20 s, ETA 60 s",
                       "  training: 400/800 steps (50%), 40 s, ETA 40 s",
                       "  training: 800/800 steps (100%), 50 s, done"]


def test_a_resumed_task_is_timed_from_where_it_was_taken_up(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    printed = []
    line = ProgressLine("training", 100, "steps", printed.append, done=50)
    clock.now += 30
    line.update(75)  # 25 steps in 30 s: 25 more take 30 s
    assert printed == ["  training: 75/100 steps (75%), 30 s, ETA 30 s"]


def test_quick_tasks_and_tasks_without_a_reporter_print_nothing(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    printed = []
    quick = ProgressLine("generating", 10, "prompts", printed.append)
    clock.now += 1
    quick.update(10)
    assert printed == []
    silent = progress_line("generating", 10, "prompts")  # no reporter installed
    clock.now += 10
    silent.update(10)
    with reporting_to(printed.append):
        reported = progress_line("generating", 10, "prompts")
    clock.now += 10
    reported.update(10)
    assert printed == ["  generating: 10/10 prompts (100%), 10 s, done"]
