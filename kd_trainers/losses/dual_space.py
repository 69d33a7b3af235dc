"""DSKD's dual-space loss: vanilla KD in the student's vocabulary space and in the teacher's, through projected hidden
states, both computed by the chunked engine (`../shared/design/DSKD.md` §3–4, §9):

    student space, on the student's label positions M_S:
        CE       = Σ CE(Z_S, y_S)                                  Z_S     = H_S·W_Sᵀ
        t2s_CE   = Σ CE(Z_t2s, y_t2s)                              Z_t2s   = H_t2s·sg(W_S)ᵀ   (trains the projectors)
        t2s_KD   = Σ g·D(softmax(Z_S/τ) , softmax(sg(Z_t2s)/(τ·τ_t)))  (g: the t2s accuracy gate under CMA, else 1)
    teacher space, on the teacher's label positions M_T:
        s2t_KD   = Σ D'(softmax(Z_s2t/τ), softmax(Z_T/τ))           Z_s2t   = H_s2t·sg(W_T)ᵀ, D' = forward KL (DSKD)
    loss = [(1 − w)·CE + w·(t2s_CE + t2s_KD + s2t_KD)] / N,   N = student label tokens (`num_items_in_batch`)

D follows the KD argument convention (student first); `settings.noise_std` perturbs both KD targets (sg(Z_t2s) and
Z_T), never the t2s cross-entropy. The gate and the t2s CE use the clean projected logits.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .noise import mix_seed
from .fused import EngineOptions, TeacherTerms, engine_terms
from .heads import maybe_gather, weight_and_bias
from .settings import LogitTransform, LossSettings
from .sources import DenseMember


class DualSpaceLoss(NamedTuple):
    """The total and its parts, each divided by the normaliser N (sums per token when multiplied back)."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    t2s_ce_loss: torch.Tensor
    t2s_kd_loss: torch.Tensor
    s2t_kd_loss: torch.Tensor
    num_correct: torch.Tensor       # student tokens where the student's argmax is the label
    t2s_num_correct: torch.Tensor   # student tokens where the t2s argmax is its target
    s2t_num_correct: torch.Tensor   # teacher tokens where the s2t argmax is the teacher's label


def _detached(head):
    weight, bias = weight_and_bias(head)
    return weight.detach(), None if bias is None else bias.detach()


def dual_space_loss(
    student_hidden: torch.Tensor,
    student_lm_head,
    t2s_hidden: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head,
    s2t_hidden: torch.Tensor,
    teacher_labels: torch.Tensor,
    settings: LossSettings,
    *,
    s2t_divergence: str = "forward_kl",
    gate_t2s_kd: bool = False,
    t2s_labels: torch.Tensor | None = None,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    teacher_transform: LogitTransform = LogitTransform(),
    **options,
) -> DualSpaceLoss:
    """The DSKD loss from hidden states, never holding a `[B, T, V]` tensor.

    Args:
        student_hidden: `[B, Ts, D_S]` student last hidden states; t2s_hidden: `[B, Ts, D_S]` the teacher's states
            projected into the student's space (with grad into the projectors).
        student_labels: `[B, Ts]` next-token labels of the student sequence (shifted; `ignore_index` off the response).
        teacher_hidden: `[B, Tt, D_T]` teacher last hidden states; s2t_hidden: `[B, Tt, D_T]` the student's states
            projected into the teacher's space (with grad into the student and the projectors).
        teacher_labels: `[B, Tt]` next-token labels of the teacher sequence. Equal to the student's under the same
            tokenizer.
        settings: `kd_weight` is w; divergence, temperature, `teacher_temperature` (τ_t), noise and T² as in KD.
        s2t_divergence: D' of the teacher-space term.
        gate_t2s_kd: count t2s_KD only where the t2s argmax equals its target (DSKD-CMA).
        t2s_labels: `[B, Ts]` targets of the t2s CE and gate; defaults to `student_labels` (DSKDv2: teacher argmax).
        student_vocab_size / teacher_vocab_size: rows of each head that are real tokens (each space's `vocab_size`).
        teacher_transform: the teacher's logit scale and soft-capping (both sides of the teacher-space term).
        options: the engine's options (`EngineOptions`) for the student space; the teacher space runs with the same,
            in its own vocabulary and logit transform and on its own noise stream. `num_items_in_batch` (N) defaults
            to this batch's student label tokens.
    """
    options = EngineOptions(**options)
    if options.vocab_size is not None:
        raise TypeError("dual_space_loss takes student_vocab_size and teacher_vocab_size, one per space, not "
                        "vocab_size.")
    if options.num_items_in_batch is None:
        options = dataclasses.replace(options, num_items_in_batch=(student_labels != options.ignore_index).sum())

    def in_space(vocab_size: int | None, transform: LogitTransform, stream: int) -> EngineOptions:
        seed = None if options.noise_seed is None else mix_seed(options.noise_seed, stream)
        return dataclasses.replace(options, vocab_size=vocab_size, student_transform=transform, noise_seed=seed)

    weight = settings.kd_weight
    # Under ZeRO-3 both heads are gathered here, once: the detached copies below must see the full weights.
    with maybe_gather(*weight_and_bias(student_lm_head), *weight_and_bias(teacher_lm_head)):
        student_space = engine_terms(
            student_hidden, student_lm_head, student_labels, settings,
            DenseMember(t2s_hidden, _detached(student_lm_head), options.student_transform),
            in_space(student_vocab_size, options.student_transform, 1),
            TeacherTerms(ce_weight=weight, gate_kd=gate_t2s_kd), t2s_labels,
        )
        teacher_settings = dataclasses.replace(settings, divergence=s2t_divergence, kd_weight=1.0,
                                               teacher_temperature=1.0)
        teacher_space = engine_terms(
            s2t_hidden, _detached(teacher_lm_head), teacher_labels, teacher_settings,
            DenseMember(teacher_hidden, teacher_lm_head, teacher_transform),
            in_space(teacher_vocab_size, teacher_transform, 2), report_ce=False,
        )
    return DualSpaceLoss(
        loss=student_space.loss + weight * teacher_space.loss,  # .loss carries the gradient; it equals kd_loss here
        ce_loss=student_space.ce_loss,
        t2s_ce_loss=student_space.teacher_ce_loss,
        t2s_kd_loss=student_space.kd_loss,
        s2t_kd_loss=teacher_space.kd_loss,
        num_correct=student_space.num_correct,
        t2s_num_correct=student_space.teacher_num_correct,
        s2t_num_correct=teacher_space.num_correct,
    )
