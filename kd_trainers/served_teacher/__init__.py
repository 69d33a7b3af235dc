"""A teacher that is not in memory but behind a server: vLLM (or `kd-serve-teacher`) answers the top-k
log-probabilities of the student's token sequences, and the trainers read them as sparse targets
(`kd_trainers.losses.sparse`), as they read a teacher cache.

Where things go: the request and answer, and what is checked of an answer, are `protocol.py`; batching, concurrency,
retries and the wait bound are `client.py`; putting the targets into a trainer's batches (fetched while the student
computes the step before) is `collator.py`; `kd-serve-teacher`'s own server is `server.py` (FastAPI and uvicorn, the
`serve` extra, imported only there).
"""

from .client import API_KEY_VARIABLE, PendingTargets, TeacherClient
from .collator import TARGETS_KEY, ServedTargets, ServedTeacherCollator
from .protocol import InvalidAnswer, completion_request, parse_completion


__all__ = [
    "API_KEY_VARIABLE",
    "InvalidAnswer",
    "PendingTargets",
    "ServedTargets",
    "ServedTeacherCollator",
    "TARGETS_KEY",
    "TeacherClient",
    "completion_request",
    "parse_completion",
]
