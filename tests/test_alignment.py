"""`kd_trainers.data.alignment` against a reference written from the definition (the groups end at the cuts both
sides make), on synthetic offsets and on the demo's BPE/WordPiece pair over texts that tokenize very differently."""

import random

import pytest

from kd_trainers.data.alignment import aligned_groups, running_ends, tokens_with_offsets
from kd_trainers.data.dual_tokenization import DualTokenizationCollator, DualTokenizer
from kd_trainers.demo.tokenizers import demo_tokenizer

HARD_TEXTS = [
    "The answer is 1234567.89 and 0.000042, not -17.",
    "spaces:   three,\ttab,\n\n\nthree newlines,      six",
    "Café, naïve, Ångström, résumé, São Paulo, Zürich",
    "emoji 😀👍🏽 and 🇫🇷 flags, ✓ marks ✗",
    "def f(x):\n    return {'k': [x ** 2, x // 3]}  # code\n",
    "ALL CAPS WordPiece lowercases, MiXeD cAsE",
    "",
]


def reference_groups(student_offsets, teacher_offsets):
    """From the definition: the cuts are the running ends both sides reach; a token belongs to the group of the first
    cut at or after its running end; tokens past the last cut form the last group."""
    student_ends, teacher_ends = running_ends(student_offsets), running_ends(teacher_offsets)
    cuts = sorted(set(student_ends) & set(teacher_ends))

    def group_of(end):
        return next((index for index, cut in enumerate(cuts) if end <= cut), len(cuts))

    groups = []
    for index in range(len(cuts) + 1):
        student = [i for i, end in enumerate(student_ends) if group_of(end) == index]
        teacher = [i for i, end in enumerate(teacher_ends) if group_of(end) == index]
        if student or teacher:
            groups.append((student, teacher))
    return groups


def as_lists(groups):
    return [(list(student), list(teacher)) for student, teacher in groups]


def random_offsets(rng, length):
    """Tokens over `length` characters: spans that may skip characters, repeat a character (pieces of one character)
    or be zero-width."""
    offsets, position = [], 0
    while position < length:
        start = position + (rng.random() < 0.2)
        end = min(length, start + rng.randint(0, 4))
        offsets.append((start, end))
        if rng.random() < 0.15:
            offsets.append((start, end))  # a second piece of the same characters
        position = max(position, end) if end > start else position + 1
    return offsets


def test_the_docstring_example():
    # "Café 42": student [Ca][f][é][ 4][2], teacher [Caf][é][ 42]
    student = [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7)]
    teacher = [(0, 3), (3, 4), (4, 7)]
    assert as_lists(aligned_groups(student, teacher)) == [([0, 1], [0]), ([2], [1]), ([3, 4], [2])]


def test_groups_equal_the_definition_on_random_offsets():
    rng = random.Random(0)
    for _ in range(500):
        length = rng.randint(0, 40)
        student, teacher = random_offsets(rng, length), random_offsets(rng, length)
        assert as_lists(aligned_groups(student, teacher)) == reference_groups(student, teacher), (student, teacher)


def test_pieces_of_one_character_and_zero_width_tokens_never_close_a_group():
    # é as two byte-level pieces on one side, a BOS (0, 0) on both, an EOS at the end on one side only
    student = [(0, 0), (0, 1), (1, 2), (1, 2), (2, 3)]
    teacher = [(0, 0), (0, 2), (2, 3), (3, 3)]
    assert as_lists(aligned_groups(student, teacher)) == [([0], [0]), ([1, 2, 3], [1]), ([4], [2, 3])]
    # the student stops early (truncated): its rest is a last group with an empty student side
    assert as_lists(aligned_groups([(0, 2)], [(0, 2), (2, 5), (5, 6)])) == [([0], [0]), ([], [1, 2])]


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_the_demo_pair_aligns_hard_texts(text):
    """The demo's byte-level BPE (student) and WordPiece (teacher) over numbers, whitespace runs, accents, emoji and
    code: the groups partition both sequences, equal the definition, end together, and each side covers the same
    visible characters of its group's span of text."""
    student_ids, student = tokens_with_offsets(demo_tokenizer("bpe"), text)
    teacher_ids, teacher = tokens_with_offsets(demo_tokenizer("wordpiece"), text)
    groups = aligned_groups(student, teacher)
    assert as_lists(groups) == reference_groups(student, teacher)
    assert [i for s, _ in groups for i in s] == list(range(len(student_ids)))
    assert [i for _, t in groups for i in t] == list(range(len(teacher_ids)))
    if text:
        assert len(student_ids) != len(teacher_ids) or student != teacher  # the two really tokenize differently
        assert any(len(s) != len(t) for s, t in groups)
    previous = 0
    for s, t in groups:
        if not s or not t:  # the last group only: one side's tokens over what the other skips (a final newline)
            assert (s, t) == groups[-1] and text[previous:].strip() == ""
            continue
        cut = max(student[i][1] for i in s)
        assert cut == max(teacher[i][1] for i in t)
        for side, positions in ((student, s), (teacher, t)):
            covered = set().union(*(range(side[i][0], side[i][1]) for i in positions))
            visible = {c for c in range(previous, cut) if not text[c].isspace()}
            assert visible <= covered and min(covered, default=cut) >= previous
        previous = cut


