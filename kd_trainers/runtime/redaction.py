"""Secrets never reach the disk: what a run saves (its resolved recipe, its command line, a study's cell record) is
redacted here first, and `TrainingArguments` are saved without their token (see `kd_trainers.checkpointing`).

A secret is the value of a key whose name says so: `hub_token`, `api_key`, `HF_TOKEN`, `WANDB_API_KEY`, a password...,
and the user and password of any URL (`http://user:secret@host/v1` is saved as `http://<redacted>@host/v1`), whatever
key holds it: `teacher_url`, a `teachers:` entry's `url`, a judge's `base_url`.
Tokens are best left out of recipes altogether: huggingface_hub reads `HF_TOKEN` or `hf auth login`, and the judge
reads `OPENAI_API_KEY`.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
SECRET_KEY = re.compile(r"(token|api_?key|secret|password|passwd|credential)", re.IGNORECASE)
# Counted and token-type settings whose names contain "token" but hold no secret.
NOT_SECRET = re.compile(r"(tokens|tokenizer|token_type|(pad|eos|bos|unk|sep|cls|mask|image|audio|video)_token)",
                        re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """Whether a setting named `key` holds a secret (`hub_token`, `api_key`, `HF_TOKEN`; not `max_new_tokens`)."""
    name = str(key).rsplit(".", 1)[-1]
    if name.isupper():  # environment variables: HF_TOKEN, WANDB_API_KEY, OPENAI_API_KEY
        return bool(SECRET_KEY.search(name))
    return bool(SECRET_KEY.search(name)) and not NOT_SECRET.search(name)


# `scheme://userinfo@`: what a URL carries its credentials in (RFC 3986), up to the host.
URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]+)@")


def redact_urls(text: str) -> str:
    """`text` with the user and password of every URL in it replaced by `<redacted>`."""
    return URL_CREDENTIALS.sub(lambda match: f"{match['scheme']}{REDACTED}@", text)


def redact(value: Any) -> Any:
    """A copy of `value` (nested dicts and lists) with every secret's value replaced by `<redacted>`, and the
    credentials of every URL in its text."""
    if isinstance(value, str):
        return redact_urls(value)
    if isinstance(value, dict):
        return {key: (REDACTED if is_secret_key(key) and item not in (None, "") else redact(item))
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


def redact_arguments(argv: list[str]) -> list[str]:
    """A command line with the values of secret `key=value` overrides and `--secret-flag value` pairs redacted."""
    result, hide_next = [], False
    for argument in argv:
        if hide_next:
            result.append(REDACTED)
            hide_next = False
            continue
        key, sep, _ = argument.partition("=")
        flag = key.lstrip("-").replace("-", "_")
        if sep and is_secret_key(flag):
            result.append(f"{key}={REDACTED}")
        else:
            result.append(redact_urls(argument))
            hide_next = argument.startswith("--") and not sep and is_secret_key(flag)
    return result
