"""The quickstart's pipeline at a few steps (the real run is the README's first command)."""

import os

import pandas as pd
import pytest
import yaml

from kd_trainers.cli.train import main as kd_train
from kd_trainers.runtime.progress import ProgressLine
from kd_trainers.cli.quickstart import run


pytestmark = pytest.mark.slow  # whole runs and studies


def test_quickstart_writes_its_recipes_runs_the_study_and_reports(tmp_path, capsys, package_cache, monkeypatch):
    monkeypatch.setattr(ProgressLine, "quiet_seconds", 0.0)  # the progress lines of a run this short too
    report = run(str(tmp_path), teacher_steps=3, student_steps=2, eval_limit=6, seeds=2)
    printed = capsys.readouterr().out
    # The plan first, then each stage with its progress.
    assert printed.index("Plan of study 'quickstart'") < printed.index("(1/10) prepare teacher: training")
    assert "student=seqkd: 2 seed(s), train seqkd for 2 steps each, then evaluate" in printed
    assert "training: 2/2 steps (100%)" in printed and "generating: 6/6 prompts (100%)" in printed
    assert "{'loss'" not in printed  # the trainer's per-log dictionaries are replaced by the progress lines
    assert "Seq-KD student vs SFT student: student=seqkd better than student=sft on" in printed
    assert "DSKD-CMA student vs SFT student: student=dskd_cma better than student=sft on" in printed
    assert "Reference (the ceiling): teacher exact_match" in printed and "**" not in printed
    assert f"Report: {os.path.abspath(report)}/report.md" in printed
    summary = pd.read_csv(os.path.join(report, "summary.csv"))
    assert sorted(summary.loc[~summary["reference"], "cell"]) == ["student=dskd_cma", "student=seqkd", "student=sft"]
    assert sorted(summary.loc[summary["reference"], "cell"]) == ["teacher", "teacher_wordpiece"]  # the ceilings
    assert {"rouge_l", "bleu_4", "embedding_cosine", "bertscore_f1", "exact_match"} <= set(summary.columns)
    assert (summary["n"] == 6).all()
    # The teachers are trained into the package cache (a temporary folder in the tests), keyed by their settings.
    for student in ("student_seqkd", "student_dskd_cma"):
        with open(tmp_path / "recipes" / f"{student}.yaml") as handle:
            teacher = yaml.safe_load(handle)["teacher_model_name_or_path"]
        assert os.path.dirname(teacher) == os.path.join(package_cache, "prepare")
        assert os.path.exists(os.path.join(teacher, "model.safetensors"))
    assert os.path.exists(tmp_path / "study" / "cells" / "student-dskd_cma" / "seed0" / "train" /
                          "dskd_projectors.safetensors")
    assert os.path.exists(os.path.join(report, "report.html"))
    # The written recipes are ordinary recipes.
    # The students see 240 labels and 960 prompts: Seq-KD the teacher's answers to all, DSKD 240 labels and 720 answers.
    seqkd = yaml.safe_load(open(tmp_path / "recipes" / "student_seqkd.yaml"))
    assert (seqkd["dataset_train_split"], seqkd["prompts"]) == ("train[:25%]", "train")
    generated = [line for line in printed.splitlines() if line.startswith("[completions] the teacher completes")]
    assert "[completions] the teacher completes 720 prompts (240 of 960 already asked by a labelled row or repeated)" \
        in generated
    # The written recipes are ordinary recipes.
    for recipe in ("teacher_sft", "teacher_wordpiece_sft", "student_sft", "student_seqkd", "student_dskd_cma"):
        assert kd_train(["validate", str(tmp_path / "recipes" / f"{recipe}.yaml")]) == 0


def test_a_second_quickstart_elsewhere_reuses_the_cached_teachers(tmp_path, capsys, package_cache):
    # The first test's teacher settings: in one session its teachers and their answers are found already.
    run(str(tmp_path / "first"), teacher_steps=3, student_steps=1, eval_limit=2, seeds=1)
    capsys.readouterr()
    run(str(tmp_path / "second"), teacher_steps=3, student_steps=1, eval_limit=2, seeds=1)
    printed = capsys.readouterr().out
    assert "prepare teacher: train sft for 3 steps (cached: found, skipped)" in printed
    assert "prepare teacher_wordpiece: done, skipped" in printed and "prepare teacher: training" not in printed
    # Another teacher setting is another cache entry, to be trained anew: the plan of a third quickstart says so
    # (checked, not run: its training is what the first run did).
    from kd_trainers.cli.quickstart import write_quickstart_study
    from kd_trainers.study import load_study
    from kd_trainers.study.runner import check_study, study_plan

    study = load_study(write_quickstart_study(str(tmp_path / "third"), teacher_steps=4, student_steps=1,
                                              eval_limit=2, seeds=1))
    checked = check_study(study)
    prepared = {step["name"]: recipe.config.output_dir for step, (_, recipe) in zip(study.prepare, checked)}
    plan = "\n".join(study_plan(study, checked, prepared))
    first = next(line for line in printed.splitlines() if "prepare teacher: train sft" in line)
    assert "prepare teacher: train sft for 4 steps (cached in " in plan
    assert prepared["teacher"] not in first and os.path.isdir(os.path.dirname(prepared["teacher"]))
