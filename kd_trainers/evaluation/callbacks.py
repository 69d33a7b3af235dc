"""`AgreementCallback`: imitation and task accuracy side by side while a distillation run trains.

Every `every_steps` optimizer steps the student answers a fixed held-out sample (greedy); the teacher's answers to the
same prompts are generated once (it is frozen). Logged with the training logs (and to every reporting integration):

    gen_agreement        top-1 final-answer agreement between student and teacher (`evaluation` metric `agreement`)
    gen_fidelity         BLEU between the two reasoning texts (`fidelity`)
    gen_exact_match      the student's final-answer accuracy against the references (`exact_match`)
    gen_teacher_exact_match   the teacher's, for reference

Works with every trainer of the package that has a teacher (KD, DSKD, Seq-KD, GKD): they bind it to themselves. Under
DeepSpeed ZeRO-3 every rank takes part in generation (TRL's `unwrap_model_for_generation` gathers the weights).
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback
from trl.models import unwrap_model_for_generation

from ..models.generation import generate_predictions
from ..data.prompt_completion import prompts_and_references
from ..runtime.checks import is_positive_integer
from .answers import ANSWER_EXTRACTORS
from .score import score


class AgreementCallback(TrainerCallback):
    """Args:
        dataset: held-out prompt/completion examples (raw text columns `prompt` and `completion`).
        every_steps: how often, in optimizer steps (also at the last step).
        num_samples: how many examples of `dataset` (the first ones).
        max_new_tokens, batch_size: generation settings (greedy).
        answer_extractor: how a final answer is read from a text (a key of `ANSWER_EXTRACTORS`).
    """

    def __init__(self, dataset, every_steps: int = 50, num_samples: int = 32, max_new_tokens: int = 64,
                 batch_size: int = 16, answer_extractor: str = "the_answer_is"):
        missing = {"prompt", "completion"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"AgreementCallback needs 'prompt' and 'completion' columns; missing {sorted(missing)} "
                             f"in {dataset.column_names}.")
        if not is_positive_integer(every_steps):
            raise ValueError(f"AgreementCallback: every_steps must be a positive integer, got {every_steps!r}.")
        if answer_extractor not in ANSWER_EXTRACTORS:
            raise ValueError(f"AgreementCallback: answer_extractor {answer_extractor!r} is not one of "
                             f"{sorted(ANSWER_EXTRACTORS)}.")
        sample = dataset.select(range(min(num_samples, len(dataset))))
        if len(sample) == 0:
            raise ValueError("AgreementCallback: the dataset is empty.")
        self.prompts, self.references = prompts_and_references(sample, "AgreementCallback")
        self.every_steps, self.max_new_tokens, self.batch_size = every_steps, max_new_tokens, batch_size
        self.answer_extractor = answer_extractor
        self.trainer = None
        self.teacher_predictions: list[str] | None = None  # generated once: the teacher is frozen
        self.teacher_exact_match: float | None = None

    def bind(self, trainer) -> None:
        """Called by the package's trainers at the end of their `__init__`: the models to generate with."""
        if getattr(trainer, "teacher_model", None) is None:
            raise ValueError("AgreementCallback needs a trainer that holds a teacher while training (KD, DSKD, GKD, or "
                             "Seq-KD with kd_weight > 0: at kd_weight=0 the teacher is released once it has generated).")
        self.trainer = trainer

    def _generate(self, model, tokenizer) -> list[str]:
        with unwrap_model_for_generation(model, self.trainer.accelerator) as unwrapped:
            was_training = unwrapped.training
            try:
                return generate_predictions(unwrapped, tokenizer, self.prompts, batch_size=self.batch_size,
                                            max_new_tokens=self.max_new_tokens)
            finally:
                unwrapped.train(was_training)

    def measure(self) -> dict[str, float]:
        """Generates with the student (and, the first time, the teacher) and scores; `{name: value}`."""
        trainer = self.trainer
        if self.teacher_predictions is None:
            self.teacher_predictions = self._generate(trainer.teacher_model, trainer.teacher_processing_class)
            teacher = score(self.teacher_predictions, self.references, metrics=["exact_match"],
                            answer_extractor=self.answer_extractor)
            self.teacher_exact_match = float(teacher["exact_match"].mean())
        student = self._generate(trainer.model_wrapped, trainer.processing_class)
        ours = score(student, self.references, metrics=["exact_match", "agreement", "fidelity"],
                     teacher_predictions=self.teacher_predictions, answer_extractor=self.answer_extractor)
        return {"gen_agreement": float(ours["agreement"].mean()), "gen_fidelity": float(ours["fidelity"].mean()),
                "gen_exact_match": float(ours["exact_match"].mean()),
                "gen_teacher_exact_match": self.teacher_exact_match}

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError("AgreementCallback was not bound to a trainer: pass it in `callbacks=` of a "
                               "kd_trainers trainer (KDTrainer, DSKDTrainer, SeqKDTrainer, GKDTrainer).")
        if state.global_step % self.every_steps == 0 or state.global_step == state.max_steps:
            # The base `Trainer.log`: the trainers' own `log` would flush their pooled loss metrics here.
            Trainer.log(self.trainer, self.measure())
        return control
