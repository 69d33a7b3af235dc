"""The built-in demo task: data, two local tokenizers, and tiny models. Tests and the quickstart run on it."""

from .models import ARCHITECTURES, SIZES, demo_model
from .task import GLOSSARY, demo_domain_text, demo_pairs, load_demo_dataset
from .tokenizers import TOKENIZER_KINDS, demo_tokenizer

__all__ = ["ARCHITECTURES", "GLOSSARY", "SIZES", "TOKENIZER_KINDS", "demo_domain_text", "demo_model", "demo_pairs",
           "demo_tokenizer", "load_demo_dataset"]
