"""A teacher given as a sparse distribution per label token, instead of hidden states and an output head.

Two kinds, as a teacher cache stores them (`kd_trainers.teacher_cache`):

- `top_k`: the teacher's k most probable token ids, their log-probabilities (at temperature 1) and the log of the
  mass left outside them (the tail). What the tail is, the ids do not say; two documented treatments (`tail`):
    * `bucket` (default): the tail is one category. The divergence compares the teacher's k tokens and its tail mass
      with the student's probabilities of the same k tokens and the student's remaining mass: the divergence of the
      two distributions coarsened to k + 1 categories, a lower bound of the full one that puts no pull on how the
      student shares its tail among tokens.
      The engine computes it as the full-vocabulary divergence against a teacher whose tail is spread in proportion
      to the student's own tail: for every f-divergence (all the built-in ones: KL both ways, JSD, the skewed KLs,
      TVD) that gives the coarsened value, and the same gradient, so the closed-form gradients apply unchanged.
    * `spread`: the tail mass is spread evenly over the V − k other tokens (DistillKit's "uniform" tail).
  Temperature: exact when the target carries the tail's log-mass at that temperature (`tempered_tail_log_mass`,
  which a teacher cache stores for the temperatures it was written for): the k tempered probabilities are
  p_i^(1/T) scaled to 1 − B_T, B_T the tempered tail mass, which is exactly the tempered teacher coarsened to k + 1
  categories. Without it (a served teacher, which returns the temperature-1 distribution only) the tail can only be
  guessed, as V − k tokens of equal probability, then all V renormalised; on a real vocabulary that misjudges the
  tail (SmolLM2, 49k tokens, T = 2: 0.87 of the mass where the tempered teacher has 0.68), so it is used only when
  asked for by name (`teacher_server_approximate_temperature`). A `top_k` target with k = V is the teacher's exact
  distribution at any temperature and gives the dense engine's loss and gradients.
- `sampled`: m tokens drawn from the teacher's distribution (with replacement) and each draw's log-probability.
  The target is the empirical distribution of the draws: its expectation is the teacher's distribution, so the
  forward-KL gradient `p_S − target` is unbiased ("Sparse Logit Sampling", Anshumann et al., ACL 2025). At a
  temperature T ≠ 1 the draws are reweighted by p^(1/T − 1) and self-normalised (a consistent estimate of the
  tempered teacher). The other divergences are not linear in the target, so the estimate would be biased: sampled
  targets take `forward_kl` only.

Teacher-logit noise is added as the dense engine adds it: to every entry of the reconstructed teacher's logits, the row
at each position drawn from `(seed, b, t)` alone, before the temperature.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


TAIL_TREATMENTS = ("bucket", "spread")
KINDS = ("top_k", "sampled")
# The log-probability given to tokens a sampled target never drew: finite, so that 0·log 0 terms stay 0 (not NaN),
# and so low that exp() of it is 0 in fp32 at any temperature the loss accepts.
ABSENT_LOG_PROB = -1.0e4


class SparseTargets(NamedTuple):
    """The teacher at `N` label tokens, in the order of `labels[labels != ignore_index]` (row-major).

    ids: `[N, k]` int64 token ids (`top_k`: distinct, most probable first; `sampled`: the draws, repeats allowed).
    log_probs: `[N, k]` fp32 teacher log-probabilities of those ids at temperature 1.
    tail_log_mass: `[N]` fp32 log of the teacher's mass outside `ids` (`top_k`; ignored for `sampled`).
    kind: `top_k` or `sampled`.
    tempered_tail_log_mass: `[N]` fp32 log of the mass outside `ids` of the teacher at temperature `tempered_at`
        (softmax(z / T)), or None when unknown (`top_k`): with it the tempered target is exact at that temperature.
    tempered_at: the temperature `tempered_tail_log_mass` is for.
    label_log_probs: `[N]` fp32 log-probability at temperature 1 of each position's label token (the next token of
        the teacher's own tokenization), whether or not it is among `ids`, or None: what a teacher of another
        tokenizer is asked for (`kd_trainers.losses.aligned`: the merge of a multi-token group reads it).
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail_log_mass: torch.Tensor
    kind: str = "top_k"
    tempered_tail_log_mass: torch.Tensor | None = None
    tempered_at: float = 1.0
    label_log_probs: torch.Tensor | None = None

    def rows(self, index: slice | torch.Tensor) -> "SparseTargets":
        tempered, label = (None if tensor is None else tensor[index]
                           for tensor in (self.tempered_tail_log_mass, self.label_log_probs))
        return SparseTargets(self.ids[index], self.log_probs[index], self.tail_log_mass[index], self.kind, tempered,
                             self.tempered_at, label)

    def to(self, device: torch.device | str) -> "SparseTargets":
        tempered, label = (None if tensor is None else tensor.to(device, torch.float32)
                           for tensor in (self.tempered_tail_log_mass, self.label_log_probs))
        return SparseTargets(self.ids.to(device), self.log_probs.to(device, torch.float32),
                             self.tail_log_mass.to(device, torch.float32), self.kind, tempered, self.tempered_at,
                             label)


