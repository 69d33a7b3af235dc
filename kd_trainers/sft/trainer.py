"""Plain SFT (the LoRA SFT stage of teacher or student before KD): TRL's `SFTTrainer` with the package's run guards."""

from trl import SFTConfig
from trl import SFTTrainer as _TRLSFTTrainer

from ..runtime.checkpointing import AtomicCheckpointMixin
from ..runtime.guards import RunGuardsMixin
from ..data.prompt_completion import require_labels


class SFTTrainer(RunGuardsMixin, AtomicCheckpointMixin, _TRLSFTTrainer):
    """`trl.SFTTrainer` whose checkpoints are written atomically and without secrets (see `kd_trainers.checkpointing`),
    and whose runs stop on a non-finite loss (see `kd_trainers.guards`). Prompt-only rows are refused before anything
    is prepared: SFT has no teacher to complete them."""

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, *positional, **kwargs):
        require_labels(train_dataset, "SFT")
        super().__init__(model, args, data_collator, train_dataset, *positional, **kwargs)

    @classmethod
    def reads_labels(cls, args) -> bool:
        return True


__all__ = ["SFTConfig", "SFTTrainer"]
