"""Tiny causal LMs for the demo task, built from transformers configs with random weights (no download).

The same code paths as real Hub models: these are ordinary `LlamaForCausalLM`, `Qwen2ForCausalLM` and
`MistralForCausalLM` instances, only small.
"""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedModel,
                          PreTrainedTokenizerBase, Qwen2Config)

ARCHITECTURES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}

# Named sizes: (hidden size, layers, attention heads). The teacher is twice as wide and deep as the student.
# student_xs / student_l: the other student sizes of the student-size study.
SIZES = {"student": (64, 2, 4), "teacher": (128, 4, 4), "bench_student": (128, 2, 4), "bench_teacher": (256, 4, 4),
         "student_xs": (32, 1, 2), "student_l": (96, 3, 4)}


def demo_config(arch: str, vocab_size: int, *, hidden_size: int, num_layers: int, num_heads: int,
                tokenizer: PreTrainedTokenizerBase | None = None, max_position_embeddings: int = 2048):
    """A transformers config of the given architecture and dimensions."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown demo architecture {arch!r}; use one of {sorted(ARCHITECTURES)}.")
    special = {}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    return ARCHITECTURES[arch](
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False, **special,
    )


def demo_model(arch: str = "llama", tokenizer: PreTrainedTokenizerBase | None = None, size: str = "student", *,
               vocab_size: int | None = None, seed: int = 0, **dims) -> PreTrainedModel:
    """A randomly initialised tiny causal LM, reproducible from `seed`.

    Args:
        arch: `llama`, `qwen2` or `mistral`.
        tokenizer: sets the vocabulary size (`len(tokenizer)`) and the special token ids.
        size: a key of `SIZES`, or override with `hidden_size`, `num_layers`, `num_heads` in `dims`.
        vocab_size: instead of a tokenizer (benchmarks).
    """
    hidden_size, num_layers, num_heads = SIZES[size]
    dims = {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads, **dims}
    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("demo_model needs a tokenizer or a vocab_size.")
        vocab_size = len(tokenizer)
    config = demo_config(arch, vocab_size, tokenizer=tokenizer, **dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
