"""kd_trainers: knowledge distillation for the Hugging Face stack, as TRL trainers.

    from kd_trainers import KDConfig, KDTrainer

Where things are: `losses/` (divergences, the readable reference, the chunked engine), one folder per method
(`kd/`: config, trainer and the shared loss mixin; `dskd/`: also the dual tokenization, projectors and cross-model
attention; `gkd/`: on-policy GKD on TRL's trainer; `seqkd/`: teacher-generated data), `teacher.py` (teacher loading
and the tokenizer check), `guards.py` (the non-finite stop and training-setting ranges), `checkpointing.py` (atomic,
secret-free checkpoints), `redaction.py` (secrets kept off the disk), `demo/` (the built-in demo task).
"""

__version__ = "0.1.0.dev0"

from .lazy import lazy_getattr

# name -> the module that defines it, loaded on first use: `kd-train --help` and the CLIs' error paths do not pay for
# importing torch, transformers and TRL.
_EXPORTS = {
    "DSKDConfig": ".dskd", "DSKDTrainer": ".dskd", "GKDConfig": ".gkd", "GKDTrainer": ".gkd", "KDConfig": ".kd",
    "KDTrainer": ".kd", "SeqKDConfig": ".seqkd", "SeqKDTrainer": ".seqkd", "DIVERGENCES": ".losses",
    "chunked_distillation_loss": ".losses", "distillation_loss": ".losses",
}
__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