def test_a_slow_tokenizer_is_refused_with_the_fix():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="Slow is not a fast tokenizer.*use_fast=True"):
        tokens_with_offsets(Slow(), "text")


def completion_groups(row, side):
    prefix = "" if side == "student" else "teacher_"
    groups = row[f"{prefix}aligned_group"]
    first = row[f"{prefix}completion_mask"].index(1)
    return groups[:first], groups[first:]


@pytest.mark.parametrize("example", [
    {"prompt": "What is 2+2? ", "completion": "It is 4, café 3.14 ok"},
    {"messages": [{"role": "user", "content": "Say   it:  x=1"}, {"role": "assistant", "content": "Çà va, 1 000 €!"}]},
])
def test_the_dual_tokenizer_marks_each_tokens_aligned_group(example):
    """Both sides' completion tokens get the group numbers of `aligned_groups` over their offsets from the
    completion's start (the chat template's prompt differs per tokenizer, the answer's text is the same); the prompt
    gets -1. Checked against the groups of each side's completion text tokenized alone."""
    tokenizers = demo_tokenizer("bpe"), demo_tokenizer("wordpiece")
    row = DualTokenizer(*tokenizers, max_length=None, align=True)(example)
    sides = [completion_groups(row, side) for side in ("student", "teacher")]
    for prompt, completion in sides:
        assert set(prompt) == {-1} and completion[0] == 0 and -1 not in completion
        assert completion == sorted(completion)
    # Each side's completion tokens (text then its end marker) line up group by group as their offsets say.
    text = example.get("completion")
    if text is None:  # the answer as the chat template renders it after the generation prompt (a leading space here)
        full = tokenizers[0].apply_chat_template(example["messages"], tokenize=False)
        prompt = tokenizers[0].apply_chat_template(example["messages"][:-1], add_generation_prompt=True, tokenize=False)
        text = full[len(prompt):].removesuffix(tokenizers[0].eos_token)
        assert text.strip() == example["messages"][-1]["content"]
    expected = aligned_groups(*(tokens_with_offsets(tokenizer, text)[1] for tokenizer in tokenizers))
    for side, (_, completion) in enumerate(sides):
        numbered = [number for number, group in enumerate(expected[:-1]) for _ in group[side]]
        assert completion[:len(numbered)] == numbered
    # the same tokenizer on both sides: one token a group
    same = DualTokenizer(tokenizers[0], tokenizers[0], max_length=12, align=True)(example)
    assert same["aligned_group"] == same["teacher_aligned_group"]
    assert completion_groups(same, "student")[1] == list(range(len(completion_groups(same, "student")[1])))


def test_the_collator_pads_the_groups_with_minus_one():
    tokenizers = demo_tokenizer("bpe"), demo_tokenizer("wordpiece")
    tokenize = DualTokenizer(*tokenizers, max_length=None, align=True)
    rows = [tokenize({"prompt": "Q ", "completion": text}) for text in ("a b c d e f", "g")]
    batch = DualTokenizationCollator(0, 0)(rows)
    assert batch["aligned_group"].shape == batch["input_ids"].shape
    assert batch["teacher_aligned_group"].shape == batch["teacher_input_ids"].shape
    assert batch["aligned_group"][1, len(rows[1]["input_ids"]):].eq(-1).all()
    assert ((batch["aligned_group"] >= 0) == (batch["labels"] != -100)).all()
