"""kd_trainers: knowledge distillation for the Hugging Face stack, as TRL trainers.

    from kd_trainers import KDConfig, KDTrainer

Where things are: `losses/` (divergences, the readable reference, the chunked engine), one folder per method
(`kd/`: config, trainer and the shared loss mixin; `dskd/`: also the dual tokenization, projectors and cross-model
attention; `gkd/`: on-policy GKD on TRL's trainer; `seqkd/`: teacher-generated data), `teacher.py` (teacher loading
and the tokenizer check), `guards.py` (the non-finite stop and training-setting ranges), `checkpointing.py` (atomic,
secret-free checkpoints), `redaction.py` (secrets kept off the disk), `demo/` (the built-in demo task).
"""

__version__ = "0.1.0.dev0"

import importlib

# name -> the module that defines it. Loaded on first use (PEP 562), so that `kd-train --help` and the error paths of
# the CLIs do not pay for importing torch, transformers and TRL.
_EXPORTS = {
    "DSKDConfig": ".dskd", "DSKDTrainer": ".dskd", "GKDConfig": ".gkd", "GKDTrainer": ".gkd", "KDConfig": ".kd",
    "KDTrainer": ".kd", "SeqKDConfig": ".seqkd", "SeqKDTrainer": ".seqkd", "DIVERGENCES": ".losses",
    "chunked_distillation_loss": ".losses", "distillation_loss": ".losses",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
