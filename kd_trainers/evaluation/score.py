"""`score`: per-example metric scores of predictions, as a pandas DataFrame, from the local `evaluate` modules (what
each gives is its own registration, `registry.py`)."""

from __future__ import annotations

import os
from functools import lru_cache

import pandas as pd

from .registry import METRICS, MODULES, MODULES_DIR, SUITES


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

    options = {"answer_extractor": answer_extractor, "embedding_model": embedding_model}
    frame = pd.DataFrame({"example_id": range(len(predictions))})
    computed: dict[tuple[str, str], dict] = {}
    corpus = {}
    for name in names:
        module, key, target = METRICS[name]
        if (module, target) not in computed:
            registration = MODULES[module]  # what the module takes from here and gives beside its columns
            kwargs = {keyword: options[option] for keyword, option in registration.options.items()}
            output = load_module(module).compute(predictions=list(predictions), references=list(against[target]),
                                                 **kwargs)
            computed[(module, target)] = output
            corpus.update({k: output[k] for k in registration.corpus if k in output})
            frame.attrs.update({k: output[k] for k in registration.attrs if k in output})
        frame[name] = computed[(module, target)][key]
    frame.attrs["corpus"] = corpus
    return frame