def check_sparse_settings(kind: str, tail: str, divergence: str) -> None:
    """Fail, naming the setting, when a sparse target cannot serve the settings (`kind`, `tail`, `divergence`)."""
    if kind not in KINDS:
        raise ValueError(f"The sparse teacher's kind must be one of {list(KINDS)}, got {kind!r}.")
    if tail not in TAIL_TREATMENTS:
        raise ValueError(f"teacher_cache_tail must be one of {list(TAIL_TREATMENTS)}, got {tail!r}.")
    if kind == "sampled" and divergence != "forward_kl":
        raise ValueError(
            f"divergence={divergence!r} with a sampled teacher cache: the sampled target is unbiased for forward_kl "
            "only (the other divergences are not linear in the teacher's distribution). Use divergence=forward_kl, "
            "or a top_k cache.")


def tempered_top_k(targets: SparseTargets, vocab: int, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`(log p_i / T [n, k], each tail token's unnormalised log-probability [n] or None when k = V, log normaliser
    [n])` of a top-k target at `temperature`: after subtracting the normaliser, the k tempered log-probabilities and
    the tail's (V − k tokens of equal share).

    With the tail's tempered mass B_T (`tempered_tail_log_mass` at this temperature) it is exact: the k tempered
    probabilities sum to 1 − B_T and the tail holds B_T. Without it, the tail is read as V − k tokens of equal
    probability, whose tempered total is (V − k)·exp((tail − log(V − k)) / T) before renormalising: exact at T = 1
    only."""
    k = targets.ids.size(1)
    tempered_top = targets.log_probs / temperature
    if k >= vocab:
        return tempered_top, None, torch.logsumexp(tempered_top, -1)
    if targets.tempered_tail_log_mass is not None and temperature != 1.0:
        if targets.tempered_at != temperature:
            raise ValueError(f"The sparse targets carry the tail's mass at temperature {targets.tempered_at}, "
                             f"the loss asks for {temperature}.")
        tail = targets.tempered_tail_log_mass.clamp(max=0.0)
        log_normaliser = torch.logsumexp(tempered_top, -1) - log1mexp(tail)
        return tempered_top, tail + log_normaliser - math.log(vocab - k), log_normaliser
    tail_each = (targets.tail_log_mass - math.log(vocab - k)) / temperature
    return tempered_top, tail_each, torch.logaddexp(torch.logsumexp(tempered_top, -1), tail_each + math.log(vocab - k))


def fill_teacher_logits_(out: torch.Tensor, targets: SparseTargets, temperature: float, tail: str,
                         student_logits: torch.Tensor | None = None, scratch: torch.Tensor | None = None,
                         student_transform=None) -> torch.Tensor:
    """Write into `out` `[n, V]` teacher "logits" whose softmax at `temperature` is the reconstructed, tempered
    teacher: `T · log p̂_T` (a row of log-probabilities is its own log-softmax, so dividing by T gives them back).

    `bucket` also reads the student's raw logits (`student_logits` `[n, V]`, left intact, with its
    `student_transform`) through the fp32 `scratch` buffer `[n, V]`.
    """
    vocab, k = out.size(1), targets.ids.size(1)
    if targets.kind == "sampled":
        # Self-normalised weights p^(1/T − 1) of the draws (all equal at T = 1), summed per token id.
        log_weights = targets.log_probs * (1.0 / temperature - 1.0)
        weights = (log_weights - log_weights.amax(-1, keepdim=True)).exp_()
        out.zero_().scatter_add_(1, targets.ids, weights)
        out.div_(weights.sum(-1, keepdim=True)).log_().clamp_(min=ABSENT_LOG_PROB)
        return out.mul_(temperature)
    tempered_top, tail_each, log_normaliser = tempered_top_k(targets, vocab, temperature)
    if tail_each is None:  # the whole vocabulary: the exact distribution
        out.scatter_(1, targets.ids, tempered_top)
        return torch.log_softmax(out, -1, out=out).mul_(temperature)
    tail_total = tail_each + math.log(vocab - k)
    top = tempered_top - log_normaliser[:, None]
    if tail == "spread":
        out.copy_((tail_each - log_normaliser)[:, None].expand_as(out))
    else:
        # The student's tempered log-probabilities, its top-k entries set to −inf: their logsumexp is the student's
        # tail mass, and each tail token gets the teacher's tail mass in the student's proportions.
        student = scratch.copy_(student_logits)
        if student_transform is not None:
            student_transform.apply_(student)
        student = torch.log_softmax(student.div_(temperature), -1, out=student)
        student.scatter_(1, targets.ids, float("-inf"))
        student_tail = torch.logsumexp(student, -1)  # [n]
        torch.add(student, (tail_total - log_normaliser - student_tail)[:, None], out=out)
    out.clamp_(min=ABSENT_LOG_PROB)  # a tail of mass 0 (−inf): 0·log 0 terms must stay 0, not NaN
    out.scatter_(1, targets.ids, top)
    return out.mul_(temperature)


def takes_sparse_forward_kl(settings) -> bool:
    """Whether the engine takes the KD term against a sparse target directly (`sparse_forward_kl_value_and_grad`):
    forward KL without noise (noise needs every entry of the teacher's logits, so the target is reconstructed)."""
    return settings.divergence == "forward_kl" and settings.noise_std == 0 and settings.teacher_temperature == 1.0


def sparse_forward_kl_value_and_grad(student_log_probs: torch.Tensor, targets: SparseTargets, tail: str,
                                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(KL(t̃ ‖ p_S) per token [n], dKL/du [n, V])` with u the student's tempered logits and t̃ the reconstructed,
    tempered teacher of `fill_teacher_logits_`, without building t̃: its tail is one number per token.

    With p_S = softmax(u) and t̃ the target, the gradient is p_S − t̃. On the k ids t̃ is the stored target; on the tail
    it is `bucket`: B·p_S,j / Q (B the teacher's tempered tail mass, Q the student's), so p_S − t̃ = p_S·(1 − B/Q) and
    the tail's KL is B·(log B − log Q); `spread`: B / (V − k) each, whose KL needs Σ log p_S over the tail. Three
    passes over `[n, V]` (exp, scale, and the sum for `spread`) where reconstructing t̃ takes a dozen.
    `student_log_probs` `[n, V]` becomes the gradient.
    """
    vocab, k = student_log_probs.size(1), targets.ids.size(1)
    ids = targets.ids
    student_top = student_log_probs.gather(1, ids)  # [n, k]
    log_tail = None  # log B, the teacher's tempered tail mass; None: no tail (sampled, or k = V)
    if targets.kind == "sampled":
        weights = torch.softmax(targets.log_probs * (1.0 / temperature - 1.0), -1)  # per draw, self-normalised
        same = ids[:, :, None] == ids[:, None, :]  # [n, k, k]: draws of the same token share its target mass
        target_at = (weights[:, None, :] * same).sum(-1)
    else:
        tempered_top, tail_each, log_normaliser = tempered_top_k(targets, vocab, temperature)
        if tail_each is not None:
            log_tail = (tail_each + math.log(vocab - k) - log_normaliser).clamp(min=ABSENT_LOG_PROB)
        weights = target_at = (tempered_top - log_normaliser[:, None]).exp()
    values = (weights * (torch.log(target_at.clamp(min=1e-30)) - student_top)).sum(-1)
    tail_sum = student_log_probs.sum(-1) - student_top.sum(-1) if log_tail is not None and tail == "spread" else None
    grad = student_log_probs.exp_()
    if log_tail is not None:
        tail_mass = log_tail.exp()
        if tail == "spread":
            each = tail_mass / (vocab - k)
            values = values + tail_mass * (log_tail - math.log(vocab - k)) - each * tail_sum
            grad.sub_(each[:, None])
        else:
            student_tail = log1mexp(torch.logsumexp(student_top, -1)).clamp(min=ABSENT_LOG_PROB)  # log Q
            values = values + tail_mass * (log_tail - student_tail)
            grad.mul_((1.0 - (log_tail - student_tail).exp())[:, None])
    grad.scatter_(1, ids, student_top.exp())  # the k ids: p_S − t̃, t̃ summed over repeated draws
    grad.scatter_add_(1, ids, -weights)
    return values, grad


def reconstruct_log_probs(targets: SparseTargets, vocab: int, temperature: float = 1.0, tail: str = "spread",
                          student_logits: torch.Tensor | None = None) -> torch.Tensor:
    """`[N, V]` log-probabilities of the reconstructed teacher at `temperature` (allocates; for references and
    measurements). `bucket` needs the student's logits `[N, V]`."""
    out = torch.empty(targets.ids.size(0), vocab, dtype=torch.float32, device=targets.ids.device)
    scratch = None if student_logits is None else torch.empty_like(out)
    fill_teacher_logits_(out, targets.to(out.device), temperature, tail,
                         None if student_logits is None else student_logits.float(), scratch)
    return torch.log_softmax(out / temperature, -1)


def top_k_targets(teacher_logits: torch.Tensor, k: int, temperature: float | None = None) -> SparseTargets:
    """The exact top-k target of full teacher logits `[N, V]` (fp32): ids, log-probabilities and tail log-mass, and,
    with a `temperature`, the tail's log-mass at it (`tempered_tail_log_mass`: exact at that temperature)."""
    log_probs = torch.log_softmax(teacher_logits.float(), -1)
    top, ids = log_probs.topk(min(k, log_probs.size(-1)), dim=-1)
    tail = log1mexp(torch.logsumexp(top, -1))
    if temperature is None:
        return SparseTargets(ids, top, tail, "top_k")
    return SparseTargets(ids, top, tail, "top_k", tail_log_masses(teacher_logits, ids, (temperature,))[0],
                         float(temperature))


def tail_log_masses(teacher_logits: torch.Tensor, ids: torch.Tensor, temperatures) -> list[torch.Tensor]:
    """`[N]` log of the mass outside `ids` `[N, k]` of softmax(z / T) for each temperature T, z the teacher's
    logits `[N, V]`: the tail left out summed directly (no 1 − top subtraction to lose a small tail in)."""
    logits = teacher_logits.float()
    masked = logits.scatter(1, ids, float("-inf"))
    return [torch.logsumexp(masked / t, -1) - torch.logsumexp(logits / t, -1) for t in temperatures]


def sampled_targets(teacher_logits: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
                    ) -> SparseTargets:
    """`num_samples` draws per row from the teacher's distribution `[N, V]` and their log-probabilities."""
    log_probs = torch.log_softmax(teacher_logits.float(), -1)
    ids = torch.multinomial(log_probs.exp(), num_samples, replacement=True, generator=generator)
    return SparseTargets(ids, log_probs.gather(-1, ids), torch.full(ids.shape[:1], -math.inf, device=ids.device),
                         "sampled")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stably (Mächler, 2012); −inf where x = 0."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
