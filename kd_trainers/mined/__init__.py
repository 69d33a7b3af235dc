"""MinED: distillation across tokenizers through alignments by minimum edit distance (Wan et al. 2024, FuseLLM; as in
the DSKD authors' code): each student token's partner in the teacher's tokenization, and a teacher → student
vocabulary map, then forward KL against the teacher's distribution carried into the student's vocabulary.

`config.py` (MinEDConfig), `trainer.py` (MinEDTrainer). The alignments are `kd_trainers.data.edit_distance`; the
loss is `kd_trainers.losses.mapped.mapped_distillation_loss`.
"""

from ..runtime.lazy import lazy_getattr

# Loaded on first use; `method.py` registers the method for recipes.
_EXPORTS = {"MinEDConfig": ".config", "MinEDTrainer": ".trainer"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
