"""GOLD: ULD with the exact part on the tokens both vocabularies share (TRL's `trl.experimental.gold` hybrid loss).

`config.py` (GOLDConfig), `trainer.py` (GOLDTrainer), subclasses of the `uld` method's; the loss is
`kd_trainers.losses.aligned.aligned_distillation_loss` with `distance="hybrid"`.
"""

from ..runtime.lazy import lazy_getattr

# Loaded on first use; `method.py` registers the method for recipes.
_EXPORTS = {"GOLDConfig": ".config", "GOLDTrainer": ".trainer"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
