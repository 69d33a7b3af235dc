"""How one example's sparse teacher is stored: a few bytes per label token, in one compressed record.

For an example with n label tokens and k ids per token (`top_k`: the k most probable; `sampled`: k draws), each token's
ids are put in order of decreasing log-probability, and the record is three parts, then zstd (through pyarrow):

    ids      n·k ids, as their lowest `id_bytes` bytes (2 for vocabularies up to 65,536, 3 up to 16.7M), stored by
             byte plane: every id's low byte, then every id's next byte, ... (Blosc's "shuffle"). The high plane of a
             152k vocabulary holds only 0, 1 and 2, which zstd shrinks to about a bit per id.
    codes    n·k log-probabilities quantised to bytes: code = round(−log p · 16), clipped to 0..255 (a step of 1/16 nat,
             so a probability is kept within ±3.2%, down to e^−16 ≈ 1e−7), stored as differences from the previous
             code of the same token (the codes only grow along a token's ids: small numbers, which zstd packs).
    tails    m·n log tail masses, float16, clipped to [−60, 0], one row of n per stored temperature (the cache's
             `temperatures`, 1 first): `top_k`: log of the probability outside the k ids of softmax(z / T), the
             quantity that makes the tempered target exact (`losses.sparse.tempered_top_k`).

    labels   n log-probabilities of each position's label token at temperature 1, float16, clipped to [−60, 0]:
             only in a cache of the teacher's own tokenization (a teacher of another tokenizer), whose aligned
             losses merge a group's tokens by them. 2 bytes a token more.

Before compression that is k·(id_bytes + 1) + 2·m bytes a token: 130 at k = 32 and one temperature, 132 with a
second, for any vocabulary up to 16.7M tokens. Decoding renormalises the k dequantised probabilities to 1 − tail, so
a token's reconstruction always sums to 1.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from ..losses.sparse import SparseTargets


CODE_STEP = 1.0 / 16.0   # nats per quantisation step
TAIL_FLOOR = -60.0       # log tail mass kept: e^-60 is 0 for any loss in fp32
COMPRESSION_LEVEL = 9    # zstd; level 9 writes at hundreds of MB/s, far above a teacher's token rate
_CODEC = pa.Codec("zstd", compression_level=COMPRESSION_LEVEL)


def id_bytes_for(vocab: int) -> int:
    """Bytes kept of each token id: the fewest that hold every id below `vocab`."""
    return max(1, math.ceil(math.log2(max(vocab, 2)) / 8))


def encode(ids: torch.Tensor, log_probs: torch.Tensor, tail_log_mass: torch.Tensor, id_bytes: int,
           label_log_probs: torch.Tensor | None = None) -> bytes:
    """One example's record. `ids` `[n, k]`, `log_probs` `[n, k]` (any order), `tail_log_mass` `[n]`, or `[m, n]`
    for m temperatures (temperature 1 first); `label_log_probs` `[n]` or None (see the module docstring)."""
    order = log_probs.argsort(-1, descending=True)
    ids = ids.gather(-1, order).cpu().numpy().astype("<u4")
    log_probs = log_probs.gather(-1, order).float().cpu().numpy()
    planes = ids.reshape(-1, 1).view(np.uint8)[:, :id_bytes].T  # [id_bytes, n·k], low byte first
    codes = np.clip(np.rint(-log_probs / CODE_STEP), 0, 255).astype(np.int16)
    deltas = np.diff(codes, axis=-1, prepend=0).astype(np.uint8)  # ≥ 0: the codes grow along each token
    tail = np.clip(tail_log_mass.float().cpu().numpy(), TAIL_FLOOR, 0.0).astype("<f2")
    raw = planes.tobytes() + deltas.tobytes() + tail.tobytes()
    if label_log_probs is not None:
        raw += np.clip(label_log_probs.float().cpu().numpy(), TAIL_FLOOR, 0.0).astype("<f2").tobytes()
    return _CODEC.compress(raw, asbytes=True)


def raw_size(num_tokens: int, k: int, id_bytes: int, num_tails: int = 1, labels: bool = False) -> int:
    """Bytes of a record before compression (`num_tails`: the stored temperatures; `labels`: with the label
    log-probabilities)."""
    return num_tokens * (k * (id_bytes + 1) + 2 * num_tails + 2 * labels)


def decode(record: bytes, num_tokens: int, k: int, id_bytes: int, kind: str, num_tails: int = 1,
           tempered_index: int = 0, temperature: float = 1.0, labels: bool = False) -> SparseTargets:
    """The example's `SparseTargets` (CPU tensors) from its record; with several stored temperatures, the tail at
    `temperature` (row `tempered_index` of the tails) as its `tempered_tail_log_mass`; with `labels`, the label
    log-probabilities."""
    raw = np.frombuffer(_CODEC.decompress(record, raw_size(num_tokens, k, id_bytes, num_tails, labels),
                                          asbytes=True), dtype=np.uint8)
    count = num_tokens * k
    planes = raw[: count * id_bytes].reshape(id_bytes, count)
    ids = np.zeros((count, 4), dtype=np.uint8)
    ids[:, :id_bytes] = planes.T
    ids = ids.view("<u4").reshape(num_tokens, k).astype(np.int64)
    codes = np.cumsum(raw[count * id_bytes: count * (id_bytes + 1)].reshape(num_tokens, k), axis=-1, dtype=np.int64)
    tails_end = count * (id_bytes + 1) + 2 * num_tails * num_tokens
    tails = np.frombuffer(raw[count * (id_bytes + 1): tails_end].tobytes(), dtype="<f2").astype(np.float32)
    tails = torch.from_numpy(tails.reshape(num_tails, num_tokens))
    label_log_probs = None
    if labels:
        label_log_probs = torch.from_numpy(np.frombuffer(raw[tails_end:].tobytes(), dtype="<f2").astype(np.float32))
    log_probs = torch.from_numpy(-codes * CODE_STEP).float()
    tail = tails[0]
    if kind == "top_k":
        # The k probabilities to the mass the tail leaves: each token's reconstruction sums to exactly 1.
        top_mass = torch.log(-torch.expm1(tail.double())).float() if num_tokens else tail
        log_probs = log_probs - torch.logsumexp(log_probs, -1, keepdim=True) + top_mass[:, None]
    return SparseTargets(torch.from_numpy(ids), log_probs, tail, kind, tails[tempered_index].clone(), temperature,
                         label_log_probs)
