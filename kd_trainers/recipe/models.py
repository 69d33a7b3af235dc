"""The models a recipe names: the student (with its SFT adapter merged when given) and the teacher, as objects for
the demo models and as names otherwise (the trainer loads those, with `model_init_kwargs`)."""

from __future__ import annotations

from ..demo import demo_model, demo_tokenizer
from ..served_teacher import TeacherClient
from ..teachers.loading import load_teacher
from ..models.tokenizer import load_tokenizer
from .schema import Recipe


DEMO_PREFIX = "demo:"


def _demo_spec(name: str) -> list[str]:
    """`[ARCH, SIZE, TOKENIZER]` of a `demo:ARCH/SIZE/TOKENIZER` spec."""
    parts = name[len(DEMO_PREFIX):].split("/")
    if len(parts) != 3:
        raise ValueError(f"{name!r}: a demo model is demo:ARCH/SIZE/TOKENIZER, e.g. demo:llama/student/bpe.")
    return parts


def resolve_model(name: str, tokenizer_name: str | None = None):
    """`(model or name, tokenizer)`. `demo:ARCH/SIZE/TOKENIZER` (e.g. `demo:llama/student/bpe`) builds a demo model;
    anything else is a Hub id or a local path, loaded by the trainer (with `model_init_kwargs`)."""
    if name.startswith(DEMO_PREFIX):
        arch, size, tokenizer_kind = _demo_spec(name)
        tokenizer = demo_tokenizer(tokenizer_kind)
        seed = {"student": 2, "teacher": 1}.get(size, 0)
        return demo_model(arch, tokenizer, size, seed=seed), tokenizer
    return name, load_tokenizer(tokenizer_name or name)


def resolve_tokenizer(name: str):
    """The tokenizer of a model named as a recipe names models (a demo spec builds only its tokenizer)."""
    if name.startswith(DEMO_PREFIX):
        return demo_tokenizer(_demo_spec(name)[2])
    return load_tokenizer(name)


def served_model_name(config, url: str | None = None, max_wait: float | None = None) -> str:
    """The name the server at `url` (default `config.teacher_url`) serves (vLLM's `root`: the Hub id or path it
    loaded), asked with the config's client settings within `max_wait` seconds (default: the config's
    `teacher_server_max_wait`; 0: one try)."""
    client = TeacherClient(url or config.teacher_url, config.teacher_server_k, 1, timeout=config.teacher_server_timeout,
                           max_wait=config.teacher_server_max_wait if max_wait is None else max_wait)
    served = client.served_model()
    return served.get("root") or served["id"]


def resolve_student(recipe: Recipe):
    """`(student or its name, tokenizer)`: the model the recipe starts from, with `model_adapter_name_or_path` merged
    into it when named (a name is otherwise left for the trainer to load with `model_init_kwargs`)."""
    options = recipe.options
    student, tokenizer = resolve_model(options["model_name_or_path"], options["tokenizer_name_or_path"])
    if options["model_adapter_name_or_path"]:
        # The same load-and-merge as a teacher's adapter; the merged student then trains like any model.
        init_kwargs = recipe.config.model_init_kwargs
        student = load_teacher(student, init_kwargs if isinstance(student, str) else None,
                               options["model_adapter_name_or_path"])
        # PEFT loads an adapter for inference, which freezes the base; merged, the student must train again.
        student.requires_grad_(True)
    return student, tokenizer


def resolve_teacher(recipe: Recipe):
    """`(teacher or its name, its tokenizer)` of a recipe with a teacher; loading and its adapter are the trainer's."""
    config = recipe.config
    return resolve_model(config.teacher_model_name_or_path, getattr(config, "teacher_tokenizer_name_or_path", None))
