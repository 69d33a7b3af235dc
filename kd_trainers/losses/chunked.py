"""The chunked, fused distillation loss the trainers use.

It goes from each model's last hidden states and `lm_head` to the loss of `reference.distillation_loss`, a chunk of
tokens at a time, and never holds either model's full `[N, V]` logits:

    for each chunk of label tokens:
        z_S = h_S @ W_S^T + b_S          [n, V]  (fp32 from here on)
        z_T = h_T @ W_T^T + b_T          [n, V]  (no grad) + σ·ε
        value, dloss/dz_S                [n, V]  (autograd over this chunk only)
        grad_h_S[chunk] = dz_S @ W_S     [n, D_S]
        grad_W_S       += dz_S^T @ h_S   [V, D_S]

The gradients are built during the forward (as Liger-Kernel's fused-linear losses do) and only scaled by the
incoming gradient in the backward, so no vocabulary-sized autograd graph outlives its chunk. Positions whose label is
`ignore_index` are dropped before projecting, so prompts and padding cost nothing.

Memory: a chunk works in a fixed set of `[n, V]` fp32 buffers, reused by every chunk. How many depends on the settings
(`working_buffers`: three to five for the closed-form divergences, more for one that goes through autograd); the chunk
length n is then the largest whose buffers fit a byte budget (`chunk_rows`). So the loss's working memory is the budget,
whatever the vocabulary, the batch or the divergence: 262k-token vocabularies get short chunks, 32k ones long chunks.

Where things are: the settings and the chunk budget (`settings.py`), one chunk's terms and gradient
(`chunk_terms.py`), reading the heads (`heads.py`), the fused autograd function and its set-up (`fused.py`); this
module holds the public entry points.
"""

from __future__ import annotations

import torch

from .fused import ChunkedDistillationOutput, EngineOptions, TeacherTerms, engine_terms
from .reference import DistillationLoss
from .settings import LogitTransform, LossSettings
from .sources import DenseMember, SparseMember
from .sparse import SparseTargets


def teacher_distillation_terms(student_hidden: torch.Tensor,
                               student_lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None], source,
                               labels: torch.Tensor, settings: LossSettings = LossSettings(), **options):
    """`(1 − w)·CE + w·KD` of the student against a teacher given as a source, whatever it is: a model's hidden states
    and head (`DenseMember`), a sparse distribution per label token (`SparseMember`), or several mixed
    (`MixedTeachers`). What the trainers call.

    Args:
        student_hidden: `[B, T, D_S]` or `[N, D_S]` student last hidden states (after the final norm).
        student_lm_head: the student's output layer (`nn.Linear`, weight `[V_S, D_S]`) or a `(weight, bias)` pair.
        labels: `[B, T]` or `[N]` next-token ids aligned with the hidden states (already shifted).
        options: the engine's options (`EngineOptions`: `ignore_index`, `num_items_in_batch`, `vocab_size`,
            `chunk_size`, `memory_budget_mb`, `student_transform`, `noise_seed`).

    Returns `ChunkedDistillationOutput` (`loss`, `ce_loss`, `kd_loss`, `num_correct`, ...), or for a mixture
    `MixtureDistillationOutput`, which adds each teacher's own `member_kd_sums` and `member_token_counts`.
    """
    return engine_terms(student_hidden, student_lm_head, labels, settings, source, EngineOptions(**options))


