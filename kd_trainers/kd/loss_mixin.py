"""The distillation loss shared by the trainers on a shared vocabulary (KD, Seq-KD, GKD): the fused chunked loss,
teacher-logit noise, pooled metrics and the model card's KD section. The trainer holds `self.teacher` (any kind,
`kd_trainers.teachers`; set up by `kd_trainers.kd.teacher_setup`) and calls `_init_distillation(args)` at the end of
its `__init__`."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings

import torch
from huggingface_hub import ModelCard
from trl import SFTTrainer
from trl.models.utils import _ForwardRedirection, unwrap_model_for_generation

from ..models.hidden_states import hidden_state_and_router_loss, last_hidden_state
from ..losses import LogitTransform, LossSettings, teacher_distillation_terms
from ..losses.reference import loss_normalizer
from ..served_teacher import TARGETS_KEY
from ..teacher_cache import BATCH_KEYS
from ..teachers.loading import model_name
from .heads import check_engine_logits


class DistillationLossMixin:
    """`compute_loss` as `(1 − kd_weight)·CE + kd_weight·KD` through the chunked engine, for a trainer with a teacher."""

    _non_model_keys: tuple[str, ...] = ("labels", *BATCH_KEYS, TARGETS_KEY)  # batch keys the models must not receive

    @classmethod
    def _as_kd_config(cls, model, args):
        """`args` as the trainer's config class (`cls._config_class`): as given, converted from an `SFTConfig` with the
        KD defaults, or a default one named after the model when None."""
        if isinstance(args, cls._config_class):
            return args
        if args is None:
            name = model_name(model).split("/")[-1].lstrip("<").rstrip(">")
            return cls._config_class(output_dir=f"{name}-{cls._name}")
        return cls._config_class.from_sft_config(args)

    @staticmethod
    def _with_teacher_source(args, **given):
        """`args` with the trainer's `teacher_cache` / `teacher_url` arguments in their fields (a field and the
        argument must not disagree), checked as the config checks them."""
        changed = False
        for name, value in given.items():
            if value is None or value == getattr(args, name, None):
                continue
            if getattr(args, name, None) is not None:
                raise ValueError(f"{name}={value!r} is passed to the trainer and the config has "
                                 f"{name}={getattr(args, name)!r}: give one.")
            setattr(args, name, value)
            changed = True
        if changed:  # checked as the config checks its own fields: the method's needs first, then the kind's settings
            args.teacher_needs().check_config(args)
            args._check_teacher_sources()
        return args

    @staticmethod
    def _refuse_compute_loss_func(args, compute_loss_func) -> None:
        """A `compute_loss_func` replaces SFT's loss; beside a KD term it would be silently dropped, so it is refused."""
        if compute_loss_func is not None and args.kd_weight > 0:
            raise ValueError(
                f"compute_loss_func is SFTTrainer's replacement for its own loss; the distillation loss "
                f"(kd_weight={args.kd_weight}) cannot include it. Drop compute_loss_func, or set kd_weight=0 (plain "
                "SFT, where it applies)."
            )

    def _init_distillation(self, args) -> None:
        """After the teacher's set-up (`self.teacher`; None when the trainer holds none: Seq-KD at `kd_weight=0`,
        which is SFT on the teacher's completions)."""
        # Every loss field of the config, through one method per config class: a field the loss reads is in it.
        self.loss_settings: LossSettings = args.loss_settings()
        self.distilled_vocab_size = len(self.processing_class)
        self._heads_checked = False  # the engine's logits are compared with each model's own forward once
        # Routes the backbone calls through the wrappers' forward, so DDP and DeepSpeed hooks fire.
        self._forward_redirection = _ForwardRedirection()
        self._noise_position = (None, 0)  # (mode, global step) and the micro-batch count within it
        self._metric_totals: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        # Callbacks that generate with the models (kd_trainers.evaluation.callbacks.AgreementCallback) get the
        # trainer; found by their `bind` method, so that the trainers need not import the evaluation layer.
        for callback in self.callback_handler.callbacks:
            if callable(getattr(callback, "bind", None)):
                callback.bind(self)

    # ----------------------------------------------------------------------------------------------------------------
    # Loss

    def _settings_for(self, mode: str) -> LossSettings:
        """The loss settings of a train or eval step: evaluation is noise-free unless `teacher_logit_noise_in_eval`."""
        if mode == "eval" and self.loss_settings.noise_std > 0 and not self.args.teacher_logit_noise_in_eval:
            return dataclasses.replace(self.loss_settings, noise_std=0.0)
        return self.loss_settings

    def _noise_seed(self, mode: str) -> int | None:
        """The seed of this micro-batch's teacher-logit noise: (seed, mode, global step, micro-batch, rank).

        Keyed by position in training rather than drawn from one running stream, so a run resumed from a checkpoint
        draws exactly the noise the uninterrupted run drew; the engine then keys each token's noise to its position
        in the batch (`kd_trainers.losses.noise`).
        """
        if self._settings_for(mode).noise_std == 0:
            return None
        key = (mode, self.state.global_step)
        micro_batch = self._noise_position[1] if self._noise_position[0] == key else 0
        self._noise_position = (key, micro_batch + 1)
        material = f"{self.args.seed}/{mode}/{self.state.global_step}/{micro_batch}/{self.accelerator.process_index}"
        return int(hashlib.sha256(material.encode()).hexdigest()[:15], 16)

    def _student_hidden(self, student, model_inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`([B, T, D] student hidden states, the MoE router loss or None)`; the router loss is computed when
        `SFTTrainer` would add it (`aux_loss_enabled`, from the model config and `router_aux_loss_coef`)."""
        if getattr(self, "aux_loss_enabled", False):
            return hidden_state_and_router_loss(student, model_inputs)
        return last_hidden_state(student, model_inputs), None

    def _weighted_router_loss(self, aux_loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """The router loss as `SFTTrainer.compute_loss` adds it: coef · aux, averaged over the accumulation steps when
        `num_items_in_batch` is given; divided by the process count that `compute_loss` multiplies the loss by."""
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        weighted = self.router_aux_loss_coef * aux_loss / steps
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            weighted = weighted / self.accelerator.num_processes
        return weighted

    def _head_checks(self, model, inputs: dict) -> list[tuple]:
        """`[(role, wrapped model, its inputs, transform, vocabulary)]` whose fused logits `_check_heads_once` checks."""
        model_inputs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        student_transform = LogitTransform.from_config(self.accelerator.unwrap_model(model).config)
        checks = [("student", model, model_inputs, student_transform, self.distilled_vocab_size)]
        if self.teacher is not None:  # the teachers in memory (a cached or served one has no head here)
            checks += self.teacher.head_checks(model_inputs, self.distilled_vocab_size)
        return checks

    def _check_heads_once(self, model, inputs: dict) -> None:
        """On the first batch, the engine's logits at a few positions must equal each model's own forward (a custom
        head, an unread logit scale or softcap would otherwise train a wrong objective in silence).

        Run outside the training forward, on each model unwrapped as for generation. Under ZeRO-3 that gathers one
        model whole at a time, for the check's one-row forward, and releases it (as on-policy generation does): a
        forward of the partitioned model outside its engine's own forward, gathered or nested, breaks DeepSpeed's
        parameter bookkeeping (a size-0 gradient in the next backward)."""
        if self._heads_checked:
            return
        for role, wrapped, inputs_, transform, vocab in self._head_checks(model, inputs):
            # TRL's unwrapping still calls transformers' deprecated gradient-checkpointing names: not the user's to fix.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*checkpointing.*deprecated")
                # It turns gradient checkpointing off and back on: with the user's kwargs, not TRL's defaults.
                with unwrap_model_for_generation(wrapped, self.accelerator, gradient_checkpointing_kwargs=
                                                 self.args.gradient_checkpointing_kwargs) as unwrapped:
                    check_engine_logits(role, unwrapped, inputs_, transform, vocab)
        self._heads_checked = True

    def _distillation_forward(self, student, inputs: dict, num_items_in_batch, mode: str):
        """Runs inside the student wrapper's forward. Returns `(loss, metrics)`, metrics `{name: (sum, count)}` for
        the logs (per-token means whatever `num_items_in_batch` is)."""
        model_inputs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        labels = inputs["labels"][:, 1:]
        student_transform = LogitTransform.from_config(student.config)
        student_hidden, aux_loss = self._student_hidden(student, model_inputs)
        student_hidden = student_hidden[:, :-1]
        engine = dict(num_items_in_batch=num_items_in_batch, vocab_size=self.distilled_vocab_size,
                      chunk_size=self.args.loss_chunk_size, memory_budget_mb=self.args.loss_memory_budget_mb,
                      compile=self.args.loss_compile,
                      student_transform=student_transform, noise_seed=self._noise_seed(mode))
        # The teacher's side of the batch, whatever its kind: a model's hidden states and head, sparse targets (a
        # cache's or a server's, no teacher forward), or several of them mixed.
        source = self.teacher.engine_source(self, inputs, model_inputs)
        losses = teacher_distillation_terms(student_hidden, student.get_output_embeddings(), source, labels,
                                            self._settings_for(mode), **engine)
        num_tokens = (labels != -100).sum()
        normalizer = loss_normalizer(num_tokens, num_items_in_batch)  # what the engine divided by: back to sums
        metrics = {"ce_loss": (losses.ce_loss * normalizer, num_tokens),
                   "kd_loss": (losses.kd_loss * normalizer, num_tokens),
                   "mean_token_accuracy": (losses.num_correct, num_tokens)}
        # Several teachers: each one's own KD term against the student.
        for name, value, count in zip(self.teacher.member_names, getattr(losses, "member_kd_sums", ()),
                                      getattr(losses, "member_token_counts", ())):
            metrics[f"kd_loss_{name}"] = (value, count)
        return self._with_router_loss(losses.loss, metrics, aux_loss, num_items_in_batch)

    def _with_router_loss(self, loss, metrics: dict, aux_loss, num_items_in_batch):
        """`(loss + the weighted MoE router loss, metrics + aux_loss)`; unchanged for a dense student."""
        if aux_loss is None:
            return loss, metrics
        one = torch.ones((), device=loss.device)
        metrics["aux_loss"] = (aux_loss.detach().float(), one)
        return loss + self._weighted_router_loss(aux_loss, num_items_in_batch), metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_settings.kd_weight == 0:
            # No KD term: the trainer is SFTTrainer, with its own loss (DFT, label smoothing, compute_loss_func, the
            # MoE router loss) on the same batches, and no teacher forward.
            sft_inputs = {k: v for k, v in inputs.items() if k == "labels" or k not in self._non_model_keys}
            return SFTTrainer.compute_loss(self, model, sft_inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        self.teacher.eval_()  # the trainer's train() may have switched a teacher model to training mode
        self._check_heads_once(model, inputs)
        student = self.accelerator.unwrap_model(model)
        loss, metrics = self._forward_redirection(
            model, student, self._distillation_forward, student, inputs, num_items_in_batch, mode
        )
        # As in `SFTTrainer.compute_loss`: num_items_in_batch counts every rank's tokens and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        # Sums and counts from every rank, pooled until the next log: each logged value is a per-token mean over
        # every micro-batch and rank since the last log, whatever the split into processes and accumulation steps.
        local = torch.stack([torch.stack([value.float(), count.float()]) for value, count in metrics.values()])
        totals = self.accelerator.gather_for_metrics(local.detach()[None]).sum(0).tolist()
        for name, (value, count) in zip(metrics, totals):
            pooled = self._metric_totals[mode].setdefault(name, [0.0, 0.0])
            pooled[0] += value
            pooled[1] += count
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        for name, (value, count) in self._metric_totals[mode].items():
            self._metrics[mode][name] = [value / max(count, 1.0)]
        self._metric_totals[mode].clear()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
            if prediction_loss_only:
                return loss.detach(), None, None
            # Only for a user's compute_metrics: the fused loss never builds the logits, so run the plain forward.
            logits = model(**{k: v for k, v in inputs.items() if k not in self._non_model_keys}).logits
        return loss.detach(), logits, inputs.get("labels")

    # ----------------------------------------------------------------------------------------------------------------
    # Model card

    def kd_settings(self) -> dict[str, object]:
        """The distillation settings, as recorded in the model card."""
        args, settings = self.args, self.loss_settings  # the settings the loss ran with, not the config's text
        return {
            "method": "vanilla logit KD",
            "teacher": self.teacher_name,
            "teacher_adapter": args.teacher_adapter_name_or_path,
            **(self.teacher.describe().card if self.teacher is not None else {}),
            "divergence": settings.divergence,
            "kd_temperature": settings.temperature,
            "kd_temperature_squared": settings.temperature_squared,
            "kd_weight": settings.kd_weight,
            # Only the settings the divergence reads; the others are shown as unset.
            **{"jsd_beta": None, "skew_alpha": None, **settings.divergence_params()},
            "teacher_logit_noise_std": settings.noise_std,
            "teacher_logit_noise_in_eval": args.teacher_logit_noise_in_eval if settings.noise_std > 0 else None,
            "loss_chunk_size": args.loss_chunk_size,
            "loss_memory_budget_mb": args.loss_memory_budget_mb,
            "loss_compile": args.loss_compile,
        }

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.teacher is not None:  # the columns its collators read (a cache's records, a routing column)
            self._signature_columns = [*self._signature_columns, *self.teacher.columns]

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.exists(path):
            return
        card = ModelCard.load(path)
        card.data.tags = sorted(card.data.tags or [])  # TRL collects them in a set: the same run, the same card
        rows = "\n".join(f"| `{key}` | {value} |" for key, value in self.kd_settings().items() if value is not None)
        card.text += (
            "\n## Knowledge distillation\n\n"
            f"Distilled with [kd_trainers](https://pypi.org/project/kd-trainers/) `{type(self).__name__}`: "
            "loss = (1 − kd_weight)·CE + kd_weight·KD.\n\n| setting | value |\n|---|---|\n" + rows + "\n"
        )
        card.save(path)
