"""The quickstart's pipeline at a few steps (the real run is the README's first command)."""

import os

import pandas as pd
import pytest

from kd_trainers.cli import main as kd_train
from kd_trainers.quickstart import run

pytestmark = pytest.mark.slow  # whole runs and studies


def test_quickstart_writes_its_recipes_runs_the_study_and_reports(tmp_path, capsys):
    report = run(str(tmp_path), teacher_steps=3, student_steps=2, eval_limit=6)
    printed = capsys.readouterr().out
    assert "KD student vs SFT student: student=kd better than student=sft on" in printed
    assert "DSKD-CMA student vs SFT student: student=dskd_cma better than student=sft on" in printed
    assert "Reference (the ceiling): teacher rouge_l" in printed and "**" not in printed
    assert f"Report: {os.path.abspath(report)}/report.md" in printed
    summary = pd.read_csv(os.path.join(report, "summary.csv"))
    assert sorted(summary.loc[~summary["reference"], "cell"]) == ["student=dskd_cma", "student=kd", "student=sft"]
    assert sorted(summary.loc[summary["reference"], "cell"]) == ["teacher", "teacher_wordpiece"]  # the ceilings
    assert {"rouge_l", "bleu_4", "embedding_cosine", "bertscore_f1", "exact_match"} <= set(summary.columns)
    assert (summary["n"] == 6).all()
    for name in ("teacher", "teacher_wordpiece"):
        assert os.path.exists(tmp_path / "study" / "prepare" / name / "model.safetensors")
    assert os.path.exists(tmp_path / "study" / "cells" / "student-dskd_cma" / "seed0" / "train" /
                          "dskd_projectors.safetensors")
    assert os.path.exists(os.path.join(report, "report.html"))
    # The written recipes are ordinary recipes.
    for recipe in ("teacher_sft", "teacher_wordpiece_sft", "student_sft", "student_kd", "student_dskd_cma"):
        assert kd_train(["validate", str(tmp_path / "recipes" / f"{recipe}.yaml")]) == 0
