"""A teacher that is not in memory: its sparse distribution at every label token, written once to disk by a cache pass
and read by the trainers in its place (`KDConfig.teacher_cache`).

Where things go: the record of one example (quantisation, compression) is `format.py`; the folder, its key and
reading it into a trainer's data and batches are `cache.py`; the pass that runs the teacher and writes the blocks is
`writer.py`; the folder's names and key, `layout.py`; whether a cache on disk is whole (its schema, each block's
checksum), `integrity.py`. The loss side (what a sparse target means to each divergence) is `kd_trainers.losses.sparse`.
"""

from .cache import (BATCH_KEYS, CacheSettings, SparseTeacherCollator, TeacherCache, cache_components, split_fingerprint,
                    targets_from_batch, teacher_files_fingerprint, teacher_fingerprint, tokenizer_fingerprint)
from .writer import write_teacher_cache


__all__ = [
    "BATCH_KEYS",
    "CacheSettings",
    "SparseTeacherCollator",
    "TeacherCache",
    "cache_components",
    "split_fingerprint",
    "targets_from_batch",
    "teacher_files_fingerprint",
    "teacher_fingerprint",
    "tokenizer_fingerprint",
    "write_teacher_cache",
]
