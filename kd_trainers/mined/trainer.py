"""`MinEDTrainer`: distillation across tokenizers through MinED's edit-distance alignments."""

from __future__ import annotations

import textwrap

from ..data.dual_tokenization import PARTNER_COLUMN
from ..data.edit_distance import representatives, vocabulary_map
from ..losses import LogitTransform
from ..losses.compiled import say_not_compiled
from ..losses.mapped import MappedSide, mapped_distillation_loss
from ..teachers.loading import model_name
from ..uld.trainer import ULDTrainer
from .config import MinEDConfig


class MinEDTrainer(ULDTrainer):
    """MinED (Wan et al. 2024, FuseLLM; the DSKD authors' cross-tokenizer baseline) between models whose tokenizers
    differ, with `ULDTrainer`'s handling of the two tokenizations and of the call.

    Each example is tokenized by both tokenizers; dynamic time warping over the two completions' token texts, with
    the edit distance as the cost, gives each student token its partner in the teacher's tokenization
    (`kd_trainers.data.edit_distance`). The teacher's distribution at the partner is carried into the student's
    vocabulary by a map from each teacher token to the student token of least edit distance (computed once per pair
    of tokenizers, kept in the user cache), and the student takes the forward KL from it. A student token without a
    partner, or whose partner's token the map does not carry to it, takes its one-hot label (the tempered CE), as in
    the authors' code. The student also trains on its own labels (CE), mixed by `kd_weight`.

    Called as `ULDTrainer` is. Logged: `ce_loss`, `kd_loss` (per student token), `mapped_tokens` (the share of
    student tokens distilled through the map), `mean_token_accuracy`.
    """

    _tag_names = ["trl", "sft", "kd_trainers", "knowledge-distillation", "mined", "cross-tokenizer"]
    _name = "MinED"
    _aligns_tokens = False
    _pairs_by_edit_distance = True
    _config_class = MinEDConfig
    _paper = {
        "title": "Knowledge Fusion of Large Language Models",
        "id": "2401.10491",
        "citation": textwrap.dedent("""\
            @inproceedings{wan2024fusellm,
                title        = {{Knowledge Fusion of Large Language Models}},
                author       = {Fanqi Wan and Xinting Huang and Deng Cai and Xiaojun Quan and Wei Bi and Shuming Shi},
                year         = 2024,
                booktitle    = {The Twelfth International Conference on Learning Representations},
            }"""),
    }

    def _vocabulary_map(self):
        """`(teacher → student ids [V_T], student ids [K], their representative teacher ids [K])` on the device,
        found once per trainer (from the user cache after the first run with this pair of tokenizers)."""
        if getattr(self, "_mapping", None) is None:
            mapping = vocabulary_map(self.teacher_processing_class, self.processing_class)
            student_ids, teacher_ids = representatives(mapping, self.teacher_vocab_size, self.distilled_vocab_size)
            to_student = mapping.to_student[:self.teacher_vocab_size]
            device = self.accelerator.device
            self._mapping = to_student.to(device), student_ids.to(device), teacher_ids.to(device)
        return self._mapping

    def _distillation_forward(self, student, inputs: dict, num_items_in_batch, mode: str):
        student_inputs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        teacher = self.accelerator.unwrap_model(self.teacher.model)
        labels = inputs["labels"][:, 1:]
        to_student, student_ids, teacher_ids = self._vocabulary_map()
        # A partner at teacher position j is predicted from position j - 1 (both sides' states are shifted); it
        # counts only where the map carries the partner's token to the student's own token.
        partner = inputs[PARTNER_COLUMN][:, 1:]
        partner_token = inputs["teacher_input_ids"].gather(1, partner.clamp_min(0))
        agrees = to_student[partner_token.clamp_max(to_student.numel() - 1)] == labels
        partners = (partner - 1).masked_fill((partner < 1) | ~agrees, -1)
        student_hidden, aux_loss = self._student_hidden(student, student_inputs)
        teacher_hidden = self.teacher.hidden_states(self, self._teacher_inputs(inputs))
        losses = mapped_distillation_loss(
            MappedSide(student_hidden[:, :-1], student.get_output_embeddings(),
                       LogitTransform.from_config(student.config), self.distilled_vocab_size),
            MappedSide(teacher_hidden[:, :-1], teacher.get_output_embeddings(), self.teacher.transform,
                       self.teacher_vocab_size),
            labels, partners, (student_ids, teacher_ids), self._settings_for(mode),
            num_items_in_batch=num_items_in_batch, chunk_size=self.args.loss_chunk_size,
            memory_budget_mb=self.args.loss_memory_budget_mb, noise_seed=self._noise_seed(mode))
        say_not_compiled("MinED's mapped loss", self.args.loss_compile, labels.device)
        metrics = self._logged_terms(losses, labels, num_items_in_batch, "mapped_tokens", losses.num_aligned)
        return self._with_router_loss(losses.loss, metrics, aux_loss, num_items_in_batch)

    def kd_settings(self) -> dict[str, object]:
        settings = super(ULDTrainer, self).kd_settings()  # past ULD's own settings (its merge): not MinED's
        settings.update(method="MinED across tokenizers", divergence="forward_kl",
                        teacher_tokenizer=model_name(self.teacher_processing_class),
                        mapped_student_tokens=int(self._vocabulary_map()[1].numel()))
        return settings
