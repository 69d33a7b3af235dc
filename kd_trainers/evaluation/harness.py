"""The `lm_eval` suite: a model in memory scored on lm-evaluation-harness tasks, one score per task item.

    evaluation:
      metrics: [ngram, reasoning, lm_eval]
      lm_eval: {tasks: [arc_easy, gsm8k], num_fewshot: 0, limit: 200, batch_size: 16, include_path: my_tasks/}

The harness runs through its Python API (`lm_eval.simple_evaluate` on an `HFLM` wrapping the model already loaded:
no second load), with per-sample logging on. Each logged sample becomes a row of the evaluation's `scores.csv` with
`example_id` `<task>/<doc_id>` and one column per metric, `<task>/<metric>` (`<task>/<metric>,<filter>` for a
task's named filters, as lm-eval writes its own keys: `gsm8k/exact_match,strict-match`). A metric that lm-eval
aggregates other than by the mean of its items (corpus BLEU, perplexity) has no column: its per-item values would not
average to the task's figure; it stays in the summary and `lm_eval_results.json`.

The demo task's lm-eval tasks (`kd_trainers.demo.harness_tasks`: `kd_demo_glossary_mc`, `kd_demo_arithmetic`, tag
`kd_demo`) are always on the include path; `include_path` adds folders of task YAMLs of your own.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import numbers
import os
import subprocess
import unittest.mock

import pandas as pd
from peft import PeftModel

from ..demo.harness_tasks import demo_task_folder
from ..runtime.files import user_cache_dir, write_atomically
from ..runtime.progress import libraries_quieted
from ..runtime.smoke import capped_limit
from ..runtime.suggest import did_you_mean


HARNESS_KEYS = ("tasks", "num_fewshot", "limit", "batch_size", "include_path")
HARNESS_DEFAULTS = {"num_fewshot": None, "limit": None, "batch_size": 16, "include_path": None}
INSTALL = "pip install 'kd-trainers[eval]' (it brings lm-eval)"


def harness_settings(block, where: str, error: type[ValueError], base_dir: str | None = None) -> dict:
    """The `lm_eval` block with its defaults, checked for shape (task names are checked by `check_harness`, which
    imports lm-eval). A relative `include_path` is taken from `base_dir` (the recipe's or study's folder)."""
    if not isinstance(block, dict):
        raise error(f"{where}: evaluation.lm_eval: {block!r} should be a mapping, e.g. "
                    "{tasks: [arc_easy], num_fewshot: 0}.")
    for key in block:
        if key not in HARNESS_KEYS:
            raise error(f"{where}: evaluation.lm_eval.{key}: unknown key.{did_you_mean(key, HARNESS_KEYS)}")
    settings = {**HARNESS_DEFAULTS, **block}
    tasks = settings.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(task, str) and task for task in tasks):
        raise error(f"{where}: evaluation.lm_eval.tasks: {settings.get('tasks')!r} should be a list of lm-eval task "
                    "names, e.g. [arc_easy, gsm8k] (the demo's: [kd_demo]).")
    settings["tasks"] = tasks
    for key, low, unset in (("num_fewshot", 0, " (or null: each task's own)"), ("limit", 1, " (or null: every item)"),
                            ("batch_size", 1, "")):
        value = settings[key]
        if value is None and unset:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise error(f"{where}: evaluation.lm_eval.{key}: {value!r} should be an integer ≥ {low}{unset}.")
    paths = settings["include_path"]
    if paths is not None:
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(path, str) and path for path in paths):
            raise error(f"{where}: evaluation.lm_eval.include_path: {settings['include_path']!r} should be a folder "
                        "of task YAMLs, or a list of them.")
        paths = [path if os.path.isabs(path) or base_dir is None else os.path.join(base_dir, path) for path in paths]
        for path in paths:
            if not os.path.isdir(path):
                raise error(f"{where}: evaluation.lm_eval.include_path: {path!r} is not a folder (a relative path is "
                            f"taken from {base_dir or 'the current folder'}).")
        settings["include_path"] = [os.path.abspath(path) for path in paths]
    settings["limit"] = capped_limit(settings["limit"])  # a smoke run scores a few items of each task
    return settings


_MANAGERS: dict[tuple[tuple[str, ...], bool], object] = {}  # (include paths, with lm-eval's own tasks) -> index


def _local_task_manager(settings: dict):
    """`(manager, paths)`: lm-eval's task index of the demo's and the include path's tasks alone (fast)."""
    from lm_eval.tasks import TaskManager  # lazy: lm-eval is optional (the eval extra) and takes seconds to import

    paths = (demo_task_folder(user_cache_dir("lm_eval_tasks")), *(settings.get("include_path") or []))
    if (paths, False) not in _MANAGERS:
        _MANAGERS[(paths, False)] = TaskManager(include_path=list(paths), include_defaults=False)
    return _MANAGERS[(paths, False)], paths


