"""Projected hidden states of DSKD: each model's last hidden states carried into the other model's space.

Same vocabulary (positions align one to one): H^{t→s} = t2s(H^t), H^{s→t} = s2t(H^s).

Different vocabularies: cross-model attention (CMA, `../shared/design/DSKD.md` §3). Queries come from the student's
(current token, gold next token) embeddings, keys from the teacher's, so that a student position attends to the
teacher positions that predict the same text; only response positions on both sides interact, with no causal mask:

    Q   = query([E_S(x_S) ; E_S(y_S)])                       [B, Ts, 2·D_T]  (fp32)
    K   = N([E_T(x_T) ; E_T(y_T)])                           [B, Tt, 2·D_T]  (fp32, no parameters)
    V_T = t2s(N(H^t) + N(E_T(y_T)))                          [B, Tt, D_S]
    V_S = s2t(H^s)                                           [B, Ts, D_T]    (with grad into the student)
    S   = Q·Kᵀ / sqrt(2·D_T) − 1e5·(1 − M_S ⊗ M_T)           [B, Ts, Tt]     (fp32: −1e5 overflows fp16)
    H^{t→s} = softmax_Tt(S)·V_T    H^{s→t} = softmax_Ts(Sᵀ)·V_S

Embeddings are looked up through `get_input_embeddings()` and detached; ids outside the response (M = 0) are replaced
by 0, as in the official code. N(X) = X / std(X) with one scalar std per tensor. One deliberate difference: the
official code pads every batch to 512 tokens and its std includes the padding; here batches are padded dynamically,
so the std is taken over the real (attention-mask) positions only, which makes the loss independent of how much
padding a batch happens to carry (and equal under any batch split).
"""

from __future__ import annotations

import math

import torch

from .projectors import DSKDProjectors

MASK_SCORE = -1e5  # the official additive mask; finite, so a fully masked row gives no NaN (its output is unused)


def _normalised(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`values / std(values over valid positions)`, one scalar; `values` `[B, T, D]`, `valid` `[B, T]` bool."""
    return values / values[valid].float().std().to(values.dtype)


def _embed(embeddings: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return embeddings(torch.where(mask, ids, torch.zeros_like(ids))).detach()


def same_vocabulary_projection(projectors: DSKDProjectors, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(H^{t→s} [B, T, D_S], H^{s→t} [B, T, D_T])` when both models tokenize alike (DSKD without attention)."""
    return projectors.t2s(teacher_hidden.detach().to(projectors.t2s.weight.dtype)), projectors.s2t(
        student_hidden.to(projectors.s2t.weight.dtype))


def cross_model_attention(
    projectors: DSKDProjectors,
    student_hidden: torch.Tensor,
    student_embeddings: torch.nn.Module,
    student_input_ids: torch.Tensor,
    student_labels: torch.Tensor,
    student_valid: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_embeddings: torch.nn.Module,
    teacher_input_ids: torch.Tensor,
    teacher_labels: torch.Tensor,
    teacher_valid: torch.Tensor,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(H^{t→s} [B, Ts, D_S], H^{s→t} [B, Tt, D_T])` by cross-model attention, in the student's hidden dtype.

    Args:
        student_hidden: `[B, Ts, D_S]` last hidden states at the positions that predict `student_labels`.
        student_input_ids / student_labels: `[B, Ts]` the token at each position and its next-token label
            (`ignore_index` off the response).
        student_valid: `[B, Ts]` bool, real (non-padding) positions.
        teacher_*: the same for the teacher, `[B, Tt, D_T]` and `[B, Tt]`.
    """
    student_mask, teacher_mask = student_labels != ignore_index, teacher_labels != ignore_index
    query_input = torch.cat([_embed(student_embeddings, student_input_ids, student_mask),
                             _embed(student_embeddings, student_labels, student_mask)], dim=-1)
    teacher_target = _embed(teacher_embeddings, teacher_labels, teacher_mask)
    key_input = torch.cat([_embed(teacher_embeddings, teacher_input_ids, teacher_mask), teacher_target], dim=-1)
    dtype = projectors.query.weight.dtype

    query = projectors.query(query_input.to(dtype)).float()
    key = _normalised(key_input, teacher_valid).float()
    teacher_hidden = teacher_hidden.detach()
    teacher_value = projectors.t2s((_normalised(teacher_hidden, teacher_valid)
                                    + _normalised(teacher_target, teacher_valid)).to(dtype)).float()
    student_value = projectors.s2t(student_hidden.to(dtype)).float()

    scores = query @ key.transpose(-1, -2) / math.sqrt(key.size(-1))
    pair_mask = student_mask[:, :, None] & teacher_mask[:, None, :]
    scores = scores + (~pair_mask).float() * MASK_SCORE
    t2s_hidden = torch.softmax(scores, dim=-1) @ teacher_value                  # [B, Ts, D_S]
    s2t_hidden = torch.softmax(scores.transpose(-1, -2), dim=-1) @ student_value  # [B, Tt, D_T]
    return t2s_hidden.to(student_hidden.dtype), s2t_hidden.to(student_hidden.dtype)
