"""Plain SFT (the LoRA SFT stage of teacher or student before KD): TRL's `SFTTrainer` with atomic checkpoints."""

from trl import SFTConfig
from trl import SFTTrainer as _TRLSFTTrainer

from ..checkpointing import AtomicCheckpointMixin


class SFTTrainer(AtomicCheckpointMixin, _TRLSFTTrainer):
    """`trl.SFTTrainer` whose checkpoints are written atomically (see `kd_trainers.checkpointing`)."""


__all__ = ["SFTConfig", "SFTTrainer"]
