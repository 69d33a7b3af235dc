"""GKD: on-policy distillation on top of TRL's `GKDTrainer`, with the package's loss.

`config.py` (GKDConfig), `trainer.py` (GKDTrainer), `data.py` (batches with the prompts to sample from).
"""

from ..lazy import lazy_getattr

# Loaded on first use; `method.py` registers the method for recipes.
_EXPORTS = {"GKDConfig": ".config", "GKDTrainer": ".trainer", "PromptCompletionCollator": ".data"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
