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
incoming gradient in the backward, so peak memory grows with the chunk, not with the sequence. Positions whose label
is `ignore_index` are dropped before projecting, so prompts and padding cost nothing.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .divergences import get_divergence
from .reference import DistillationLoss, check_loss_settings, loss_normalizer

# Default chunk: the largest number of tokens whose fp32 logits [chunk, V] fit in this many elements (128 MiB).
DEFAULT_CHUNK_ELEMENTS = 2**25


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
            scale = 1.0 / config.logits_scaling
        return cls(scale=1.0 if scale is None else float(scale), softcap=getattr(config, "final_logit_softcapping", None))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
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

    def __post_init__(self):
        check_loss_settings(divergence=self.divergence, temperature=self.temperature, jsd_beta=self.jsd_beta,
                            skew_alpha=self.skew_alpha, noise_std=self.noise_std, kd_weight=self.kd_weight)


def chunk_loss_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    settings: LossSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and summed (scaled) KD of one chunk, differentiable. Logits `[n, V]` fp32, labels `[n]`, all valid."""
    temperature = settings.temperature
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if temperature == 1.0:
        ce = -student_log_probs.gather(-1, labels[:, None]).sum()
    else:
        ce = (torch.logsumexp(student_logits, dim=-1) - student_logits.gather(-1, labels[:, None])[:, 0]).sum()
    kd = get_divergence(settings.divergence)(student_log_probs, teacher_log_probs, jsd_beta=settings.jsd_beta,
                                             skew_alpha=settings.skew_alpha).sum()
    if settings.temperature_squared:
        kd = kd * temperature**2
    return ce, kd


def chunk_value_and_grad(raw_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                         settings: LossSettings, student_transform: "LogitTransform"
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(ce_sum, kd_sum, d total / d raw_logits [n, V])` for one chunk, total = (1 − w)·ce + w·kd.

    Uses the divergence's closed-form gradient when it has one and the student's logits are not transformed;
    otherwise autograd over this chunk alone.
    """
    divergence = get_divergence(settings.divergence)
    closed_form = getattr(divergence, "value_and_grad", None)
    if closed_form is None or student_transform != LogitTransform():
        raw_logits = raw_logits.detach().requires_grad_(True)
        with torch.enable_grad():
            ce, kd = chunk_loss_sums(student_transform(raw_logits), teacher_logits, labels, settings)
            (grad,) = torch.autograd.grad((1.0 - settings.kd_weight) * ce + settings.kd_weight * kd, raw_logits)
        return ce.detach(), kd.detach(), grad

    temperature, weight = settings.temperature, settings.kd_weight
    scale = temperature**2 if settings.temperature_squared else 1.0
    student_log_probs = F.log_softmax(raw_logits / temperature if temperature != 1.0 else raw_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature if temperature != 1.0 else teacher_logits, dim=-1)
    # CE = Σ logsumexp(z) − z_y; its gradient is softmax(z) − onehot(y).
    if temperature == 1.0:
        label_log_probs = student_log_probs.gather(-1, labels[:, None])
        ce_probs = student_log_probs.exp() if weight < 1.0 else None
    else:
        log_normalizer = torch.logsumexp(raw_logits, dim=-1, keepdim=True)
        label_log_probs = raw_logits.gather(-1, labels[:, None]) - log_normalizer
        ce_probs = (raw_logits - log_normalizer).exp_() if weight < 1.0 else None
    ce = -label_log_probs.sum()
    values, grad = closed_form(student_log_probs, teacher_log_probs, jsd_beta=settings.jsd_beta,
                               skew_alpha=settings.skew_alpha)
    kd = values.sum() * scale
    grad.mul_(weight * scale / temperature)  # chain rule through u = z / T
    if ce_probs is not None:
        grad.add_(ce_probs, alpha=1.0 - weight)
        grad.scatter_add_(-1, labels[:, None], torch.full_like(label_log_probs, -(1.0 - weight)))
    return ce, kd, grad


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.float()


