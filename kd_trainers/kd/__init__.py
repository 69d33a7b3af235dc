"""Vanilla logit knowledge distillation: `KDConfig` and `KDTrainer`."""

from .config import KDConfig
from .trainer import KDTrainer

__all__ = ["KDConfig", "KDTrainer"]
