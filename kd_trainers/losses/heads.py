"""Reading an output head inside the engine: its weight and bias (`weight_and_bias`), gathered whole under DeepSpeed
ZeRO-3 (`maybe_gather`), its first rows (`vocabulary_rows`), and a chunk's logits written into a buffer
(`project_into`)."""

from __future__ import annotations

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx


def project_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """`hidden @ weight^T + bias` written into the fp32 buffer `out` `[n, V]` (computed in the model's dtype)."""
    if hidden.dtype == out.dtype:
        if bias is None:
            return torch.mm(hidden, weight.T, out=out)
        return torch.addmm(bias, hidden, weight.T, out=out)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return out.copy_(logits)


def vocabulary_rows(tensor: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """The first `count` rows of a head's weight or bias; the tensor itself when that is all of it, so that its
    gradient reaches the parameter directly (a slice's backward would build a second `[V, D]` tensor)."""
    if tensor is None or tensor.size(0) == count:
        return tensor
    return tensor[:count]


def weight_and_bias(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, torch.nn.Module):
        return head.weight, getattr(head, "bias", None)
    weight, bias = head
    return weight, bias


def maybe_gather(*params):
    """Under DeepSpeed ZeRO-3 the heads are partitioned; gather them while the engine reads them directly."""
    return maybe_gather_lm_head_ctx(*[p for p in params if isinstance(p, torch.nn.Parameter)])
