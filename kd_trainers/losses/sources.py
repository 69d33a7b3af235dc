"""The teacher as the engine consumes it, whatever it is: a model's hidden states and head (`DenseMember`) or a sparse
distribution per label token (`SparseMember`: a cache's or a server's top-k); several of them mixed are
`mixture.MixedTeachers`. Each source prepares its engine side for one call (`prepare`: its label rows, its head cut to
the distilled vocabulary), which fills a chunk's teacher logits (`fill_`); the fused function asks every teacher the
same things and never which kind it is."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .heads import project_into, weight_and_bias
from .settings import LogitTransform, LossSettings
from .sparse import SparseTargets, check_sparse_settings, fill_teacher_logits_, takes_sparse_forward_kl


class EngineTeacher:
    """A teacher prepared for one engine call (`*Member.prepare`): what the fused function reads of it.

    `rows` `[N, D_T]`: the hidden states the engine passes through autograd (a model's; `[N, 0]` for the others),
    `transform`: the logit transform applied after the teacher-side terms, `extra_buffers`: the `[chunk, V]` buffers it
    works in beyond the engine's own (the last ones of `scratch`)."""

    rows: torch.Tensor
    transform: LogitTransform = LogitTransform()
    extra_buffers: int = 0
    weight: torch.Tensor | None = None  # a model's head, for the teacher-side CE's gradient into its hidden states

    def fill_(self, out: torch.Tensor, chunk: slice, student_logits: torch.Tensor, settings: LossSettings,
              student_transform: LogitTransform, scratch: list[torch.Tensor], closed_form: bool):
        """Writes the chunk's raw teacher logits `[n, V]` into `out`; returns a sparse target `(targets, tail)` for the
        closed form to take directly instead (forward KL against a sparse teacher), else None."""
        raise NotImplementedError

    def finish(self, out):
        """The engine's output as the entry point returns it (a mixture adds each teacher's own term)."""
        return out


class _DenseChunks(EngineTeacher):
    def __init__(self, rows, weight, bias, transform):
        self.rows, self.weight, self.bias, self.transform = rows, weight, bias, transform

    def fill_(self, out, chunk, student_logits, settings, student_transform, scratch, closed_form):
        project_into(out, self.rows[chunk], self.weight, self.bias)
        return None


class _SparseChunks(EngineTeacher):
    def __init__(self, rows, targets: SparseTargets, tail: str):
        self.rows, self.targets, self.tail = rows, targets, tail

    def fill_(self, out, chunk, student_logits, settings, student_transform, scratch, closed_form):
        if takes_sparse_forward_kl(settings) and closed_form:  # the closed form reads the target itself
            return self.targets.rows(chunk), self.tail
        # The teacher from its stored distribution (the bucket tail reads the student's logits).
        fill_teacher_logits_(out, self.targets.rows(chunk), settings.temperature, self.tail, student_logits,
                             scratch[0], student_transform)
        return None


class DenseMember(NamedTuple):
    """A teacher given as hidden states `[B, T, D]` or `[N, D]` and its output head (`nn.Linear` or `(weight, bias)`),
    with its logit transform."""

    hidden: torch.Tensor
    lm_head: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None]
    transform: LogitTransform = LogitTransform()

    def head_params(self) -> tuple:
        """The head's parameters, gathered whole under ZeRO-3 while the engine reads them."""
        return weight_and_bias(self.lm_head)

    def head_rows(self) -> list[int]:
        """The rows of its head, which bound the distilled vocabulary (read while gathered)."""
        return [weight_and_bias(self.lm_head)[0].size(0)]

    def prepare(self, labels: torch.Tensor, mask: torch.Tensor, vocab: int, settings: LossSettings,
                student_rows: torch.Tensor, keeps_grad: bool = False) -> EngineTeacher:
        """Its rows at the label tokens (`mask` `[B·T]` of `labels`) and its head's first `vocab` rows, detached (the
        rows keep their gradient when `keeps_grad`: DSKD's teacher-side CE trains what produced them)."""
        rows = self.hidden.reshape(-1, self.hidden.size(-1))[mask]
        weight, bias = weight_and_bias(self.lm_head)
        return _DenseChunks(rows if keeps_grad else rows.detach(), weight[:vocab].detach(),
                            None if bias is None else bias[:vocab].detach(), self.transform)


class SparseMember(NamedTuple):
    """A teacher given as sparse targets `[N, k]` (a cache's, a server's), one row per label token in row-major order,
    with its tail treatment (`kd_trainers.losses.sparse`)."""

    targets: SparseTargets
    tail: str = "bucket"

    def head_params(self) -> tuple:
        return ()

    def head_rows(self) -> list[int]:
        return []

    def prepare(self, labels: torch.Tensor, mask: torch.Tensor, vocab: int, settings: LossSettings,
                student_rows: torch.Tensor, keeps_grad: bool = False) -> EngineTeacher:
        """Its targets on the student's device, checked against the settings and the label tokens."""
        check_sparse_settings(self.targets.kind, self.tail, settings.divergence)
        count = student_rows.size(0)
        if self.targets.ids.size(0) != count:
            raise ValueError(f"The sparse teacher has {self.targets.ids.size(0)} rows for {count} label tokens: it "
                             "must hold one row per label token, in order.")
        return _SparseChunks(student_rows.new_zeros(count, 0), self.targets.to(student_rows.device), self.tail)
