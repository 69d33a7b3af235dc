"""`GOLDTrainer`: ULD with the exact part on the tokens both vocabularies share (GOLD's hybrid loss)."""

from __future__ import annotations

import textwrap

from ..data.alignment import shared_token_ids
from ..uld.trainer import ULDTrainer
from .config import GOLDConfig


class GOLDTrainer(ULDTrainer):
    """GOLD's hybrid cross-tokenizer distillation (TRL's `trl.experimental.gold`) on top of `ULDTrainer`: at each
    aligned group, the generalized JSD on the token strings both vocabularies contain (`gold_beta`) and ULD on the
    rest, weighted by `gold_matched_weight` (default: the shared share of the teacher's vocabulary). Called and
    logged as `ULDTrainer`; the shared tokens are found once, from the two tokenizers' vocabularies.
    """

    _tag_names = ["trl", "sft", "kd_trainers", "knowledge-distillation", "gold", "cross-tokenizer"]
    _name = "GOLD"
    _config_class = GOLDConfig
    _paper = {
        "title": "Unlocking On-Policy Distillation for Any Model Family",
        "citation": textwrap.dedent("""\
            @misc{hf2025gold,
                title        = {{Unlocking On-Policy Distillation for Any Model Family}},
                author       = {{Hugging Face}},
                year         = 2025,
                howpublished = {\\url{https://huggingface.co/spaces/HuggingFaceH4/on-policy-distillation}},
            }"""),
    }

    def _shared_ids(self):
        if getattr(self, "_shared", None) is None:
            student_ids, teacher_ids = shared_token_ids(self.processing_class, self.teacher_processing_class)
            # only rows both heads score (a tokenizer may hold more tokens than a padded head's real rows, or fewer)
            keep = (student_ids < self.distilled_vocab_size) & (teacher_ids < self.teacher_vocab_size)
            device = self.accelerator.device
            self._shared = student_ids[keep].to(device), teacher_ids[keep].to(device)
        return self._shared

    def kd_settings(self) -> dict[str, object]:
        settings = super().kd_settings()
        settings.update(gold_beta=self.args.gold_beta, gold_matched_weight=self.args.gold_matched_weight,
                        shared_tokens=int(self._shared_ids()[0].numel()))
        return settings
