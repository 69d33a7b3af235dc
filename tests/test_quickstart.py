"""The quickstart's code path, at a few steps (the real run is the README's first command)."""

import math
import os

from kd_trainers.quickstart import run


def test_quickstart_with_dskd_trains_scores_and_saves_every_student(tmp_path, capsys):
    scores = run(str(tmp_path), teacher_steps=3, student_steps=2, dskd=True)
    assert set(scores) == {"teacher (SFT)", "student, SFT only", "student, KD", "teacher (SFT, WordPiece)",
                           "student, DSKD-CMA"}
    assert all(math.isfinite(score["test_nll"]) and 0 <= score["exact_match"] <= 1 for score in scores.values())
    assert os.path.exists(tmp_path / "student-kd" / "model.safetensors")
    assert os.path.exists(tmp_path / "student-kd" / "README.md")
    assert os.path.exists(tmp_path / "student-dskd-cma" / "dskd_projectors.safetensors")
    printed = capsys.readouterr().out
    assert "5/5  Student (BPE) by DSKD with cross-model attention" in printed and "t2s_accuracy" in printed
