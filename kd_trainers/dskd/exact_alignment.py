"""DSKDv2's exact token alignment (ETA, `../shared/design/DSKD.md` §9): across vocabularies, the positions where the
two tokenizations have one token each over the same characters are paired one to one, and DSKD's projections run
there as under one vocabulary; every other position is left out of the t2s and s2t terms (the student's CE keeps
every label).

    H^{t→s}[b, i] = t2s(H^t[b, j])    H^{s→t}[b, j] = s2t(H^s[b, i])      for each exact pair (i, j)

The pairs are the aligned groups (`kd_trainers.data.alignment`) with exactly one label token on each side. DSKDv2
matches token strings greedily; here the characters the tokens cover are compared, which is the same for tokenizers
that keep the text as it is and also pairs a normalising tokenizer's token with the one it normalised (WordPiece's
lowercase "it" with "It").
"""

from __future__ import annotations

import torch

from ..losses.aligned import group_count, group_keys
from .projectors import DSKDProjectors


def exact_pairs(student_labels: torch.Tensor, student_groups: torch.Tensor, teacher_labels: torch.Tensor,
                teacher_groups: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """`(teacher position of each student position [B, Ts], student position of each teacher position [B, Tt])`,
    `-1` where a position has no exact partner.

    Args:
        student_labels / teacher_labels: `[B, Ts]` / `[B, Tt]` next-token labels (`ignore_index` off the response).
        student_groups / teacher_groups: the aligned group of each label, shifted like the labels (`-1` off it).
    """
    count = group_count(student_groups, teacher_groups)
    sides = [group_keys(labels, groups, count, ignore_index)
             for labels, groups in ((student_labels, student_groups), (teacher_labels, teacher_groups))]
    size = student_labels.size(0) * count
    tokens, position_of_key = [], []
    for (positions, keys), labels in zip(sides, (student_labels, teacher_labels)):
        grouped = keys >= 0
        tokens.append(torch.zeros(size, dtype=torch.long, device=keys.device).index_add_(
            0, keys[grouped], torch.ones_like(keys[grouped])))
        position = torch.full((size,), -1, dtype=torch.long, device=keys.device)
        position[keys[grouped]] = positions[grouped] % labels.size(1)  # the token's t (a one-token group's only one)
        position_of_key.append(position)
    exact = (tokens[0] == 1) & (tokens[1] == 1)
    partners = []
    for (positions, keys), labels, other in zip(sides, (student_labels, teacher_labels), reversed(position_of_key)):
        partner = torch.full((labels.numel(),), -1, dtype=torch.long, device=labels.device)
        paired = (keys >= 0) & exact[keys.clamp_min(0)]
        partner[positions[paired]] = other[keys[paired]]
        partners.append(partner.view_as(labels))
    return partners[0], partners[1]


def exact_alignment_projection(projectors: DSKDProjectors, student_hidden: torch.Tensor,
                               teacher_hidden: torch.Tensor, teacher_of_student: torch.Tensor,
                               student_of_teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(H^{t→s} [B, Ts, D_S], H^{s→t} [B, Tt, D_T])` at the exact pairs (`exact_pairs`); positions without a
    partner get the projection of position 0's state, which no term reads (their t2s and s2t labels are ignored)."""
    def gathered(hidden, index):
        return hidden.gather(1, index.clamp_min(0)[..., None].expand(*index.shape, hidden.size(-1)))

    dtype = projectors.t2s.weight.dtype
    t2s_hidden = projectors.t2s(gathered(teacher_hidden.detach(), teacher_of_student).to(dtype))
    s2t_hidden = projectors.s2t(gathered(student_hidden, student_of_teacher).to(dtype))
    return t2s_hidden.to(student_hidden.dtype), s2t_hidden.to(student_hidden.dtype)
