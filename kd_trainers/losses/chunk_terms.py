"""One chunk's loss terms and their gradient with respect to the student's logits `[n, V]`: through a divergence's
closed form when it has one (`closed_form_value_and_grad`, no autograd graph), else through autograd over this chunk
only (`autograd_value_and_grad`); and the teacher side's cross-entropy of DSKD (`teacher_ce_value_and_grad`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .divergences import get_divergence
from .settings import LogitTransform, LossSettings
from .sparse import SparseTargets, sparse_forward_kl_value_and_grad


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


def chunk_total(raw_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, settings: LossSettings,
                student_transform: LogitTransform, kd_token_weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`(total, (ce_sum, kd_sum))` of one chunk from the student's raw logits, total = (1 − w)·ce + w·kd: what the
    autograd path differentiates here, and the compiled path (`compiled.py`) under `torch.func`."""
    ce, kd = chunk_loss_sums(student_transform(raw_logits), teacher_logits, labels, settings, kd_token_weights)
    return (1.0 - settings.kd_weight) * ce + settings.kd_weight * kd, (ce, kd)


def autograd_value_and_grad(raw_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                            settings: LossSettings, student_transform: LogitTransform,
                            kd_token_weights: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(ce_sum, kd_sum, d total / d raw_logits [n, V])` of one chunk by autograd (`chunk_total`).

    The general path: any divergence, any student logit transform. Logits `[n, V]` fp32.
    """
    raw_logits = raw_logits.detach().requires_grad_(True)
    with torch.enable_grad():
        total, (ce, kd) = chunk_total(raw_logits, teacher_logits, labels, settings, student_transform,
                                      kd_token_weights)
        (grad,) = torch.autograd.grad(total, raw_logits)
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


def teacher_ce_value_and_grad(raw_logits: torch.Tensor, labels: torch.Tensor, transform: LogitTransform,
                              out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Σ CE(transform(raw_logits), labels), d/d raw_logits)` for the teacher side of DSKD (the t2s cross-entropy,
    which trains the projectors). Logits `[n, V]` fp32 are left intact; the gradient is written into `out`. A row
    whose label is negative (the ignore index: a position without a t2s target, as under exact token alignment)
    adds nothing and gets a zero gradient."""
    valid = labels >= 0
    if transform != LogitTransform():
        logits = raw_logits.detach().requires_grad_(True)
        with torch.enable_grad():
            ce = F.cross_entropy(transform(logits)[valid], labels[valid], reduction="sum")
            (grad,) = torch.autograd.grad(ce, logits)
        return ce.detach(), out.copy_(grad)
    rows = torch.arange(labels.numel(), device=labels.device)
    targets = labels.clamp_min(0)
    log_probs = torch.log_softmax(raw_logits, -1, out=out)
    ce = -log_probs[rows, targets][valid].sum()
    grad = log_probs.exp_()
    grad[rows, targets] -= valid.to(grad.dtype)
    if not bool(valid.all()):
        grad[~valid] = 0.0
    return ce, grad
