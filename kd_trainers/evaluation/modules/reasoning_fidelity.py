"""Reasoning fidelity: BLEU-4 (nltk, smoothing method 1, sacrebleu 13a tokens) between the student's and the teacher's
reasoning text, the part of each answer before its "The answer is" sentence. Per example, in [0, 1]. A local
`evaluate` module: predictions are the student's outputs, references the teacher's."""

import evaluate
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from kd_trainers.evaluation.answers import reasoning_text
from kd_trainers.evaluation.module_info import text_pair_info


# Its registration, read from this file's text without importing it (`kd_trainers.evaluation.registry`): the metric
# columns it gives `score`, each as {key: its output key, against: references | teacher_predictions, suite: name}.
KD_METRICS = {"fidelity": {"key": "fidelity", "against": "teacher_predictions", "suite": "reasoning"}}


class ReasoningFidelity(evaluate.Metric):
    def _info(self):
        return text_pair_info(__doc__, "predictions: student texts; references: teacher texts")

    def _compute(self, predictions, references):
        tokenize, smoothing = Tokenizer13a(), SmoothingFunction().method1
        scores = []
        for student, teacher in zip(predictions, references):
            hypothesis = tokenize(reasoning_text(student)).split()
            reference = tokenize(reasoning_text(teacher)).split()
            scores.append(sentence_bleu([reference], hypothesis, smoothing_function=smoothing)
                          if hypothesis and reference else float(hypothesis == reference))
        return {"fidelity": scores}
