"""Loading a tokenizer by name or path, keeping a folder's own `tokenizer.json` as it was saved.

transformers 5 rebuilds the tokenizer of some model types (its `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`: qwen2,
phi3, jamba, ...) from the saved vocabulary with that family's own pre-tokenizer, whatever `tokenizer.json` says. A
Qwen2 model saved with another tokenizer (the demo's WordPiece teacher, or any Qwen2 architecture trained with a
tokenizer of its own) then comes back tokenizing text differently from how it was trained, silently: a distillation
from it compares the student with a teacher reading garbage. `load_tokenizer` loads the saved file as it is when the
two disagree.
"""

from __future__ import annotations

import json
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


def _kind(spec: dict) -> tuple:
    """What makes two tokenizers tokenize differently at the top level: the model and the pre-tokenizer types."""
    return (spec.get("model") or {}).get("type"), (spec.get("pre_tokenizer") or {}).get("type")


def load_tokenizer(name_or_path: str, **kwargs) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name_or_path)`, or the folder's `tokenizer.json` as saved when the class that
    transformers picks for the model type rebuilds another kind of tokenizer (see the module docstring)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    saved_path = os.path.join(str(name_or_path), "tokenizer.json")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not os.path.isfile(saved_path):
        return tokenizer
    with open(saved_path) as handle:
        saved = json.load(handle)
    if _kind(saved) != _kind(json.loads(backend.to_str())):
        return PreTrainedTokenizerFast.from_pretrained(name_or_path, **kwargs)
    return tokenizer
