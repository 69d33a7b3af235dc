"""Which tokens of two tokenizations of one text cover the same characters: the alignment that every cross-tokenizer
method pairing positions by their text shares (ULD's and GOLD's merged positions, DSKDv2's exact token alignment;
MinED pairs tokens by edit distance instead, `kd_trainers.data.edit_distance`); and which token strings two
vocabularies share (`shared_token_ids`: DSKD's projector initialisation, GOLD's exact part).

Two tokenizers cut a text at different places. Where both cut after the same character, everything before is covered
by whole tokens on both sides; the tokens between two such common cuts form one aligned group:

    text      "Café 42"
    student   [Ca][f][é][ 4][2]          ends  2 3 4 6 7
    teacher   [Caf][é][ 42]              ends  3 4 7
    groups    ([Ca][f], [Caf])  ([é], [é])  ([ 4][2], [ 42])      (common ends 3, 4, 7)

A group is one-to-one where the tokenizers agree (then the two tokens are the same text), many-to-one or many-to-many
where they do not. The groups are the finest partition of both sequences whose parts end together.

Positions are character offsets into the one text both sides tokenized (a fast tokenizer's `offset_mapping`), so the
two sides share a coordinate system without decoding a token. Only a token's end is read: a WordPiece token that
skips the space before it, or a byte-level one that includes it, ends in the same place. A token that ends no later
than the token before it (the second byte-level piece of an accented letter or an emoji, a byte-fallback piece, a
zero-width special token) cannot close a group: groups close between characters only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Offsets = Sequence[tuple[int, int]]


def running_ends(offsets: Offsets) -> list[int]:
    """Each token's end as a cut: the furthest character any token up to it covers. `[N]` for `N` tokens."""
    ends, furthest = [], 0
    for _, end in offsets:
        furthest = max(furthest, int(end))
        ends.append(furthest)
    return ends


def aligned_groups(student_offsets: Offsets, teacher_offsets: Offsets) -> list[tuple[range, range]]:
    """The aligned groups of two tokenizations of one text, in order: `(student positions, teacher positions)`.

    Args:
        student_offsets / teacher_offsets: `(start, end)` character offsets of each token into the same text, `[N_S]`
            and `[N_T]` (a fast tokenizer's `offset_mapping`, or `tokens_with_offsets`).

    Returns ranges that partition `range(N_S)` and `range(N_T)`. Each group but the last ends on both sides at one
    character; every cut both sides make closes a group. Tokens after the last common cut (one side's end-of-turn
    marker, text one side truncated) form a last group, whose other side may be empty.
    """
    student_ends, teacher_ends = running_ends(student_offsets), running_ends(teacher_offsets)
    groups, s, t, s_start, t_start = [], 0, 0, 0, 0
    while s < len(student_ends) and t < len(teacher_ends):
        if student_ends[s] < teacher_ends[t]:
            s += 1
        elif student_ends[s] > teacher_ends[t]:
            t += 1
        else:
            cut = student_ends[s]
            # Tokens that do not move past the cut (pieces of the same character, zero-width tokens) stay in this group.
            while s < len(student_ends) and student_ends[s] == cut:
                s += 1
            while t < len(teacher_ends) and teacher_ends[t] == cut:
                t += 1
            groups.append((range(s_start, s), range(t_start, t)))
            s_start, t_start = s, t
    if s_start < len(student_ends) or t_start < len(teacher_ends):
        groups.append((range(s_start, len(student_ends)), range(t_start, len(teacher_ends))))
    return groups


def require_fast_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer without character offsets (a slow one), naming the fix."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: aligning two tokenizations needs each "
                         "token's character offsets; load it with AutoTokenizer.from_pretrained(..., use_fast=True).")


def tokens_with_offsets(tokenizer, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """`(ids, offsets)` of `text`: the token ids and each token's `(start, end)` characters. Needs a fast tokenizer
    (one backed by the `tokenizers` library), which tracks offsets through its normaliser and pre-tokeniser."""
    require_fast_tokenizer(tokenizer)
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]


def same_vocabulary(student_tokenizer, teacher_tokenizer) -> bool:
    """True when both tokenizers map every token string to the same id (compared token by token, not by size)."""
    return student_tokenizer is teacher_tokenizer or student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()


def shared_token_ids(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """`(student_ids [K], teacher_ids [K])` of the token strings both vocabularies contain, in string order."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    shared = sorted(set(student_vocab) & set(teacher_vocab))
    return (torch.tensor([student_vocab[token] for token in shared], dtype=torch.long),
            torch.tensor([teacher_vocab[token] for token in shared], dtype=torch.long))
