"""`ULDTrainer`: universal logit distillation across tokenizers, at the aligned groups of the two tokenizations."""

from __future__ import annotations

import textwrap

from ..kd.trainer import KDTrainer
from ..kd.two_tokenizers import PAIRING_BATCH_KEYS, TEACHER_BATCH_KEYS, TwoTokenizationsMixin
from ..losses import LogitTransform
from ..losses.aligned import Side, SparseSide, aligned_distillation_loss
from ..losses.compiled import say_not_compiled
from ..served_teacher import TARGETS_KEY
from ..teacher_cache import BATCH_KEYS
from ..losses.reference import loss_normalizer
from ..teachers.loading import model_name
from .config import ULDConfig


class ULDTrainer(TwoTokenizationsMixin, KDTrainer):
    """Universal logit distillation (Boizard et al., 2024) between models whose tokenizers differ, on top of
    `KDTrainer`.

    Each example is tokenized by both tokenizers, and the completion's tokens of the two sides are grouped where they
    cover the same characters (`kd_trainers.data.alignment`). For every group, each side's distribution (merged over
    the group's tokens as GOLD merges them, `uld_merge`) is sorted and the two compared by their L1 distance, which
    needs no mapping between the vocabularies. The student also trains on its own labels (CE), mixed by `kd_weight`.

    Called as `ULDTrainer(student, teacher, args=ULDConfig(...), train_dataset=..., processing_class=...,
    teacher_processing_class=...)`, or in `KDTrainer`'s order (`teacher_model=`). The teacher's tokenizer comes from
    `teacher_processing_class`, else `ULDConfig.teacher_tokenizer_name_or_path`, else the teacher's name or path.
    Logged: `ce_loss`, `kd_loss` (per student token), `aligned_groups` (the share of student tokens that start a
    scored group), `mean_token_accuracy`.

    Example (a Llama student with the demo's BPE tokenizer, a Qwen2 teacher with its WordPiece one):

        >>> import tempfile
        >>> from kd_trainers.uld import ULDConfig, ULDTrainer
        >>> from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset
        >>> student_tokenizer, teacher_tokenizer = demo_tokenizer("bpe"), demo_tokenizer("wordpiece")
        >>> student = demo_model("llama", student_tokenizer, "student")
        >>> teacher = demo_model("qwen2", teacher_tokenizer, "teacher")
        >>> args = ULDConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
        ...                  report_to=[], save_strategy="no", bf16=False)
        >>> trainer = ULDTrainer(student, teacher, args=args, train_dataset=load_demo_dataset()["train"].select(range(8)),
        ...                      processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer)
        >>> trainer.train().global_step   # the trainer prints the run's metrics, then
        {'train_runtime': ..., 'ce_loss': ..., 'kd_loss': ..., ...}
        2
    """

    _tag_names = ["trl", "sft", "kd_trainers", "knowledge-distillation", "uld", "cross-tokenizer"]
    _non_model_keys = ("labels", *TEACHER_BATCH_KEYS, *PAIRING_BATCH_KEYS, *BATCH_KEYS, TARGETS_KEY)
    _name = "ULD"
    _aligns_tokens = True
    _config_class = ULDConfig
    _paper = {
        "title": "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
        "id": "2402.12030",
        "citation": textwrap.dedent("""\
            @article{boizard2024uld,
                title        = {{Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs}},
                author       = {Nicolas Boizard and Kevin El Haddad and C{\\'e}line Hudelot and Pierre Colombo},
                year         = 2024,
                journal      = {arXiv preprint arXiv:2402.12030},
            }"""),
    }

    def _compares_logits(self, args) -> bool:
        """The two distributions are compared sorted, never token id by token id: the heads may differ in size."""
        return False

    def _check_tokenizers(self, args, student_tokenizer, teacher_tokenizer, student_name: str,
                          teacher_name: str) -> None:
        """Any two tokenizers with character offsets (fast ones); packing is refused (each example aligns alone)."""
        for role, tokenizer, name in (("student", student_tokenizer, student_name),
                                      ("teacher", teacher_tokenizer, teacher_name)):
            if not getattr(tokenizer, "is_fast", False):
                raise ValueError(f"The {role}'s tokenizer ({name}) is not a fast tokenizer: {self._name} aligns "
                                 "the two tokenizations by each token's character offsets. Load it with "
                                 "AutoTokenizer.from_pretrained(..., use_fast=True).")
        if args.packing:
            raise ValueError(f"packing=True cannot be combined with {self._name}, which aligns each example's "
                             "two tokenizations separately. Set packing=False.")

    def _shared_ids(self):
        """The hybrid's exact part reads the token strings both vocabularies share; plain ULD none."""
        return None

    def _distillation_forward(self, student, inputs: dict, num_items_in_batch, mode: str):
        student_inputs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        labels = inputs["labels"][:, 1:]
        student_hidden, aux_loss = self._student_hidden(student, student_inputs)
        teacher_labels, teacher_groups = inputs["teacher_labels"][:, 1:], inputs["teacher_aligned_group"][:, 1:]
        if self.teacher.model is None:  # a cache or a server: its top k at the teacher's own label tokens
            targets = self.teacher.engine_source(self, inputs, student_inputs).targets.to(student_hidden.device)
            teacher_side = SparseSide(targets, teacher_labels, teacher_groups, self.teacher_vocab_size)
        else:
            teacher = self.accelerator.unwrap_model(self.teacher.model)
            teacher_hidden = self.teacher.hidden_states(self, self._teacher_inputs(inputs))
            teacher_side = Side(teacher_hidden[:, :-1], teacher.get_output_embeddings(), teacher_labels,
                                teacher_groups, self.teacher.transform, self.teacher_vocab_size)
        losses = aligned_distillation_loss(
            Side(student_hidden[:, :-1], student.get_output_embeddings(), labels, inputs["aligned_group"][:, 1:],
                 LogitTransform.from_config(student.config), self.distilled_vocab_size),
            teacher_side,
            self._settings_for(mode), self.args.aligned_settings(), shared_ids=self._shared_ids(),
            num_items_in_batch=num_items_in_batch, chunk_size=self.args.loss_chunk_size,
            memory_budget_mb=self.args.loss_memory_budget_mb, noise_seed=self._noise_seed(mode))
        say_not_compiled("ULD's aligned loss", self.args.loss_compile, labels.device)
        metrics = self._logged_terms(losses, labels, num_items_in_batch, "aligned_groups", losses.num_pairs)
        return self._with_router_loss(losses.loss, metrics, aux_loss, num_items_in_batch)

    @staticmethod
    def _logged_terms(losses, labels, num_items_in_batch, share_name: str, share_count) -> dict:
        """The logged terms as `(sum, tokens)`: CE and KD per student token (the loss divided by N: back to sums),
        `share_name` the share of student tokens that `share_count` counts, and the token accuracy."""
        num_tokens = (labels != -100).sum()
        normalizer = loss_normalizer(num_tokens, num_items_in_batch)
        return {"ce_loss": (losses.ce_loss * normalizer, num_tokens),
                "kd_loss": (losses.kd_loss * normalizer, num_tokens),
                share_name: (share_count.to(num_tokens.device).float(), num_tokens),
                "mean_token_accuracy": (losses.num_correct, num_tokens)}

    def kd_settings(self) -> dict[str, object]:
        settings = super().kd_settings()
        settings.update(method=self._name + " across tokenizers", divergence=self.args.aligned_settings().distance,
                        teacher_tokenizer=model_name(self.teacher_processing_class), uld_merge=self.args.uld_merge)
        return settings
