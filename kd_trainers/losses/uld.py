"""Distillation between models whose vocabularies differ, from each model's whole distribution at aligned positions:
universal logit distillation (ULD, Boizard et al. 2024) and GOLD's hybrid (TRL's `trl.experimental.gold`). The
readable full-logits definitions, one row per aligned position, which the methods' chunked paths are tested against.

ULD compares the two distributions as probability vectors sorted in decreasing order, the shorter one padded with
zeros to the longer's length (the closed form of the Wasserstein-1 distance Boizard et al. use when no token of one
vocabulary is known to be any token of the other):

    ULD(p_S, p_T) = Σ_i | sort↓(p_S)_i − sort↓(p_T)_i |             p_S = softmax(z_S / T_S), p_T = softmax(z_T / T_T)

It needs nothing of the teacher but its sorted probabilities, so a teacher's top-k targets (a cache, a server) carry
it up to their tail. GOLD's hybrid splits each vocabulary into the token strings both vocabularies contain (`K` of
them, paired by `kd_trainers.data.alignment.shared_token_ids`) and the rest:

    hybrid = w_m · JSD_β(p_S[shared], p_T[shared]) + (1 − w_m) · ULD(p_S[rest], p_T[rest])

where the shared columns are compared as they are (not renormalised) and `w_m` defaults to `K / V_T`, as TRL's.
JSD_β is TRL's generalized JSD: β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m), m = β·p_T + (1 − β)·p_S.

Each function returns one value per row (`[N]`); a loss sums them and divides by its normaliser, as every loss of
the package does. TRL averages over each sequence's positions and then over sequences: for one sequence the two
agree (the tests check both against TRL's `ULDLoss` on one sequence at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# TRL's floor on a probability before its logarithm (GOLD's JSD on probabilities), kept so that the two agree
_PROBABILITY_FLOOR = 1e-8


def _tempered_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(logits.float() / temperature, dim=-1)


def sorted_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """`Σ_i |sort↓(p_S)_i − sort↓(p_T)_i|` per row: `[N, V_S]` and `[N, V_T]` probabilities (or any non-negative
    masses), the shorter padded with zeros. Returns `[N]`."""
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_probs.sort(dim=-1, descending=True).values
    width = max(student_sorted.size(-1), teacher_sorted.size(-1))
    student_sorted = F.pad(student_sorted, (0, width - student_sorted.size(-1)))
    teacher_sorted = F.pad(teacher_sorted, (0, width - teacher_sorted.size(-1)))
    return (student_sorted - teacher_sorted).abs().sum(dim=-1)


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_temperature: float = 1.0,
                 teacher_temperature: float = 1.0) -> torch.Tensor:
    """ULD per row from logits: `[N, V_S]` student, `[N, V_T]` teacher (row k of each is the same aligned position).
    Returns `[N]`."""
    return sorted_distance(_tempered_probabilities(student_logits, student_temperature),
                           _tempered_probabilities(teacher_logits, teacher_temperature))


def generalized_jsd_of_probabilities(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                                     beta: float) -> torch.Tensor:
    """TRL's generalized JSD of two probability vectors of one support (GOLD's exact part), summed per row: `[N, K]`
    each, returns `[N]`. The ends are TRL's special cases: β = 0 is KL(p_T ‖ p_S) (forward) and β = 1 is
    KL(p_S ‖ p_T) (reverse)."""
    student_log = student_probs.clamp_min(_PROBABILITY_FLOOR).log()
    teacher_log = teacher_probs.clamp_min(_PROBABILITY_FLOOR).log()
    if beta == 0:
        return (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)
    if beta == 1:
        return (student_log.exp() * (student_log - teacher_log)).sum(dim=-1)
    mixture_log = torch.logsumexp(torch.stack([student_log + torch.log1p(torch.tensor(-beta)),
                                               teacher_log + torch.log(torch.tensor(beta))]), dim=0)
    teacher_part = (teacher_log.exp() * (teacher_log - mixture_log)).sum(dim=-1)
    student_part = (student_log.exp() * (student_log - mixture_log)).sum(dim=-1)
    return beta * teacher_part + (1 - beta) * student_part


def hybrid_terms_of_probabilities(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                                  student_shared: torch.Tensor, teacher_shared: torch.Tensor,
                                  beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """GOLD's two parts per row, before weighting: `(JSD_β on the shared tokens [N], ULD on the rest [N])`, from
    probability vectors (or GOLD's merged, unnormalised ones) `[N, V_S]` and `[N, V_T]`; `student_shared` /
    `teacher_shared`: `[K]` ids of the token strings both vocabularies contain, pair by pair."""
    matched = generalized_jsd_of_probabilities(student_probs[:, student_shared], teacher_probs[:, teacher_shared], beta)
    student_rest = torch.ones(student_probs.size(-1), dtype=torch.bool, device=student_probs.device)
    teacher_rest = torch.ones(teacher_probs.size(-1), dtype=torch.bool, device=teacher_probs.device)
    student_rest[student_shared], teacher_rest[teacher_shared] = False, False
    unmatched = sorted_distance(student_probs[:, student_rest], teacher_probs[:, teacher_rest])
    return matched, unmatched


def hybrid_of_probabilities(student_probs: torch.Tensor, teacher_probs: torch.Tensor, student_shared: torch.Tensor,
                            teacher_shared: torch.Tensor, beta: float = 0.5,
                            matched_weight: float | None = None) -> torch.Tensor:
    """GOLD's hybrid per row (`[N]`) from probabilities: `w_m · JSD_β(shared) + (1 − w_m) · ULD(rest)`, `w_m` by
    default the shared share of the teacher's vocabulary (`K / V_T`, TRL's adaptive weight)."""
    matched, unmatched = hybrid_terms_of_probabilities(student_probs, teacher_probs, student_shared, teacher_shared,
                                                       beta)
    if matched_weight is None:
        matched_weight = teacher_shared.numel() / max(1, teacher_probs.size(-1))
    return matched_weight * matched + (1 - matched_weight) * unmatched


def hybrid_uld_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_shared: torch.Tensor,
                     teacher_shared: torch.Tensor, beta: float = 0.5, student_temperature: float = 1.0,
                     teacher_temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`hybrid_terms_of_probabilities` from logits `[N, V_S]` and `[N, V_T]` (row k of each the same aligned
    position), each model's softmax at its temperature."""
    return hybrid_terms_of_probabilities(_tempered_probabilities(student_logits, student_temperature),
                                         _tempered_probabilities(teacher_logits, teacher_temperature),
                                         student_shared, teacher_shared, beta)


def hybrid_uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_shared: torch.Tensor,
                        teacher_shared: torch.Tensor, beta: float = 0.5, matched_weight: float | None = None,
                        student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> torch.Tensor:
    """`hybrid_of_probabilities` from logits (see `hybrid_uld_terms`)."""
    return hybrid_of_probabilities(_tempered_probabilities(student_logits, student_temperature),
                                   _tempered_probabilities(teacher_logits, teacher_temperature),
                                   student_shared, teacher_shared, beta, matched_weight)
