"""`SeqKDConfig`: sequence-level KD (Kim & Rush, 2016) settings, on top of `KDConfig`."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from ..kd.config import DistillationConfig
from ..runtime.checks import is_positive_integer
from ..teachers.cached import TeacherCacheFields
from ..teachers.needs import TeacherNeeds


@dataclass
class SeqKDConfig(TeacherCacheFields, DistillationConfig):
    r"""
    Configuration class for [`SeqKDTrainer`]: every field of `KDConfig` but those of a served teacher and several
    teachers (Seq-KD generates with one teacher in memory: `teacher_url` is refused, with the reason), plus how the teacher generates the training
    completions. The student then trains on the teacher's completions: by SFT alone (`kd_weight=0`, the default; the
    teacher's tokenizer may then differ from the student's) or with logit KD on top (`kd_weight > 0`, same vocabulary).

    > Parameters that control the teacher's generation

    seqkd_max_new_tokens (`int`, *optional*, defaults to `128`):
        Most tokens the teacher generates per prompt.
    seqkd_do_sample (`bool`, *optional*, defaults to `False`):
        Sample instead of greedy decoding (seeded by `seed`, per block of prompts, so a resumed generation matches).
    seqkd_temperature (`float`, *optional*, defaults to `1.0`) and seqkd_top_p (`float`, *optional*, defaults to `1.0`):
        Sampling settings, used when `seqkd_do_sample`.
    seqkd_batch_size (`int`, *optional*, defaults to `16`):
        Prompts per generation batch.
    seqkd_cache_dir (`str`, *optional*, defaults to `None`):
        Where generated sets are kept, one folder per (teacher, adapter, prompts, settings); `None` is
        `$KD_TRAINERS_CACHE/seqkd` (default `~/.cache/kd_trainers/seqkd`). A run that finds its set there does not
        generate again, so a sweep generates once.
    """

    kd_weight: float = field(default=0.0, metadata={"help": "Weight of logit KD on top of SFT on the teacher's outputs."})
    seqkd_max_new_tokens: int = field(default=128, metadata={"help": "Most tokens the teacher generates per prompt."})
    seqkd_do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    seqkd_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with seqkd_do_sample)."})
    seqkd_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling p (with seqkd_do_sample)."})
    seqkd_batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch."})
    seqkd_cache_dir: str | None = field(default=None, metadata={"help": "Cache of generated sets; None: the user cache."})

    # A teacher kind this method cannot use: accepted by name only to be refused with the reason (`teacher_needs`).
    teacher_url: InitVar[str | None] = None

    def __post_init__(self, teacher_url=None):
        self.refuse_teacher_kinds(teacher_url=teacher_url)
        for name in ("seqkd_max_new_tokens", "seqkd_batch_size"):
            value = getattr(self, name)
            if not is_positive_integer(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.seqkd_temperature <= 0 or not 0 < self.seqkd_top_p <= 1:
            raise ValueError(f"seqkd_temperature must be > 0 and seqkd_top_p in (0, 1], got {self.seqkd_temperature} "
                             f"and {self.seqkd_top_p}.")
        super().__post_init__()

    def teacher_needs(self) -> TeacherNeeds:
        """A teacher in memory to generate the training set; a cache only for logit KD on top."""
        refused = {
            "url": "Seq-KD generates its training set with the teacher in memory, which a server of log-probabilities "
                   "does not replace. Drop teacher_url (a teacher_cache serves Seq-KD's KD term), or use method kd "
                   "with it.",
            "mixture": "Seq-KD generates its training set with one teacher in memory, which several teachers at once "
                       "do not give. Name that teacher with teacher_model, or use method kd with them."}
        if self.kd_weight == 0:
            refused["cache"] = ("with kd_weight=0, Seq-KD is then SFT on the teacher's completions and reads no "
                                "teacher distribution. Drop teacher_cache, or set kd_weight > 0 for logit KD on top "
                                "from the cache.")
        return TeacherNeeds(refused)

    def holds_teacher_while_training(self) -> bool:
        """At `kd_weight=0` the teacher is released once it has generated: training is SFT on its completions."""
        return self.kd_weight > 0 and super().holds_teacher_while_training()

    def _check_teacher_sources(self) -> None:
        self._check_teacher_cache_settings()

    def generation_settings(self) -> dict:
        settings = {"max_new_tokens": self.seqkd_max_new_tokens, "do_sample": self.seqkd_do_sample}
        if self.seqkd_do_sample:
            settings.update(temperature=self.seqkd_temperature, top_p=self.seqkd_top_p, seed=self.seed)
        return settings
