"""kd_trainers: knowledge distillation for the Hugging Face stack, as TRL trainers.

    from kd_trainers import KDConfig, KDTrainer

Where things are: `losses/` (divergences, the readable reference, the chunked engine), one folder per method
(`kd/`: config, trainer and the shared loss mixin; `dskd/`: also the dual tokenization, projectors and cross-model
attention; `gkd/`: on-policy GKD on TRL's trainer; `seqkd/`: teacher-generated data), `teacher.py` (teacher loading
and the tokenizer check), `guards.py` (the non-finite stop and training-setting ranges), `checkpointing.py` (atomic,
secret-free checkpoints), `redaction.py` (secrets kept off the disk), `demo/` (the built-in demo task).
"""

__version__ = "0.1.0.dev0"

from .dskd import DSKDConfig, DSKDTrainer
from .gkd import GKDConfig, GKDTrainer
from .kd import KDConfig, KDTrainer
from .losses import DIVERGENCES, chunked_distillation_loss, distillation_loss
from .seqkd import SeqKDConfig, SeqKDTrainer

__all__ = ["DIVERGENCES", "DSKDConfig", "DSKDTrainer", "GKDConfig", "GKDTrainer", "KDConfig", "KDTrainer",
           "SeqKDConfig", "SeqKDTrainer", "chunked_distillation_loss", "distillation_loss", "__version__"]
