"""GKD: on-policy distillation on top of TRL's `GKDTrainer`, with the package's loss.

`config.py` (GKDConfig), `trainer.py` (GKDTrainer), `data.py` (batches with the prompts to sample from).
"""

import warnings

from ..runtime.lazy import lazy_getattr

# The package builds on TRL's experimental GKD by its own choice: TRL's warning on importing `trl.experimental` is not
# the user's to act on. Set before `config.py` and `trainer.py` import it.
warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")

# Loaded on first use; `method.py` registers the method for recipes.
_EXPORTS = {"GKDConfig": ".config", "GKDTrainer": ".trainer", "PromptCompletionCollator": ".data"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
