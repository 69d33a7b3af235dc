"""Distillation at the aligned positions of two tokenizations (ULD, GOLD), chunked so that no `[B, T, V]` tensor of
either vocabulary exists:

    CE   = Σ_{student label tokens} −log softmax(z_S)[y]                       (the student's own labels, T = 1)
    KD   = Σ_{aligned groups g present on both sides} d(q_S(g), q_T(g))
    loss = [(1 − w)·CE + w·s·KD] / N            s = T² when `temperature_squared`, N = `num_items_in_batch`

A group is the tokens of each side that cover the same completion text (`kd_trainers.data.alignment`); `q(g)` is
GOLD's merged distribution of a side over it, at temperature T (`merge`):

    "observed":  q(g) = p_T(· | first token's prefix) · Π_{later tokens k of g} p_T(y_k | its prefix)
    "bayesian":  q(g) = p_T(· | last token's prefix) · Π_{earlier tokens k of g} p_T(y_k | its prefix)

(a one-token group is that token's distribution). The teacher's logits are noised (σ·ε keyed to the teacher
position) before its softmax. `d` is ULD's sorted L1 (`"uld"`) or GOLD's hybrid (`"hybrid"`), per row as in
`kd_trainers.losses.uld`.

The teacher is a model in memory (`Side`: its hidden states and head) or sparse targets at its own label tokens
(`SparseSide`: a teacher cache or a server, read at the teacher's tokenization): its top-k tokens, their tempered
probabilities (exact with the tail's mass at T, which a cache stores; a server's guessed, `kd_trainers.losses.sparse.
tempered_top_k`) and its label token's probability; the tail's remaining mass is spread evenly over its other tokens
(`sparse_teacher_logits`). That is exact when k covers the vocabulary and an approximation otherwise, taken only when
asked for by name (`teacher_cache_tail` / `teacher_server_tail` `"spread"`), its error measured in the README.

The work is two passes over chunks of rows: each side's label log-probabilities (the CE and the merge's scalar
factors; the student's under activation checkpointing, its `[n, V]` buffers rebuilt in the backward), then each
chunk of groups' two distributions, scored with their gradients taken at once (`GradientsInForward`: no sort is
kept or redone for the backward) and dropped. Memory stays flat in both vocabularies, and ULD's sort is one
chunk's. Chunks hold `chunk_size` rows, or as many as fit
`memory_budget_mb` in four `[n, max(V_S, V_T)]` fp32 buffers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .heads import maybe_gather, vocabulary_rows, weight_and_bias
from .noise import position_noise_
from .reference import loss_normalizer
from .settings import LogitTransform, LossSettings, chunk_length
from .sparse import SparseTargets, fill_teacher_logits_, tempered_top_k
from .uld import hybrid_of_probabilities, sorted_distance

MERGES = ("observed", "bayesian")
DISTANCES = ("uld", "hybrid")
_WORKING_BUFFERS = 4  # a chunk's logits, probabilities and sorted copies of the wider side


@dataclass(frozen=True)
class AlignedSettings:
    """What the aligned distance computes: `distance` (`"uld"` or `"hybrid"`), the merge of a multi-token group,
    and GOLD's hybrid settings: β of the exact part's generalized JSD and its weight (default `K / V_T`)."""

    distance: str = "uld"
    merge: str = "observed"
    matched_beta: float = 1.0
    matched_weight: float | None = None

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {list(DISTANCES)}, got {self.distance!r}.")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {list(MERGES)}, got {self.merge!r}.")
        if not 0 <= self.matched_beta <= 1:
            raise ValueError(f"matched_beta must be in [0, 1], got {self.matched_beta!r}.")
        if self.matched_weight is not None and not 0 <= self.matched_weight <= 1:
            raise ValueError(f"matched_weight must be in [0, 1] or None, got {self.matched_weight!r}.")


class Side(NamedTuple):
    """One model's side of the batch.

    hidden: `[B, T, D]` last hidden states (shifted: position t predicts `labels[:, t]`); head: its output head (a
    module or `(weight, bias)`); labels: `[B, T]` next-token labels, `ignore_index` off the completion; groups:
    `[B, T]` aligned group of each label (shifted like the labels), `-1` off the completion; transform: its logit
    scale and soft-capping; vocab_size: rows of its head that are real tokens (None: all).
    """

    hidden: torch.Tensor
    head: object
    labels: torch.Tensor
    groups: torch.Tensor
    transform: LogitTransform = LogitTransform()
    vocab_size: int | None = None


class SparseSide(NamedTuple):
    """A teacher side given as sparse targets at its own label tokens (a teacher cache or server at the teacher's
    tokenization).

    targets: `top_k` `SparseTargets` `[N_T, k]` at the label tokens of `labels` in row-major order, with each label's
    log-probability (`label_log_probs` `[N_T]`) and, for exact tempered targets at T ≠ 1, the tail's mass at T
    (`tempered_tail_log_mass`); labels, groups: `[B, T]` as in `Side`; vocab_size: the teacher's vocabulary `V_T`.
    """

    targets: SparseTargets
    labels: torch.Tensor
    groups: torch.Tensor
    vocab_size: int


def sparse_teacher_logits(targets: SparseTargets, labels: torch.Tensor, vocab: int, temperature: float
                          ) -> torch.Tensor:
    """`[n, V_T]` fp32 "logits" whose softmax at `temperature` is the teacher a `SparseSide` describes, at n label
    tokens (`targets` `[n, k]`, `labels` `[n]`): `T · log p̂_T`, with p̂_T the k tempered probabilities, the label's
    own where it is not among them (from `label_log_probs`), and the tail's tempered mass spread evenly over the
    other tokens. Renormalised by the softmax (the label's own probability stands in for one even share)."""
    out = torch.empty(labels.numel(), vocab, dtype=torch.float32, device=targets.ids.device)
    fill_teacher_logits_(out, targets, temperature, "spread")
    outside = ~(targets.ids == labels[:, None]).any(-1)
    if bool(outside.any()):
        _, _, log_normaliser = tempered_top_k(targets, vocab, temperature)
        own = targets.label_log_probs - temperature * log_normaliser  # T · log p_T(y), as the k entries are written
        rows = outside.nonzero()[:, 0]
        out[rows, labels[rows]] = own[rows]
    return out


class _TeacherRows:
    """The teacher's `[n, V_T]` fp32 logits (noised) at a chunk of its label tokens (`index` into them), from a model
    (its head over the hidden states) or from sparse targets (`sparse_teacher_logits`, noised alike)."""

    def __init__(self, head: "ChunkHead | None", hidden: torch.Tensor | None, positions: torch.Tensor,
                 labels: torch.Tensor, sparse: SparseSide | None = None, temperature: float = 1.0):
        self.head, self.hidden, self.positions, self.labels = head, hidden, positions, labels
        self.sparse, self.temperature = sparse, temperature

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        if self.sparse is None:
            return self.head.logits(self.hidden[index], self.positions[index])
        logits = sparse_teacher_logits(self.sparse.targets.rows(index), self.labels[index], self.sparse.vocab_size,
                                       self.temperature)
        return self.head.noised(logits, self.positions[index])

    def label_log_probs(self, chunk: int) -> torch.Tensor:
        """`[n]` log p_T(y) at each label token, at the loss's temperature (noised as the distributions are)."""
        outputs = []
        with torch.no_grad():
            for start in range(0, self.labels.numel(), chunk):
                index = torch.arange(start, min(start + chunk, self.labels.numel()), device=self.labels.device)
                outputs.append(tempered_label_log_probs(self.logits(index), self.labels[index], self.temperature))
        return torch.cat(outputs) if outputs else self.labels.new_zeros(0, dtype=torch.float32)


class AlignedLoss(NamedTuple):
    """The total and its parts, each divided by N; `num_correct` student tokens whose argmax is the label;
    `num_pairs` aligned groups scored."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    kd_loss: torch.Tensor
    num_correct: torch.Tensor
    num_pairs: torch.Tensor


class ChunkHead(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: LogitTransform
    noise_std: float = 0.0
    noise_seed: int | None = None
    width: int = 1  # the labels' `T`, to key a flat position's noise to its `(b, t)`

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        """`[n, V]` fp32 logits of `hidden` `[n, D]`, the rows at flat `positions` `[n]`, noised when σ > 0."""
        weight, bias = (self.weight, self.bias) if weight is None else (weight, bias)
        logits = hidden @ weight.T
        if bias is not None:
            logits = logits + bias
        logits = self.transform(logits.to(torch.promote_types(logits.dtype, torch.float32)))  # bf16 up; fp64 kept
        return self.noised(logits, positions)

    def noised(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`logits` `[n, V]` plus σ·ε, each row's ε keyed to its flat position (none when σ = 0)."""
        if self.noise_std > 0:
            # drawn in fp32 whatever the logits' dtype, as the reference and the other engines draw it
            noise = position_noise_(torch.empty(logits.shape, dtype=torch.float32, device=logits.device),
                                    self.noise_seed, positions // self.width, positions % self.width)
            logits = logits + self.noise_std * noise
        return logits


@contextlib.contextmanager
def chunk_heads(student, teacher, settings: LossSettings, noise_seed: int | None, teacher_width: int):
    """`(student's ChunkHead, teacher's ChunkHead)`: each side's head (a module or `(weight, bias)`) cut to its
    `vocab_size` real rows, gathered for the block under ZeRO-3; the teacher's detached and noised by `settings`
    (keyed to positions of width `teacher_width`). `student`/`teacher`: anything with `head`, `transform` and
    `vocab_size` (`Side`, `kd_trainers.losses.mapped.MappedSide`), or a teacher's `SparseSide` (its ChunkHead only
    noises)."""
    student_weight, student_bias = weight_and_bias(student.head)
    if isinstance(teacher, SparseSide):  # no head: the teacher's ChunkHead only noises the reconstructed logits
        with maybe_gather(student_weight, student_bias):
            vocab = student.vocab_size or student_weight.size(0)
            yield (ChunkHead(vocabulary_rows(student_weight, vocab), vocabulary_rows(student_bias, vocab),
                             student.transform),
                   ChunkHead(None, None, LogitTransform(), settings.noise_std, noise_seed, teacher_width))
        return
    teacher_weight, teacher_bias = weight_and_bias(teacher.head)
    with maybe_gather(student_weight, student_bias, teacher_weight, teacher_bias):
        vocab = student.vocab_size or student_weight.size(0)
        student_head = ChunkHead(vocabulary_rows(student_weight, vocab), vocabulary_rows(student_bias, vocab),
                                 student.transform)
        vocab = teacher.vocab_size or teacher_weight.size(0)
        teacher_bias = vocabulary_rows(teacher_bias, vocab)
        teacher_head = ChunkHead(vocabulary_rows(teacher_weight, vocab).detach(),
                                 None if teacher_bias is None else teacher_bias.detach(),
                                 teacher.transform, settings.noise_std, noise_seed, teacher_width)
        yield student_head, teacher_head


def tempered_label_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """`[n]` log softmax(logits / T)[y] of `logits` `[n, V]` at labels `[n]`."""
    logits = logits / temperature if temperature != 1 else logits
    return logits.log_softmax(-1).gather(1, labels[:, None])[:, 0]


def label_log_probs(head: ChunkHead, hidden: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
                     temperature: float, chunk: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(log p(y) at T = 1 [n], log p_T(y) at temperature T [n], argmax == y [n])` at the rows of `hidden` `[n, D]`."""
    outputs = []
    for start in range(0, hidden.size(0), chunk):
        rows = slice(start, start + chunk)

        def run(h, weight, bias, rows=rows):
            logits = head.logits(h, positions[rows], weight, bias)
            at_one = tempered_label_log_probs(logits, labels[rows], 1.0)
            tempered = tempered_label_log_probs(logits, labels[rows], temperature) if temperature != 1 else at_one
            correct = (logits.argmax(-1) == labels[rows]).to(logits.dtype)
            return torch.stack([at_one, tempered, correct])

        if grad:
            outputs.append(checkpoint(run, hidden[rows], head.weight, head.bias, use_reentrant=False))
        else:
            with torch.no_grad():
                outputs.append(run(hidden[rows], head.weight, head.bias))
    stacked = torch.cat(outputs, dim=1) if outputs else hidden.new_zeros(3, 0, dtype=torch.float32)
    return stacked[0], stacked[1], stacked[2].detach()


# Which inputs of `GradientsInForward` (rows, weight, bias, log-scales) are cut into chunks with the rows; the head's
# weight and bias are read whole by every chunk.
_PER_ROW = (True, False, False, True)


class GradientsInForward(torch.autograd.Function):
    """`Σ_chunks score(inputs[chunk])`, each chunk's gradients taken in the forward pass (autograd on leaves of that
    chunk alone) and summed, so the backward only scales them: nothing of a chunk's `[n, V]` work (its two sorts
    included) is kept or recomputed. Inputs: the rows `[P, D]`, the head's weight `[V, D]` and bias `[V]` (or None),
    the log-scales `[P]`; rows and log-scales are cut into chunks of `chunk`, the head is read whole by each."""

    @staticmethod
    def forward(ctx, score, chunk: int, count: int, rows, weight, bias, log_scales):
        total = rows.new_zeros((), dtype=torch.promote_types(rows.dtype, torch.float32))
        wants = [tensor is not None and tensor.requires_grad for tensor in (rows, weight, bias, log_scales)]
        grads = [None if not want else torch.zeros_like(tensor, dtype=torch.promote_types(tensor.dtype,
                                                                                          torch.float32))
                 for want, tensor in zip(wants, (rows, weight, bias, log_scales))]
        for start in range(0, count, chunk):
            part = slice(start, start + chunk)
            leaves = [rows[part].detach(), weight.detach(), None if bias is None else bias.detach(),
                      log_scales[part].detach()]
            for index, want in enumerate(wants):
                if want:
                    leaves[index].requires_grad_(True)
            with torch.enable_grad():
                value = score(*leaves, part)
                taken = [leaf for leaf, want in zip(leaves, wants) if want]
                found = iter(torch.autograd.grad(value, taken, allow_unused=True) if taken else ())
            total += value.detach()
            for index, want in enumerate(wants):
                if want:
                    grad = next(found)
                    if grad is not None:
                        (grads[index][part] if _PER_ROW[index] else grads[index]).add_(grad)
        ctx.wants = wants
        ctx.save_for_backward(*[grad if grad is not None else torch.empty(0) for grad in grads])
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        out = [None if not want else (grad * grad_output).to(grad.dtype) for want, grad in zip(ctx.wants, saved)]
        return (None, None, None, *out)


class _SideGroups(NamedTuple):
    positions: torch.Tensor   # [n] flat positions of the side's label tokens
    keys: torch.Tensor        # [n] batch-global group key of each (-1: in no group)
    base: torch.Tensor        # [K] index into `positions` of each key's base token (-1: key absent)


def group_count(*groups: torch.Tensor) -> int:
    """How many group numbers a batch's `[B, T]` group tensors use (`-1` is none): the stride of `group_keys`."""
    return int(max(max(int(tensor.max()) for tensor in groups), 0)) + 1


def group_keys(labels: torch.Tensor, groups: torch.Tensor, count: int, ignore_index: int = -100
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(flat positions of the label tokens [n], each one's batch-wide group key b·count + g [n])`, the key `-1` for
    a label in no group. `labels` and `groups` `[B, T]`, `count` from `group_count` over both sides (a key then means
    the same group of the same row on both)."""
    positions = (labels.reshape(-1) != ignore_index).nonzero()[:, 0]
    local = groups.reshape(-1)[positions]
    return positions, torch.where(local >= 0, positions // labels.size(1) * count + local, -1)


def _side_groups(labels: torch.Tensor, groups: torch.Tensor, group_count: int, merge: str, ignore_index: int
                 ) -> _SideGroups:
    positions, keys = group_keys(labels, groups, group_count, ignore_index)
    size = labels.size(0) * group_count
    in_group = keys >= 0
    order = torch.arange(positions.numel(), device=labels.device)
    reduce, empty = ("amin", positions.numel()) if merge == "observed" else ("amax", -1)
    base = torch.full((size,), empty, dtype=torch.long, device=labels.device)
    base.scatter_reduce_(0, keys[in_group], order[in_group], reduce=reduce, include_self=True)
    base[(base == positions.numel()) | (base < 0)] = -1
    return _SideGroups(positions, keys, base)


def _log_scales(side: _SideGroups, pair_of_key: torch.Tensor, log_probs: torch.Tensor, pairs: int) -> torch.Tensor:
    """`[P]` Σ of log p_T(y) over each pair's non-base tokens on this side (the merge's scalar factors, in logs)."""
    pair = torch.where(side.keys >= 0, pair_of_key[side.keys.clamp_min(0)], -1)
    order = torch.arange(side.keys.numel(), device=side.keys.device)
    others = (pair >= 0) & (order != side.base[side.keys.clamp_min(0)])
    return log_probs.new_zeros(pairs).index_add(0, pair[others], log_probs[others])


def _check_sparse_side(side: SparseSide, ignore_index: int) -> None:
    targets = side.targets
    if targets.kind != "top_k":
        raise ValueError(f"A sparse teacher across tokenizers must be top_k targets, got {targets.kind!r}: the sorted "
                         "comparison needs the teacher's most probable tokens.")
    if targets.label_log_probs is None:
        raise ValueError("A sparse teacher across tokenizers needs each label token's log-probability "
                         "(SparseTargets.label_log_probs): the merge of a multi-token group reads it.")
    count = int((side.labels != ignore_index).sum())
    if targets.ids.size(0) != count:
        raise ValueError(f"The sparse teacher has targets at {targets.ids.size(0)} tokens, its labels {count}.")


def aligned_distillation_loss(student: Side, teacher: Side | SparseSide, settings: LossSettings,
                              aligned: AlignedSettings = AlignedSettings(), *,
                              shared_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
                              num_items_in_batch: int | torch.Tensor | None = None, ignore_index: int = -100,
                              chunk_size: int | None = None, memory_budget_mb: float | None = None,
                              noise_seed: int | None = None) -> AlignedLoss:
    """The loss of the module docstring. `settings`: `kd_weight` w, `temperature` T (both sides), `noise_std` σ on
    the teacher's logits (with `noise_seed`), `temperature_squared`; its divergence is not read. `shared_ids`:
    `(student ids [K], teacher ids [K])` of the token strings both vocabularies contain (the hybrid's exact part).
    N defaults to the batch's student label tokens."""
    if aligned.distance == "hybrid" and shared_ids is None:
        raise ValueError("The hybrid distance needs shared_ids: the token ids both vocabularies share.")
    if settings.noise_std > 0 and noise_seed is None:
        raise ValueError("noise_std > 0 needs a noise_seed (an int): the noise is drawn from it, per position.")
    sparse = teacher if isinstance(teacher, SparseSide) else None
    if sparse is not None:
        _check_sparse_side(sparse, ignore_index)
    temperature = settings.temperature
    with chunk_heads(student, teacher, settings, noise_seed, teacher.labels.size(1)) as (student_head, teacher_head):
        width = max(student_head.weight.size(0),
                    sparse.vocab_size if sparse is not None else teacher_head.weight.size(0))
        chunk = chunk_length(width, _WORKING_BUFFERS, student.hidden.device, chunk_size, memory_budget_mb)

        count = group_count(student.groups, teacher.groups)
        student_groups = _side_groups(student.labels, student.groups, count, aligned.merge, ignore_index)
        teacher_groups = _side_groups(teacher.labels, teacher.groups, count, aligned.merge, ignore_index)

        student_rows = student.hidden.reshape(-1, student.hidden.size(-1))[student_groups.positions]
        student_targets = student.labels.reshape(-1)[student_groups.positions]
        teacher_targets = teacher.labels.reshape(-1)[teacher_groups.positions]
        teacher_source = _TeacherRows(
            teacher_head, None if sparse else teacher.hidden.reshape(-1, teacher.hidden.size(-1))[
                teacher_groups.positions].detach(),
            teacher_groups.positions, teacher_targets, sparse, temperature)
        student_log_p, student_log_p_t, correct = label_log_probs(
            student_head, student_rows, student_groups.positions, student_targets, temperature, chunk, grad=True)
        teacher_log_p_t = teacher_source.label_log_probs(chunk)

        common = (student_groups.base >= 0) & (teacher_groups.base >= 0)
        pairs = int(common.sum())
        pair_of_key = torch.full_like(student_groups.base, -1)
        pair_of_key[common] = torch.arange(pairs, device=common.device)
        student_base = student_groups.base[common]
        teacher_base = teacher_groups.base[common]
        student_scale = _log_scales(student_groups, pair_of_key, student_log_p_t, pairs)
        teacher_scale = _log_scales(teacher_groups, pair_of_key, teacher_log_p_t.detach(), pairs)

        def score(h, weight, bias, log_scale, rows):
            """Σ d over the pairs `rows`: `h` `[n, D_S]` the student's base rows, `log_scale` `[n]`."""
            student_probs = F.softmax(student_head.logits(h, student_groups.positions[student_base[rows]], weight,
                                                          bias) / temperature, dim=-1) * log_scale.exp()[:, None]
            with torch.no_grad():
                teacher_logits = teacher_source.logits(teacher_base[rows])
                teacher_probs = F.softmax(teacher_logits / temperature, dim=-1) * teacher_scale[rows].exp()[:, None]
            if aligned.distance == "uld":
                return sorted_distance(student_probs, teacher_probs).sum()
            return hybrid_of_probabilities(student_probs, teacher_probs, *shared_ids, beta=aligned.matched_beta,
                                           matched_weight=aligned.matched_weight).sum()

        kd_sum = GradientsInForward.apply(score, chunk, pairs, student_rows[student_base], student_head.weight,
                                           student_head.bias, student_scale)
    normalizer = loss_normalizer(student_targets.new_tensor(student_targets.numel()), num_items_in_batch)
    ce = -student_log_p.sum() / normalizer
    kd = kd_sum / normalizer
    scale = temperature**2 if settings.temperature_squared else 1.0
    weight = settings.kd_weight
    return AlignedLoss(loss=(1 - weight) * ce + weight * scale * kd, ce_loss=ce.detach(), kd_loss=kd.detach(),
                       num_correct=correct.sum(), num_pairs=torch.tensor(pairs))
