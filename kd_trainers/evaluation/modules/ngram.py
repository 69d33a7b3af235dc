"""n-gram overlap of predictions with references, per example: BLEU-1..4 (nltk, smoothing method 1, tokens from
sacrebleu's 13a tokenizer), chrF (sacrebleu) and ROUGE-L F1 (rouge-score, Porter stemming); and corpus BLEU and corpus
chrF (sacrebleu). Every score is in [0, 1]. A local `evaluate` module: `evaluate.load(<this file>)`, nothing fetched."""

import evaluate
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from kd_trainers.evaluation.module_info import text_pair_info


# Its registration, read from this file's text without importing it (`kd_trainers.evaluation.registry`): the metric
# columns it gives `score`, each as {key: its output key, against: references | teacher_predictions, suite: name}, and
# `corpus`: corpus-level keys of its output, kept in the frame's `attrs["corpus"]`.
KD_METRICS = {
    "bleu_1": {"key": "bleu_1", "against": "references", "suite": "ngram"},
    "bleu_2": {"key": "bleu_2", "against": "references", "suite": "ngram"},
    "bleu_3": {"key": "bleu_3", "against": "references", "suite": "ngram"},
    "bleu_4": {"key": "bleu_4", "against": "references", "suite": "ngram"},
    "chrf": {"key": "chrf", "against": "references", "suite": "ngram"},
    "rouge_l": {"key": "rouge_l", "against": "references", "suite": "ngram"},
}
KD_CORPUS = ["corpus_bleu", "corpus_chrf"]

_WEIGHTS = {1: (1.0,), 2: (0.5, 0.5), 3: (1 / 3, 1 / 3, 1 / 3), 4: (0.25, 0.25, 0.25, 0.25)}


class NgramOverlap(evaluate.Metric):
    def _info(self):
        return text_pair_info(__doc__)

    def _compute(self, predictions, references):
        tokenize = Tokenizer13a()
        smoothing = SmoothingFunction().method1
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        result = {f"bleu_{n}": [] for n in _WEIGHTS}
        result.update(chrf=[], rouge_l=[])
        for prediction, reference in zip(predictions, references):
            hypothesis, reference_tokens = tokenize(prediction).split(), tokenize(reference).split()
            for n, weights in _WEIGHTS.items():
                result[f"bleu_{n}"].append(
                    sentence_bleu([reference_tokens], hypothesis, weights=weights, smoothing_function=smoothing)
                    if hypothesis else 0.0)
            result["chrf"].append(sacrebleu.sentence_chrf(prediction, [reference]).score / 100)
            result["rouge_l"].append(scorer.score(reference, prediction)["rougeL"].fmeasure)
        result["corpus_bleu"] = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100
        result["corpus_chrf"] = sacrebleu.corpus_chrf(list(predictions), [list(references)]).score / 100
        return result
