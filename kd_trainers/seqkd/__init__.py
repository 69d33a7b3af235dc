"""Seq-KD: the teacher completes the training prompts (cached, resumable), the student trains on its completions.

`config.py` (SeqKDConfig), `trainer.py` (SeqKDTrainer); the cached generated dataset is `kd_trainers.data.teacher_completions`.
"""

from ..runtime.lazy import lazy_getattr

# Loaded on first use; `method.py` registers the method for recipes.
_EXPORTS = {"SeqKDConfig": ".config", "SeqKDTrainer": ".trainer", "teacher_generated_dataset": "..teacher_completions"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
