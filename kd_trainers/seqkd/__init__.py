"""Seq-KD: the teacher completes the training prompts (cached, resumable), the student trains on its completions.

`config.py` (SeqKDConfig), `generate.py` (the cached generated dataset), `trainer.py` (SeqKDTrainer).
"""

from ..lazy import lazy_getattr

# Loaded on first use; `method.py` registers the method for recipes.
_EXPORTS = {"SeqKDConfig": ".config", "SeqKDTrainer": ".trainer", "teacher_generated_dataset": ".generate"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
