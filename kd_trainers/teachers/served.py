"""A teacher behind a server (`teacher_url`): vLLM or `kd-serve-teacher` answers the top-k log-probabilities of each
batch's token sequences, asked by the collator (while the student computes the step before), and the engine reads
them as sparse targets. The protocol, client and server are `kd_trainers.served_teacher`."""

from __future__ import annotations

from ..losses import SparseMember
from ..served_teacher import TARGETS_KEY, ServedTeacherCollator, TeacherClient
from .base import Teacher, TeacherDescription, register_teacher_kind
from .loading import load_teacher_tokenizer, model_name


def served_client(host, args, url: str, teacher, teacher_processing_class, student_tokenizer, model):
    """`(client, tokenizer, served model entry)` of the teacher behind `url`: asked for its name (waiting for it within
    teacher_server_max_wait), its tokenizer checked against the student's. The tokenizer is the one given, else the
    named teacher's, else the one of the served model's name (vLLM's `root`: the Hub id or path it loaded)."""
    client = TeacherClient(url, args.teacher_server_k, len(student_tokenizer),
                           batch_size=args.teacher_server_batch_size, concurrency=args.teacher_server_concurrency,
                           timeout=args.teacher_server_timeout, max_wait=args.teacher_server_max_wait)
    served = client.served_model()
    served_name = served.get("root") or served["id"]
    if teacher_processing_class is not None or teacher is not None:
        tokenizer = load_teacher_tokenizer(teacher if teacher is not None else served_name, teacher_processing_class,
                                           student_tokenizer)
    else:
        try:
            tokenizer = load_teacher_tokenizer(served_name)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"teacher_url={client.public_url!r} serves {served_name!r}, whose tokenizer does not load here "
                f"({str(error).splitlines()[0][:200]}): pass teacher_processing_class=<its tokenizer>, or set "
                "teacher_model_name_or_path to the teacher's Hub id or local path (it is not loaded).") from None
    # Named by where the tokenizer came from: the one given, the named teacher's, or the served model's name.
    if teacher_processing_class is not None:
        source = f"the teacher_processing_class given for the server at {client.public_url}"
    elif teacher is not None:
        source = f"{model_name(teacher)} (teacher_model_name_or_path, for the server at {client.public_url})"
    else:
        source = f"{served_name} (the model served at {client.public_url})"
    host._check_tokenizers(args, student_tokenizer, tokenizer, model_name(model), source)
    return client, tokenizer, served


@register_teacher_kind
class ServedTeacher(Teacher):
    """The teacher's top-k log-probabilities, asked of `client` per batch. `member`: its name among several teachers
    (its batch key carries the suffix `_<index>`)."""

    kind = "url"

    def __init__(self, client: TeacherClient, source, tokenizer, name, *, tail: str, member: str | None = None,
                 suffix: str = ""):
        super().__init__(source, tokenizer, name)
        self.client, self.tail, self.member = client, tail, member
        self.key = TARGETS_KEY + suffix
        if suffix:  # the trainer keeps the unsuffixed key away from the models already
            self.batch_keys = (self.key,)

    @classmethod
    def chosen_by(cls, args, entries) -> bool:
        return not entries and getattr(args, "teacher_url", None) is not None

    @classmethod
    def plan(cls, host, model, args, teacher_model, teacher_processing_class, student_tokenizer, entries=None):
        teacher = host._required_teacher(teacher_model, args)  # a name only tells the tokenizer: nothing loads
        args.check_served_temperature(f"teacher_url={args.teacher_url!r}", len(student_tokenizer))
        client, tokenizer, served = served_client(host, args, args.teacher_url, teacher, teacher_processing_class,
                                                  student_tokenizer, model)
        return cls(client, teacher, tokenizer, f"served at {client.public_url} (model {served['id']})",
                   tail=args.teacher_server_tail)

    @classmethod
    def member_of(cls, host, entry, index: int, args, student_tokenizer, model) -> "ServedTeacher":
        """One of several teachers (`teacher_models[index]`): its server asked for its name, its tokenizer checked."""
        args.check_served_temperature(f"teacher_models[{index}] ({entry.name}): url={entry.source!r}",
                                      len(student_tokenizer))
        client, tokenizer, _ = served_client(host, args, entry.source, None, entry.tokenizer, student_tokenizer, model)
        return cls(client, None, tokenizer, None, tail=args.teacher_server_tail, member=entry.name,
                   suffix=f"_{index}")

    def set_up(self, host, args) -> None:
        """Each batch asks the server for its targets, through the collator."""
        host.data_collator = ServedTeacherCollator(host.data_collator, self.client,
                                                   prefetch=args.teacher_server_prefetch, key=self.key)

    def engine_source(self, host, inputs: dict, model_inputs: dict) -> SparseMember:
        return SparseMember(inputs[self.key].get(), self.tail)

    def describe(self) -> TeacherDescription:
        client = self.client
        card = {"teacher_url": client.public_url, "teacher_server_model": client.model, "teacher_server_k": client.k,
                "teacher_server_tail": self.tail}
        run_info = {"teacher_server": {"url": client.public_url, "model": client.model, "k": client.k,
                                       "tail": self.tail}}
        return TeacherDescription(card, run_info)

    def close(self) -> None:
        self.client.close()
