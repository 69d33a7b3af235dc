"""Final-answer extractors (for exact match and teacher-student agreement) and the reasoning text before the answer."""

from __future__ import annotations

import re
from typing import Callable

_ANSWER_IS = re.compile(r"answer is\s*[:(]?\s*([^\s.,;:)]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")
_CHOICE = re.compile(r"\b([A-E])\b")


def the_answer_is(text: str) -> str:
    """The token after "The answer is" ("The answer is 42." -> "42"), else the whole text, lowercased and stripped."""
    match = _ANSWER_IS.search(text)
    return (match.group(1) if match else text).strip().lower()


def last_number(text: str) -> str:
    """The last number in the text, commas as thousands separators removed ("It costs 1,200 euros" -> "1200")."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else ""


def multiple_choice(text: str) -> str:
    """The choice letter: after "answer is" if present ("The answer is (B)" -> "B"), else the first A-E on its own."""
    match = _ANSWER_IS.search(text)
    if match and _CHOICE.fullmatch(match.group(1).upper()):
        return match.group(1).upper()
    choice = _CHOICE.search(text)
    return choice.group(1) if choice else ""


def demo(text: str) -> str:
    """The demo task's answer: the number after "The answer is", else the text up to its first full stop."""
    from ..demo.scoring import final_answer  # lazy: the demo package imports torch; the extractors do not need it

    return final_answer(text)


ANSWER_EXTRACTORS: dict[str, Callable[[str], str]] = {
    "the_answer_is": the_answer_is, "last_number": last_number, "multiple_choice": multiple_choice, "demo": demo,
}


def get_extractor(name: str) -> Callable[[str], str]:
    try:
        return ANSWER_EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"Unknown answer extractor {name!r}; use one of {sorted(ANSWER_EXTRACTORS)}.") from None


def reasoning_text(text: str) -> str:
    """The reasoning part of an answer: everything before its "The answer is" sentence (all of it if none)."""
    match = re.search(r"(?:^|[.\n])\s*(?:so |therefore |thus )?the answer is", text, re.IGNORECASE)
    return text[: match.start()].strip() if match else text.strip()