def _task_manager(settings: dict):
    """lm-eval's task index: of the demo's and the include path's tasks alone when they are all the settings name
    (indexing lm-eval's own 14,000 task YAMLs takes about ten seconds), else of lm-eval's tasks too; built once per
    process and include path."""
    from lm_eval.tasks import TaskManager  # lazy: lm-eval is optional (the eval extra) and takes seconds to import

    local, paths = _local_task_manager(settings)
    if all(task in local.all_tasks for task in settings["tasks"]):
        return local
    if (paths, True) not in _MANAGERS:
        _MANAGERS[(paths, True)] = TaskManager(include_path=list(paths))
    return _MANAGERS[(paths, True)]


def _default_task_names() -> set[str]:
    """The names of lm-eval's own tasks, tags and groups, kept in the user's cache per lm-eval version: indexing them
    takes about ten seconds, once; after that a name is checked at once."""
    import lm_eval  # lazy: see _task_manager
    from lm_eval.tasks import TaskManager  # lazy: see _task_manager

    path = os.path.join(user_cache_dir("lm_eval_tasks"), f"default_task_names-{lm_eval.__version__}.json")
    if os.path.isfile(path):
        try:
            with open(path) as handle:
                return set(json.load(handle))
        except (OSError, ValueError):
            pass  # rebuilt below
    names = sorted(TaskManager().all_tasks)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, json.dumps(names))
    return set(names)


def check_harness(settings: dict, where: str, error: type[ValueError]) -> None:
    """lm-eval is installed and knows every task named (the harness's own, the demo's, the include path's): one line
    naming the unknown task and the closest known one, before any model is loaded."""
    try:
        manager = _local_task_manager(settings)[0]
    except ImportError:
        raise error(f"{where}: evaluation.metrics has lm_eval, which needs the lm-eval package: {INSTALL}.") from None
    known = set(manager.all_tasks)
    if not all(task in known for task in settings["tasks"]):
        known |= _default_task_names()
    for task in settings["tasks"]:
        if task not in known:
            raise error(f"{where}: evaluation.lm_eval.tasks: {task!r} is not an lm-eval task, tag or group."
                        f"{did_you_mean(task, sorted(known))} A task of your own: put its YAML in a folder named by "
                        "evaluation.lm_eval.include_path.")


@contextlib.contextmanager
def _merged(model):
    """The model as lm-eval should see it: a PEFT model with its adapter merged into the base weights (undone after,
    so a trainer's model is left as it was), in eval mode (restored after)."""
    training = model.training
    merge = isinstance(model, PeftModel)
    if merge:
        model.merge_adapter()
    model.eval()
    try:
        yield model.get_base_model() if merge else model
    finally:
        if merge:
            model.unmerge_adapter()
        model.train(training)


def is_task_item(example_ids: pd.Series) -> pd.Series:
    """Which rows of a `scores.csv` are lm-eval items (`example_id` `<task>/<doc_id>`), not generated answers."""
    return example_ids.astype(str).str.contains("/", regex=False)


def _column(task: str, metric: str, filter_name: str) -> str:
    return f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric},{filter_name}"


def _figure_key(key: str) -> str | None:
    """lm-eval's result key (`acc,none`, `exact_match,strict-match`) -> our name (`acc`, `exact_match,strict-match`);
    None for what is not a figure (`alias`, `name`, `sample_len`)."""
    if "," not in key:
        return None
    metric, filter_name = key.split(",", 1)
    return metric if filter_name == "none" else key


