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


def test_a_failed_cell_makes_the_benchmark_fail_after_writing_the_others(tmp_path, monkeypatch):
    bench = _bench_kd_step()
    monkeypatch.delenv("KD_TRAINERS_SMOKE", raising=False)
    rows = [{"device": "cpu", "method": "kd", "step_s": 0.5, "note": ""},
            {"device": "cpu", "method": "kd_served", "step_s": float("nan"), "note": "failed (exit 1)"}]
    try:
        bench.write_results(rows, str(tmp_path / "cells"))
    except SystemExit as stop:
        assert "1 of 2 cells failed" in str(stop.code) and "kd_served" in str(stop.code)
    else:
        raise AssertionError("a failed cell must not end as a success")
    assert "kd_served" in (tmp_path / "cells.csv").read_text()


def test_a_smoke_run_measures_the_smallest_cell_once_into_its_own_folder(tmp_path, monkeypatch):
    import argparse

    bench = _bench_kd_step()
    monkeypatch.setenv("KD_TRAINERS_SMOKE", "1")
    options = bench.smallest_cell(argparse.Namespace(vocab=[128000, 32000], seq=[1024, 512], steps=3, repeats=2,
                                                     divergences=["forward_kl", "jsd"]))
    assert (options.vocab, options.seq, options.steps, options.repeats, options.divergences) == (
        [32000], [64], 1, 1, ["forward_kl"])
    bench.write_results([{"device": "cpu", "method": "kd", "note": ""}], str(tmp_path / "cells"))
    assert (tmp_path / "smoke" / "cells.csv").exists() and not (tmp_path / "cells.csv").exists()
