"""The DSKD projectors: `query` (cross-model attention), `t2s` (teacher -> student space), `s2t` (student -> teacher).

As in the official code (`distiller.py`, `projector_config.json`): three `nn.Linear` layers with bias, PyTorch's default
initialisation, no activation, all three built even when `query` is unused (same vocabulary):

    query: Linear(2·D_S -> 2·D_T)   t2s: Linear(D_T -> D_S)   s2t: Linear(D_S -> D_T)

DSKDv2 options: bias-free layers, and `t2s`/`s2t` initialised by pseudo-inverses of the output heads over the shared
vocabulary, t2s = W_Tᵀ·pinv(W_Sᵀ) so that W_S·t2s(h_T) ≈ W_T·h_T (student logits of a teacher state ≈ teacher logits).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn


PROJECTOR_WEIGHTS = "dskd_projectors.safetensors"


class DSKDProjectors(nn.Module):
    """The three projectors of DSKD, for a student of width `student_hidden_size` and a teacher of `teacher_hidden_size`."""

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, bias: bool = True):
        super().__init__()
        self.student_hidden_size, self.teacher_hidden_size, self.bias = student_hidden_size, teacher_hidden_size, bias
        self.query = nn.Linear(2 * student_hidden_size, 2 * teacher_hidden_size, bias=bias)
        self.t2s = nn.Linear(teacher_hidden_size, student_hidden_size, bias=bias)
        self.s2t = nn.Linear(student_hidden_size, teacher_hidden_size, bias=bias)

    @torch.no_grad()
    def init_from_heads(self, student_head: torch.Tensor, teacher_head: torch.Tensor,
                        student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> None:
        """DSKDv2's pseudo-inverse initialisation of `t2s` and `s2t` from the output heads.

        Args:
            student_head: `[V_S, D_S]`; teacher_head: `[V_T, D_T]`.
            student_ids / teacher_ids: `[K]` rows of the same tokens in each head (the shared vocabulary).
        """
        w_s = student_head[student_ids].float()  # [K, D_S]
        w_t = teacher_head[teacher_ids].float()  # [K, D_T]
        # t2s maps h_T to A·h_T with A [D_S, D_T] (= its weight) minimising ‖w_s·A − w_t‖: A = pinv(w_s)·w_t, so that
        # the student head scores t2s(h_T) like the teacher head scores h_T (W_Tᵀ·pinv(W_Sᵀ) in the spec's notation).
        self.t2s.weight.copy_((torch.linalg.pinv(w_s) @ w_t).to(self.t2s.weight.dtype))
        self.s2t.weight.copy_((torch.linalg.pinv(w_t) @ w_s).to(self.s2t.weight.dtype))
        for layer in (self.t2s, self.s2t):
            if layer.bias is not None:
                layer.bias.zero_()

    def sizes(self) -> dict[str, int | bool]:
        """What the projectors are built from (`DSKDProjectors(**sizes)`); saved in the weights file's metadata."""
        return {"student_hidden_size": self.student_hidden_size, "teacher_hidden_size": self.teacher_hidden_size,
                "bias": self.bias}

    def save(self, directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Writes `dskd_projectors.safetensors` into `directory`, with `sizes()` in its metadata.

        `state_dict` replaces this module's weights in the file: under ZeRO-3 the parameters here are partitioned, and
        the caller passes the consolidated ones.
        """
        projectors = self
        if state_dict is not None:
            projectors = DSKDProjectors(**self.sizes())
            projectors.load_state_dict({name: tensor.detach().cpu() for name, tensor in state_dict.items()})
        os.makedirs(directory, exist_ok=True)
        save_model(projectors, os.path.join(directory, PROJECTOR_WEIGHTS),
                   metadata={key: json.dumps(value) for key, value in self.sizes().items()})

    @staticmethod
    def saved_sizes(directory: str) -> dict[str, int | bool]:
        with safe_open(os.path.join(directory, PROJECTOR_WEIGHTS), framework="pt") as handle:
            return {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}

    @classmethod
    def from_saved(cls, directory: str) -> "DSKDProjectors":
        projectors = cls(**cls.saved_sizes(directory))
        load_model(projectors, os.path.join(directory, PROJECTOR_WEIGHTS))
        return projectors

    def load_saved(self, directory: str) -> None:
        """Loads weights saved by `save` into these projectors, checking that the sizes agree."""
        saved = self.saved_sizes(directory)
        if saved != self.sizes():
            raise ValueError(f"The projectors in {directory} were built for {saved}, these are {self.sizes()}.")
        load_model(self, os.path.join(directory, PROJECTOR_WEIGHTS), device=str(self.query.weight.device))