class _FusedDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                labels, normalizer, settings, transforms, chunk_size, generator):
        student_transform, teacher_transform = transforms
        num_tokens = student_hidden.size(0)
        want_weight_grad = student_weight.requires_grad
        grad_hidden = torch.zeros_like(student_hidden)
        # Accumulated in fp32 across chunks whatever the model dtype, then cast once.
        grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=student_weight.device) \
            if want_weight_grad else None
        grad_bias = torch.zeros(student_bias.shape, dtype=torch.float32, device=student_bias.device) \
            if student_bias is not None and student_bias.requires_grad else None
        ce_sum = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        kd_sum = torch.zeros_like(ce_sum)
        num_correct = torch.zeros((), dtype=torch.long, device=student_hidden.device)

        for start in range(0, num_tokens, chunk_size):
            chunk = slice(start, min(start + chunk_size, num_tokens))
            hidden = student_hidden[chunk]
            chunk_labels = labels[chunk]
            teacher_logits = teacher_transform(_project(teacher_hidden[chunk], teacher_weight, teacher_bias))
            if settings.noise_std > 0:
                noise = torch.randn(teacher_logits.shape, generator=generator, device=teacher_logits.device,
                                    dtype=torch.float32)
                teacher_logits = teacher_logits + settings.noise_std * noise
            raw_logits = _project(hidden, student_weight, student_bias)
            # Before the loss: the closed-form paths may overwrite buffers derived from the logits.
            num_correct += (raw_logits.argmax(-1) == chunk_labels).sum()
            ce, kd, grad_logits = chunk_value_and_grad(raw_logits, teacher_logits, chunk_labels, settings,
                                                       student_transform)
            ce_sum += ce
            kd_sum += kd

            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[chunk] = grad_logits @ student_weight
            if grad_weight is not None:
                grad_weight.add_((grad_logits.T @ hidden).float())
            if grad_bias is not None:
                grad_bias.add_(grad_logits.float().sum(0))

        inverse = 1.0 / normalizer
        ctx.save_for_backward(
            grad_hidden * inverse.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * inverse).to(student_weight.dtype),
            None if grad_bias is None else (grad_bias * inverse).to(student_bias.dtype),
        )
        ce_mean, kd_mean = ce_sum * inverse, kd_sum * inverse
        loss = (1.0 - settings.kd_weight) * ce_mean + settings.kd_weight * kd_mean
        ctx.mark_non_differentiable(ce_mean, kd_mean, num_correct)
        return loss, ce_mean, kd_mean, num_correct

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss

        def scaled(grad):
            return None if grad is None else grad * scale.to(grad.dtype)

        return (scaled(grad_hidden), scaled(grad_weight), scaled(grad_bias),
                None, None, None, None, None, None, None, None, None)


def chunked_distillation_loss(
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
    student_transform: LogitTransform = LogitTransform(),
    teacher_transform: LogitTransform = LogitTransform(),
    generator: torch.Generator | None = None,
) -> tuple[DistillationLoss, torch.Tensor]:
    """The loss of `reference.distillation_loss`, from hidden states and output heads, in token chunks.

    Args:
        student_hidden: `[B, T, D_S]` or `[N, D_S]` student last hidden states (after the final norm).
        student_lm_head: the student's output layer (`nn.Linear`, weight `[V_S, D_S]`) or a `(weight, bias)` pair.
        teacher_hidden: `[B, T, D_T]` or `[N, D_T]`; D_T may differ from D_S. Detached here.
        teacher_lm_head: the teacher's output layer, weight `[V_T, D_T]`.
        labels: `[B, T]` or `[N]` next-token ids aligned with the hidden states (already shifted).
        settings: divergence, temperature, noise, KD weight (see `LossSettings`).
        num_items_in_batch: global label-token count of the accumulated batch, as in the reference.
        vocab_size: use only the first `vocab_size` rows of both heads (the shared vocabulary when one head is padded,
            e.g. Qwen2.5-0.5B's 151,936 rows against Qwen2.5-7B's 152,064). Defaults to the smaller head.
        chunk_size: tokens per chunk; default: as many as keep one `[chunk, V]` fp32 tensor within 128 MiB.
        student_transform / teacher_transform: logit scale and soft-capping of each model.
        generator: RNG of the teacher-logit noise. Noise is drawn chunk by chunk in token order, `[n, V]` at a time.

    Returns:
        `(DistillationLoss(loss, ce_loss, kd_loss), num_correct)`, where `num_correct` counts label tokens whose
        student argmax is right (for the token-accuracy metric).
    """
    student_weight, student_bias = _weight_and_bias(student_lm_head)
    teacher_weight, teacher_bias = _weight_and_bias(teacher_lm_head)
    with _maybe_gather(student_weight, student_bias, teacher_weight, teacher_bias):
        vocab = min(student_weight.size(0), teacher_weight.size(0)) if vocab_size is None else vocab_size
        if vocab > min(student_weight.size(0), teacher_weight.size(0)):
            raise ValueError(f"vocab_size={vocab} exceeds an output head ({student_weight.size(0)} student rows, "
                             f"{teacher_weight.size(0)} teacher rows).")
        labels = labels.reshape(-1)
        mask = labels != ignore_index
        if mask.any() and int(labels[mask].max()) >= vocab:
            raise ValueError(f"A label id ({int(labels[mask].max())}) is outside the distilled vocabulary of {vocab}.")
        normalizer = loss_normalizer(mask.sum(), num_items_in_batch)
        # Boolean indexing keeps the autograd link: the gradient is scattered back to [B, T, D_S].
        student_rows = student_hidden.reshape(-1, student_hidden.size(-1))[mask]
        teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.size(-1))[mask].detach()
        if chunk_size is None:
            chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
        loss, ce, kd, num_correct = _FusedDistillationFunction.apply(
            student_rows, student_weight[:vocab], None if student_bias is None else student_bias[:vocab],
            teacher_rows, teacher_weight[:vocab].detach(),
            None if teacher_bias is None else teacher_bias[:vocab].detach(),
            labels[mask], normalizer, settings, (student_transform, teacher_transform), chunk_size, generator,
        )
    return DistillationLoss(loss, ce, kd), num_correct


def _weight_and_bias(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, torch.nn.Module):
        return head.weight, getattr(head, "bias", None)
    weight, bias = head
    return weight, bias


def _maybe_gather(*params):
    """Under DeepSpeed ZeRO-3 the heads are partitioned; gather them while the engine reads them directly."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:  # pragma: no cover - trl is a hard dependency
        return nullcontext()
    return maybe_gather_lm_head_ctx(*[p for p in params if isinstance(p, torch.nn.Parameter)])
