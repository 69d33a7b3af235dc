"""Several teachers at once in the chunked engine: per token, the target is the weighted mixture of their
distributions at the loss's temperature, p = Σ_i w_i softmax(z_i / T), handed to the engine as the logits T · log p
(which the engine divides by T again), so that every divergence, temperature, noise and CE/KD mixing applies to it as
to one teacher. A member is a model's hidden states and head (`DenseMember`) or a sparse target (`SparseMember`: a
cache's or a server's top-k, reconstructed with its tail), so a mixture's support is the union of its members'.
Weights per teacher mix them; weights per row (one-hot) route each row to one teacher.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .chunked import teacher_distillation_terms
from .divergences import get_divergence
from .noise import grid_positions
from .settings import LossSettings
from .sources import DenseMember, EngineTeacher, SparseMember


class _Mixture(EngineTeacher):
    """The teachers of a mixture prepared for one engine call, with per-token log-weights `[N, M]`: `fill_` writes a
    chunk's mixed teacher as logits, `T · log Σ_i w_i softmax(z_i / T)`, and adds each teacher's own KD term against
    the student to `kd_sums` `[M]`. It works in 3 `[chunk, V]` buffers of the engine's beyond its own: one teacher's
    logits, a bucket tail's scratch, the student's log-probabilities."""

    extra_buffers = 3

    def __init__(self, rows: torch.Tensor, members: list[EngineTeacher], log_weights: torch.Tensor):
        self.rows, self.members, self.log_weights = rows, members, log_weights
        # Each teacher's own KD term, summed over the tokens it has weight on, and their count.
        self.kd_sums = torch.zeros(len(members), dtype=torch.float32, device=log_weights.device)
        self.kd_counts = torch.zeros(len(members), dtype=torch.float32, device=log_weights.device)

    def fill_(self, out, chunk, student_logits, settings, student_transform, scratch, closed_form):
        member_logits, tail_scratch, student_log_probs = scratch[-self.extra_buffers:]
        temperature = settings.temperature * settings.teacher_temperature
        student_log_probs.copy_(student_logits)
        student_transform.apply_(student_log_probs)
        torch.log_softmax(student_log_probs.div_(settings.temperature), -1, out=student_log_probs)
        scale = settings.temperature**2 if settings.temperature_squared else 1.0
        divergence = get_divergence(settings.divergence)
        for index, member in enumerate(self.members):
            # Every member as its logits (a sparse one reconstructed with its tail, never the closed form's target).
            member.fill_(member_logits, chunk, student_logits, settings, student_transform, [tail_scratch], False)
            member.transform.apply_(member_logits)
            torch.log_softmax(member_logits.div_(temperature), -1, out=member_logits)
            log_weight = self.log_weights[chunk, index: index + 1]
            counted = (log_weight[:, 0] > float("-inf")).float()
            values = divergence(student_log_probs, member_logits, **settings.divergence_params())
            self.kd_sums[index] += (values * counted).sum() * scale
            self.kd_counts[index] += counted.sum()
            member_logits.add_(log_weight)
            if index == 0:
                out.copy_(member_logits)
            else:
                torch.logaddexp(out, member_logits, out=out)
        out.mul_(temperature)
        return None

    def finish(self, out) -> "MixtureDistillationOutput":
        return MixtureDistillationOutput(out.loss, out.ce_loss, out.kd_loss, out.num_correct, self.kd_sums,
                                         self.kd_counts)


class MixtureDistillationOutput(NamedTuple):
    """`ChunkedDistillationOutput`'s terms, and each teacher's own KD term for the logs: `member_kd_sums` `[M]`, the
    (scaled, noise-free) divergence of the student from that teacher alone summed over the tokens the teacher has
    weight on, and `member_token_counts` `[M]`, how many."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    kd_loss: torch.Tensor
    num_correct: torch.Tensor
    member_kd_sums: torch.Tensor
    member_token_counts: torch.Tensor


class MixedTeachers(NamedTuple):
    """Several teachers as one source: `members` (`DenseMember` or `SparseMember` each) and their `weights`, `[M]`
    (one weight per teacher, every token) or `[B, M]` (per row of `labels` `[B, T]`: a row routed to one teacher has
    weight 1 for it and 0 for the others); non-negative, normalised to sum 1 per row."""

    members: list
    weights: torch.Tensor

    def head_params(self) -> tuple:
        return tuple(param for member in self.members for param in member.head_params())

    def head_rows(self) -> list[int]:
        return [rows for member in self.members for rows in member.head_rows()]

    def prepare(self, labels: torch.Tensor, mask: torch.Tensor, vocab: int, settings: LossSettings,
                student_rows: torch.Tensor, keeps_grad: bool = False) -> EngineTeacher:
        members = self.members
        if not members:
            raise ValueError("A mixture needs at least one teacher.")
        weights = torch.as_tensor(self.weights, dtype=torch.float32, device=student_rows.device)
        if weights.size(-1) != len(members) or weights.dim() not in (1, 2) or (weights < 0).any() \
                or not torch.isfinite(weights).all():
            raise ValueError(f"weights must be [M] or [B, M] non-negative finite numbers for M = {len(members)} "
                             f"teachers, got shape {tuple(weights.shape)}.")
        totals = weights.sum(-1, keepdim=True)
        if (totals <= 0).any():
            raise ValueError("Every row needs a teacher of weight > 0 (its weights sum to 0).")
        log_weights = (weights / totals).log()
        rows = grid_positions(labels)[0][mask]
        if weights.dim() == 2:
            if labels.dim() != 2 or weights.size(0) != labels.size(0):
                raise ValueError(f"Per-row weights {tuple(weights.shape)} need labels [B, T] with B = "
                                 f"{weights.size(0)}.")
            log_weights = log_weights[rows]
        else:
            log_weights = log_weights.expand(rows.numel(), -1)
        prepared = [member.prepare(labels, mask, vocab, settings, student_rows) for member in members]
        return _Mixture(student_rows.new_zeros(student_rows.size(0), 0), prepared, log_weights)


def mixture_distillation_terms(student_hidden: torch.Tensor,
                               student_lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None],
                               members: list[DenseMember | SparseMember], weights: torch.Tensor, labels: torch.Tensor,
                               settings: LossSettings = LossSettings(), **options) -> MixtureDistillationOutput:
    """`chunked_distillation_terms` against several teachers at once: per token, the target is their mixture at the
    loss's temperature, `p = Σ_i w_i softmax(z_i / T)` (a sparse teacher's z_i its reconstruction, so a mixture's
    support is the union of its members'), and every divergence, temperature, noise (added to the mixture's logits
    `T · log p`) and CE/KD mixing applies to it as to one teacher. Two identical teachers give exactly one's loss.

    Args:
        members: `DenseMember(hidden [B, T, D_i], head, transform)` (a model's; detached) or
            `SparseMember(targets [N, k], tail)` (a cache's or a server's, one row per label token).
        weights: `[M]` or `[B, M]` (`MixedTeachers`).
        options: the engine's options (`fused.EngineOptions`: `ignore_index`, `num_items_in_batch`, `vocab_size`,
            `chunk_size`, `memory_budget_mb`, `student_transform`, `noise_seed`). The work is 3 `[chunk, V]` buffers
            more than one teacher's, and each teacher's logits are made in turn.
    """
    return teacher_distillation_terms(student_hidden, student_lm_head, MixedTeachers(members, weights), labels,
                                      settings, **options)
