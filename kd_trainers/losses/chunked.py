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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .divergences import divergence_params, get_divergence
from .noise import grid_positions, position_noise_
from .reference import DistillationLoss, check_loss_settings, loss_normalizer
from .sparse import (SparseTargets, check_sparse_settings, fill_teacher_logits_, sparse_forward_kl_value_and_grad,
                     takes_sparse_forward_kl)


# Default byte budget of a chunk's `[n, V]` working buffers. Every chunk re-reads both output heads and the head's fp32
# gradient, so short chunks cost time: on CPU (width 128, 128k vocabulary) 32-token chunks took 1.4x as long as 64-token
# ones, and 64 to 256 tokens were within 10% of each other. 96 MiB gives 64 tokens at a 131k vocabulary in the 3
# buffers of on-policy GKD (48 in the 4 of KD with a CE term), while keeping the loss well under what TRL's
# DistillationTrainer takes for the same batch. A GPU gets 512 MiB (about 200 tokens at 150k), to amortise the reads
# of its much wider heads.
DEFAULT_MEMORY_BUDGET_MB = {"cpu": 96, "accelerator": 512}


def default_memory_budget_mb(device: torch.device) -> int:
    """The default budget (MiB) of the loss's working buffers on `device` (see `DEFAULT_MEMORY_BUDGET_MB`)."""
    return DEFAULT_MEMORY_BUDGET_MB["cpu" if torch.device(device).type == "cpu" else "accelerator"]


def chunk_rows(vocab: int, buffers: int, memory_budget_mb: float) -> int:
    """Tokens per chunk: the most whose `buffers` fp32 `[n, vocab]` buffers fit in `memory_budget_mb` MiB (at least 1)."""
    return max(1, int(memory_budget_mb * 2**20) // (buffers * vocab * 4))


def chunk_length(vocab: int, buffers: int, device: torch.device, chunk_size: int | None = None,
                 memory_budget_mb: float | None = None) -> int:
    """Tokens per chunk as a caller asked: `chunk_size` when given, else the most that fit `memory_budget_mb` (default
    `default_memory_budget_mb(device)`) in `buffers` `[n, vocab]` fp32 buffers. Giving both is an error."""
    if chunk_size is not None:
        if memory_budget_mb is not None:
            raise ValueError(f"chunk_size={chunk_size} and memory_budget_mb={memory_budget_mb} both size the chunks: "
                             "give one.")
        return chunk_size
    if memory_budget_mb is None:
        memory_budget_mb = default_memory_budget_mb(device)
    return chunk_rows(vocab, buffers, memory_budget_mb)


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to `h @ W^T + b` before its softmax: `softcap·tanh(scale·z / softcap)` (Gemma, Cohere)."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config) -> "LogitTransform":
        """Read the logit scale and final soft-capping from a transformers config, as TRL's fused heads do."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = getattr(config, "logit_scale", None)
        if scale is None:
            scale = getattr(config, "output_multiplier", None)
        if scale is None:
            scale = getattr(config, "lm_head_multiplier", None)
        if scale is None and getattr(config, "logits_scaling", None) is not None:
            # Granite divides its logits by `logits_scaling`; HyperCLOVA X multiplies them by it. A head that does
            # something else again is caught by the trainers' first-batch check (`kd_trainers.kd.heads`).
            multiplies = getattr(config, "model_type", None) == "hyperclovax"
            scale = config.logits_scaling if multiplies else 1.0 / config.logits_scaling
        return cls(scale=1.0 if scale is None else float(scale), softcap=getattr(config, "final_logit_softcapping", None))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def apply_(self, logits: torch.Tensor, derivative: torch.Tensor | None = None) -> torch.Tensor:
        """`self(logits)` in place. With a softcap and a `derivative` buffer (same shape), also writes d out / d logits
        = scale·(1 − tanh²) into it, for the student's closed-form gradient; without a softcap the derivative is the
        constant `scale` and nothing is written."""
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_()
            if derivative is not None:
                torch.mul(logits, logits, out=derivative).neg_().add_(1.0).mul_(self.scale)
            logits.mul_(self.softcap)
        return logits


@dataclass(frozen=True)
class LossSettings:
    """The knobs of the loss, as in `reference.distillation_loss`."""

    divergence: str = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    noise_std: float = 0.0
    kd_weight: float = 1.0
    temperature_squared: bool = True
    # Extra temperature of the KD target only (teacher logits / (T·teacher_temperature)), DSKD's `teacher_temperature`.
    teacher_temperature: float = 1.0
    # Settings of a registered divergence other than the two above (`{"gamma": 2.0}` for a divergence declared with
    # `*, gamma`): passed to it by name, checked by its registration's `checks`.
    other_divergence_settings: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        check_loss_settings(divergence=self.divergence, temperature=self.temperature, noise_std=self.noise_std,
                            kd_weight=self.kd_weight, **self._divergence_settings())
        if not 0 < self.teacher_temperature < float("inf"):
            raise ValueError(f"teacher_temperature must be a finite number > 0, got {self.teacher_temperature}.")

    def _divergence_settings(self) -> dict[str, float]:
        return {"jsd_beta": self.jsd_beta, "skew_alpha": self.skew_alpha, **dict(self.other_divergence_settings)}

    def divergence_params(self) -> dict[str, float]:
        """The settings the divergence reads (`jsd_beta` for `jsd`, nothing for `forward_kl`), as keywords."""
        return divergence_params(self.divergence, self._divergence_settings())


def chunk_loss_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    settings: LossSettings, kd_token_weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and summed (scaled) KD of one chunk, differentiable. Logits `[n, V]` fp32, labels `[n]`, all valid;
    `kd_token_weights` `[n]` multiplies each token's KD term (DSKD's accuracy gate)."""
    temperature = settings.temperature
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / (temperature * settings.teacher_temperature), dim=-1)
    if temperature == 1.0:
        ce = -student_log_probs.gather(-1, labels[:, None]).sum()
    else:
        ce = (torch.logsumexp(student_logits, dim=-1) - student_logits.gather(-1, labels[:, None])[:, 0]).sum()
    kd = get_divergence(settings.divergence)(student_log_probs, teacher_log_probs, **settings.divergence_params())
    kd = kd.sum() if kd_token_weights is None else (kd * kd_token_weights).sum()
    if settings.temperature_squared:
        kd = kd * temperature**2
    return ce, kd


