"""Distillation through a teacher → student vocabulary map (MinED), chunked so that no `[B, T, V]` tensor of either
vocabulary exists:

    CE   = Σ_{student label tokens i} −log softmax(z_S,i)[y_i]                   (the student's own labels, T = 1)
    KD   = Σ_{aligned i} KL(p̃_T,j(i) ‖ q_S,i)  +  Σ_{other i} −log q_S,i[y_i]
    loss = [(1 − w)·CE + w·s·KD] / N            s = T² when `temperature_squared`, N = `num_items_in_batch`

with q_S,i = softmax(z_S,i / T) over the student's vocabulary, and p̃_T,j the teacher's distribution at its
partner position j(i) carried into the student's vocabulary: each student id k that has a representative teacher
token r(k) takes that token's logit, every other student id probability 0,

    p̃_T,j[k] = exp(z_T,j[r(k)] / T) / Σ_{k' mapped} exp(z_T,j[r(k')] / T)      (the teacher's logits noised first)

A student token is aligned when it has a partner and the map carries the partner's token to the student's token; at
every other student token the target is the one-hot label, whose KL is the tempered cross-entropy (the DSKD
authors' MinED does the same). The partners and the map come from `kd_trainers.data.edit_distance`.

Two passes over chunks of rows: the label log-probabilities of every student token (the CE and the one-hot targets'
terms, under activation checkpointing), then each chunk of aligned rows' KL, its gradient taken as it is scored
(`GradientsInForward`). Chunks hold `chunk_size` rows, or as many as fit `memory_budget_mb` in four
`[n, max(V_S, V_T)]` fp32 buffers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .aligned import GradientsInForward, chunk_heads, label_log_probs
from .reference import loss_normalizer
from .settings import LogitTransform, LossSettings, chunk_length

_WORKING_BUFFERS = 4  # a chunk's two sides' logits and their log-probabilities


class MappedSide(NamedTuple):
    """One model's side of the batch: `hidden` `[B, T, D]` (shifted: position t predicts the token after it), its
    output `head` (a module or `(weight, bias)`), logit `transform`, `vocab_size` real rows of the head (None: all)."""

    hidden: torch.Tensor
    head: object
    transform: LogitTransform = LogitTransform()
    vocab_size: int | None = None


class MappedLoss(NamedTuple):
    """The total and its parts, each divided by N; `num_correct` student tokens whose argmax is the label;
    `num_aligned` student tokens distilled through the map (the rest took the one-hot target)."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    kd_loss: torch.Tensor
    num_correct: torch.Tensor
    num_aligned: torch.Tensor


def mapped_distillation_loss(student: MappedSide, teacher: MappedSide, labels: torch.Tensor, partners: torch.Tensor,
                             mapping: tuple[torch.Tensor, torch.Tensor], settings: LossSettings, *,
                             num_items_in_batch: int | torch.Tensor | None = None, ignore_index: int = -100,
                             chunk_size: int | None = None, memory_budget_mb: float | None = None,
                             noise_seed: int | None = None) -> MappedLoss:
    """The loss of the module docstring.

    Args:
        labels: `[B, T_S]` the student's next-token labels (`ignore_index` off the completion).
        partners: `[B, T_S]` for each student label, the teacher position (in `teacher.hidden`'s `T_T`) whose
            distribution it distils, `-1` where it takes its one-hot label instead.
        mapping: `(student ids [K], teacher ids [K])`: each mapped student id and the teacher token whose logit it
            takes (`kd_trainers.data.edit_distance.representatives`).
        settings: `kd_weight` w, `temperature` T, `noise_std` σ on the teacher's logits (with `noise_seed`),
            `temperature_squared`; its divergence is not read (forward KL).
    N defaults to the batch's student label tokens."""
    if settings.noise_std > 0 and noise_seed is None:
        raise ValueError("noise_std > 0 needs a noise_seed (an int): the noise is drawn from it, per position.")
    temperature = settings.temperature
    student_ids, teacher_ids = mapping
    teacher_width = teacher.hidden.size(1)
    with chunk_heads(student, teacher, settings, noise_seed, teacher_width) as (student_head, teacher_head):
        width = max(student_head.weight.size(0), teacher_head.weight.size(0))
        chunk = chunk_length(width, _WORKING_BUFFERS, student.hidden.device, chunk_size, memory_budget_mb)

        positions = (labels.reshape(-1) != ignore_index).nonzero()[:, 0]
        student_rows = student.hidden.reshape(-1, student.hidden.size(-1))[positions]
        targets = labels.reshape(-1)[positions]
        log_p, log_p_tempered, correct = label_log_probs(student_head, student_rows, positions, targets, temperature,
                                                         chunk, grad=True)
        partner = partners.reshape(-1)[positions]
        aligned = partner >= 0
        # the teacher row of each aligned student token: its batch row, at its partner's position
        teacher_positions = (positions[aligned] // labels.size(1)) * teacher_width + partner[aligned]
        teacher_rows = teacher.hidden.reshape(-1, teacher.hidden.size(-1))[teacher_positions].detach()
        aligned_positions = positions[aligned]
        count = int(aligned.sum())

        def score(h, weight, bias, _unused, rows):
            """Σ KL(p̃_T ‖ q_S) over the aligned rows `rows`; `h` `[n, D_S]` their student states."""
            student_log_q = (student_head.logits(h, aligned_positions[rows], weight, bias) / temperature
                             ).log_softmax(-1)[:, student_ids]
            with torch.no_grad():
                teacher_logits = teacher_head.logits(teacher_rows[rows], teacher_positions[rows])
                teacher_log_p = (teacher_logits[:, teacher_ids] / temperature).log_softmax(-1)
            return (teacher_log_p.exp() * (teacher_log_p - student_log_q)).sum()

        kl_sum = GradientsInForward.apply(score, chunk, count, student_rows[aligned], student_head.weight,
                                          student_head.bias, student_rows.new_zeros(count))
    normalizer = loss_normalizer(targets.new_tensor(targets.numel()), num_items_in_batch)
    ce = -log_p.sum() / normalizer
    kd = (kl_sum - log_p_tempered[~aligned].sum()) / normalizer
    scale = temperature**2 if settings.temperature_squared else 1.0
    weight = settings.kd_weight
    return MappedLoss(loss=(1 - weight) * ce + weight * scale * kd, ce_loss=ce.detach(), kd_loss=kd.detach(),
                      num_correct=correct.sum(), num_aligned=torch.tensor(count))