def chunked_distillation_terms(
    student_hidden: torch.Tensor,
    student_lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None],
    teacher_hidden: torch.Tensor,
    teacher_lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None],
    labels: torch.Tensor,
    settings: LossSettings = LossSettings(),
    *,
    teacher_transform: LogitTransform = LogitTransform(),
    teacher_terms: TeacherTerms = TeacherTerms(),
    teacher_labels: torch.Tensor | None = None,
    report_ce: bool = True,
    **options,
) -> ChunkedDistillationOutput:
    """The loss of `reference.distillation_loss`, from hidden states and output heads, in token chunks.

    Args:
        student_hidden: `[B, T, D_S]` or `[N, D_S]` student last hidden states (after the final norm).
        student_lm_head: the student's output layer (`nn.Linear`, weight `[V_S, D_S]`) or a `(weight, bias)` pair.
        teacher_hidden: `[B, T, D_T]` or `[N, D_T]`; D_T may differ from D_S. Detached, unless
            `teacher_terms.ce_weight > 0`, whose cross-entropy sends a gradient into it.
        teacher_lm_head: the teacher's output layer, weight `[V_T, D_T]`; never given a gradient.
        labels: `[B, T]` or `[N]` next-token ids aligned with the hidden states (already shifted).
        settings: divergence, temperature, noise, KD weight (see `LossSettings`).
        teacher_transform: logit scale and soft-capping of the teacher (the student's is an engine option).
        teacher_terms: the teacher-side cross-entropy and KD gate of DSKD (off by default).
        teacher_labels: `[B, T]` or `[N]` targets of those teacher-side terms; defaults to `labels`. Only positions
            where `labels != ignore_index` count.
        report_ce: at `kd_weight=1` the CE is only reported (`ce_loss`); False skips it (`ce_loss` is then 0), as
            DSKD's teacher-space term does, whose CE nobody reads.
        options: the engine's options (`EngineOptions`):
            ignore_index (-100); num_items_in_batch: global label-token count of the accumulated batch, as in the
            reference; vocab_size: use only the first `vocab_size` rows of both heads (the shared vocabulary when one
            head is padded, e.g. Qwen2.5-0.5B's 151,936 rows against Qwen2.5-7B's 152,064), default the smaller head;
            chunk_size: tokens per chunk, when set, otherwise sized from memory_budget_mb: MiB for the chunk's
            `[n, V]` fp32 working buffers (`working_buffers` of them), default `default_memory_budget_mb(device)`
            (only one of the two may be given); student_transform: the student's logit scale and soft-capping;
            noise_seed: seed of the teacher-logit noise (needed when `settings.noise_std > 0`). The noise at position
            (b, t) of `labels` depends on `(noise_seed, b, t)` alone, as in the reference: not on the chunk size nor
            on which other positions are masked.
    """
    return engine_terms(student_hidden, student_lm_head, labels, settings,
                        DenseMember(teacher_hidden, teacher_lm_head, teacher_transform), EngineOptions(**options),
                        teacher_terms, teacher_labels, report_ce)


def sparse_distillation_terms(
    student_hidden: torch.Tensor,
    student_lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None],
    targets: SparseTargets,
    labels: torch.Tensor,
    settings: LossSettings = LossSettings(),
    *,
    tail: str = "bucket",
    **options,
) -> ChunkedDistillationOutput:
    """`chunked_distillation_terms` with the teacher given as a sparse distribution per label token
    (`kd_trainers.losses.sparse`): no teacher model, no teacher head, the same chunks, divergences, temperature, noise
    and CE/KD mixing.

    Args:
        targets: the teacher at the `N` label tokens of `labels` (`labels != ignore_index`, row-major order).
        tail: `bucket` or `spread`, what a `top_k` target's tail is (see `kd_trainers.losses.sparse`).
        options: the engine's options, as in `chunked_distillation_terms`; `vocab_size` is the teacher's vocabulary
            (V of the tail's V − k tokens), defaulting to the student head's rows.
    """
    return teacher_distillation_terms(student_hidden, student_lm_head, SparseMember(targets, tail), labels, settings,
                                      **options)


def chunked_distillation_loss(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, labels,
                              settings: LossSettings = LossSettings(), **kwargs
                              ) -> tuple[DistillationLoss, torch.Tensor]:
    """`chunked_distillation_terms` for vanilla KD: returns `(DistillationLoss(loss, ce_loss, kd_loss), num_correct)`,
    where `num_correct` counts label tokens whose student argmax is right (for the token-accuracy metric). Takes the
    same arguments.

    Example: the reference's loss and gradient, from hidden states and heads, two tokens at a time.

        >>> import torch
        >>> from kd_trainers.losses import LossSettings, chunked_distillation_loss, distillation_loss
        >>> generator = torch.Generator().manual_seed(0)
        >>> student_hidden = torch.randn(6, 8, generator=generator, requires_grad=True)   # [N, D_S]
        >>> teacher_hidden = torch.randn(6, 16, generator=generator)                      # [N, D_T]
        >>> student_head, teacher_head = torch.nn.Linear(8, 50, bias=False), torch.nn.Linear(16, 50, bias=False)
        >>> labels = torch.tensor([3, 7, -100, 1, 0, 9])                                  # [N], -100: not a label
        >>> settings = LossSettings(divergence="jsd", temperature=2.0, kd_weight=0.5)
        >>> fused, _ = chunked_distillation_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels,
        ...                                      settings, chunk_size=2)
        >>> fused_grad, = torch.autograd.grad(fused.loss, student_hidden)
        >>> full = distillation_loss(student_head(student_hidden), teacher_head(teacher_hidden), labels,
        ...                          divergence="jsd", temperature=2.0, kd_weight=0.5)
        >>> full_grad, = torch.autograd.grad(full.loss, student_hidden)
        >>> bool(torch.allclose(fused.loss, full.loss)), bool(torch.allclose(fused_grad, full_grad, atol=1e-6))
        (True, True)
    """
    out = chunked_distillation_terms(student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, labels,
                                     settings, **kwargs)
    return DistillationLoss(out.loss, out.ce_loss, out.kd_loss), out.num_correct
