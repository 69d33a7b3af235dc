"""The part of vLLM's OpenAI-compatible completions API a served teacher speaks, written down exactly.

Request: `POST {base_url}/completions` (base_url ends in `/v1`), JSON:

    {"model": NAME, "prompt": [[id, id, ...], ...], "max_tokens": 1, "prompt_logprobs": K,
     "temperature": 1.0, "n": 1, "stream": false}

- `prompt` is a list of token-id lists (the OpenAI API's "array of token arrays"): the server does not re-tokenize.
- `prompt_logprobs: K` asks for the K most probable next tokens at every prompt position (a vLLM extension of the
  API; vLLM refuses K above its `--max-logprobs`, 20 unless set).
- `max_tokens: 1`: vLLM generates at least one token (`max_tokens: 0` is allowed only with `echo`); it is ignored.
- vLLM's prompt log-probabilities are the model's raw `log_softmax` (its default `--logprobs-mode raw_logprobs`);
  `temperature: 1.0` keeps them so where a server applies its sampling settings to them. The package tempers the
  targets itself (`kd_temperature`).

Response (HTTP 200), JSON:

    {"id": ..., "object": "text_completion", "model": NAME,
     "choices": [{"index": i, "text": ..., "prompt_token_ids": [...] (vLLM, optional),
                  "prompt_logprobs": [null, {"<id>": {"logprob": -0.1, "rank": 1, "decoded_token": "..."}, ...}, ...]},
                 ...]}

- one choice per prompt, `index` its position in `prompt` (with `n: 1`);
- `prompt_logprobs[j]` is the distribution of prompt token j given tokens 0..j-1: position 0 has none (`null`);
  positions 1..L-1 map token ids (as strings, JSON's keys) to their log-probability at temperature 1 and their rank in
  the vocabulary (1 = most probable). vLLM puts the K most probable tokens and the prompt token itself (its own rank,
  which may be above K) in each position's map.

What the client checks of every answer, before a step may use it: one choice per prompt; L entries for a prompt of L
tokens; at each position j ≥ 1 the prompt token j itself (the answer is for the sequence that was sent, not a shifted
or another one) and at least K entries; finite log-probabilities ≤ 0 whose probabilities sum to at most one; ids
inside the student's vocabulary; `prompt_token_ids`, when given, equal to what was sent. An answer that fails any of
these is not used: it is asked again, like an answer that never came.

The distillation target at a label position t (the student predicts token t + 1 from tokens 0..t) is
`prompt_logprobs[t + 1]`: its K most probable ids and log-probabilities, and the log of the mass outside them
(`kd_trainers.losses.sparse.SparseTargets`, kind `top_k`), with the prompt token's own log-probability there (its
`label_log_probs`: what a teacher of another tokenizer is read by, `kd_trainers.losses.aligned`).
"""

from __future__ import annotations

import math

import torch

from ..losses.sparse import SparseTargets, log1mexp
from ..teacher_cache.format import TAIL_FLOOR  # the lowest log tail mass kept, as the cache keeps it


# Probabilities may sum a little above one in the server's float arithmetic (and JSON's decimal digits).
SUM_SLACK = 1e-3


class InvalidAnswer(ValueError):
    """A server's answer that a step must not use (malformed, short, for another sequence)."""


def completion_request(model: str, sequences: list[list[int]], k: int) -> dict:
    """The JSON body asking for the top-`k` prompt log-probabilities of `sequences`."""
    return {"model": model, "prompt": [list(map(int, ids)) for ids in sequences], "max_tokens": 1,
            "prompt_logprobs": int(k), "temperature": 1.0, "n": 1, "stream": False}


