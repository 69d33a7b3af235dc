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

from .fused import ChunkedDistillationOutput, TeacherTerms, engine_terms
from .reference import DistillationLoss
from .settings import LogitTransform, LossSettings
from .sparse import SparseTargets, check_sparse_settings


def chunked_distillation_terms(
    student_hidden: torch.Tensor,
    student_lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None],
    teacher_hidden: torch.Tensor,
    teacher_lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None],
    labels: torch.Tensor,
    settings: LossSettings = LossSettings(),
    *,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    memory_budget_mb: float | None = None,
    student_transform: LogitTransform = LogitTransform(),
    teacher_transform: LogitTransform = LogitTransform(),
    noise_seed: int | None = None,
    teacher_terms: TeacherTerms = TeacherTerms(),
    teacher_labels: torch.Tensor | None = None,
    report_ce: bool = True,
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
        num_items_in_batch: global label-token count of the accumulated batch, as in the reference.
        vocab_size: use only the first `vocab_size` rows of both heads (the shared vocabulary when one head is padded,
            e.g. Qwen2.5-0.5B's 151,936 rows against Qwen2.5-7B's 152,064). Defaults to the smaller head.
        chunk_size: tokens per chunk, when set; otherwise sized from `memory_budget_mb` (`chunk_rows`).
        memory_budget_mb: MiB for the chunk's `[n, V]` fp32 working buffers (`working_buffers` of them); default
            `default_memory_budget_mb(device)`. Only one of `chunk_size` and `memory_budget_mb` may be given.
        student_transform / teacher_transform: logit scale and soft-capping of each model.
        noise_seed: seed of the teacher-logit noise (needed when `settings.noise_std > 0`). The noise at position
            (b, t) of `labels` depends on `(noise_seed, b, t)` alone, as in the reference: not on the chunk size nor on
            which other positions are masked.
        teacher_terms: the teacher-side cross-entropy and KD gate of DSKD (off by default).
        teacher_labels: `[B, T]` or `[N]` targets of those teacher-side terms; defaults to `labels`. Only positions
            where `labels != ignore_index` count.
        report_ce: at `kd_weight=1` the CE is only reported (`ce_loss`); False skips it (`ce_loss` is then 0), as
            DSKD's teacher-space term does, whose CE nobody reads.
    """
    return engine_terms(student_hidden, student_lm_head, labels, settings, (teacher_hidden, teacher_lm_head), None,
                         ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size,
                         chunk_size=chunk_size, memory_budget_mb=memory_budget_mb,
                         student_transform=student_transform, teacher_transform=teacher_transform,
                         noise_seed=noise_seed, teacher_terms=teacher_terms, teacher_labels=teacher_labels,
                         report_ce=report_ce)


def sparse_distillation_terms(
    student_hidden: torch.Tensor,
    student_lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None],
    targets: SparseTargets,
    labels: torch.Tensor,
    settings: LossSettings = LossSettings(),
    *,
    tail: str = "bucket",
    vocab_size: int | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget_mb: float | None = None,
    student_transform: LogitTransform = LogitTransform(),
    noise_seed: int | None = None,
) -> ChunkedDistillationOutput:
    """`chunked_distillation_terms` with the teacher given as a sparse distribution per label token
    (`kd_trainers.losses.sparse`): no teacher model, no teacher head, the same chunks, divergences, temperature, noise
    and CE/KD mixing.

    Args:
        targets: the teacher at the `N` label tokens of `labels` (`labels != ignore_index`, row-major order).
        tail: `bucket` or `spread`, what a `top_k` target's tail is (see `kd_trainers.losses.sparse`).
        vocab_size: the teacher's vocabulary (V of the tail's V − k tokens); defaults to the student head's rows.
        The others as in `chunked_distillation_terms`.
    """
    check_sparse_settings(targets.kind, tail, settings.divergence)
    return engine_terms(student_hidden, student_lm_head, labels, settings, None, (targets, tail),
                         ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size,
                         chunk_size=chunk_size, memory_budget_mb=memory_budget_mb,
                         student_transform=student_transform, teacher_transform=LogitTransform(),
                         noise_seed=noise_seed, teacher_terms=TeacherTerms(), teacher_labels=None, report_ce=True)


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
