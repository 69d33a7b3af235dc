"""`score`: per-example metric scores of predictions, as a pandas DataFrame, from the local `evaluate` modules."""

from __future__ import annotations

import os
from functools import lru_cache

import pandas as pd

MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modules")

# metric column -> (module, key in its output, what it compares against)
METRICS: dict[str, tuple[str, str, str]] = {
    **{f"bleu_{n}": ("ngram", f"bleu_{n}", "references") for n in (1, 2, 3, 4)},
    "chrf": ("ngram", "chrf", "references"),
    "rouge_l": ("ngram", "rouge_l", "references"),
    "embedding_cosine": ("embedding", "embedding_cosine", "references"),
    "bertscore_precision": ("embedding", "bertscore_precision", "references"),
    "bertscore_recall": ("embedding", "bertscore_recall", "references"),
    "bertscore_f1": ("embedding", "bertscore_f1", "references"),
    "exact_match": ("final_answer_match", "match", "references"),
    "agreement": ("final_answer_match", "match", "teacher_predictions"),
    "fidelity": ("reasoning_fidelity", "fidelity", "teacher_predictions"),
}
SUITES: dict[str, list[str]] = {
    "ngram": ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "chrf", "rouge_l"],
    "embedding": ["embedding_cosine", "bertscore_precision", "bertscore_recall", "bertscore_f1"],
    "reasoning": ["exact_match", "agreement", "fidelity"],
}
CORPUS_METRICS = ("corpus_bleu", "corpus_chrf")  # from the ngram module, in `frame.attrs["corpus"]`


@lru_cache(maxsize=None)
def load_module(name: str):
    """A local evaluate module of this package (loaded from its file: nothing is fetched)."""
    import evaluate

    return evaluate.load(os.path.join(MODULES_DIR, f"{name}.py"))


def resolve_metrics(metrics: str | list[str]) -> list[str]:
    """Suite names and metric names -> metric names, in order, without repeats."""
    names = []
    for item in [metrics] if isinstance(metrics, str) else metrics:
        expanded = SUITES.get(item, [item])
        for name in expanded:
            if name not in METRICS:
                raise ValueError(f"Unknown metric or suite {item!r}. Suites: {sorted(SUITES)}; metrics: "
                                 f"{sorted(METRICS)}.")
            if name not in names:
                names.append(name)
    return names


def score(predictions: list[str], references: list[str], metrics: str | list[str] = "ngram",
          teacher_predictions: list[str] | None = None, answer_extractor: str = "the_answer_is",
          embedding_model: str | None = None) -> pd.DataFrame:
    """One row per example, one column per metric (`bleu_1`..`bleu_4`, `chrf`, `rouge_l`, `exact_match`,
    `agreement`, `fidelity`, `embedding_cosine`, `bertscore_precision`/`recall`/`f1`). Corpus-level BLEU and chrF,
    when the n-gram module ran, are in `frame.attrs["corpus"]`, and the embedding model in
    `frame.attrs["embedding_model"]`. `agreement` and `fidelity` need `teacher_predictions` (same examples, same
    order). `embedding_model`: a local or Hub sentence-transformers model; default the packaged all-MiniLM-L6-v2."""
    names = resolve_metrics(metrics)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("Nothing to score: predictions is empty.")
    against = {"references": references, "teacher_predictions": teacher_predictions}
    needs_teacher = [n for n in names if METRICS[n][2] == "teacher_predictions"]
    if needs_teacher and teacher_predictions is None:
        raise ValueError(f"{needs_teacher} compare the student with the teacher: pass teacher_predictions.")
    if teacher_predictions is not None and len(teacher_predictions) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(teacher_predictions)} teacher predictions.")

    frame = pd.DataFrame({"example_id": range(len(predictions))})
    computed: dict[tuple[str, str], dict] = {}
    corpus = {}
    for name in names:
        module, key, target = METRICS[name]
        if (module, target) not in computed:
            kwargs = {"final_answer_match": {"answer_extractor": answer_extractor},
                      "embedding": {"model_name_or_path": embedding_model}}.get(module, {})
            computed[(module, target)] = load_module(module).compute(predictions=list(predictions),
                                                                     references=list(against[target]), **kwargs)
            corpus.update({k: computed[(module, target)][k] for k in CORPUS_METRICS
                           if k in computed[(module, target)]})
            if "embedding_model" in computed[(module, target)]:
                frame.attrs["embedding_model"] = computed[(module, target)]["embedding_model"]
        frame[name] = computed[(module, target)][key]
    frame.attrs["corpus"] = corpus
    return frame