def _position(entry, token: int, k: int, vocab: int, where: str) -> tuple[list[int], list[float], float]:
    """The `k` most probable `(ids, log_probs)` of one position's map, checked, and the prompt token's own
    log-probability. Entries ranked above `k` (vLLM adds the prompt token with its own rank) are not part of the
    target."""
    if not isinstance(entry, dict):
        raise InvalidAnswer(f"{where}: expected a map of token ids to log-probabilities, got {type(entry).__name__}")
    if str(token) not in entry:
        raise InvalidAnswer(f"{where}: the prompt token {token} is missing (the answer is not for the sequence sent)")
    pairs = []
    for key, value in entry.items():
        logprob = value.get("logprob") if isinstance(value, dict) else value
        if not isinstance(logprob, (int, float)) or not math.isfinite(logprob) or logprob > 1e-4:
            raise InvalidAnswer(f"{where}: token {key} has log-probability {logprob!r}")
        token_id = int(key)
        if not 0 <= token_id < vocab:
            raise InvalidAnswer(f"{where}: token id {token_id} is outside the vocabulary of {vocab} tokens")
        rank = value.get("rank") if isinstance(value, dict) else None
        if isinstance(rank, int) and rank > k:
            continue  # the prompt token outside the top k (vLLM adds it): not part of the target
        pairs.append((float(logprob), token_id))
    if len(pairs) < k:
        raise InvalidAnswer(f"{where}: {len(pairs)} of the top {k} tokens, fewer than asked for")
    pairs.sort(key=lambda pair: (-pair[0], pair[1]))
    top = pairs[:k]
    own = entry[str(token)]
    return ([token_id for _, token_id in top], [logprob for logprob, _ in top],
            float(own.get("logprob") if isinstance(own, dict) else own))


def parse_completion(answer, sequences: list[list[int]], k: int, vocab: int) -> list[SparseTargets]:
    """Per sequence of L tokens, the `SparseTargets` of its positions 1..L-1 (`[L-1, k]`), from a completions answer;
    `InvalidAnswer` naming the first thing wrong."""
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        raise InvalidAnswer("no `choices` list in the answer")
    choices = answer["choices"]
    if len(choices) != len(sequences):
        raise InvalidAnswer(f"{len(choices)} choices for {len(sequences)} prompts")
    try:
        choices = sorted(choices, key=lambda choice: choice["index"])
    except (KeyError, TypeError):
        raise InvalidAnswer("a choice without an `index`") from None
    targets = []
    for row, (choice, ids) in enumerate(zip(choices, sequences)):
        positions = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
        if not isinstance(positions, list):
            raise InvalidAnswer(f"prompt {row}: no `prompt_logprobs` list")
        if len(positions) != len(ids):
            raise InvalidAnswer(f"prompt {row}: {len(positions)} positions for a prompt of {len(ids)} tokens")
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != list(ids):
            raise InvalidAnswer(f"prompt {row}: the server read other token ids than were sent")
        top_ids, top_log_probs, own_log_probs = [], [], []
        for position in range(1, len(ids)):
            position_ids, position_log_probs, own = _position(positions[position], int(ids[position]), k, vocab,
                                                              f"prompt {row}, position {position}")
            top_ids.append(position_ids)
            top_log_probs.append(position_log_probs)
            own_log_probs.append(own)
        log_probs = torch.tensor(top_log_probs, dtype=torch.float64).reshape(-1, k)
        mass = torch.logsumexp(log_probs, -1)
        if (mass > math.log1p(SUM_SLACK)).any():
            raise InvalidAnswer(f"prompt {row}: the top-{k} probabilities sum to {mass.exp().max().item():.4f} > 1")
        tail = log1mexp(mass.clamp(max=0.0)).clamp(min=TAIL_FLOOR)
        # The k probabilities to exactly the mass the tail leaves, so that each position sums to one.
        log_probs = log_probs - mass[:, None] + log1mexp(tail)[:, None]
        targets.append(SparseTargets(torch.tensor(top_ids, dtype=torch.long).reshape(-1, k), log_probs.float(),
                                     tail.float(), "top_k",
                                     label_log_probs=torch.tensor(own_log_probs, dtype=torch.float32)))
    return targets


def served_models(answer) -> list[dict]:
    """The `data` list of a `GET /models` answer (`[{"id": NAME, "root": ..., ...}]`)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("data"), list) or not answer["data"]:
        raise InvalidAnswer("no models listed in the answer to GET /models")
    return answer["data"]
