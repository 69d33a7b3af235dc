"""A trainer's batches with a served teacher's targets: the collator sends each batch's sequences to the server as it
builds the batch and puts a handle in it (`ServedTargets`); the loss takes the targets from the handle.

Why a handle and not the targets: the data loader builds batch i + 1 before the trainer computes step i (accelerate
looks one batch ahead, and a step with gradient accumulation collects its micro-batches first), so the requests are
in flight while the student computes, and a fast server costs the step almost nothing. With `prefetch=False`, or in
a data loader worker process (which already runs ahead of the step), the collator waits for the answers itself.
"""

from __future__ import annotations

import torch
from torch.utils.data import get_worker_info

from ..losses.sparse import SparseTargets
from .client import PendingTargets, TeacherClient


TARGETS_KEY = "teacher_targets"  # the batch key of the handle (the trainers keep it away from the models)


class ServedTargets:
    """A batch's targets: `get()` waits for the server's answers and returns the `SparseTargets` of the batch's label
    tokens, `N` of them in the order of `labels[:, 1:][labels[:, 1:] != -100]` (row-major)."""

    def __init__(self, pending: PendingTargets, positions: list[torch.Tensor]):
        self.pending, self.positions = pending, positions
        self._targets: SparseTargets | None = None

    def get(self) -> SparseTargets:
        if self._targets is None:
            rows = self.pending.result()  # per row: its positions 1..L-1
            parts = [row.rows(index) for row, index in zip(rows, self.positions)]
            ids, log_probs, tail = (torch.cat(tensors) for tensors in zip(*(part[:3] for part in parts)))
            self._targets = SparseTargets(ids, log_probs, tail, "top_k", label_log_probs=torch.cat(
                [part.label_log_probs for part in parts]))
        return self._targets

    def __getstate__(self):  # sent from a data loader worker: the answers, not the threads waiting for them
        self.get()
        return {"pending": None, "positions": self.positions, "_targets": self._targets}


class ServedTeacherCollator:
    """Wraps a trainer's collator (right-padded rows, one example each; not padding-free) and adds
    `batch[key]` (`teacher_targets`, or another key for one server of several), a `ServedTargets` for its label
    tokens: those of `input_ids`/`labels`, or with `prefix="teacher_"` of the teacher's own tokenization
    (`teacher_input_ids`/`teacher_labels`)."""

    def __init__(self, collator, client: TeacherClient, prefetch: bool = True, key: str = TARGETS_KEY,
                 prefix: str = ""):
        self.collator, self.client, self.prefetch, self.key = collator, client, prefetch, key
        self.prefix = prefix  # "teacher_": the server reads the teacher's own tokenization of each row

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        ids, labels = batch[self.prefix + "input_ids"], batch[self.prefix + "labels"]
        mask = batch.get(self.prefix + "attention_mask")
        if ids.size(0) != len(examples):
            raise ValueError(f"teacher_url: the collator made {ids.size(0)} rows of {len(examples)} examples (packed "
                             "or padding-free); a served teacher scores one example a row.")
        sequences, positions = [], []
        for row in range(ids.size(0)):
            length = ids.size(1) if mask is None else int(mask[row].sum())
            if mask is not None and not bool(mask[row, :length].all()):
                raise ValueError("teacher_url: the collator pads on the left; a served teacher needs right padding.")
            if bool((labels[row, length:] != -100).any()):
                raise ValueError("teacher_url: a label token falls in the padding of its row.")
            sequences.append(ids[row, :length].tolist())
            # Label position t (predicting token t + 1) is the answer's position t + 1: index t of the row's targets.
            positions.append((labels[row, 1:length] != -100).nonzero().squeeze(-1))
        targets = ServedTargets(self.client.submit(sequences), positions)
        if not self.prefetch or get_worker_info() is not None:
            targets.get()
        batch[self.key] = targets
        return batch
