"""`SeqKDTrainer`: the student trains on the teacher's own completions of the training prompts.

Two steps: the teacher completes the training prompts (`teacher_generated_dataset`, a dataset folder of its own), then
the student trains on them. With `kd_weight=0` that training is SFT (the trainer is then exactly `SFTTrainer`, and the
teacher is released after generating: it is not held for the run); with `kd_weight > 0` it is `KDTrainer`'s logit KD
on the teacher's text.
"""

from __future__ import annotations

import textwrap

from ..kd.prompt_rows import every_prompt_row
from ..teachers import Teacher
from ..kd.trainer import KDTrainer
from .config import SeqKDConfig


class SeqKDTrainer(KDTrainer):
    """Sequence-level knowledge distillation (Kim & Rush, 2016) on top of `KDTrainer`.

    Before training, the teacher completes every training prompt (`teacher_generated_dataset`: batched, cached on disk
    by content, resumable); the student then trains on those completions, by SFT alone (`kd_weight=0`: no teacher in
    memory while training) or with logit KD on top. Arguments are `KDTrainer`'s; `train_dataset` is the prompts'
    dataset: prompts alone, or labelled rows whose completions are never read (the teacher's replace them), and
    `prompt_dataset` more prompts. `self.seqkd_dataset_dir` is the generated set's folder
    (`datasets.load_from_disk`): to run the two steps yourself, generate it once and give it to any SFT trainer.
    """

    _tag_names = ["trl", "sft", "kd_trainers", "knowledge-distillation", "seq-kd"]
    _name = "SeqKD"
    _config_class = SeqKDConfig
    _paper = {
        "title": "Sequence-Level Knowledge Distillation",
        "id": "1606.07947",
        "citation": textwrap.dedent("""\\
            @inproceedings{kim2016sequence,
                title        = {{Sequence-Level Knowledge Distillation}},
                author       = {Yoon Kim and Alexander M. Rush},
                year         = 2016,
                booktitle    = {Proceedings of EMNLP 2016},
            }"""),
    }

    def _compares_logits(self, args) -> bool:
        # SFT on the teacher's text needs no shared vocabulary; logit KD on top does.
        return args.kd_weight > 0

    @classmethod
    def reads_labels(cls, args) -> bool:
        return False  # every prompt is completed by the teacher: the dataset's own completions are never read

    def _completion_settings(self, args) -> tuple[dict, int, str | None]:
        return args.generation_settings(), args.seqkd_batch_size, args.seqkd_cache_dir

    def _prepare_training_data(self, plan: Teacher, args, sft_kwargs: dict, prompt_dataset=None) -> dict:
        """Step one: the teacher's completions of every prompt (the training rows', labelled or not, and the
        `prompt_dataset`'s not already among them) are the training set."""
        train = sft_kwargs.get("train_dataset")
        if train is None and prompt_dataset is None:
            raise ValueError("SeqKDTrainer needs a train_dataset (or a prompt_dataset): its prompts are what the "
                             "teacher completes.")
        generated = self._teacher_completions(plan, args, every_prompt_row(train, prompt_dataset))
        self.seqkd_dataset_dir = self.completions_dir
        return {**sft_kwargs, "train_dataset": generated}

    def _set_up_teacher(self, plan: Teacher, args) -> None:
        """Step two: the teacher beside the student only when logit KD is on top; at `kd_weight=0` there is none."""
        if args.kd_weight == 0:
            return
        try:
            super()._set_up_teacher(plan, args)
        finally:
            self._generation_teacher = None  # a cache read in its place must not keep it alive

    @classmethod
    def _required_teacher(cls, teacher_model, args):
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher is None:
            raise ValueError("SeqKDTrainer needs a teacher, also with a teacher_cache: it writes the training set "
                             "(its completions). Pass teacher_model or set teacher_model_name_or_path.")
        return teacher

    def kd_settings(self) -> dict[str, object]:
        settings = super().kd_settings()
        settings.update(method="Seq-KD" + (" + logit KD" if self.args.kd_weight > 0 else " (SFT on teacher outputs)"),
                        teacher_generation=str(self.args.generation_settings()), seqkd_dataset=self.seqkd_dataset_dir)
        return settings
