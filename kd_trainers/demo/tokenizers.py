"""Two deliberately different tokenizers trained locally on the demo corpus (the `tokenizers` library, no download).

- `"bpe"`: byte-level BPE, 640 entries, Llama-style specials (`<s>` BOS prepended, `</s>` EOS, `<pad>`).
- `"wordpiece"`: lowercasing WordPiece, 480 entries, no BOS, `<|endoftext|>` EOS, `[PAD]`, `[UNK]`.

Different vocabularies, sizes and special tokens, as between Llama and Mistral or Qwen: what the vocabulary check of
`KDTrainer` and DSKD's cross-model attention exist for. Both carry the same simple chat template, so the
conversational dataset formats work too.
"""

from __future__ import annotations

from collections import Counter

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


def _train_wordpiece(corpus: list[str], vocab_size: int = 480) -> PreTrainedTokenizerFast:
    """A lowercasing WordPiece tokenizer whose vocabulary is built here from word frequencies: the special tokens, the
    alphabet alone and as `##` continuations, then the most frequent words (ties broken alphabetically).

    Not `tokenizers.trainers.WordPieceTrainer`: it breaks ties between equally frequent merges in hash order, which
    differs from process to process, and every process of a multi-process run must build the same tokenizer.
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for line in corpus
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    alphabet = sorted({character for word in counts for character in word})
    tokens = ["[PAD]", "[UNK]", "<|endoftext|>", *alphabet, *(f"##{c}" for c in alphabet)]
    known = set(tokens)
    frequent = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if word not in known]
    tokens += frequent[: vocab_size - len(tokens)]
    tokenizer = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(tokens)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
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
