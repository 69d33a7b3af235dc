"""GKD: on-policy distillation on top of TRL's `GKDTrainer`, with the package's loss.

`config.py` (GKDConfig), `trainer.py` (GKDTrainer), `data.py` (batches with the prompts to sample from).
"""

from .config import GKDConfig
from .data import PromptCompletionCollator
from .trainer import GKDTrainer

__all__ = ["GKDConfig", "GKDTrainer", "PromptCompletionCollator"]
