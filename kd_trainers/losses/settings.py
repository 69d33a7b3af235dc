"""The engine's settings and its memory budget: what a loss computes (`LossSettings`), each model's logit scale and
soft-capping (`LogitTransform`), and how long a chunk of tokens is (`chunk_length`): the largest whose `[n, V]` fp32
working buffers (`working_buffers` of them) fit the memory budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .divergences import divergence_params, get_divergence
from .reference import check_loss_settings


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
        self.check(**dataclasses.asdict(self))

    @classmethod
    def check(cls, names: Mapping[str, str] | None = None, **values) -> None:
        """The checks of `LossSettings(**values)`, each setting named as `names` maps it (a config checks its own
        fields with its own names before it builds the settings)."""
        values = {**{item.name: item.default for item in dataclasses.fields(cls)}, **values}
        other = dict(values["other_divergence_settings"])
        check_loss_settings(divergence=values["divergence"], temperature=values["temperature"],
                            noise_std=values["noise_std"], kd_weight=values["kd_weight"], names=names,
                            jsd_beta=values["jsd_beta"], skew_alpha=values["skew_alpha"], **other)
        if not 0 < values["teacher_temperature"] < float("inf"):
            raise ValueError(f"{(names or {}).get('teacher_temperature', 'teacher_temperature')} must be a finite "
                             f"number > 0, got {values['teacher_temperature']}.")

    def _divergence_settings(self) -> dict[str, float]:
        return {"jsd_beta": self.jsd_beta, "skew_alpha": self.skew_alpha, **dict(self.other_divergence_settings)}

    def divergence_params(self) -> dict[str, float]:
        """The settings the divergence reads (`jsd_beta` for `jsd`, nothing for `forward_kl`), as keywords."""
        return divergence_params(self.divergence, self._divergence_settings())


def uses_closed_form(settings: LossSettings) -> bool:
    return hasattr(get_divergence(settings.divergence), "value_and_grad")


def working_buffers(settings: LossSettings, student_transform: LogitTransform = LogitTransform(),
                    report_ce: bool = True) -> int:
    """How many fp32 `[n, V]` buffers one chunk works in: the two models' logits, then either the closed form's
    scratch (the student's log-probabilities, a CE gradient when w < 1 or T ≠ 1, the divergence's own, the softcap's
    derivative) or, for a divergence without one, a scratch buffer plus what autograd holds (`autograd_buffers`).
    The noise and the teacher-side CE use one of these buffers before the student's logits are made."""
    divergence = get_divergence(settings.divergence)
    if not uses_closed_form(settings):
        return 3 + divergence.autograd_buffers
    ce_gradient = settings.kd_weight < 1.0 or (settings.temperature != 1.0 and report_ce)
    softcap = student_transform.softcap is not None
    # both models' logits + the student's log-probabilities; the teacher's logits buffer is the divergence's first
    # scratch once the teacher's log-probabilities are made (into the student's logits buffer)
    return 3 + ce_gradient + (divergence.scratch_buffers - 1) + softcap
