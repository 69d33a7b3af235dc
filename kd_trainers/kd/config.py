"""`KDConfig`: the settings of vanilla logit knowledge distillation, on top of TRL's `SFTConfig`."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from ..runtime.guards import check_training_args
from ..losses.compiled import check_compile_mode
from ..losses.settings import LossSettings
from ..losses.divergences import DIVERGENCES, get_divergence
from ..runtime.checks import is_positive_integer
from ..teachers.cached import TeacherCacheFields
from ..teachers.mixture import SeveralTeachersFields
from ..teachers.needs import KIND_FIELDS, TeacherNeeds, stand_in
from ..teachers.served import TeacherServerFields


@dataclass
class DistillationConfig(SFTConfig):
    """The settings every distillation method shares: `SFTConfig`'s, the teacher model's and the loss's (each
    documented on `KDConfig`). A method's config subclasses it together with the field classes of the teacher kinds it
    can use (`kd_trainers.teachers`: a cache's, a server's, several teachers'), so that it has no field it would refuse.
    """


    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local path of the teacher, used when no teacher model is passed to the trainer."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when loading the teacher."},
    )
    teacher_adapter_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A PEFT (LoRA) adapter applied to the teacher and merged into it before distillation."},
    )
    divergence: str = field(
        default="forward_kl",
        metadata={"help": "Divergence between the student's and the teacher's distributions.",
                  "choices": sorted(DIVERGENCES)},
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "β of the generalised JSD, in (0, 1)."})
    skew_alpha: float = field(default=0.1, metadata={"help": "α of the skewed KL divergences, in [0, 1)."})
    divergence_params: dict[str, float] | None = field(
        default=None, metadata={"help": "Settings of a registered divergence beyond jsd_beta and skew_alpha, by name."})
    kd_temperature: float = field(
        default=1.0, metadata={"help": "Temperature dividing both models' logits in the KD term; > 0."}
    )
    kd_temperature_squared: bool = field(
        default=True, metadata={"help": "Multiply the KD term by the squared temperature (Hinton et al., 2015)."}
    )
    kd_weight: float = field(
        default=0.5, metadata={"help": "Weight w in loss = (1 - w) * CE + w * KD, in [0, 1]."}
    )
    teacher_logit_noise_std: float = field(
        default=0.0, metadata={"help": "Std of Gaussian noise added to the teacher's logits before the softmax; >= 0."}
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Label tokens per chunk of the fused loss; None sizes chunks from loss_memory_budget_mb."},
    )
    loss_memory_budget_mb: float | None = field(
        default=None,
        metadata={"help": "MiB for the fused loss's [chunk, vocab] working buffers; None: 96 on CPU, 512 on a GPU."},
    )
    loss_compile: str = field(
        default="auto",
        metadata={"help": "Run the fused loss's chunks compiled (torch.compile): auto (on CUDA), on, off."},
    )
    teacher_logit_noise_in_eval: bool = field(
        default=False,
        metadata={"help": "Add the teacher-logit noise to evaluation losses too (off: eval losses are noise-free)."},
    )

    def teacher_needs(self) -> TeacherNeeds:
        """What the method needs of its teacher (`kd_trainers.teachers.needs`): vanilla KD takes every kind."""
        return TeacherNeeds()

    def __post_init__(self):
        # Checked before the parent's set-up so that a typo fails at once, naming the field and the value.
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {self.divergence!r}.")
        self._check_divergence_params()
        # The loss's own checks, naming this config's fields (handed down: no message is renamed on its way back).
        LossSettings.check(self._loss_setting_names, **self._loss_setting_values())
        if self.loss_chunk_size is not None and not is_positive_integer(self.loss_chunk_size):
            raise ValueError(f"loss_chunk_size must be a positive integer or None, got {self.loss_chunk_size!r}.")
        budget = self.loss_memory_budget_mb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget < float("inf")):
            raise ValueError(f"loss_memory_budget_mb must be a finite number of MiB > 0 or None, got {budget!r}.")
        check_compile_mode(self.loss_compile)
        if budget is not None and self.loss_chunk_size is not None:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size} and loss_memory_budget_mb={budget} both size "
                             "the loss's chunks: set one of them.")
        self.teacher_needs().check_config(self)  # a teacher kind the method cannot use: refused first
        self._check_teacher_sources()
        self._refuse_sft_only_losses()
        with warnings.catch_warnings():
            # transformers 5 renamed gradient checkpointing, and TRL's configs still set it by its old name: a notice
            # about TRL's default, not about anything the user wrote.
            warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
            super().__post_init__()
        check_training_args(self)  # settings that would train nothing are refused here, before any model loads

    # LossSettings' names -> this config's fields, for the loss's checks to name.
    _loss_setting_names = {"temperature": "kd_temperature", "noise_std": "teacher_logit_noise_std"}

    def loss_settings(self) -> LossSettings:
        """The `LossSettings` the trainer's loss runs with: every loss field of this config, and nothing else."""
        return LossSettings(**self._loss_setting_values())

    def _loss_setting_values(self) -> dict:
        """`LossSettings` keyword arguments from this config's fields; a subclass maps its own fields here."""
        return dict(divergence=self.divergence, temperature=self.kd_temperature, jsd_beta=self.jsd_beta,
                    skew_alpha=self.skew_alpha, noise_std=self.teacher_logit_noise_std, kd_weight=self.kd_weight,
                    temperature_squared=self.kd_temperature_squared,
                    other_divergence_settings=tuple(sorted((self.divergence_params or {}).items())))

    def _check_divergence_params(self) -> None:
        """`divergence_params` names only settings the chosen divergence reads, and not the ones with fields here;
        their values are checked by the divergence's own checks (in `loss_settings`)."""
        params = self.divergence_params
        if params is None:
            return
        if not isinstance(params, dict) or not all(isinstance(name, str) for name in params) or not all(
                isinstance(value, (int, float)) and not isinstance(value, bool) for value in params.values()):
            raise ValueError(f"divergence_params must map setting names to numbers, got {params!r}.")
        fielded = sorted(set(params) & {"jsd_beta", "skew_alpha"})
        if fielded:
            raise ValueError(f"divergence_params has {fielded}, which are fields of the config: set "
                             f"{', '.join(f'{name}=...' for name in fielded)} instead.")
        reads = get_divergence(self.divergence).params
        unread = sorted(set(params) - set(reads))
        if unread:
            raise ValueError(f"divergence_params has {unread}, which divergence={self.divergence!r} does not read (it "
                             f"reads {list(reads) or 'none'}): remove them, or choose the divergence that reads them.")

    def _check_positive_integers(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not is_positive_integer(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    def _check_teacher_sources(self) -> None:
        """The settings of the teacher kinds this config has fields for (a cache's, a server's): none here."""

    def refuse_teacher_kinds(self, **given) -> None:
        """A teacher kind this config has no field for, given by its field's name (`teacher_cache=...`, an `InitVar`
        of a method that cannot use it), refused with the method's reason (`teacher_needs`)."""
        kinds = {field_name: kind for kind, field_name in KIND_FIELDS.items()}
        for name, value in given.items():
            if value is not None:
                self.teacher_needs().check(kinds[name], value)

    def holds_teacher_while_training(self) -> bool:
        """Whether a teacher model sits beside the student while training (not with a teacher cache or server)."""
        return stand_in(self) is None

    def _refuse_sft_only_losses(self) -> None:
        """SFTConfig's own cross-entropy variants apply at `kd_weight=0` (the trainer is then SFTTrainer); the fused KD
        loss has plain cross-entropy only, so beside a KD term they are refused rather than silently dropped."""
        if self.kd_weight == 0:
            return
        if getattr(self, "loss_type", "nll") != "nll":
            raise ValueError(
                f"loss_type={self.loss_type!r} changes SFT's cross-entropy, which the distillation loss "
                f"(kd_weight={self.kd_weight}) does not implement: its CE term is the plain negative log-likelihood. "
                "Set loss_type='nll', or kd_weight=0 for plain SFT with it."
            )
        if getattr(self, "label_smoothing_factor", 0) > 0:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} smooths SFT's cross-entropy, which the "
                f"distillation loss (kd_weight={self.kd_weight}) does not implement (the teacher's distribution is "
                "already a soft target). Set label_smoothing_factor=0, or kd_weight=0 for plain SFT with it."
            )

    @classmethod
    def from_sft_config(cls, args: SFTConfig, **overrides) -> "DistillationConfig":
        """This config with every field of an existing `SFTConfig` (the drop-in path) and the KD defaults."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        return cls(**{**values, **overrides})


@dataclass
class KDConfig(TeacherCacheFields, TeacherServerFields, SeveralTeachersFields, DistillationConfig):
    r"""
    Configuration class for [`KDTrainer`]: every field of `trl.SFTConfig`, plus the knowledge-distillation settings
    below. The loss is `(1 − kd_weight)·CE + kd_weight·KD`, with CE the student's cross-entropy on the labels and KD
    the divergence between the student's and the teacher's next-token distributions at temperature `kd_temperature`
    (see `kd_trainers.losses.distillation_loss` for the exact formula).

    > Parameters that control the teacher

    teacher_model_name_or_path (`str`, *optional*, defaults to `None`):
        Hub id or local path of the teacher, used when no `teacher_model` is passed to the trainer.
    teacher_model_init_kwargs (`dict[str, Any]`, *optional*, defaults to `None`):
        Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the teacher is loaded from a name or path
        (for example `{"dtype": "bfloat16"}`).
    teacher_adapter_name_or_path (`str`, *optional*, defaults to `None`):
        A PEFT (LoRA) adapter applied to the teacher and merged into it before distillation, for example the output of
        a LoRA SFT run of the teacher.

    teacher_cache (`str`, *optional*, defaults to `None`):
        A folder holding the teacher's sparse distribution at every label token of the training (and evaluation)
        data, read in place of a teacher in memory. When it holds no complete cache yet, the teacher (which must then
        be given) writes it there first, over the trainer's own tokenized data, and is released before training; a
        cache of other data, tokenizer or settings is refused, naming what differs. Several runs (a temperature or
        noise sweep, students of one tokenizer) can share one. Not for DSKD (it needs the teacher's hidden states) nor
        on-policy GKD.
    teacher_cache_mode (`str`, *optional*, defaults to `"top_k"`):
        What the cache stores per token: `top_k` (the k most probable ids, their log-probabilities and the tail's
        mass) or `sampled` (k ids drawn from the teacher, an unbiased target for `forward_kl` only).
    teacher_cache_k (`int`, *optional*, defaults to `32`):
        Ids stored per label token (top-k, or draws). At 32 a token takes at most 130 bytes on disk before zstd.
    teacher_cache_tail (`str`, *optional*, defaults to `"bucket"`):
        What a `top_k` target's tail is to the loss: `bucket` (one category against the student's remaining mass) or
        `spread` (evenly over the other tokens). See `kd_trainers.losses.sparse`.
    teacher_cache_batch_size (`int`, *optional*, defaults to `8`):
        Rows per teacher forward in the pass that writes the cache.
    teacher_cache_temperatures (`list[float]`, *optional*, defaults to `None`):
        Temperatures, besides 1 and `kd_temperature`, at which a `top_k` cache stores the tail's mass (2 bytes a token
        each), so that runs at those temperatures (a temperature sweep) read the same cache. At a stored temperature
        the tempered target is exact (the tempered teacher coarsened to k + 1 categories); a run at a temperature the
        cache does not store is refused, naming the stored ones.

    teacher_url (`str`, *optional*, defaults to `None`):
        The base URL (`http://HOST:PORT/v1`) of a teacher behind a vLLM-compatible completions server (vLLM, or
        `kd-serve-teacher`), asked for the top-k log-probabilities of every training (and evaluation) sequence, as
        token ids, in place of a teacher in memory. Its tokenizer (`teacher_processing_class`, else the one of
        `teacher_model_name_or_path`, else of the served model's name) must be the student's. Not for DSKD, GKD or
        Seq-KD. An API key is read from the `KD_TRAINERS_TEACHER_API_KEY` environment variable.
    teacher_server_k (`int`, *optional*, defaults to `20`):
        Top-k ids asked per position (vLLM serves up to its `--max-logprobs`, 20 unless raised).
    teacher_server_tail (`str`, *optional*, defaults to `"bucket"`):
        What the served target's tail is to the loss: `bucket` or `spread`, as `teacher_cache_tail`.
    teacher_server_batch_size (`int`, *optional*, defaults to `8`):
        Sequences per request.
    teacher_server_concurrency (`int`, *optional*, defaults to `4`):
        Requests in flight at once.
    teacher_server_timeout (`float`, *optional*, defaults to `60.0`):
        Seconds to wait for one answer before asking again.
    teacher_server_approximate_temperature (`bool`, *optional*, defaults to `False`):
        A server returns the teacher's log-probabilities at temperature 1 only (vLLM's prompt log-probabilities are
        raw), so at `kd_temperature` ≠ 1 the tempered tail can only be guessed (its V − k tokens read as equally
        likely), an approximation measured in the README ("Real models"). Refused unless this is set.
    teacher_server_max_wait (`float`, *optional*, defaults to `120.0`):
        Seconds a request may take with its retries (backoff from 0.25 s, doubling to 8 s) before the run stops with
        an error naming the URL (and, in a single process, a checkpoint of the last completed step to resume from).
    teacher_column (`str`, *optional*, defaults to `None`):
        With several teachers (`KDTrainer(teacher_models=[...])`, a recipe's `teachers:`), the dataset column whose
        value (a teacher's name, or its index) says which one teacher each example is distilled from; without it
        the teachers are mixed per token by their weights.
    teacher_server_prefetch (`bool`, *optional*, defaults to `True`):
        Send a batch's requests when the batch is built, before the step that uses it, so that the server answers
        while the student computes the step before. Off: each batch waits for its answers when it is built.

    > Parameters that control the distillation loss

    divergence (`str`, *optional*, defaults to `"forward_kl"`):
        One of `forward_kl` (KL(p_T ‖ p_S)), `reverse_kl` (KL(p_S ‖ p_T)), `jsd` (generalised JSD with `jsd_beta`),
        `skew_forward_kl`, `skew_reverse_kl` (with `skew_alpha`) and `tvd` (total variation).
    jsd_beta (`float`, *optional*, defaults to `0.5`):
        β of the generalised JSD, mixture m = β·p_T + (1 − β)·p_S; in (0, 1).
    skew_alpha (`float`, *optional*, defaults to `0.1`):
        α of the skewed KLs (DistiLLM), in [0, 1).
    divergence_params (`dict[str, float]`, *optional*, defaults to `None`):
        The settings of a registered divergence beyond `jsd_beta` and `skew_alpha`, by name: `{"gamma": 2.0}` for
        a divergence registered with `*, gamma` (`kd_trainers.losses.register_divergence`). Each is checked by the
        divergence's own `checks`; a name the chosen divergence does not read is refused.
    kd_temperature (`float`, *optional*, defaults to `1.0`):
        Temperature dividing both models' logits in the KD term. The CE term always uses temperature 1.
    kd_temperature_squared (`bool`, *optional*, defaults to `True`):
        Multiply the KD term by `kd_temperature²` (Hinton et al., 2015), which keeps its gradient magnitude
        independent of the temperature. Set to `False` for the unscaled KD term of the DSKD and TRL GKD codebases.
    kd_weight (`float`, *optional*, defaults to `0.5`):
        w in `loss = (1 − w)·CE + w·KD`, in [0, 1]. `1.0` is pure distillation, `0.0` plain SFT.
    teacher_logit_noise_std (`float`, *optional*, defaults to `0.0`):
        Standard deviation σ of Gaussian noise added to the teacher's logits before the softmax (the noisy-teacher
        experiments). The noise at each token is drawn from `seed`, the global step, the micro-batch, the process and
        the token's position in the batch, so a run resumed from a checkpoint, with any `loss_chunk_size`, sees the
        same noise. Evaluation losses are noise-free unless `teacher_logit_noise_in_eval`.
    loss_chunk_size (`int`, *optional*, defaults to `None`):
        Number of label tokens per chunk of the fused loss, when set. `None` sizes the chunks from
        `loss_memory_budget_mb` instead. The loss and its gradients do not depend on it.
    loss_memory_budget_mb (`float`, *optional*, defaults to `None`):
        Memory (MiB) for the fused loss's working buffers: the chunk is the longest whose `[chunk, vocab]` fp32
        buffers (3 to 5 of them, by settings) fit in it, so the loss's memory stays flat as the vocabulary and the
        batch grow. `None` is 96 MiB on CPU (64 tokens a chunk at a 131k vocabulary for on-policy GKD, 48 for KD
        with a CE term) and 512 MiB on a GPU, where longer chunks amortise re-reading both output heads. Larger is
        faster on long batches (every chunk re-reads the heads). Set only one of `loss_chunk_size` and
        `loss_memory_budget_mb`.
    loss_compile (`str`, *optional*, defaults to `"auto"`):
        Run each chunk of the fused loss compiled with `torch.compile` (`kd_trainers.losses.compiled`): the softmaxes,
        the divergence and its gradient fused into a few passes over the `[chunk, vocab]` block. `"auto"` compiles
        on CUDA only (on CPU it measured no faster: `benchmarks/README.md`); `"on"` everywhere, `"off"` never. The
        first step pays the compile (seconds); a compiler that fails is said once and the loss runs eagerly. The
        values and gradients are the eager engine's to fp32 rounding (`tests/test_compiled_loss.py`). ULD's and
        MinED's aligned losses have no compiled path and say so once when it is asked for.
    teacher_logit_noise_in_eval (`bool`, *optional*, defaults to `False`):
        Also add the teacher-logit noise to evaluation losses. Off, evaluation measures the clean objective.

    > SFT settings

    Every `SFTConfig` field works as in `SFTTrainer`; at `kd_weight=0` this trainer *is* `SFTTrainer` (its own
    `compute_loss`: DFT, label smoothing, the MoE router loss all apply). With `kd_weight > 0` the CE term is plain
    cross-entropy, so `loss_type='dft'` and `label_smoothing_factor > 0` are refused; an MoE student's router loss is
    added exactly as `SFTTrainer` adds it.

    Example:

        >>> from kd_trainers import KDConfig
        >>> args = KDConfig(output_dir="kd-student", divergence="reverse_kl", kd_temperature=2.0, kd_weight=0.5,
        ...                 bf16=False)
        >>> settings = args.loss_settings()   # what the loss runs with
        >>> settings.divergence, settings.temperature, settings.kd_weight, settings.temperature_squared
        ('reverse_kl', 2.0, 0.5, True)
        >>> KDConfig(output_dir="kd-student", kd_weight=1.5, bf16=False)
        Traceback (most recent call last):
        ...
        ValueError: kd_weight must be in [0, 1], got 1.5.
    """

    def _check_teacher_sources(self) -> None:
        self._check_teacher_cache_settings()
        self._check_teacher_server_settings()
