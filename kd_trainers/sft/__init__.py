"""Plain SFT (the LoRA SFT stage of teacher or student before KD): `trainer.py` (TRL's `SFTTrainer` with the package's
run guards), `method.py` (`method: sft` for recipes)."""

from ..runtime.lazy import lazy_getattr

__all__ = ["SFTConfig", "SFTTrainer"]
__getattr__ = lazy_getattr(__name__, globals(), {"SFTConfig": ".trainer", "SFTTrainer": ".trainer"})
