"""ULD: universal logit distillation (Boizard et al., 2024) across tokenizers, at the aligned groups of the two
tokenizations (GOLD's token merging, TRL's `trl.experimental.gold`).

`config.py` (ULDConfig), `trainer.py` (ULDTrainer). Each example is tokenized by both tokenizers with its aligned
groups (`kd_trainers.kd.two_tokenizers`, `kd_trainers.data.alignment`); the loss is
`kd_trainers.losses.aligned.aligned_distillation_loss`. GOLD's hybrid loss is the `gold` method, a subclass.
"""

from ..runtime.lazy import lazy_getattr

# Loaded on first use; `method.py` registers the method for recipes.
_EXPORTS = {"ULDConfig": ".config", "ULDTrainer": ".trainer"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
