"""MinED's two alignments by minimum edit distance (Wan et al. 2024, FuseLLM; as the DSKD authors' code uses them):
which teacher token each student token of the same text stands for, and which student token each teacher token of the
vocabulary stands for. Both compare token *strings*, where `kd_trainers.data.alignment` compares character offsets.

- **Sequence alignment** (`edit_distance_partners`): dynamic time warping over the two token sequences, the cost of a
  pair the Levenshtein distance of their texts (without the leading space, which one tokenizer writes into the token
  and another, WordPiece, drops). The warping path pairs every token with one or more of the other side; a student
  token paired with exactly one teacher token has that token as its partner, one paired with several has none.

      student  [ 4][2][ dollars]      teacher  [ 42][ dollar][s]
      path     ( 4, 42) (2, 42) ( dollars, dollar) ( dollars, s)
      partners   42       42      -  (two teacher tokens)

- **Vocabulary map** (`vocabulary_map`): each teacher token's nearest student token, the exact same text when the
  student's vocabulary has it, else the one at the least edit distance (ties: the lowest student id). The texts keep
  their leading space here, so a word-initial token maps to a word-initial one. Computed once per pair of tokenizers
  (`rapidfuzz`; each teacher token against the student tokens of about its length, which the distance bounds: 21 s
  for Qwen2.5's 152k teacher tokens against SmolLM2's 49k on 2 cores, the same map as all against all in 37 s) and
  kept in the user cache, keyed by both vocabularies.

A token's text is what its tokenizer's decoder writes for it after another word (`token_texts`): `" the"` for a
word-initial token whether the tokenizer spells it `Ġthe` (byte-level BPE), `▁the` (SentencePiece) or `the`
(WordPiece), `"ing"` for `##ing`. A lone byte of a multi-byte character decodes to U+FFFD.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from ..runtime.files import user_cache_dir
from ..runtime.progress import progress_line
from ..teacher_cache.cache import digest, tokenizer_fingerprint

# A word the decoders write as itself; decoding it before a token shows whether that token opens a new word.
_BEFORE = "a"
_MAP_VERSION = "mined-vocabulary-map-1"
_QUERY_BLOCK = 512  # teacher tokens compared with a window of the student vocabulary at once ([512, window])


def token_texts(tokenizer, tokens: Sequence[str]) -> list[str]:
    """The text each token string of `tokenizer` stands for after a word (see the module docstring). `[N]`."""
    added = {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    texts = []
    for token in tokens:
        if token in added or decoder is None:
            texts.append(token if token in added else tokenizer.convert_tokens_to_string([token]))
            continue
        decoded = decoder.decode([_BEFORE, token])
        texts.append(decoded[len(_BEFORE):] if decoded.startswith(_BEFORE) else decoded)
    return texts


def _levenshtein_matrix(queries: Sequence[str], choices: Sequence[str], dtype=np.int64) -> np.ndarray:
    """`[len(queries), len(choices)]` Levenshtein distances (rapidfuzz, both cores)."""
    return process.cdist(list(queries), list(choices), scorer=Levenshtein.distance, dtype=dtype, workers=-1)


def edit_distance_partners(student_texts: Sequence[str], teacher_texts: Sequence[str]) -> list[int]:
    """For each student token, the index of the one teacher token the warping path pairs it with, `-1` when it pairs
    with several. `student_texts` `[N_S]`, `teacher_texts` `[N_T]` (`token_texts`); returns `[N_S]`.

    The path is the least-cost monotone one from the first pair to the last, a step moving one token on either side
    or on both; where two steps cost the same, the backward trace prefers the diagonal, then a teacher step."""
    if not student_texts or not teacher_texts:
        return [-1] * len(student_texts)
    strip = [[text.lstrip() for text in texts] for texts in (teacher_texts, student_texts)]
    cost = _levenshtein_matrix(*strip)  # [N_T, N_S]: rows teacher tokens i, columns student tokens j
    total = np.empty_like(cost)
    total[0] = np.cumsum(cost[0])
    for i in range(1, cost.shape[0]):
        # total[i, j] = cost[i, j] + min(total[i-1, j], total[i-1, j-1], total[i, j-1]). The first two are known from
        # row i-1; the third runs along the row, solved at once: with P the row's running sum of costs,
        # total[i, j] = P[j] + min over k <= j of (reach[k] - P[k]), reach[k] = cost[i, k] + min(up, diagonal).
        above = total[i - 1]
        reach = cost[i] + np.minimum(above, np.concatenate(([above[0]], above[:-1])))
        running = np.cumsum(cost[i])
        total[i] = running + np.minimum.accumulate(reach - running)
    i, j = cost.shape[0] - 1, cost.shape[1] - 1
    teachers_of = [[] for _ in range(cost.shape[1])]
    teachers_of[j].append(i)
    while i > 0 or j > 0:
        steps = [(total[i - 1, j - 1] if i > 0 and j > 0 else np.inf, i - 1, j - 1),
                 (total[i - 1, j] if i > 0 else np.inf, i - 1, j),
                 (total[i, j - 1] if j > 0 else np.inf, i, j - 1)]
        _, i, j = min(steps, key=lambda step: step[0])  # the first of equal costs: diagonal, then teacher
        teachers_of[j].append(i)
    return [teachers[0] if len(teachers) == 1 else -1 for teachers in teachers_of]


class VocabularyMap(NamedTuple):
    """`to_student[t]`: the student id teacher token t maps to; `distance[t]`: the edit distance of their texts
    (0 where the student has the same text). Both `[V_T]` (the teacher tokenizer's `len`)."""

    to_student: torch.Tensor
    distance: torch.Tensor


def _compute_vocabulary_map(teacher_tokenizer, student_tokenizer) -> VocabularyMap:
    def texts(tokenizer):
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return token_texts(tokenizer, ["" if token is None else token for token in tokens])

    teacher_texts, student_texts = texts(teacher_tokenizer), texts(student_tokenizer)
    first_id = {}
    for student_id, text in enumerate(student_texts):
        first_id.setdefault(text, student_id)
    to_student = np.array([first_id.get(text, -1) for text in teacher_texts], dtype=np.int64)
    distance = np.zeros(len(teacher_texts), dtype=np.int64)
    missing = np.flatnonzero(to_student < 0)
    line = progress_line("mapping the teacher's tokens to the student's by edit distance", missing.size, "tokens")
    # Two texts whose lengths differ by d are at least d edits apart, so a teacher token need only be compared with
    # the student tokens within `radius` of its length once its best distance there is at most `radius`: none
    # outside can be as near. Most tokens have a near neighbour (distance 1 or 2), so a narrow window answers them;
    # the rest are compared again within their best distance, which is then exact. Windows keep ascending ids, so
    # the lowest id among equals still wins.
    student_lengths = np.array([len(text) for text in student_texts])
    teacher_lengths = np.array([len(teacher_texts[t]) for t in missing], dtype=np.int64)
    done = 0
    for length in np.unique(teacher_lengths):
        pending, radius = missing[teacher_lengths == length], 2
        while pending.size:
            window = np.flatnonzero(np.abs(student_lengths - length) <= radius)
            if not window.size:  # no student token that long or short: widen to the nearest lengths there are
                radius = int(np.abs(student_lengths - length).min())
                continue
            best = np.empty(pending.size, dtype=np.int64)
            for start in range(0, pending.size, _QUERY_BLOCK):
                block = pending[start:start + _QUERY_BLOCK]
                distances = _levenshtein_matrix([teacher_texts[t] for t in block], [student_texts[i] for i in window],
                                                dtype=np.int32)
                nearest = distances.argmin(axis=1)  # the first (lowest) id among equals
                to_student[block] = window[nearest]
                best[start:start + block.size] = distance[block] = distances[np.arange(block.size), nearest]
            exact = best <= radius
            done += int(exact.sum())
            line.update(done)
            pending, radius = pending[~exact], int(best[~exact].max(initial=0))
    return VocabularyMap(torch.from_numpy(to_student), torch.from_numpy(distance))


def vocabulary_map(teacher_tokenizer, student_tokenizer, cache: bool = True) -> VocabularyMap:
    """The teacher → student vocabulary map of the module docstring, read from the user cache
    (`$KD_TRAINERS_CACHE/vocabulary_maps`) when computed before, else computed and kept there (`cache=False`:
    neither read nor kept)."""
    key = digest([_MAP_VERSION, tokenizer_fingerprint(teacher_tokenizer), tokenizer_fingerprint(student_tokenizer)])
    path = os.path.join(user_cache_dir("vocabulary_maps"), f"{key}.pt")
    if cache and os.path.isfile(path):
        stored = torch.load(path)
        return VocabularyMap(stored["to_student"], stored["distance"])
    found = _compute_vocabulary_map(teacher_tokenizer, student_tokenizer)
    if cache:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # written beside, then renamed: a reader (another process of the same run) never sees half a file
        handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
        os.close(handle)
        torch.save(found._asdict(), partial)
        os.replace(partial, path)
    return found


def representatives(mapping: VocabularyMap, teacher_rows: int, student_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(student ids [K], teacher ids [K])`: for each student id some teacher token maps to, the one teacher token
    whose logit it takes (the nearest by edit distance, then the lowest id; the DSKD authors' code takes one teacher
    token per student token likewise). Only teacher ids below `teacher_rows` and student ids below `student_rows`
    (the two heads' real rows) take part."""
    to_student, distance = mapping.to_student[:teacher_rows], mapping.distance[:teacher_rows]
    teacher_ids = torch.arange(to_student.numel())
    valid = to_student < student_rows
    key = distance[valid] * (teacher_rows + 1) + teacher_ids[valid]
    best = torch.full((student_rows,), torch.iinfo(torch.long).max, dtype=torch.long)
    best.scatter_reduce_(0, to_student[valid], key, reduce="amin")
    student_ids = (best != torch.iinfo(torch.long).max).nonzero()[:, 0]
    return student_ids, best[student_ids] % (teacher_rows + 1)