def harness_frame(output: dict) -> tuple[pd.DataFrame, dict, list[str]]:
    """`(frame, figures, dropped)` from `simple_evaluate`'s output (with samples): a row per task item, a column per
    mean-aggregated metric; lm-eval's own figure per task and metric (`<task>/<metric>`, `<task>/<metric>_stderr`);
    the columns left out because their items do not average to lm-eval's figure."""
    figures = {}
    for task, values in output["results"].items():
        for key, value in values.items():
            name = _figure_key(key)
            if name is not None and isinstance(value, numbers.Real):
                figures[f"{task}/{name}"] = float(value)
    rows: dict[str, dict] = {}
    for task, samples in output["samples"].items():
        for sample in samples:
            row = rows.setdefault(f"{task}/{sample['doc_id']}", {"example_id": f"{task}/{sample['doc_id']}"})
            for metric in sample["metrics"]:
                value = sample[metric]
                if isinstance(value, numbers.Real):  # numpy scalars and bools too
                    row[_column(task, metric, sample["filter"])] = float(value)
    frame = pd.DataFrame(list(rows.values()))
    dropped = []
    for column in [c for c in frame.columns if c != "example_id"]:
        reported = figures.get(column)
        mean = frame[column].mean()
        if reported is None or not math.isclose(mean, reported, rel_tol=1e-9, abs_tol=1e-12):
            dropped.append(column)
    return frame.drop(columns=dropped), figures, dropped


def _git_commit_hash() -> str | None:
    """The working directory's git commit, as lm-eval records it, without git's complaints on the terminal."""
    try:
        answer = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:  # no git on this machine
        return None
    return answer.stdout.strip() or None


@contextlib.contextmanager
def _quiet_git():
    """lm-eval asks git for the commit of the working directory with git's stderr on the terminal, so every run
    outside a repository prints `fatal: not a git repository`; it asks `_git_commit_hash` instead."""
    import lm_eval.evaluator  # lazy: see _task_manager

    if not hasattr(lm_eval.evaluator, "get_git_commit_hash"):
        yield
        return
    with unittest.mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", _git_commit_hash):
        yield


def run_harness(model, tokenizer, settings: dict, directory: str | None = None) -> tuple[pd.DataFrame, dict]:
    """lm-eval on `model` (in memory) with the `lm_eval` settings; returns `(frame, figures)` (see `harness_frame`).
    With `directory`, writes `lm_eval_results.json` (lm-eval's results, task configs, versions, n-shot, sample
    counts) and `lm_eval_samples.jsonl` (per item: task, doc_id, filter, the prompt, the target, the filtered response
    and the metrics)."""
    from lm_eval import simple_evaluate  # lazy: see _task_manager
    from lm_eval.models.huggingface import HFLM  # lazy: see _task_manager

    manager = _task_manager(settings)
    # lm-eval warns that a model passed in memory skips its own loading options: that is the point here.
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    # lm-eval draws its own progress bars (on stderr) with no switch to turn them off: under a CLI that prints its
    # own progress lines (`quiet_libraries`: kd-study, kd-quickstart) they are set aside.
    bars = contextlib.redirect_stderr(io.StringIO()) if libraries_quieted() else contextlib.nullcontext()
    with _merged(model) as plain, bars, _quiet_git():
        lm = HFLM(pretrained=plain, tokenizer=tokenizer, batch_size=settings["batch_size"])
        output = simple_evaluate(model=lm, tasks=list(settings["tasks"]), num_fewshot=settings["num_fewshot"],
                                 limit=settings["limit"], log_samples=True, task_manager=manager)
    frame, figures, dropped = harness_frame(output)
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        record = {key: output.get(key) for key in ("results", "groups", "group_subtasks", "configs", "versions",
                                                   "n-shot", "higher_is_better", "n-samples", "lm_eval_version")}
        record["settings"] = settings
        record["not_per_item"] = dropped
        with open(os.path.join(directory, "lm_eval_results.json"), "w") as handle:
            json.dump(record, handle, indent=2, default=str)
        with open(os.path.join(directory, "lm_eval_samples.jsonl"), "w") as handle:
            for task, samples in output["samples"].items():
                for sample in samples:
                    handle.write(json.dumps({
                        "task": task, "doc_id": sample["doc_id"], "filter": sample["filter"],
                        "prompt": sample["arguments"][0][0] if sample["arguments"] else None,
                        "target": sample["target"], "response": sample["filtered_resps"],
                        **{metric: sample[metric] for metric in sample["metrics"]}}, default=str) + "\n")
    return frame, figures
