"""The teacher of a trainer, one interface (`Teacher`, `base.py`) and four kinds, each in its own module:

    resident.py   a model in memory (loaded, adapter merged, frozen, prepared beside the student)
    cached.py     a teacher cache on disk (`kd_trainers.teacher_cache`: the format, key and integrity)
    served.py     a server of top-k log-probabilities (`kd_trainers.served_teacher`: the protocol, client, server)
    mixture.py    several of the others at once, mixed per token or routed per example (`entries.py`: the entries)

A kind owns its checks before anything loads (`plan`), its set-up after the parent trainer's `__init__` (`set_up`:
load, open or connect; the collator hook), the engine's teacher source for a batch (`engine_source`), and its record
(`describe`: the model card's rows and `run_info.json`'s entries). The trainers hold one `self.teacher` and never ask
which kind it is. A new kind is one module here: subclass `Teacher`, decorate it with `@register_teacher_kind`, say
which arguments choose it (`chosen_by`), and import it below. The loading helpers every kind shares are `loading.py`.
"""

from .base import TEACHER_KINDS, Teacher, TeacherDescription, plan_teacher, register_teacher_kind
from .cached import CachedTeacher
from .mixture import MixtureTeacher
from .resident import ResidentTeacher
from .served import ServedTeacher


__all__ = [
    "TEACHER_KINDS",
    "CachedTeacher",
    "MixtureTeacher",
    "ResidentTeacher",
    "ServedTeacher",
    "Teacher",
    "TeacherDescription",
    "plan_teacher",
    "register_teacher_kind",
]
