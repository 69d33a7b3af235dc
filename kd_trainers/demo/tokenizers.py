"""Two deliberately different tokenizers trained locally on the demo corpus (the `tokenizers` library, no download).

- `"bpe"`: byte-level BPE, 640 entries, Llama-style specials (`<s>` BOS prepended, `</s>` EOS, `<pad>`).
- `"wordpiece"`: lowercasing WordPiece, 480 entries, no BOS, `<|endoftext|>` EOS, `[PAD]`, `[UNK]`.

Different vocabularies, sizes and special tokens, as between Llama and Mistral or Qwen: what the vocabulary check of
`KDTrainer` and DSKD's cross-model attention exist for. Both carry the same simple chat template, so the
conversational dataset formats work too.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .task import demo_corpus

# Q/A turns; "A:" alone is the generation prompt, so a prompt's rendering is a prefix of prompt + completion.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Q: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}A: {% generation %}{{ message['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)

TOKENIZER_KINDS = ("bpe", "wordpiece")


def _train_bpe(corpus: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def _train_wordpiece(corpus: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=480, special_tokens=["[PAD]", "[UNK]", "<|endoftext|>"],
                                        show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="[PAD]",
                                   unk_token="[UNK]", chat_template=CHAT_TEMPLATE)


def demo_tokenizer(kind: str = "bpe", seed: int = 0) -> PreTrainedTokenizerFast:
    """Train one of the demo tokenizers (about a second). Save it with `save_pretrained` to load it by path."""
    corpus = demo_corpus(seed=seed)
    if kind == "bpe":
        return _train_bpe(corpus)
    if kind == "wordpiece":
        return _train_wordpiece(corpus)
    raise ValueError(f"Unknown demo tokenizer kind {kind!r}; use one of {TOKENIZER_KINDS}.")
