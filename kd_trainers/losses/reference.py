"""The readable reference: the distillation loss from full logits.

This is the definition every faster path is tested against. It holds both models' logits `[B, T, V]` at once, so the
trainers use the chunked engine (`chunked.py`) instead; use this one to read, to test, or for small vocabularies.

The loss, for student logits z_S, teacher logits z_T, temperature T, KD weight w and noise σ:

    z_T' = z_T + σ·ε,  ε ~ N(0, 1)                 (teacher-logit noise, keyed to (noise_seed, position))
    ce   = Σ_i −log softmax(z_S,i)[y_i] / N        (hard-label cross-entropy at temperature 1)
    kd   = s · Σ_i D(softmax(z_S,i / T), softmax(z_T',i / T)) / N
    loss = (1 − w)·ce + w·kd

where the sums run over the positions whose label is not `ignore_index`, N is `num_items_in_batch` when given (the
number of label tokens in the whole accumulated batch, which keeps gradient accumulation exact) and otherwise the
number of label tokens here (either clamped to at least 1, so that an all-masked batch gives 0, not NaN); s = T² when
`temperature_squared=True` (Hinton et al., 2015: it keeps the soft-target gradients at the same magnitude as T changes),
else 1 (the DSKD and GKD codebases use s = 1).
"""

from __future__ import annotations

from collections.abc import Mapping

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .divergences import check_divergence_params, divergence_params, get_divergence
from .noise import grid_positions, position_noise_


class DistillationLoss(NamedTuple):
    """`loss = (1 − kd_weight)·ce_loss + kd_weight·kd_loss`. `ce_loss` and `kd_loss` are detached, for logging."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    kd_loss: torch.Tensor


def check_loss_settings(*, divergence: str, temperature: float, noise_std: float, kd_weight: float,
                        names: Mapping[str, str] | None = None, **divergence_settings: float) -> None:
    """Fail fast, naming the setting and the value, on settings that would give a meaningless loss.

    `divergence_settings` (`jsd_beta`, `skew_alpha`, ...) are checked only when `divergence` reads them: a β that the
    loss never reads cannot make it meaningless. `names`: how the caller names a setting in its messages (a config's
    field names: `{"temperature": "kd_temperature"}`), handed down so that no message is renamed on its way back.
    """
    name = (names or {}).get
    get_divergence(divergence)
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"{name('temperature', 'temperature')} must be a finite number > 0, got {temperature}.")
    check_divergence_params(divergence, divergence_params(divergence, divergence_settings), names)
    if not 0 <= noise_std < float("inf"):
        raise ValueError(f"{name('noise_std', 'noise_std')} must be a finite number >= 0, got {noise_std}.")
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"{name('kd_weight', 'kd_weight')} must be in [0, 1], got {kd_weight}.")


def loss_normalizer(num_label_tokens: torch.Tensor, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    """The N the summed losses are divided by: `num_items_in_batch` if given, else the local count; clamped to >= 1
    either way, so that a batch (or an accumulated batch) without label tokens gives a finite 0, as in SFTTrainer."""
    count = num_label_tokens if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    return count.to(num_label_tokens.device, torch.float32).clamp(min=1)


def add_teacher_noise(teacher_logits: torch.Tensor, labels: torch.Tensor, noise_std: float,
                      noise_seed: int | None) -> torch.Tensor:
    """z_T + σ·ε in fp32, ε at each position of `labels` (`[B, T]` or `[N]`) drawn from `(noise_seed, b, t)` alone
    (`noise.position_noise_`). Logits `[B·T, V]`."""
    if noise_std == 0:
        return teacher_logits
    if noise_seed is None:
        raise ValueError("noise_std > 0 needs a noise_seed (an int): the noise is drawn from it, per position.")
    rows, columns = grid_positions(labels)
    noise = position_noise_(torch.empty(teacher_logits.shape, dtype=torch.float32, device=teacher_logits.device),
                            noise_seed, rows, columns)
    return teacher_logits.float() + noise_std * noise


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    noise_std: float = 0.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    kd_weight: float = 1.0,
    temperature_squared: bool = True,
    noise_seed: int | None = None,
    **other_divergence_settings: float,
) -> DistillationLoss:
    """Distillation loss from full logits (see the module docstring for the formula).

    Args:
        student_logits: `[B, T, V]` (or `[N, V]`), any float dtype; computed in fp32.
        teacher_logits: `[B, T, V]` (or `[N, V]`), same shape; no gradient flows into it.
        labels: `[B, T]` (or `[N]`) next-token ids *aligned with the logits* (already shifted: the logits at position
            i predict `labels[i]`); positions equal to `ignore_index` are left out.
        divergence: a name in `kd_trainers.losses.DIVERGENCES`.
        temperature: T, dividing both models' logits in the KD term.
        jsd_beta: β of `jsd`, in (0, 1).
        skew_alpha: α of the skewed KLs, in [0, 1).
        noise_std: σ of the Gaussian noise added to the teacher's logits before the softmax.
        num_items_in_batch: global number of label tokens of the accumulated batch (see the module docstring).
        kd_weight: w in `(1 − w)·ce + w·kd`.
        temperature_squared: multiply the KD term by T².
        noise_seed: seed of the noise; the row at position (b, t) depends on `(noise_seed, b, t)` alone.
        other_divergence_settings: the settings of a registered divergence other than `jsd_beta` and `skew_alpha`.

    Example:

        >>> import torch
        >>> from kd_trainers.losses import distillation_loss
        >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])   # [N=2, V=3]
        >>> out = distillation_loss(logits, logits, torch.tensor([0, 1]), temperature=2.0, kd_weight=0.5)
        >>> round(float(out.kd_loss), 6)   # the student is the teacher: nothing to distil
        0.0
        >>> bool(torch.isclose(out.loss, 0.5 * out.ce_loss))   # (1 - w)·ce + w·kd
        True
    """
    divergence_settings = {"jsd_beta": jsd_beta, "skew_alpha": skew_alpha, **other_divergence_settings}
    check_loss_settings(divergence=divergence, temperature=temperature, noise_std=noise_std, kd_weight=kd_weight,
                        **divergence_settings)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have "
            "the same shape; slice both to the shared vocabulary first."
        )
    vocab = student_logits.size(-1)
    student_logits = student_logits.reshape(-1, vocab).float()
    teacher_logits = add_teacher_noise(teacher_logits.reshape(-1, vocab).detach().float(), labels, noise_std,
                                       noise_seed)
    labels = labels.reshape(-1)
    mask = labels != ignore_index

    ce_per_token = F.cross_entropy(student_logits, labels.masked_fill(~mask, 0), reduction="none")
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    params = divergence_params(divergence, divergence_settings)
    kd_per_token = get_divergence(divergence)(student_log_probs, teacher_log_probs, **params)
    scale = temperature**2 if temperature_squared else 1.0

    normalizer = loss_normalizer(mask.sum(), num_items_in_batch)
    # `where` rather than multiply-by-mask: a masked row's value must not leak NaN or inf into the sum.
    ce = torch.where(mask, ce_per_token, 0.0).sum() / normalizer
    kd = scale * torch.where(mask, kd_per_token, 0.0).sum() / normalizer
    loss = (1.0 - kd_weight) * ce + kd_weight * kd
    return DistillationLoss(loss, ce.detach(), kd.detach())
