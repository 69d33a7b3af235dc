"""Teacher-logit noise keyed to the token's position.

The noise row added to the teacher's logits at position `(b, t)` of a batch is a function of `(seed, b, t)` alone:
not of the chunk size, not of which other positions are masked, not of the order the engine visits tokens in. So the
reference and the chunked engine draw the same noise, and a run resumed with another `loss_chunk_size` (or another
packing of prompts) sees the same noise at the same token as the uninterrupted run.

Each row is drawn from its own generator seeded by a 63-bit mix of `(seed, b, t)`. One `randn(V)` call per token costs
about what one `randn(n, V)` call costs per chunk: the work is the V numbers, not the call.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One step of SplitMix64 (Steele et al., 2014): a fast bijective mix of 64-bit integers."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a generator's `manual_seed` takes < 2**63)."""
    value = 0
    for part in parts:
        value = _splitmix64(value ^ (int(part) & _MASK64))
    return value >> 1


def grid_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rows [N], columns [N])` of every entry of a `[B, T]` (or `[N]`: one row) label tensor, flattened in order."""
    if labels.dim() == 1:
        columns = torch.arange(labels.numel(), device=labels.device)
        return torch.zeros_like(columns), columns
    rows, columns = labels.shape[-2], labels.shape[-1]
    index = torch.arange(rows * columns, device=labels.device)
    return index // columns, index % columns


def position_noise_(out: torch.Tensor, seed: int, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Fill `out` `[n, V]` with N(0, 1) noise, row i a function of `(seed, rows[i], columns[i])` alone."""
    generator = torch.Generator(device=out.device)
    for index, (row, column) in enumerate(zip(rows.tolist(), columns.tolist())):
        generator.manual_seed(mix_seed(seed, row, column))
        torch.randn(out.shape[1:], generator=generator, dtype=out.dtype, device=out.device, out=out[index])
    return out
