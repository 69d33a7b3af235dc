"""kd_trainers: knowledge distillation for the Hugging Face stack, as TRL trainers.

    from kd_trainers import KDConfig, KDTrainer

The package reads as its layers, bottom to top (each imports only the ones below it):
`runtime/` (the run's own machinery: files, guards, checkpoints, errors) and `methods.py` (the method registry);
`losses/` (divergences, the reference, the chunked engine); `teachers/` (one interface for a teacher in memory, cached,
served or several; `teacher_cache/` and `served_teacher/` are the cache's storage and the server), `models/`
(tokenizers, hidden states, generation), `data/` (prompt/completion rows, the teacher's completions) and `demo/`; one
folder per method (`kd/`, `dskd/`, `uld/`, `gold/`, `mined/`, `gkd/`, `seqkd/`, `sft/`); `evaluation/`; `recipe/`; `study/`; `cli/`.
"""

__version__ = "0.1.0.dev0"

from .runtime.lazy import lazy_getattr
from .runtime.moved import install as _install_moved_modules

# name -> the module that defines it, loaded on first use: `kd-train --help` and the CLIs' error paths do not pay for
# importing torch, transformers and TRL.
_EXPORTS = {
    "DSKDConfig": ".dskd", "DSKDTrainer": ".dskd", "GKDConfig": ".gkd", "GKDTrainer": ".gkd", "KDConfig": ".kd",
    "KDTrainer": ".kd", "SeqKDConfig": ".seqkd", "SeqKDTrainer": ".seqkd", "DIVERGENCES": ".losses",
    "chunked_distillation_loss": ".losses", "distillation_loss": ".losses", "ULDConfig": ".uld", "ULDTrainer": ".uld",
    "GOLDConfig": ".gold", "GOLDTrainer": ".gold", "MinEDConfig": ".mined", "MinEDTrainer": ".mined",
}
__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
_install_moved_modules()  # the old paths of modules that moved into the layers keep working
