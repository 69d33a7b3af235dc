"""DSKD: dual-space knowledge distillation, with cross-model attention when the vocabularies differ.

`config.py` (DSKDConfig), `trainer.py` (DSKDTrainer; each example tokenized for both tokenizers by
`kd_trainers.kd.two_tokenizers`),
`projectors.py` (query / t2s / s2t), `cross_model_attention.py` (the projected hidden states). The loss itself is
`kd_trainers.losses.dual_space_loss`, on the shared chunked engine.
"""

from ..runtime.lazy import lazy_getattr

# Loaded on first use; `method.py` registers the method for recipes.
_EXPORTS = {"DSKDConfig": ".config", "DSKDTrainer": ".trainer"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
