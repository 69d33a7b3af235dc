"""Plain SFT (the LoRA SFT stage of teacher or student before KD): TRL's `SFTTrainer` with the package's run guards."""

from trl import SFTConfig
from trl import SFTTrainer as _TRLSFTTrainer

from ..checkpointing import AtomicCheckpointMixin
from ..guards import RunGuardsMixin


class SFTTrainer(RunGuardsMixin, AtomicCheckpointMixin, _TRLSFTTrainer):
    """`trl.SFTTrainer` whose checkpoints are written atomically and without secrets (see `kd_trainers.checkpointing`),
    and whose runs stop on a non-finite loss (see `kd_trainers.guards`)."""


__all__ = ["SFTConfig", "SFTTrainer"]
