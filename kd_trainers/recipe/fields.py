"""Recipe values checked against the fields they set, with the type, choices and help that `transformers'
HfArgumentParser` reads from those fields (as it does for TRL's scripts), so that nothing here restates a field.

HfArgumentParser turns YAML-free command-line text into values; a recipe's values come from YAML already typed (a
number, a list, a mapping). `RecipeFields.coerce` therefore runs each scalar through the parser's own conversion for
its field (`int`, `float`, `string_to_bool`, an enum's choices) and checks lists and mappings against the field's
annotation, and only words the errors: the key, the value, what the field takes, and the closest choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..runtime.suggest import did_you_mean


class FieldValueError(ValueError):
    """A value the field cannot take; the message says what it takes (without the file and key, which the caller adds)."""


# YAML 1.1's other boolean words, which recipes keep as text (yaml_files.RecipeLoader); `string_to_bool` takes the rest.
_ON_OFF = {"on": True, "off": False}


def _union_members(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _type_name(annotation) -> str:
    names = []
    for member in _union_members(annotation):
        if member is type(None):
            names.append("null")
        elif typing.get_origin(member) is typing.Literal:
            names.append(" or ".join(repr(choice) for choice in typing.get_args(member)))
        else:
            names.append(getattr(typing.get_origin(member) or member, "__name__", str(member)))
    return " or ".join(names)


class RecipeFields:
    """The settable fields of one or more dataclasses (a method's config, the recipe's own keys), as parsed by
    `HfArgumentParser`: `coerce(key, value)` returns the value the field should get, or raises `FieldValueError`."""

    def __init__(self, *dataclass_types: type):
        parser = HfArgumentParser(dataclass_types)
        # The `--name` action of each field (HfArgumentParser adds a `--no_name` one for booleans that default to True).
        self._actions = {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}
        self._annotations: dict[str, Any] = {}
        for dataclass_type in dataclass_types:
            hints = typing.get_type_hints(dataclass_type)
            for field in dataclasses.fields(dataclass_type):
                if field.init:
                    self._annotations[field.name] = hints.get(field.name, Any)

    def __contains__(self, key: str) -> bool:
        return key in self._annotations

    def __iter__(self):
        return iter(self._annotations)

    def help(self, key: str) -> str:
        action = self._actions.get(key)
        return (action.help or "") if action is not None else ""

    def coerce(self, key: str, value):
        annotation = self._annotations[key]
        if annotation is Any:
            return value
        members = _union_members(annotation)
        if value is None:
            if type(None) in members:
                return None
            raise self._error(key, value)
        if isinstance(value, (dict, list, tuple)):
            kinds = {typing.get_origin(member) or member for member in members}
            if isinstance(value, dict) and (dict in kinds or Any in kinds):
                return value
            if isinstance(value, (list, tuple)) and kinds & {list, tuple}:
                return [self._scalar(key, item) for item in value] if self._actions.get(key) is not None \
                    and self._actions[key].nargs in ("+", "*") else list(value)
            raise self._error(key, value)
        return self._scalar(key, value)

    def _scalar(self, key: str, value):
        action = self._actions.get(key)
        if action is None or action.type is None:  # a field the parser does not type: the config decides
            return value
        if isinstance(value, enum.Enum):
            value = value.value
        convert = action.type
        try:
            if convert is string_to_bool:
                if isinstance(value, str) and value.lower() in _ON_OFF:
                    return _ON_OFF[value.lower()]
                if not isinstance(value, (bool, str)):
                    raise TypeError
                converted = convert(value)
            elif convert in (int, float):
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise TypeError
                converted = convert(str(value))  # str: 2.5 is not silently an int 2; YAML's '1e-3' text is a float
            elif convert is str:
                if not isinstance(value, str):
                    raise TypeError
                converted = value
            else:  # an enum's or a Literal's choice function
                converted = convert(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise self._error(key, value) from None
        if action.choices is not None and converted not in action.choices:
            choices = [getattr(choice, "value", choice) for choice in action.choices]
            raise FieldValueError(f"{value!r} is not one of {choices}.{did_you_mean(str(value), map(str, choices))}")
        return getattr(converted, "value", converted) if isinstance(converted, enum.Enum) else converted

    def _error(self, key: str, value) -> FieldValueError:
        help_text = self.help(key)
        return FieldValueError(f"{value!r} should be {_type_name(self._annotations[key])}"
                               + (f" ({help_text})." if help_text else "."))
