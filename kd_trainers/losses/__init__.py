"""Distillation losses: divergences, the readable reference, and the chunked engine the trainers use.

Where things go: a new divergence is one function registered in `divergences.py`, and its closed-form gradient a
second one under `@closed_form`; both `distillation_loss` and `chunked_distillation_loss` pick it up by name. DSKD's
dual-space loss (`dual_space.py`) is two calls of the same chunked engine, one per vocabulary space. On CUDA the
engine runs each chunk's terms compiled (`compiled.py`), as the gradient of the registered divergence itself, so a new
divergence needs nothing more there either. A teacher given
as a sparse distribution per token (a teacher cache) goes through the same engine (`sparse.py`,
`sparse_distillation_terms`), and several teachers mixed per token too (`mixture.py`, `mixture_distillation_terms`).
The engine takes any of them as one teacher source (`sources.py`: `DenseMember`, `SparseMember`; `MixedTeachers`),
each preparing its own side of the fused function, and `teacher_distillation_terms` is the entry point the trainers
call with their teacher's source.
"""

from .chunked import (chunked_distillation_loss, chunked_distillation_terms, sparse_distillation_terms,
                      teacher_distillation_terms)
from .divergences import DIVERGENCES, closed_form, get_divergence, register_divergence
from .dual_space import DualSpaceLoss, dual_space_loss
from .fused import ChunkedDistillationOutput, EngineOptions, TeacherTerms
from .mixture import MixedTeachers, MixtureDistillationOutput, mixture_distillation_terms
from .reference import DistillationLoss, distillation_loss
from .settings import LogitTransform, LossSettings
from .sources import DenseMember, SparseMember
from .sparse import SparseTargets


__all__ = [
    "DIVERGENCES",
    "ChunkedDistillationOutput",
    "DenseMember",
    "DistillationLoss",
    "DualSpaceLoss",
    "EngineOptions",
    "LogitTransform",
    "LossSettings",
    "MixedTeachers",
    "MixtureDistillationOutput",
    "SparseMember",
    "SparseTargets",
    "TeacherTerms",
    "chunked_distillation_loss",
    "closed_form",
    "chunked_distillation_terms",
    "dual_space_loss",
    "distillation_loss",
    "get_divergence",
    "mixture_distillation_terms",
    "register_divergence",
    "sparse_distillation_terms",
    "teacher_distillation_terms",
]
