"""`ULDConfig`: universal logit distillation across tokenizers, on top of the settings every method shares."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kd.config import DistillationConfig
from ..kd.two_tokenizers import TwoTokenizerFields
from ..losses.aligned import MERGES, AlignedSettings
from ..teachers.cached import TeacherCacheFields
from ..teachers.needs import TeacherNeeds, stand_in
from ..teachers.served import TeacherServerFields


@dataclass
class ULDConfig(TwoTokenizerFields, TeacherCacheFields, TeacherServerFields, DistillationConfig):
    r"""
    Configuration class for [`ULDTrainer`]: the settings every distillation method shares (`kd_weight`,
    `kd_temperature`, `teacher_logit_noise_std`, the loss's chunking, the teacher model) plus those below. The
    `divergence` fields are not read (ULD compares sorted probability vectors) and are refused when set.

    loss = [(1 − w)·CE + w·s·Σ_g ULD(q_S(g), q_T(g))] / N: CE on the student's own labels, ULD per aligned group g
    of the two tokenizations, `q(g)` a side's merged distribution at temperature T over the group's tokens, s = T²
    when `kd_temperature_squared`, N the student label tokens (see `kd_trainers.losses.aligned`).

    > Parameters that control ULD

    teacher_tokenizer_name_or_path (`str`, *optional*, defaults to `None`):
        The teacher's tokenizer, when no `teacher_processing_class` is given; defaults to the teacher's name or path.
    uld_merge (`str`, *optional*, defaults to `"observed"`):
        How a group of several tokens on one side becomes one distribution (GOLD's `uld_token_merge_strategy`):
        `"observed"`, the first token's distribution times the probabilities of the group's later tokens;
        `"bayesian"`, the last token's distribution times those of the earlier ones.
    max_prompt_length (`int`, *optional*, defaults to `None`):
        Prompt tokens kept (from the right) on each side; `None` keeps the whole prompt.
    lmbda, max_completion_length, temperature, top_p:
        The on-policy option across tokenizers (off by default), documented on `TwoTokenizerFields`.
    kd_temperature_squared (`bool`, *optional*, defaults to `False`):
        Multiply the ULD term by T² (off, as in ULD and GOLD).

    > A teacher cache of the teacher's own tokenization

    teacher_cache (`str`, *optional*, defaults to `None`):
        Folder of the teacher's top-k distributions at its own label tokens (and each label token's probability),
        read in place of a teacher in memory; written there first by the teacher when it holds no complete cache.
    teacher_cache_tail (`str`, *optional*, defaults to `"bucket"`):
        Must be set to `"spread"` with a cache: the tail's mass (outside the top k, at the run's temperature) is
        spread evenly over the teacher's other tokens, the label's own probability kept. That is an approximation
        of the sorted vector unless `teacher_cache_k` covers the teacher's vocabulary; its measured error is in the
        README ("ULD and GOLD from a teacher cache or server").
    teacher_cache_mode, teacher_cache_k, teacher_cache_batch_size, teacher_cache_temperatures:
        As in `KDConfig`; the mode must be `top_k`.

    > A served teacher, asked at the teacher's own tokenization

    teacher_url (`str`, *optional*, defaults to `None`):
        Base URL of a vLLM-compatible server of the teacher (`kd-serve-teacher`, vLLM), asked for its top
        `teacher_server_k` log-probabilities and each token's own at every position of the teacher's tokenization
        of each row, in place of a teacher in memory.
    teacher_server_tail (`str`, *optional*, defaults to `"bucket"`):
        Must be set to `"spread"` with a server, as `teacher_cache_tail` with a cache.
    teacher_server_k, teacher_server_batch_size, teacher_server_concurrency, teacher_server_timeout,
    teacher_server_max_wait, teacher_server_approximate_temperature, teacher_server_prefetch:
        As in `KDConfig`.

    With a cache or a server, `kd_temperature` must be 1: at T ≠ 1 most of the tempered teacher's mass sits in the
    tail the top k does not resolve, and the spread tail's error is large (measured; see the refusal's message).
    """

    kd_temperature_squared: bool = field(
        default=False, metadata={"help": "Multiply the ULD term by the squared temperature (off in ULD and GOLD)."}
    )
    uld_merge: str = field(
        default="observed", metadata={"help": "Merge of a multi-token aligned group.", "choices": list(MERGES)}
    )
    _method_label = "ULD"
    # Whose tokenization a teacher cache or server is read at: the teacher's own, where the aligned groups read it.
    stand_in_tokenization = "teacher"

    def __post_init__(self):
        if self.uld_merge not in MERGES:
            raise ValueError(f"uld_merge must be one of {list(MERGES)}, got {self.uld_merge!r}.")
        self._refuse_divergence_fields()
        self._check_two_tokenizer_fields()
        self._check_teacher_cache_settings()
        self._check_teacher_server_settings()
        self._check_stand_in_across_tokenizers()
        self.aligned_settings()  # the loss's own checks, before the parent's set-up
        super().__post_init__()

    def _check_stand_in_across_tokenizers(self) -> None:
        """What a cache or a server of the teacher's own tokenization can serve: top-k targets, their tail spread
        (asked for by name: an approximation below the whole vocabulary); a cache, the dataset's completions only."""
        given = stand_in(self)
        if given is not None and self.kd_temperature != 1.0:
            raise ValueError(
                f"kd_temperature={self.kd_temperature} with {given[0]}={given[1]!r}: {self._method_label} from "
                "a teacher's top-k spreads the tail's mass evenly over the teacher's other tokens, and at T != 1 the "
                "tail holds most of the tempered mass: measured on Qwen2.5 -> SmolLM2 at T = 2, the KD term is off "
                "by +135% (ULD) and GOLD's gradient is uncorrelated with the true one (README, \"ULD and GOLD from "
                "a teacher cache or server\"). Train at kd_temperature=1, or with the teacher in memory.")
        if self.teacher_url is not None:
            where = f"teacher_url={self.teacher_url!r} with {self._method_label}"
            if self.teacher_server_tail != "spread":
                raise ValueError(self._tail_refusal("teacher_server_tail", self.teacher_server_tail, where,
                                                    "teacher_server_k"))
        if self.teacher_cache is None:
            return
        where = f"teacher_cache={self.teacher_cache!r} with {self._method_label}"
        if self.teacher_cache_mode != "top_k":
            raise ValueError(f"teacher_cache_mode={self.teacher_cache_mode!r}: {where} compares the teacher's sorted "
                             "probabilities, which sampled draws do not give. Set teacher_cache_mode=top_k.")
        if self.teacher_cache_tail != "spread":
            raise ValueError(self._tail_refusal("teacher_cache_tail", self.teacher_cache_tail, where,
                                                "teacher_cache_k"))
        if self.lmbda > 0:
            raise ValueError(f"lmbda={self.lmbda}: {where}: the student's own samples are not in the cache, which "
                             "holds the teacher at the dataset's completions. Use a teacher in memory or a served "
                             "teacher for on-policy batches, or set lmbda=0.")

    @staticmethod
    def _tail_refusal(name: str, value: str, where: str, k_name: str) -> str:
        return (f"{name}={value!r}: {where} compares the two models' sorted probability vectors, where a tail kept "
                f"as one category has no place. Set {name}=spread to spread the tail's mass evenly over the "
                f"teacher's other tokens: an approximation unless {k_name} covers the teacher's vocabulary (its "
                "measured error: README, \"ULD and GOLD from a teacher cache or server\").")

    def _refuse_divergence_fields(self) -> None:
        """ULD reads no divergence: a divergence setting given to it would do nothing, so it is refused."""
        defaults = {"divergence": "forward_kl", "jsd_beta": 0.5, "skew_alpha": 0.1, "divergence_params": None}
        for name, default in defaults.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not read by {self._method_label}, which compares the two "
                    f"models' sorted probability vectors{self._divergence_note}. Remove {name}, or use method kd or "
                    "dskd for a divergence.")

    _divergence_note = ""

    def aligned_settings(self) -> AlignedSettings:
        """What `kd_trainers.losses.aligned` computes for this method."""
        return AlignedSettings(distance="uld", merge=self.uld_merge)

    def teacher_needs(self) -> TeacherNeeds:
        """A teacher model in memory, a cache or a server, each read at the teacher's own tokenization; several
        teachers are mixed per student token, which the aligned groups do not have."""
        return TeacherNeeds({
            "mixture": f"{self._method_label} reads the teacher's distribution at every position of the teacher's "
                       "own tokenization, and several teachers are mixed per student token. Drop teacher_models and "
                       "give one teacher (teacher_model_name_or_path, teacher_cache or teacher_url)."})
