"""The engine against a teacher given as a source, whatever it is: a model's hidden states and head (`DenseMember`), a
sparse distribution per label token (`SparseMember`: a cache's or a server's top-k), or several of them mixed
(`MixedTeachers`). The trainers hand their teacher's source here and never choose among the engine's entry points."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .chunked import chunked_distillation_terms, sparse_distillation_terms
from .mixture import DenseMember, SparseMember, mixture_distillation_terms


class MixedTeachers(NamedTuple):
    """Several teachers' sources (`DenseMember` or `SparseMember` each) and their weights, `[M]` or `[B, M]`
    (`mixture_distillation_terms`)."""

    members: list
    weights: torch.Tensor


def teacher_distillation_terms(student_hidden: torch.Tensor, student_lm_head, source, labels: torch.Tensor, settings,
                               **engine):
    """`(1 − w)·CE + w·KD` of the student (`[B, T, D_S]` hidden states and its head) against `source`, with the
    engine's keyword arguments (`num_items_in_batch`, `vocab_size`, `chunk_size`, `memory_budget_mb`,
    `student_transform`, `noise_seed`). Returns the engine's output: `loss`, `ce_loss`, `kd_loss`, `num_correct`, and a
    mixture's per-teacher `member_kd_sums` and `member_token_counts`."""
    if isinstance(source, MixedTeachers):
        return mixture_distillation_terms(student_hidden, student_lm_head, source.members, source.weights, labels,
                                          settings, **engine)
    if isinstance(source, SparseMember):
        return sparse_distillation_terms(student_hidden, student_lm_head, source.targets, labels, settings,
                                         tail=source.tail, **engine)
    if isinstance(source, DenseMember):
        return chunked_distillation_terms(student_hidden, student_lm_head, source.hidden, source.lm_head, labels,
                                          settings, teacher_transform=source.transform, **engine)
    raise TypeError(f"A teacher source is a DenseMember, a SparseMember or MixedTeachers, got {type(source).__name__}.")
