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

from .fused import TeacherTerms, engine_terms
from .heads import maybe_gather, project_into, weight_and_bias
from .settings import LogitTransform, LossSettings
from .divergences import get_divergence
from .noise import grid_positions
from .sparse import SparseTargets, check_sparse_settings, fill_teacher_logits_


class DenseMember(NamedTuple):
    """A teacher of a mixture given as hidden states `[B, T, D]` or `[N, D]` and its output head."""

    hidden: torch.Tensor
    lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None]
    transform: LogitTransform = LogitTransform()


class SparseMember(NamedTuple):
    """A teacher of a mixture given as sparse targets `[N, k]` (a cache, a server), with its tail treatment."""

    targets: SparseTargets
    tail: str = "bucket"


class Mixture:
    """The teachers of a mixture, their rows and per-token log-weights `[N, M]`, for the engine's fused function:
    `fill_` writes a chunk's mixed teacher as logits, `T · log Σ_i w_i softmax(z_i / T)`, and adds each teacher's own
    KD term against the student to `kd_sums` `[M]`. It works in `buffers` `[chunk, V]` buffers of the engine's: one
    teacher's logits, a bucket tail's scratch, the student's log-probabilities."""

    buffers = 3

    def __init__(self, members: list, log_weights: torch.Tensor):
        self.members, self.log_weights = members, log_weights
        # Each teacher's own KD term, summed over the tokens it has weight on, and their count.
        self.kd_sums = torch.zeros(len(members), dtype=torch.float32, device=log_weights.device)
        self.kd_counts = torch.zeros(len(members), dtype=torch.float32, device=log_weights.device)

    def head_rows(self) -> list[int]:
        """The rows of the dense members' heads, which bound the distilled vocabulary (read while gathered)."""
        return [member.lm_head[0].size(0) for member in self.members if isinstance(member, DenseMember)]

    def fill_(self, out: torch.Tensor, chunk: slice, student_logits: torch.Tensor, settings: LossSettings,
              student_transform: LogitTransform, scratch: list[torch.Tensor]) -> torch.Tensor:
        member_logits, tail_scratch, student_log_probs = scratch
        temperature = settings.temperature * settings.teacher_temperature
        student_log_probs.copy_(student_logits)
        student_transform.apply_(student_log_probs)
        torch.log_softmax(student_log_probs.div_(settings.temperature), -1, out=student_log_probs)
        scale = settings.temperature**2 if settings.temperature_squared else 1.0
        divergence = get_divergence(settings.divergence)
        for index, member in enumerate(self.members):
            if isinstance(member, SparseMember):
                fill_teacher_logits_(member_logits, member.targets.rows(chunk), settings.temperature, member.tail,
                                     student_logits, tail_scratch, student_transform)
            else:  # the head's first V rows: the distilled vocabulary, the buffers' width
                rows, (weight, bias), transform = member
                vocab = member_logits.size(1)
                project_into(member_logits, rows[chunk], weight[:vocab], None if bias is None else bias[:vocab])
                transform.apply_(member_logits)
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
        return out.mul_(temperature)


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


def mixture_distillation_terms(
    student_hidden: torch.Tensor,
    student_lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None],
    members: list[DenseMember | SparseMember],
    weights: torch.Tensor,
    labels: torch.Tensor,
    settings: LossSettings = LossSettings(),
    *,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    memory_budget_mb: float | None = None,
    student_transform: LogitTransform = LogitTransform(),
    noise_seed: int | None = None,
) -> MixtureDistillationOutput:
    """`chunked_distillation_terms` against several teachers at once: per token, the target is their mixture at the
    loss's temperature, `p = Σ_i w_i softmax(z_i / T)` (a sparse teacher's z_i its reconstruction, so a mixture's
    support is the union of its members'), and every divergence, temperature, noise (added to the mixture's logits
    `T · log p`) and CE/KD mixing applies to it as to one teacher. Two identical teachers give exactly one's loss.

    Args:
        members: `DenseMember(hidden [B, T, D_i], head, transform)` (a model's; detached) or
            `SparseMember(targets [N, k], tail)` (a cache's or a server's, one row per label token).
        weights: `[M]` (one weight per teacher, every token) or `[B, M]` (per row of `labels` `[B, T]`: a row routed
            to one teacher has weight 1 for it and 0 for the others); non-negative, normalised to sum 1 per row.
        The others as in `chunked_distillation_terms`. The work is 3 `[chunk, V]` buffers more than one teacher's,
        and each teacher's logits are made in turn.
    """
    if not members:
        raise ValueError("A mixture needs at least one teacher.")
    weights = torch.as_tensor(weights, dtype=torch.float32, device=student_hidden.device)
    if weights.size(-1) != len(members) or weights.dim() not in (1, 2) or (weights < 0).any() \
            or not torch.isfinite(weights).all():
        raise ValueError(f"weights must be [M] or [B, M] non-negative finite numbers for M = {len(members)} teachers, "
                         f"got shape {tuple(weights.shape)}.")
    totals = weights.sum(-1, keepdim=True)
    if (totals <= 0).any():
        raise ValueError("Every row needs a teacher of weight > 0 (its weights sum to 0).")
    log_weights = (weights / totals).log()
    mask = labels.reshape(-1) != ignore_index
    rows = grid_positions(labels)[0][mask]
    if weights.dim() == 2:
        if labels.dim() != 2 or weights.size(0) != labels.size(0):
            raise ValueError(f"Per-row weights {tuple(weights.shape)} need labels [B, T] with B = {weights.size(0)}.")
        log_weights = log_weights[rows]
    else:
        log_weights = log_weights.expand(rows.numel(), -1)
    prepared, heads = [], []
    for member in members:
        if isinstance(member, SparseMember):
            check_sparse_settings(member.targets.kind, member.tail, settings.divergence)
            if member.targets.ids.size(0) != rows.numel():
                raise ValueError(f"A sparse teacher has {member.targets.ids.size(0)} rows for {rows.numel()} label "
                                 "tokens: it must hold one row per label token, in order.")
            prepared.append(SparseMember(member.targets.to(student_hidden.device), member.tail))
        else:
            # Its label rows, and its head as (weight, bias): the parameters themselves, which the gather below fills
            # under ZeRO-3 (a detached copy taken now would stay empty; the engine's forward builds no graph).
            weight, bias = weight_and_bias(member.lm_head)
            heads += [weight, bias]
            prepared.append(DenseMember(member.hidden.reshape(-1, member.hidden.size(-1))[mask].detach(),
                                        (weight, bias), member.transform))
    mixture = Mixture(prepared, log_weights)
    # Gathered around the engine (ZeRO-3), which reads the heads' rows (`Mixture.head_rows`) for the vocabulary.
    with maybe_gather(*heads):
        out = engine_terms(student_hidden, student_lm_head, labels, settings, None, None, ignore_index=ignore_index,
                            num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, chunk_size=chunk_size,
                            memory_budget_mb=memory_budget_mb, student_transform=student_transform,
                            teacher_transform=LogitTransform(), noise_seed=noise_seed, teacher_terms=TeacherTerms(),
                            teacher_labels=None, report_ce=True, mixture=mixture)
    return MixtureDistillationOutput(out.loss, out.ce_loss, out.kd_loss, out.num_correct, mixture.kd_sums,
                                     mixture.kd_counts)
