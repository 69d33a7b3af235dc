"""`DSKDTrainer`: dual-space knowledge distillation, across vocabularies with cross-model attention."""

from __future__ import annotations

import contextlib
import os
import textwrap

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ..data.alignment import same_vocabulary, shared_token_ids
from ..kd.trainer import KDTrainer
from ..kd.two_tokenizers import PAIRING_BATCH_KEYS, TEACHER_BATCH_KEYS, TwoTokenizationsMixin
from ..losses import LogitTransform, dual_space_loss
from ..losses.settings import chunk_length
from ..losses.reference import loss_normalizer
from ..teachers.loading import model_name, output_head_shape
from .config import DSKDConfig
from .cross_model_attention import cross_model_attention, same_vocabulary_projection
from .exact_alignment import exact_alignment_projection, exact_pairs
from .projectors import PROJECTOR_WEIGHTS, DSKDProjectors


PROJECTORS_ATTRIBUTE = "dskd_projectors"  # where the projectors live inside the student while training


class DSKDTrainer(TwoTokenizationsMixin, KDTrainer):
    """Dual-space knowledge distillation (Zhang et al., 2024) on top of `KDTrainer`.

    The student learns from the teacher in both vocabulary spaces: the teacher's hidden states projected into the
    student's space (t2s) and the student's projected into the teacher's (s2t), each scored by its own model's output
    head. When the tokenizers differ, cross-model attention aligns the two token sequences; then every example is
    tokenized by both tokenizers from the same prompt and completion (`kd_trainers.data.dual_tokenization`).

    Called as `DSKDTrainer(student, teacher, args=DSKDConfig(...), train_dataset=..., processing_class=...,
    teacher_processing_class=...)`; `DSKDTrainer(student, args, teacher_model=teacher, ...)` (KDTrainer's order) works
    too. Otherwise takes `KDTrainer`'s arguments. The teacher's tokenizer comes from `teacher_processing_class`,
    else `DSKDConfig.teacher_tokenizer_name_or_path`, else the teacher's name or path. The projectors (`query`, `t2s`,
    `s2t`) train with the student at `projector_lr`; they live in the student module while training (so that DDP and
    DeepSpeed synchronise and checkpoint them) and are saved beside it as `dskd_projectors.safetensors`, never inside
    the saved student. Logged: `ce_loss`, `t2s_ce_loss`, `t2s_kd_loss`, `s2t_kd_loss`, `t2s_accuracy`,
    `s2t_accuracy`, `mean_token_accuracy`.

    Example (a Llama student with the demo's BPE tokenizer, a Qwen2 teacher with its WordPiece one):

        >>> import tempfile
        >>> from kd_trainers import DSKDConfig, DSKDTrainer
        >>> from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset
        >>> student_tokenizer, teacher_tokenizer = demo_tokenizer("bpe"), demo_tokenizer("wordpiece")
        >>> student = demo_model("llama", student_tokenizer, "student")
        >>> teacher = demo_model("qwen2", teacher_tokenizer, "teacher")
        >>> args = DSKDConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
        ...                   report_to=[], save_strategy="no", bf16=False)
        >>> trainer = DSKDTrainer(student, teacher, args=args, train_dataset=load_demo_dataset()["train"].select(range(8)),
        ...                       processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer)
        >>> trainer.cross_model_attention   # the tokenizers differ token by token
        True
        >>> trainer.train().global_step   # the trainer prints the run's metrics, then
        {'train_runtime': ..., 'ce_loss': ..., 't2s_ce_loss': ..., 't2s_kd_loss': ..., 's2t_kd_loss': ..., ...}
        2
    """

    _tag_names = ["trl", "sft", "kd_trainers", "knowledge-distillation", "dskd"]
    _non_model_keys = ("labels", *TEACHER_BATCH_KEYS, *PAIRING_BATCH_KEYS)
    _name = "DSKD"
    _config_class = DSKDConfig
    _paper = {
        "title": "Dual-Space Knowledge Distillation for Large Language Models",
        "id": "2406.17328",
        "citation": textwrap.dedent("""\
            @inproceedings{zhang2024dskd,
                title        = {{Dual-Space Knowledge Distillation for Large Language Models}},
                author       = {Songming Zhang and Xue Zhang and Zengkui Sun and Yufeng Chen and Jinan Xu},
                year         = 2024,
                booktitle    = {Proceedings of EMNLP 2024},
            }"""),
    }

    def _attach_trainable_modules(self, teacher) -> None:
        """Builds the projectors from both heads while the teacher is still whole, and puts them in the student."""
        args = self.args
        student_head = self.model.get_output_embeddings().weight
        teacher_head = teacher.get_output_embeddings().weight
        # Seeded here, so the initial projectors depend on `seed` alone, not on what consumed random numbers before
        # (process count, DeepSpeed, data loading): one and several processes start from the same projectors.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            projectors = DSKDProjectors(output_head_shape(self.model)[1], output_head_shape(teacher)[1],
                                        bias=args.projector_bias)
        if args.projector_init == "pinv":
            student_ids, teacher_ids = shared_token_ids(self.processing_class, self.teacher_processing_class)
            with maybe_gather_lm_head_ctx(student_head, teacher_head):  # whole heads under ZeRO-3
                projectors.init_from_heads(student_head.detach().cpu(), teacher_head.detach().cpu(), student_ids,
                                           teacher_ids)
        if args.projector_path is not None:
            projectors.load_saved(args.projector_path)
        self.model.add_module(PROJECTORS_ATTRIBUTE, projectors.to(student_head.device, student_head.dtype))

    # ----------------------------------------------------------------------------------------------------------------
    # Tokenizers and data

    def _check_tokenizers(self, args, student_tokenizer, teacher_tokenizer, student_name: str,
                          teacher_name: str) -> None:
        """Decides whether cross-model attention is needed; refuses what cannot work before any data is touched."""
        same = same_vocabulary(student_tokenizer, teacher_tokenizer)
        requested = args.cross_model_attention
        if requested is False and not same:
            raise ValueError(
                f"cross_model_attention=False needs one shared vocabulary, but the student ({student_name}) and the "
                f"teacher ({teacher_name}) tokenize differently. Leave cross_model_attention=None (it turns on for "
                "different tokenizers) or use a teacher with the student's tokenizer."
            )
        # DSKDv2's exact token alignment takes cross-model attention's place across vocabularies
        self.exact_alignment = not same and args.token_alignment == "exact" and requested is None
        self.cross_model_attention = (not same and not self.exact_alignment) if requested is None else requested
        if self._tokenizes_twice() and args.t2s_target == "teacher_argmax":
            raise ValueError(
                "t2s_target='teacher_argmax' needs the teacher's prediction at each student position, which exists "
                "only under one shared vocabulary. Use t2s_target='gold'."
            )
        if self._tokenizes_twice() and args.packing:
            raise ValueError("packing=True cannot be combined with DSKD across vocabularies, which aligns each "
                             "example's two tokenizations separately. Set packing=False.")

    def _tokenizes_twice(self) -> bool:
        return self.cross_model_attention or self.exact_alignment

    @property
    def _aligns_tokens(self) -> bool:
        """Exact token alignment reads the aligned groups; cross-model attention learns its own alignment."""
        return self.exact_alignment

    # ----------------------------------------------------------------------------------------------------------------
    # Optimizer: the projectors get their own learning rate

    @property
    def projectors(self) -> DSKDProjectors:
        return getattr(self.accelerator.unwrap_model(self.model), PROJECTORS_ATTRIBUTE)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        projector_ids = {id(p) for p in self.projectors.parameters()}
        projector_groups = []
        for group in optimizer.param_groups:
            moved = [p for p in group["params"] if id(p) in projector_ids]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in projector_ids]
                projector_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                         "lr": self.args.projector_lr})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        for group in projector_groups:
            optimizer.add_param_group(group)
        return optimizer

    # ----------------------------------------------------------------------------------------------------------------
    # Loss

    def _distillation_forward(self, student, inputs: dict, num_items_in_batch, mode: str):
        teacher = self.accelerator.unwrap_model(self.teacher.model)  # a model in memory: its hidden states are read
        student_inputs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        labels = inputs["labels"][:, 1:]
        teacher_inputs = self._teacher_inputs(inputs) if self._tokenizes_twice() else student_inputs
        student_transform = LogitTransform.from_config(student.config)
        student_hidden, aux_loss = self._student_hidden(student, student_inputs)
        student_hidden = student_hidden[:, :-1]
        projectors = getattr(student, PROJECTORS_ATTRIBUTE)
        t2s_labels = None  # the t2s targets: the student's labels, unless a branch below says otherwise
        if self.cross_model_attention:
            teacher_labels = inputs["teacher_labels"][:, 1:]
            teacher_hidden = self.teacher.hidden_states(self, teacher_inputs)[:, :-1]
            t2s_hidden, s2t_hidden = cross_model_attention(
                projectors, student_hidden, student.get_input_embeddings(), student_inputs["input_ids"][:, :-1],
                labels, student_inputs["attention_mask"][:, :-1].bool(), teacher_hidden,
                teacher.get_input_embeddings(), teacher_inputs["input_ids"][:, :-1], teacher_labels,
                teacher_inputs["attention_mask"][:, :-1].bool(),
            )
        elif self.exact_alignment:
            teacher_hidden = self.teacher.hidden_states(self, teacher_inputs)[:, :-1]
            teacher_of_student, student_of_teacher = exact_pairs(
                labels, inputs["aligned_group"][:, 1:], inputs["teacher_labels"][:, 1:],
                inputs["teacher_aligned_group"][:, 1:])
            t2s_hidden, s2t_hidden = exact_alignment_projection(projectors, student_hidden, teacher_hidden,
                                                                teacher_of_student, student_of_teacher)
            # the t2s and s2t terms read the exact pairs only; the student's CE keeps every label
            teacher_labels = inputs["teacher_labels"][:, 1:].masked_fill(student_of_teacher < 0, -100)
            t2s_labels = labels.masked_fill(teacher_of_student < 0, -100)
        else:
            teacher_labels = labels
            teacher_hidden = self.teacher.hidden_states(self, student_inputs)[:, :-1]
            t2s_hidden, s2t_hidden = same_vocabulary_projection(projectors, student_hidden, teacher_hidden)
        if self.args.t2s_target == "teacher_argmax":
            t2s_labels = self._teacher_argmax(teacher_hidden, teacher, labels)

        losses = dual_space_loss(
            student_hidden, student.get_output_embeddings(), t2s_hidden, labels,
            teacher_hidden, teacher.get_output_embeddings(), s2t_hidden, teacher_labels, self._settings_for(mode),
            s2t_divergence=self.args.s2t_divergence, gate_t2s_kd=self._tokenizes_twice(), t2s_labels=t2s_labels,
            num_items_in_batch=num_items_in_batch, student_vocab_size=self.distilled_vocab_size,
            teacher_vocab_size=self.teacher_vocab_size, chunk_size=self.args.loss_chunk_size,
            memory_budget_mb=self.args.loss_memory_budget_mb, compile=self.args.loss_compile,
            student_transform=student_transform, teacher_transform=self.teacher.transform,
            noise_seed=self._noise_seed(mode),
        )
        num_tokens = (labels != -100).sum()
        num_teacher_tokens = (teacher_labels != -100).sum()
        normalizer = loss_normalizer(num_tokens, num_items_in_batch)
        # Every term is a sum divided by the student token count; the logs show each per student token.
        metrics = {name: (getattr(losses, name) * normalizer, num_tokens)
                   for name in ("ce_loss", "t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss")}
        metrics.update(mean_token_accuracy=(losses.num_correct, num_tokens),
                       t2s_accuracy=(losses.t2s_num_correct, num_tokens),
                       s2t_accuracy=(losses.s2t_num_correct, num_teacher_tokens))
        return self._with_router_loss(losses.loss, metrics, aux_loss, num_items_in_batch)

    def _teacher_argmax(self, teacher_hidden, teacher, labels) -> torch.Tensor:
        """DSKDv2's t2s target: the teacher's own prediction at each label position (same vocabulary), `[B, T]`."""
        head = teacher.get_output_embeddings()
        targets = torch.full_like(labels, -100)
        mask = labels != -100
        rows = teacher_hidden[mask]
        chunk = chunk_length(head.weight.shape[0], 1, rows.device, self.args.loss_chunk_size,  # one [chunk, V]
                             self.args.loss_memory_budget_mb)
        predictions = [head(rows[start:start + chunk])[:, : self.distilled_vocab_size].argmax(-1)
                       for start in range(0, rows.size(0), chunk)]
        targets[mask] = torch.cat(predictions) if predictions else targets[mask]
        return targets

    # ----------------------------------------------------------------------------------------------------------------
    # Saving and resuming: a clean student, the projectors beside it

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        prefix = PROJECTORS_ATTRIBUTE + "."
        projector_state = {key.split(prefix, 1)[1]: value for key, value in state_dict.items() if prefix in key}
        student_state = {key: value for key, value in state_dict.items() if prefix not in key}
        with self._projectors_detached():
            super()._save(output_dir, state_dict=student_state)
        if self.args.should_save:
            self.projectors.save(output_dir, projector_state)

    @contextlib.contextmanager
    def _projectors_detached(self):
        """The student without its projectors, so that transformers and PEFT see (and save or load) a plain model."""
        student = self.accelerator.unwrap_model(self.model)
        projectors = student._modules.pop(PROJECTORS_ATTRIBUTE)
        try:
            yield
        finally:
            student._modules[PROJECTORS_ATTRIBUTE] = projectors

    @contextlib.contextmanager
    def published_model(self):
        """The student without its projectors (they are a training device, not part of the model)."""
        with self._projectors_detached():
            yield self.accelerator.unwrap_model(self.model)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_deepspeed_enabled:  # the DeepSpeed engine checkpoint holds the projectors with the student
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        with self._projectors_detached():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not os.path.exists(os.path.join(resume_from_checkpoint, PROJECTOR_WEIGHTS)):
            raise FileNotFoundError(f"{resume_from_checkpoint} has no {PROJECTOR_WEIGHTS}: it was not written by "
                                    "DSKDTrainer, so the projectors cannot resume from it.")
        self.projectors.load_saved(resume_from_checkpoint)

    def kd_settings(self) -> dict[str, object]:
        settings = super().kd_settings()
        args = self.args
        settings.update(
            method=("DSKD with cross-model attention" if self.cross_model_attention else
                    "DSKD with exact token alignment" if self.exact_alignment else "DSKD (same vocabulary)"),
            token_alignment=args.token_alignment if self._tokenizes_twice() else None,
            teacher_tokenizer=model_name(self.teacher_processing_class), projector_lr=args.projector_lr,
            projector_init=args.projector_init, t2s_target=args.t2s_target,
            teacher_temperature=self.loss_settings.teacher_temperature, s2t_divergence=args.s2t_divergence,
        )
        return settings
