"""Per example, 1.0 when the final answers extracted from the prediction and the reference are equal, else 0.0.

Against gold references this is exact match; against the teacher's predictions it is teacher-student agreement (top-1
final-answer agreement). `answer_extractor`: the_answer_is, last_number, multiple_choice or demo (see
`kd_trainers.evaluation.answers`). A local `evaluate` module."""

import evaluate

from kd_trainers.evaluation.answers import get_extractor
from kd_trainers.evaluation.module_info import text_pair_info


# Its registration, read from this file's text without importing it (`kd_trainers.evaluation.registry`): the metric
# columns it gives `score`, each as {key: its output key, against: references | teacher_predictions, suite: name}; its
# `compute` keyword from `score`'s (`KD_OPTIONS`).
KD_METRICS = {
    "exact_match": {"key": "match", "against": "references", "suite": "reasoning"},
    "agreement": {"key": "match", "against": "teacher_predictions", "suite": "reasoning"},
}
KD_OPTIONS = {"answer_extractor": "answer_extractor"}


class FinalAnswerMatch(evaluate.Metric):
    def _info(self):
        return text_pair_info(__doc__)

    def _compute(self, predictions, references, answer_extractor="the_answer_is"):
        extract = get_extractor(answer_extractor)
        return {"match": [float(extract(p) == extract(r)) for p, r in zip(predictions, references)]}
