"""Seq-KD: the teacher completes the training prompts (cached, resumable), the student trains on its completions.

`config.py` (SeqKDConfig), `generate.py` (the cached generated dataset), `trainer.py` (SeqKDTrainer).
"""

from .config import SeqKDConfig
from .generate import teacher_generated_dataset
from .trainer import SeqKDTrainer

__all__ = ["SeqKDConfig", "SeqKDTrainer", "teacher_generated_dataset"]
