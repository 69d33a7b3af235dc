"""Runs that cannot go wrong quietly: training settings that train nothing are refused, examples that truncation
leaves without a label token are counted out loud, and a loss or gradient that stops being finite stops the run.

`RunGuardsMixin` goes into every trainer of the package, before the TRL trainer class. The checks cost nothing extra:
`Trainer` already reads the loss (`logging_nan_inf_filter`) and the gradient norm on the host at every step.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers.trainer_utils import get_last_checkpoint

from .errors import NonFiniteTrainingError, TeacherServerError
from .checks import is_positive_integer
from .smoke import capped_steps


class DroppedExamplesWarning(UserWarning):
    """Training examples that truncation to `max_length` left without a single label token (TRL drops them)."""


NON_FINITE_CAUSES = (
    "a learning rate too high (try 10x lower, with warmup), fp16 overflow (use bf16 or fp32), "
    "a kd_temperature or teacher_logit_noise_std far out of the usual range, or NaN/inf already in the "
    "teacher's or the student's weights"
)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_training_args(args) -> None:
    """Raises `ValueError` naming the field, the value and the fix for settings that would train nothing (or fail
    after the models load): an empty `output_dir`, `max_steps: 0`, batch sizes or accumulation below 1, a negative or
    non-finite learning rate, no epochs to train, a seed numpy cannot take."""
    if not str(getattr(args, "output_dir", "x") or "").strip():
        raise ValueError("output_dir: '' is empty: name the folder the run writes to, e.g. output_dir: outputs/run1.")
    if args.max_steps == 0 or (isinstance(args.max_steps, int) and args.max_steps < -1):
        raise ValueError(f"max_steps: {args.max_steps} trains nothing: give a positive number of steps, or -1 to "
                         "train for num_train_epochs.")
    if args.max_steps == -1 and not _positive(args.num_train_epochs):
        raise ValueError(f"num_train_epochs: {args.num_train_epochs!r} trains nothing (with max_steps -1): give a "
                         "positive number of epochs, or a positive max_steps.")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if not is_positive_integer(value):
            raise ValueError(f"{name}: {value!r} should be a positive integer (1 or more).")
    if not isinstance(args.learning_rate, (int, float)) or not math.isfinite(args.learning_rate) \
            or args.learning_rate < 0:
        raise ValueError(f"learning_rate: {args.learning_rate!r} should be a finite number >= 0 (e.g. 2e-5).")
    for name in ("seed", "data_seed"):  # numpy's and torch's generators take 0 .. 2**32 - 1
        value = getattr(args, name, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32):
            raise ValueError(f"{name}: {value!r} should be an integer from 0 to 4294967295 (2**32 - 1), e.g. 42.")
    max_length = getattr(args, "max_length", None)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length: {max_length!r} should be an integer of at least 2 (prompt and completion "
                         "tokens together), or null for no truncation.")


def check_processes_train_together(accelerator) -> None:
    """Refuses several processes that accelerate did not join into one training: on a machine without CUDA it sets
    up no distributed training unless `use_cpu` is set, and each process then trains (and saves) a copy of its own
    on its shard of the data, quietly. A config asking for FSDP that accelerate runs another way is refused too."""
    kind = accelerator.distributed_type
    if accelerator.num_processes > 1 and kind == DistributedType.NO:
        raise ValueError(
            f"{accelerator.num_processes} processes were started but accelerate set up no distributed training "
            "(distributed_type NO): each would train its own copy of the model. On a machine without CUDA set "
            "use_cpu=True in the training arguments (kd-train does), or launch with a DeepSpeed config.")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and kind != DistributedType.FSDP:
        raise ValueError(f"The accelerate config asks for FSDP, but accelerate runs this as {kind.value}: FSDP needs "
                         "CUDA devices. Use a DeepSpeed ZeRO config to shard on CPU, or a multi-process (DDP) one.")


def last_good_checkpoint(output_dir: str) -> str:
    """Where a stopped run can be resumed from, for the error message."""
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    return (f"The last good checkpoint is {last}; nothing was saved after it." if last else
            "No checkpoint was saved before this step.")


# torch's notice, at every pass over a data loader, that `dataloader_pin_memory` (True by default) does nothing on a
# machine without an accelerator: the setting is the library's default, not the user's to change.
warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator",
                        category=UserWarning)


class RunGuardsMixin:
    """Mix into a `transformers.Trainer` subclass, before it: `class T(RunGuardsMixin, ..., SFTTrainer)`."""

    _nonfinite_loss: float | None = None  # the first non-finite micro-batch loss of the current optimizer step

    # ---- processes -----------------------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        check_processes_train_together(self.accelerator)

    # ---- parameters ----------------------------------------------------------------------------------------------

    def create_optimizer(self, *args, **kwargs):
        """Refuses a model with no parameter to train, which would otherwise run every step and change nothing."""
        if not any(parameter.requires_grad for parameter in self.model.parameters()):
            raise ValueError(
                f"The model ({type(self.model).__name__}) has no trainable parameter: every one has "
                "requires_grad=False, so training would change nothing. A model merged from a PEFT adapter loaded "
                "for inference comes frozen: call model.requires_grad_(True) before passing it (or pass a "
                "peft_config to train an adapter).")
        return super().create_optimizer(*args, **kwargs)

    # ---- data --------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation, with the examples it drops (no label token left after truncation) counted and
        reported: every one dropped is refused, a part of them is a warning with the count and the fix."""
        before = len(dataset) if hasattr(dataset, "__len__") else None
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if before is None or packing or not hasattr(prepared, "__len__"):
            return prepared
        after = len(prepared)
        if after < before:
            fix = (f"raise max_length (now {args.max_length}), shorten the prompts, or use truncation_mode: "
                   "keep_end")
            if after == 0:
                raise ValueError(f"{dataset_name} dataset: all {before} examples are left without a label token "
                                 f"once truncated to max_length={args.max_length} (their prompts fill it): {fix}.")
            message = (f"{dataset_name} dataset: {before - after} of {before} examples "
                       f"({100 * (before - after) / before:.0f}%) are left without a label token once truncated to "
                       f"max_length={args.max_length} and are dropped: {fix}.")
            warnings.warn(message, DroppedExamplesWarning, stacklevel=2)
            if PartialState().is_main_process:  # the trainer's accelerator does not exist yet here
                print(f"WARNING: {message}", flush=True)
        return prepared

    # ---- resume --------------------------------------------------------------------------------------------------

    def _run_epoch(self, *args, **kwargs):
        """Trains nothing when resumed from a checkpoint already at `max_steps` (a run killed during its final save):
        `Trainer` would run one step past `max_steps` before its end-of-step check."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # ---- a served teacher that stops answering ----------------------------------------------------------------

    def train(self, *args, **kwargs):
        """`Trainer.train`, capped at a few steps in a smoke run (`kd_trainers.smoke`); when a served teacher gives
        no valid answer within its bound, the step it was for is not trained, and the run stops with a checkpoint of
        the last completed step to resume from."""
        self.args.max_steps = capped_steps(self.args.max_steps)  # KD_TRAINERS_SMOKE=1: a few steps
        try:
            return super().train(*args, **kwargs)
        except TeacherServerError as error:
            raise TeacherServerError(f"{error} {self._save_after_teacher_failure()}") from error

    def _save_after_teacher_failure(self) -> str:
        step = self.state.global_step
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.close()  # a server's other requests in flight stop retrying
        if self.accelerator.num_processes > 1:
            # Saving is collective and the other processes may be anywhere in their step: the regular checkpoints.
            return f"Training stopped in step {step + 1}. {last_good_checkpoint(self.args.output_dir)}"
        if step == 0:
            return "Training stopped in step 1: no step was completed, so there is nothing to resume."
        folder = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        if not os.path.isdir(folder):
            # Before its optimizer step: the weights, optimizer and schedule are those after step `step`.
            self._save_checkpoint(self.model, trial=None)
        return (f"Training stopped in step {step + 1}, which was not trained; {folder} holds the state after step "
                f"{step}: run again to resume from it (kd-train resumes from the last checkpoint; in Python, "
                "trainer.train(resume_from_checkpoint=True)).")

    # ---- non-finite loss and gradients -------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self._note_loss(super().training_step(model, inputs, num_items_in_batch))

    def _note_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Remembers a non-finite micro-batch loss until the optimizer step decides (`_get_grad_norm`)."""
        if self._nonfinite_loss is None and not torch.isfinite(loss).all():
            self._nonfinite_loss = float(loss.detach().float().sum())
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm of the step (global: every rank has the same); a non-finite one, or a non-finite loss on
        any rank, stops training here, before the optimizer applies it."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        norm = float(grad_norm) if grad_norm is not None else 0.0
        loss_bad = self._nonfinite_loss is not None
        if self.accelerator.num_processes > 1:  # every rank must stop together, or the others wait forever
            flag = torch.tensor([float(loss_bad)], device=self.accelerator.device)
            loss_bad = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if loss_bad or not math.isfinite(norm):
            self._stop_nonfinite(norm)
        return grad_norm

    def _stop_nonfinite(self, norm: float) -> None:
        step = self.state.global_step + 1
        terms = {}
        mode_totals = getattr(self, "_metric_totals", {}).get("train", {})
        for name, (value, count) in mode_totals.items():
            terms[name] = value / max(count, 1.0)
        what = []
        if self._nonfinite_loss is not None:
            what.append(f"loss {self._nonfinite_loss}")
        what.append(f"gradient norm {norm}")
        detail = ", ".join(f"{name} {value:.4g}" for name, value in terms.items())
        self._nonfinite_loss = None
        raise NonFiniteTrainingError(
            f"Training stopped at step {step}: {', '.join(what)}"
            f"{f' (mean since the last log: {detail})' if detail else ''}. Usual causes: {NON_FINITE_CAUSES}. "
            f"{last_good_checkpoint(self.args.output_dir)}")
