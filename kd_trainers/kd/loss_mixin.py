"""The distillation loss shared by the trainers on a shared vocabulary (KD, Seq-KD, GKD): the fused chunked loss,
teacher-logit noise, pooled metrics and the model card's KD section. The trainer provides `self.teacher_model` (prepared
by accelerate or DeepSpeed) and calls `_init_distillation(args, teacher)` at the end of its `__init__`."""

from __future__ import annotations

import hashlib
import os

import torch
from huggingface_hub import ModelCard
from trl.models.utils import _ForwardRedirection

from ..losses import LogitTransform, LossSettings, chunked_distillation_loss


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its output head (`LlamaModel` of a `LlamaForCausalLM`), through a PEFT wrapper if any."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def last_hidden_state(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """`[B, T, D]` hidden states after the final norm, without computing the `[B, T, V]` logits."""
    return backbone_of(model)(**inputs, use_cache=False).last_hidden_state


class DistillationLossMixin:
    """`compute_loss` as `(1 − kd_weight)·CE + kd_weight·KD` through the chunked engine, for a trainer with a teacher."""

    _non_model_keys: tuple[str, ...] = ("labels",)  # batch keys the models must not receive

    @classmethod
    def _required_teacher(cls, teacher_model, args):
        """The teacher given, else the config's name for it; a clear error when there is neither."""
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher is None:
            raise ValueError(f"{cls.__name__} needs a teacher: pass teacher_model=<model or name> or set "
                             f"{type(args).__name__}.teacher_model_name_or_path.")
        return teacher

    def _init_distillation(self, args, teacher) -> None:
        """`teacher`: the unwrapped, frozen teacher (its config gives its logit scale and softcap)."""
        self.teacher_logit_transform = LogitTransform.from_config(teacher.config)
        self.loss_settings = LossSettings(
            divergence=args.divergence, temperature=args.kd_temperature, jsd_beta=args.jsd_beta,
            skew_alpha=args.skew_alpha, noise_std=args.teacher_logit_noise_std, kd_weight=args.kd_weight,
            temperature_squared=args.kd_temperature_squared,
        )
        self.distilled_vocab_size = len(self.processing_class)
        # Routes the backbone calls through the wrappers' forward, so DDP and DeepSpeed hooks fire.
        self._forward_redirection = _ForwardRedirection()
        self._noise_position = (None, 0)  # (mode, global step) and the micro-batch count within it
        self._metric_totals: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        from ..callbacks import AgreementCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, AgreementCallback):
                callback.bind(self)

    # ----------------------------------------------------------------------------------------------------------------
    # Loss

    def _noise_generator(self, device: torch.device, mode: str) -> torch.Generator | None:
        """A generator for the teacher-logit noise, seeded by (seed, mode, global step, micro-batch, rank).

        Keyed by position in training rather than drawn from one running stream, so a run resumed from a checkpoint
        draws exactly the noise the uninterrupted run drew.
        """
        if self.loss_settings.noise_std == 0:
            return None
        key = (mode, self.state.global_step)
        micro_batch = self._noise_position[1] if self._noise_position[0] == key else 0
        self._noise_position = (key, micro_batch + 1)
        material = f"{self.args.seed}/{mode}/{self.state.global_step}/{micro_batch}/{self.accelerator.process_index}"
        generator = torch.Generator(device=device)
        generator.manual_seed(int(hashlib.sha256(material.encode()).hexdigest()[:15], 16))
        return generator

    def _distillation_forward(self, student, inputs: dict, num_items_in_batch, mode: str):
        """Runs inside the student wrapper's forward. Returns `(loss, metrics)`, metrics `{name: (sum, count)}` for
        the logs (per-token means whatever `num_items_in_batch` is)."""
        model_inputs = {k: v for k, v in inputs.items() if k not in self._non_model_keys}
        labels = inputs["labels"][:, 1:]
        student_hidden = last_hidden_state(student, model_inputs)[:, :-1]
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, last_hidden_state, unwrapped_teacher, model_inputs
            )[:, :-1]
        losses, num_correct = chunked_distillation_loss(
            student_hidden, student.get_output_embeddings(), teacher_hidden, unwrapped_teacher.get_output_embeddings(),
            labels, self.loss_settings, num_items_in_batch=num_items_in_batch, vocab_size=self.distilled_vocab_size,
            chunk_size=self.args.loss_chunk_size, student_transform=LogitTransform.from_config(student.config),
            teacher_transform=self.teacher_logit_transform,
            generator=self._noise_generator(student_hidden.device, mode),
        )
        num_tokens = (labels != -100).sum()
        normalizer = self._loss_normalizer(num_tokens, num_items_in_batch)
        return losses.loss, {"ce_loss": (losses.ce_loss * normalizer, num_tokens),
                             "kd_loss": (losses.kd_loss * normalizer, num_tokens),
                             "mean_token_accuracy": (num_correct, num_tokens)}

    @staticmethod
    def _loss_normalizer(num_tokens: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """What the engine divided the sums by: turns its means back into sums for the logs."""
        normalizer = num_tokens.clamp(min=1) if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        return normalizer.to(num_tokens.device, torch.float32)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        self.teacher_model.eval()
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
        args = self.args
        return {
            "method": "vanilla logit KD",
            "teacher": self.teacher_name,
            "teacher_adapter": args.teacher_adapter_name_or_path,
            "divergence": args.divergence,
            "kd_temperature": args.kd_temperature,
            "kd_temperature_squared": args.kd_temperature_squared,
            "kd_weight": args.kd_weight,
            "jsd_beta": args.jsd_beta if args.divergence == "jsd" else None,
            "skew_alpha": args.skew_alpha if args.divergence.startswith("skew") else None,
            "teacher_logit_noise_std": args.teacher_logit_noise_std,
            "loss_chunk_size": args.loss_chunk_size,
        }

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.exists(path):
            return
        card = ModelCard.load(path)
        rows = "\n".join(f"| `{key}` | {value} |" for key, value in self.kd_settings().items() if value is not None)
        card.text += (
            "\n## Knowledge distillation\n\n"
            f"Distilled with [kd_trainers](https://pypi.org/project/kd-trainers/) `{type(self).__name__}`: "
            "loss = (1 − kd_weight)·CE + kd_weight·KD.\n\n| setting | value |\n|---|---|\n" + rows + "\n"
        )
        card.save(path)
