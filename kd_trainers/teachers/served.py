"""A teacher behind a server (`teacher_url`): vLLM or `kd-serve-teacher` answers the top-k log-probabilities of each
batch's token sequences, asked by the collator (while the student computes the step before), and the engine reads
them as sparse targets. The protocol, client and server are `kd_trainers.served_teacher`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses import SparseMember
from ..losses.sparse import TAIL_TREATMENTS
from ..runtime.errors import TeacherServerError
from ..served_teacher import TARGETS_KEY, ServedTeacherCollator, TeacherClient
from ..served_teacher.client import ServerRefused, public_url, refusal_hint
from ..teacher_cache.cache import TOKENIZATIONS
from .base import Teacher, TeacherDescription, register_teacher_kind
from .needs import stand_in_tokenization
from .loading import check_same_vocabulary, load_teacher_tokenizer, model_name


@dataclass
class TeacherServerFields:
    """The config fields of a served teacher (documented on `KDConfig`), for the configs of the methods that can ask
    one, with their checks."""

    teacher_url: str | None = field(
        default=None,
        metadata={"help": "Base URL (http://HOST:PORT/v1) of a vLLM-compatible server answering the teacher's top-k "
                  "log-probabilities, in place of a teacher in memory."})
    teacher_server_k: int = field(default=20, metadata={"help": "Top-k ids asked of the served teacher per position."})
    teacher_server_tail: str = field(
        default="bucket", metadata={"help": "The served target's tail: bucket (one category) or spread (evenly).",
                                    "choices": ["bucket", "spread"]})
    teacher_server_batch_size: int = field(default=8, metadata={"help": "Sequences per request to the server."})
    teacher_server_concurrency: int = field(default=4, metadata={"help": "Requests in flight at once."})
    teacher_server_timeout: float = field(default=60.0, metadata={"help": "Seconds to wait for one answer."})
    teacher_server_max_wait: float = field(
        default=120.0, metadata={"help": "Seconds a request may take with its retries before the run stops."})
    teacher_server_approximate_temperature: bool = field(
        default=False, metadata={"help": "Allow kd_temperature != 1 with a served teacher, its tempered tail "
                                 "approximated (the server returns temperature-1 log-probabilities only)."})
    teacher_server_prefetch: bool = field(
        default=True, metadata={"help": "Ask for a batch's targets before the step that uses it (overlapped)."})

    def _check_teacher_server_settings(self) -> None:
        self._check_positive_integers("teacher_server_k", "teacher_server_batch_size", "teacher_server_concurrency")
        for name in ("teacher_server_timeout", "teacher_server_max_wait"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}.")
        if self.teacher_server_tail not in TAIL_TREATMENTS:
            raise ValueError(f"teacher_server_tail must be one of {list(TAIL_TREATMENTS)}, got "
                             f"{self.teacher_server_tail!r}.")
        if self.teacher_url is None:
            return
        if not isinstance(self.teacher_url, str) or not self.teacher_url.startswith(("http://", "https://")):
            raise ValueError(f"teacher_url must be an http(s) URL ending in /v1, e.g. http://127.0.0.1:8000/v1, got "
                             f"{self.teacher_url!r}.")
        if getattr(self, "teacher_cache", None) is not None:
            raise ValueError(f"teacher_url={self.teacher_url!r} and teacher_cache={self.teacher_cache!r} are two "
                             "teachers in place of one: set one of them.")
        if getattr(self, "packing", False) or getattr(self, "padding_free", False):
            raise ValueError(f"packing/padding_free with teacher_url={self.teacher_url!r}: the served teacher scores "
                             "one example a row. Set packing=False and padding_free=False.")

    def check_served_temperature(self, teacher: str, vocab: int) -> None:
        """A served teacher (named by `teacher`) at kd_temperature ≠ 1 only with the approximation asked for, unless
        it is asked for the whole vocabulary (`teacher_server_k` ≥ `vocab`: no tail, exact at any temperature)."""
        if self.kd_temperature != 1.0 and not self.teacher_server_approximate_temperature and \
                self.teacher_server_k < vocab:
            raise ValueError(
                f"kd_temperature={self.kd_temperature} with {teacher}: a server returns the teacher's "
                "log-probabilities at temperature 1 only, so its tempered tail (the mass outside the top-k) is not "
                "known and could only be approximated. Use a teacher cache (exact at its stored temperatures) or a "
                "teacher in memory, or set teacher_server_approximate_temperature=true to accept the approximation "
                "(its measured error is in the README, \"Real models\").")


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


def _probe_ids(tokenizer) -> list[int]:
    """Two token ids of the student's vocabulary (a short text's), for a request that must have one scored position."""
    if tokenizer is not None:
        ids = tokenizer("The answer is 42.", add_special_tokens=False)["input_ids"]
        if len(ids) >= 2:
            return ids[:2]
    return [0, 1]


def check_server_before_loading(url: str, field: str, config, student, student_name: str,
                                tokenizer_name: str | None = None, load_tokenizer=load_teacher_tokenizer) -> None:
    """The server at `url` (a run's `field`) answers, at the first try, what the run will ask of it: `GET /models`,
    then a real `prompt_logprobs` request at the run's k for two of the `student` tokenizer's tokens (None: not known
    yet), its answer checked as a step's would be. The served model's tokenizer (`tokenizer_name`, else the served
    model's name, loaded by `load_tokenizer`) must be the student's, unless the method reads the teacher at its own
    tokenization (then the probe is the teacher's tokens). Each failure is a `ValueError` saying what it
    means: no server, a wrong path, a k above the server's `--max-logprobs`, a server that answers fewer, another
    vocabulary."""
    where = f"{field}: {public_url(url)!r}"
    if student is not None:  # a temperature a server cannot serve exactly: refused before it is asked anything
        config.check_served_temperature(f"{field}={public_url(url)!r}", len(student))
    client = TeacherClient(url, config.teacher_server_k, len(student) if student is not None else 2**31,
                           timeout=config.teacher_server_timeout, max_wait=0)
    try:
        served = client.served_model()
    except ServerRefused as error:
        raise ValueError(f"{where} refused GET /models: HTTP {error.status}: {error.text[:200]} "
                         f"({refusal_hint(error.status, error.text, config.teacher_server_k)}).") from None
    except TeacherServerError as error:
        last = getattr(error, "last", error)
        raise ValueError(f"{where} does not answer GET /models ({last}). Start the teacher's server first "
                         "(kd-serve-teacher MODEL --port PORT, or vLLM; see the README), then run again.") from None
    served_name = served.get("root") or served["id"]
    if student is not None:
        try:
            teacher_tokenizer = load_tokenizer(tokenizer_name or served_name)
        except (OSError, ValueError) as error:
            raise ValueError(f"{where} serves {served_name!r}, whose tokenizer does not load here "
                             f"({' '.join(str(error).split())[:200]}); name the teacher's Hub id or local path "
                             "(teacher_model_name_or_path, or the entry's tokenizer), which gives its tokenizer and is "
                             "not loaded.") from None
        if stand_in_tokenization(config) == "teacher":  # asked at the teacher's own tokenization: its ids answer
            client.vocab, student = len(teacher_tokenizer), teacher_tokenizer
        else:
            try:
                check_same_vocabulary(student, teacher_tokenizer, student_name,
                                      f"{served_name}, served at {public_url(url)}")
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
    try:
        client.probe(_probe_ids(student))
    except ServerRefused as error:
        raise ValueError(f"{where} refused a prompt_logprobs request at teacher_server_k={config.teacher_server_k}: "
                         f"HTTP {error.status}: {error.text[:200]} "
                         f"({refusal_hint(error.status, error.text, config.teacher_server_k)}).") from None
    except TeacherServerError as error:
        last = getattr(error, "last", error)
        raise ValueError(f"{where} gave no usable answer to a prompt_logprobs request at teacher_server_k="
                         f"{config.teacher_server_k} ({last}). A server that answers fewer log-probabilities than "
                         "asked caps them: restart it with --max-logprobs at least teacher_server_k, or lower "
                         "teacher_server_k.") from None


@register_teacher_kind
class ServedTeacher(Teacher):
    """The teacher's top-k log-probabilities, asked of `client` per batch. `member`: its name among several teachers
    (its batch key carries the suffix `_<index>`)."""

    kind = "url"

    def __init__(self, client: TeacherClient, source, tokenizer, name, *, tail: str, member: str | None = None,
                 suffix: str = "", prefix: str = ""):
        super().__init__(source, tokenizer, name)
        self.client, self.tail, self.member = client, tail, member
        self.prefix = prefix  # "teacher_": asked at the teacher's own tokenization of each row
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
        if stand_in_tokenization(args) == "teacher":  # asked at the teacher's own tokenization: its ids answer
            client.vocab = len(tokenizer)
        return cls(client, teacher, tokenizer, f"served at {client.public_url} (model {served['id']})",
                   tail=args.teacher_server_tail, prefix=TOKENIZATIONS[stand_in_tokenization(args)])

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
                                                   prefetch=args.teacher_server_prefetch, key=self.key,
                                                   prefix=self.prefix)

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
