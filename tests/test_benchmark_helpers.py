"""The benchmarks' shared runner, without running a benchmark: a cell's figures as its processes report them."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_kd_step():
    spec = importlib.util.spec_from_file_location("bench_kd_step", os.path.join(ROOT, "benchmarks", "bench_kd_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_cell_without_a_peak_keeps_the_figures_it_took(monkeypatch):
    """On CPU a cell runs twice, for the time and for the memory; a script whose cells take no peak (the on-policy
    ones) keeps its time and memory growth (it stopped with KeyError: 'peak_mb')."""
    bench = _bench_kd_step()
    answers = iter([{"step_s": 0.5, "memory_growth_mb": 90.0, "note": ""},     # the timed run
                    {"step_s": 0.7, "memory_growth_mb": 75.0, "note": ""}])    # the run that measures memory
    monkeypatch.setattr(bench, "_run_cell_process", lambda script, cell, env: next(answers))
    assert bench.run_cell("bench_on_policy.py", ["ours", 32000, 4, 2, False], gpu=False) == {
        "step_s": 0.5, "memory_growth_mb": 75.0, "note": ""}
    answers = iter([{"step_s": 0.5, "memory_growth_mb": 90.0, "peak_mb": 900.0, "note": ""},
                    {"step_s": 0.7, "memory_growth_mb": 75.0, "peak_mb": 700.0, "note": ""}])
    assert bench.run_cell("bench_kd_step.py", ["ours", 32000, 4, 2, False], gpu=False) == {
        "step_s": 0.5, "memory_growth_mb": 75.0, "peak_mb": 700.0, "note": ""}
