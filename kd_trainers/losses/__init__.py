"""Distillation losses: divergences, the readable reference, and the chunked engine the trainers use.

Where things go: a new divergence is one function registered in `divergences.py`; both `distillation_loss` and
`chunked_distillation_loss` pick it up by name.
"""

from .chunked import LogitTransform, LossSettings, chunked_distillation_loss
from .divergences import DIVERGENCES, get_divergence, register_divergence
from .reference import DistillationLoss, distillation_loss

__all__ = [
    "DIVERGENCES",
    "DistillationLoss",
    "LogitTransform",
    "LossSettings",
    "chunked_distillation_loss",
    "distillation_loss",
    "get_divergence",
    "register_divergence",
]