def autograd_value_and_grad(raw_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                            settings: LossSettings, student_transform: LogitTransform,
                            kd_token_weights: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(ce_sum, kd_sum, d total / d raw_logits [n, V])` of one chunk by autograd, total = (1 − w)·ce + w·kd.

    The general path: any divergence, any student logit transform. Logits `[n, V]` fp32.
    """
    raw_logits = raw_logits.detach().requires_grad_(True)
    with torch.enable_grad():
        ce, kd = chunk_loss_sums(student_transform(raw_logits), teacher_logits, labels, settings, kd_token_weights)
        (grad,) = torch.autograd.grad((1.0 - settings.kd_weight) * ce + settings.kd_weight * kd, raw_logits)
    return ce.detach(), kd.detach(), grad


def closed_form_value_and_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                               settings: LossSettings, student_transform: LogitTransform,
                               scratch: list[torch.Tensor], kd_token_weights: torch.Tensor | None = None,
                               report_ce: bool = True, sparse_target: tuple[SparseTargets, str] | None = None
                               ) -> tuple[torch.Tensor | float, torch.Tensor, torch.Tensor, float]:
    """`autograd_value_and_grad` for a divergence with a closed-form gradient, in place: `student_logits` (raw, before
    the student's transform), `teacher_logits` (transformed) and the `scratch` buffers (all `[n, V]` fp32;
    `working_buffers` says how many) are overwritten, and the returned gradient is one of them. Returns
    `(ce_sum, kd_sum, G, c)` with d total / d raw_logits = c·G: the constant factor c is left to the matrix products
    that consume the gradient, which saves a pass over `[n, V]`. With `report_ce=False` and w = 1 the CE, which then
    only feeds a log, is not computed (returned as 0): at T ≠ 1 it would cost a softmax and a buffer. With
    `sparse_target` `(targets, tail)` (forward KL only) the KD term is taken against the stored target directly
    (`sparse.sparse_forward_kl_value_and_grad`) and `teacher_logits` is only scratch.

    total = (1 − w)·CE(z) + w·s·D(softmax(z/T), softmax(z_T/T)), s = T² or 1, z = transform(raw), so
    d total / dz = (1 − w)·(softmax(z) − onehot(y)) + (w·s/T)·dD/du, times dz/d raw (the transform's derivative).
    """
    temperature, weight = settings.temperature, settings.kd_weight
    scale = temperature**2 if settings.temperature_squared else 1.0
    free = list(scratch)
    rows = torch.arange(labels.numel(), device=labels.device)
    derivative = free.pop() if student_transform.softcap is not None else None
    student_transform.apply_(student_logits, derivative)
    ce_wanted = weight < 1.0 or report_ce
    ce_grad = free.pop() if weight < 1.0 or (temperature != 1.0 and ce_wanted) else None
    ce = 0.0  # unless computed below

    def start_ce_grad(log_probs):  # softmax(z) − onehot(y) into ce_grad; its weight (1 − w) goes into c
        torch.exp(log_probs, out=ce_grad)
        ce_grad[rows, labels] -= 1.0

    if temperature != 1.0:
        if ce_wanted:  # CE is taken at temperature 1: its own log-softmax before the logits are divided by T
            torch.log_softmax(student_logits, -1, out=ce_grad)
            ce = -ce_grad[rows, labels].sum()
            if weight < 1.0:
                start_ce_grad(ce_grad)
        student_logits.div_(temperature)
    if temperature * settings.teacher_temperature != 1.0 and sparse_target is None:
        teacher_logits.div_(temperature * settings.teacher_temperature)
    student_log_probs = torch.log_softmax(student_logits, -1, out=free.pop())
    if sparse_target is None:
        teacher_log_probs = torch.log_softmax(teacher_logits, -1, out=student_logits)
    if temperature == 1.0:
        ce = -student_log_probs[rows, labels].sum()
        if weight < 1.0:
            start_ce_grad(student_log_probs)
    if sparse_target is None:
        values, kd_grad = get_divergence(settings.divergence).value_and_grad(
            student_log_probs, teacher_log_probs, scratch=[teacher_logits, *free], **settings.divergence_params())
    else:  # forward KL against the stored target itself: no [n, V] teacher is built
        values, kd_grad = sparse_forward_kl_value_and_grad(student_log_probs, *sparse_target, temperature)
    if kd_token_weights is not None:
        values = values * kd_token_weights
        kd_grad.mul_(kd_token_weights[:, None])
    kd_factor = weight * scale / temperature  # chain rule through u = z / T
    if weight < 1.0:
        grad, factor = ce_grad.add_(kd_grad, alpha=kd_factor / (1.0 - weight)), 1.0 - weight
    else:
        grad, factor = kd_grad, kd_factor
    if derivative is not None:  # the softcap's derivative already holds the logit scale
        grad.mul_(derivative)
    else:
        factor *= student_transform.scale
    return ce, values.sum() * scale, grad, factor


def _uses_closed_form(settings: LossSettings) -> bool:
    return hasattr(get_divergence(settings.divergence), "value_and_grad")


def working_buffers(settings: LossSettings, student_transform: LogitTransform = LogitTransform(),
                    report_ce: bool = True) -> int:
    """How many fp32 `[n, V]` buffers one chunk works in: the two models' logits, then either the closed form's
    scratch (the student's log-probabilities, a CE gradient when w < 1 or T ≠ 1, the divergence's own, the softcap's
    derivative) or, for a divergence without one, a scratch buffer plus what autograd holds (`autograd_buffers`).
    The noise and the teacher-side CE use one of these buffers before the student's logits are made."""
    divergence = get_divergence(settings.divergence)
    if not _uses_closed_form(settings):
        return 3 + divergence.autograd_buffers
    ce_gradient = settings.kd_weight < 1.0 or (settings.temperature != 1.0 and report_ce)
    softcap = student_transform.softcap is not None
    # both models' logits + the student's log-probabilities; the teacher's logits buffer is the divergence's first
    # scratch once the teacher's log-probabilities are made (into the student's logits buffer)
    return 3 + ce_gradient + (divergence.scratch_buffers - 1) + softcap


def _project_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """`hidden @ weight^T + bias` written into the fp32 buffer `out` `[n, V]` (computed in the model's dtype)."""
    if hidden.dtype == out.dtype:
        if bias is None:
            return torch.mm(hidden, weight.T, out=out)
        return torch.addmm(bias, hidden, weight.T, out=out)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return out.copy_(logits)


def teacher_ce_value_and_grad(raw_logits: torch.Tensor, labels: torch.Tensor, transform: LogitTransform,
                              out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Σ CE(transform(raw_logits), labels), d/d raw_logits)` for the teacher side of DSKD (the t2s cross-entropy,
    which trains the projectors). Logits `[n, V]` fp32 are left intact; the gradient is written into `out`."""
    if transform != LogitTransform():
        logits = raw_logits.detach().requires_grad_(True)
        with torch.enable_grad():
            ce = F.cross_entropy(transform(logits), labels, reduction="sum")
            (grad,) = torch.autograd.grad(ce, logits)
        return ce.detach(), out.copy_(grad)
    rows = torch.arange(labels.numel(), device=labels.device)
    log_probs = torch.log_softmax(raw_logits, -1, out=out)
    ce = -log_probs[rows, labels].sum()
    grad = log_probs.exp_()
    grad[rows, labels] -= 1.0
    return ce, grad


@dataclass(frozen=True)
class TeacherTerms:
    """What the engine does with the teacher side beyond serving as the KD target (DSKD's projected teacher).

    ce_weight: weight of the cross-entropy of the teacher-side logits on `teacher_labels`, whose gradient goes into
        the teacher-side hidden states (never the teacher's head). 0 (vanilla KD) skips it.
    gate_kd: count a token's KD term only where the teacher side's argmax equals its `teacher_labels` entry (DSKD-CMA's
        "t2s accuracy" gate, computed on the clean logits, before noise).
    """

    ce_weight: float = 0.0
    gate_kd: bool = False


class ChunkedDistillationOutput(NamedTuple):
    """Everything `chunked_distillation_terms` computes; the means are divided by the loss normaliser."""

    loss: torch.Tensor                 # (1 − w)·ce_loss + w·kd_loss + teacher_ce_weight·teacher_ce_loss
    ce_loss: torch.Tensor
    kd_loss: torch.Tensor              # scaled by T² if set; gated if asked
    teacher_ce_loss: torch.Tensor      # 0 unless teacher_ce_weight > 0
    num_correct: torch.Tensor          # label tokens where the student's argmax is right
    teacher_num_correct: torch.Tensor  # tokens where the teacher side's argmax equals teacher_labels (0 unless
                                       # teacher terms are on)


class _ChunkPlan(NamedTuple):
    """What the fused function reads besides the four inputs that may take a gradient (rows are label tokens only)."""

    teacher_weight: torch.Tensor         # [V, D_T], detached
    teacher_bias: torch.Tensor | None    # [V], detached
    labels: torch.Tensor                 # [N]
    teacher_labels: torch.Tensor         # [N], targets of the teacher-side terms
    normalizer: torch.Tensor             # scalar: the N the sums are divided by
    settings: LossSettings
    student_transform: LogitTransform
    teacher_transform: LogitTransform
    teacher_terms: TeacherTerms
    chunk_size: int
    noise: tuple | None                  # (seed, rows [N], columns [N]) when settings.noise_std > 0
    report_ce: bool                      # False: the CE at w = 1 feeds nothing, so skip it
    sparse: tuple[SparseTargets, str] | None = None  # (targets [N, k], tail treatment): the teacher, in place of
                                                     # teacher_hidden and its head
    mixture: object | None = None  # several teachers (`mixture.Mixture`): fills each chunk's teacher logits itself


class _FusedDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, plan: _ChunkPlan):
        """student_hidden `[N, D_S]`, student_weight `[V, D_S]`, student_bias `[V]` or None, teacher_hidden `[N, D_T]`
        (differentiable only for the teacher-side CE); returns the terms of `ChunkedDistillationOutput`."""
        teacher_weight, teacher_bias, labels, teacher_labels, normalizer, settings = plan[:6]
        student_transform, teacher_transform, teacher_terms, chunk_size, noise, report_ce, sparse, mixture = plan[6:]
        num_tokens = student_hidden.size(0)
        device = student_hidden.device
        # Under no_grad (evaluation) nothing needs a gradient, and none is built.
        hidden_needs_grad, weight_needs_grad, bias_needs_grad, teacher_needs_grad = ctx.needs_input_grad[:4]
        grad_hidden = torch.zeros_like(student_hidden) if hidden_needs_grad else None
        # Accumulated in fp32 across chunks whatever the model dtype, then cast once.
        grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=device) \
            if weight_needs_grad else None
        grad_bias = torch.zeros(student_bias.shape, dtype=torch.float32, device=device) if bias_needs_grad else None
        builds_gradient = hidden_needs_grad or weight_needs_grad or bias_needs_grad
        teacher_ce_on = teacher_terms.ce_weight > 0
        grad_teacher_hidden = torch.zeros_like(teacher_hidden) if teacher_ce_on and teacher_needs_grad else None
        sums = torch.zeros(3, dtype=torch.float32, device=device)  # ce, kd, teacher ce
        counts = torch.zeros(2, dtype=torch.long, device=device)   # student correct, teacher correct

        # fp32 [chunk, V] buffers reused by every chunk (`working_buffers` of them): a fresh tensor per operation
        # would cost more in page faults (CPU) or allocator traffic than the arithmetic itself, and would escape the
        # memory budget the chunk was sized by.
        vocab = student_weight.size(0)
        closed_form = _uses_closed_form(settings)
        count = working_buffers(settings, student_transform, report_ce) if closed_form else 3
        buffers = [torch.empty(min(chunk_size, num_tokens), vocab, dtype=torch.float32, device=device)
                   for _ in range(count + (mixture.buffers if mixture is not None else 0))]

        for start in range(0, num_tokens, chunk_size):
            chunk = slice(start, min(start + chunk_size, num_tokens))
            hidden = student_hidden[chunk]
            chunk_labels, chunk_teacher_labels = labels[chunk], teacher_labels[chunk]
            student_logits, teacher_logits, *scratch = (buffer[: hidden.size(0)] for buffer in buffers)
            sparse_target = None
            if mixture is not None:  # several teachers: their tempered mixture, as logits (the bucket tail reads the
                _project_into(student_logits, hidden, student_weight, student_bias)  # student's)
                mixture.fill_(teacher_logits, chunk, student_logits, settings, student_transform,
                              scratch[-mixture.buffers:])
            elif sparse is not None:  # the teacher from its stored distribution (the bucket tail reads the student's)
                _project_into(student_logits, hidden, student_weight, student_bias)
                if takes_sparse_forward_kl(settings) and closed_form:
                    sparse_target = (sparse[0].rows(chunk), sparse[1])
                else:
                    fill_teacher_logits_(teacher_logits, sparse[0].rows(chunk), settings.temperature, sparse[1],
                                         student_logits, scratch[0], student_transform)
            else:
                _project_into(teacher_logits, teacher_hidden[chunk], teacher_weight, teacher_bias)
            if teacher_ce_on or teacher_terms.gate_kd:
                # The transforms are monotone: the argmax of the raw logits is the model's prediction.
                teacher_correct = teacher_logits.argmax(-1) == chunk_teacher_labels
                counts[1] += teacher_correct.sum()
            if teacher_ce_on:
                teacher_ce, teacher_grad = teacher_ce_value_and_grad(teacher_logits, chunk_teacher_labels,
                                                                     teacher_transform, scratch[0])
                sums[2] += teacher_ce
                if grad_teacher_hidden is not None:
                    teacher_grad = teacher_grad.to(teacher_hidden.dtype)
                    torch.mm(teacher_grad, teacher_weight, out=grad_teacher_hidden[chunk])
            teacher_transform.apply_(teacher_logits)
            if settings.noise_std > 0:
                seed, rows, columns = noise
                position_noise_(scratch[0], seed, rows[chunk], columns[chunk])
                teacher_logits.add_(scratch[0], alpha=settings.noise_std)
            if sparse is None and mixture is None:
                _project_into(student_logits, hidden, student_weight, student_bias)
            counts[0] += (student_logits.argmax(-1) == chunk_labels).sum()
            gate = teacher_correct.float() if teacher_terms.gate_kd else None
            if closed_form:
                ce, kd, grad_logits, factor = closed_form_value_and_grad(
                    student_logits, teacher_logits, chunk_labels, settings, student_transform, scratch, gate, report_ce,
                    sparse_target)
            else:
                ce, kd, grad_logits = autograd_value_and_grad(student_logits, teacher_logits, chunk_labels, settings,
                                                              student_transform, gate)
                factor = 1.0
            sums[0] += ce
            sums[1] += kd
            if not builds_gradient:
                continue
            # The gradient of the logits is factor·grad_logits; the factor is applied to the small products.
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, student_weight, out=grad_hidden[chunk])
                if factor != 1.0:
                    grad_hidden[chunk] *= factor
            if grad_weight is not None:
                if grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.T, hidden, alpha=factor)
                else:
                    grad_weight.add_(grad_logits.T @ hidden, alpha=factor)
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0), alpha=factor)

        # Scaled in place and kept on ctx rather than saved: the backward hands each one to autograd as the only
        # reference, which then takes it as the parameter's .grad instead of copying a [V, D] tensor.
        inverse = 1.0 / normalizer
        ctx.gradients = [
            None if grad_hidden is None else grad_hidden.mul_(inverse.to(grad_hidden.dtype)),
            None if grad_weight is None else grad_weight.mul_(inverse).to(student_weight.dtype),
            None if grad_bias is None else grad_bias.mul_(inverse).to(student_bias.dtype),
            None if grad_teacher_hidden is None
            else grad_teacher_hidden.mul_((inverse * teacher_terms.ce_weight).to(grad_teacher_hidden.dtype)),
        ]
        ce_mean, kd_mean, teacher_ce_mean = sums * inverse
        loss = (1.0 - settings.kd_weight) * ce_mean + settings.kd_weight * kd_mean \
            + teacher_terms.ce_weight * teacher_ce_mean
        num_correct, teacher_num_correct = counts[0].clone(), counts[1].clone()
        ctx.mark_non_differentiable(ce_mean, kd_mean, teacher_ce_mean, num_correct, teacher_num_correct)
        return loss, ce_mean, kd_mean, teacher_ce_mean, num_correct, teacher_num_correct

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        gradients, ctx.gradients = ctx.gradients, None
        if gradients is None:
            raise RuntimeError("This distillation loss was already backpropagated: its gradients are built in the "
                               "forward and handed to autograd once, so retain_graph cannot replay them. Compute the "
                               "loss again for another backward.")
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # 1 unless scaled (DeepSpeed, a weighted sum)
            gradients = [None if grad is None else grad.mul_(grad_loss.to(grad.dtype)) for grad in gradients]
        return (*gradients, None)


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
    return _engine_terms(student_hidden, student_lm_head, labels, settings, (teacher_hidden, teacher_lm_head), None,
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
    return _engine_terms(student_hidden, student_lm_head, labels, settings, None, (targets, tail),
                         ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size,
                         chunk_size=chunk_size, memory_budget_mb=memory_budget_mb,
                         student_transform=student_transform, teacher_transform=LogitTransform(),
                         noise_seed=noise_seed, teacher_terms=TeacherTerms(), teacher_labels=None, report_ce=True)


def _engine_terms(student_hidden, student_lm_head, labels, settings, dense_teacher, sparse_teacher, *, ignore_index,
                  num_items_in_batch, vocab_size, chunk_size, memory_budget_mb, student_transform, teacher_transform,
                  noise_seed, teacher_terms, teacher_labels, report_ce, mixture=None) -> ChunkedDistillationOutput:
    """The engine's set-up for any teacher: `dense_teacher` `(hidden, head)`, `sparse_teacher` `(targets, tail)`,
    or a `mixture` of them (`kd_trainers.losses.mixture`), which fills each chunk's teacher logits itself in
    `mixture.buffers` more buffers."""
    student_weight, student_bias = _weight_and_bias(student_lm_head)
    teacher_hidden, teacher_weight, teacher_bias = None, None, None
    if dense_teacher is not None:
        teacher_hidden = dense_teacher[0]
        teacher_weight, teacher_bias = _weight_and_bias(dense_teacher[1])
    with _maybe_gather(student_weight, student_bias, teacher_weight, teacher_bias):
        # Read inside the gather: under ZeRO-3 a partitioned head has 0 rows until it is gathered.
        head_rows = [weight.size(0) for weight in (student_weight, teacher_weight) if weight is not None]
        if mixture is not None:
            head_rows += mixture.head_rows()
        vocab = min(head_rows) if vocab_size is None else vocab_size
        if vocab > min(head_rows):
            rows = ", ".join(f"{count} {'teacher' if index else 'student'} rows"
                             for index, count in enumerate(head_rows))
            raise ValueError(f"vocab_size={vocab} exceeds an output head ({rows}).")
        positions = grid_positions(labels)  # (b, t) of every label entry, for the noise
        labels = labels.reshape(-1)
        mask = labels != ignore_index
        if mask.any() and int(labels[mask].max()) >= vocab:
            raise ValueError(f"A label id ({int(labels[mask].max())}) is outside the distilled vocabulary of {vocab}.")
        noise = None
        if settings.noise_std > 0:
            if noise_seed is None:
                raise ValueError("settings.noise_std > 0 needs a noise_seed (an int): the noise is drawn from it.")
            noise = (noise_seed, *(index[mask] for index in positions))
        teacher_labels = labels if teacher_labels is None else teacher_labels.reshape(-1)
        normalizer = loss_normalizer(mask.sum(), num_items_in_batch)
        # Boolean indexing keeps the autograd link: the gradient is scattered back to [B, T, D].
        student_rows = student_hidden.reshape(-1, student_hidden.size(-1))[mask]
        if dense_teacher is not None:
            teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.size(-1))[mask]
            if teacher_terms.ce_weight == 0:
                teacher_rows = teacher_rows.detach()
            teacher_weight = teacher_weight[:vocab].detach()
            teacher_bias = None if teacher_bias is None else teacher_bias[:vocab].detach()
        elif mixture is not None:
            teacher_rows = student_rows.new_zeros(student_rows.size(0), 0)  # the members hold their own
        else:
            targets, tail = sparse_teacher
            if targets.ids.size(0) != student_rows.size(0):
                raise ValueError(f"The sparse teacher has {targets.ids.size(0)} rows for {student_rows.size(0)} label "
                                 "tokens: it must hold one row per label token, in order.")
            sparse_teacher = (targets.to(student_hidden.device), tail)
            teacher_rows = student_rows.new_zeros(student_rows.size(0), 0)  # no teacher hidden states
        buffers = working_buffers(settings, student_transform, report_ce) + (mixture.buffers if mixture else 0)
        chunk_size = chunk_length(vocab, buffers, student_hidden.device, chunk_size, memory_budget_mb)
        plan = _ChunkPlan(teacher_weight, teacher_bias, labels[mask], teacher_labels[mask], normalizer, settings,
                          student_transform, teacher_transform, teacher_terms, chunk_size, noise, report_ce,
                          sparse_teacher, mixture)
        inputs = [student_rows, _rows(student_weight, vocab), _rows(student_bias, vocab), teacher_rows]
        if not torch.is_grad_enabled():
            # Evaluation: an autograd.Function's inputs still say they need gradients under no_grad, so detach them,
            # and the engine builds none (half its matrix products).
            inputs = [None if tensor is None else tensor.detach() for tensor in inputs]
        outputs = _FusedDistillationFunction.apply(*inputs, plan)
    return ChunkedDistillationOutput(*outputs)


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


def _rows(tensor: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """The first `count` rows of a head's weight or bias; the tensor itself when that is all of it, so that its
    gradient reaches the parameter directly (a slice's backward would build a second `[V, D]` tensor)."""
    if tensor is None or tensor.size(0) == count:
        return tensor
    return tensor[:count]


def _weight_and_bias(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, torch.nn.Module):
        return head.weight, getattr(head, "bias", None)
    weight, bias = head
    return weight, bias


def _maybe_gather(*params):
    """Under DeepSpeed ZeRO-3 the heads are partitioned; gather them while the engine reads them directly."""
    return maybe_gather_lm_head_ctx(*[p for p in params if isinstance(p, torch.nn.Parameter)])
