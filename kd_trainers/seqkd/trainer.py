"""`SeqKDTrainer`: the student trains on the teacher's own completions of the training prompts.

Two steps: the teacher completes the training prompts (`teacher_generated_dataset`, a dataset folder of its own), then
the student trains on them. With `kd_weight=0` that training is SFT (the trainer is then exactly `SFTTrainer`, and the
teacher is released after generating: it is not held for the run); with `kd_weight > 0` it is `KDTrainer`'s logit KD
on the teacher's text.
"""

from __future__ import annotations

import gc
import textwrap

from accelerate import PartialState

from ..kd.teacher_setup import TeacherPlan
from ..kd.trainer import KDTrainer
from ..teacher import freeze, model_name
from .config import SeqKDConfig
from .generate import teacher_generated_dataset


class SeqKDTrainer(KDTrainer):
    """Sequence-level knowledge distillation (Kim & Rush, 2016) on top of `KDTrainer`.

    Before training, the teacher completes every training prompt (`teacher_generated_dataset`: batched, cached on disk
    by content, resumable); the student then trains on those completions, by SFT alone (`kd_weight=0`: no teacher in
    memory while training) or with logit KD on top. Arguments are `KDTrainer`'s; `train_dataset` is the prompts'
    dataset (its completions are replaced). `self.seqkd_dataset_dir` is the generated set's folder
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

    def _prepare_training_data(self, plan: TeacherPlan, args, sft_kwargs: dict) -> dict:
        """Step one: the teacher's completions of the training prompts replace the dataset's."""
        if sft_kwargs.get("train_dataset") is None:
            raise ValueError("SeqKDTrainer needs a train_dataset: its prompts are what the teacher completes.")
        teacher = freeze(super()._load_teacher_model(plan.teacher, args))
        state = PartialState()
        generated, self.seqkd_dataset_dir = teacher_generated_dataset(
            teacher, plan.tokenizer, sft_kwargs["train_dataset"], args.generation_settings(), args.seqkd_cache_dir,
            teacher_id=f"{model_name(plan.teacher)}|{args.teacher_adapter_name_or_path}",
            batch_size=args.seqkd_batch_size, state=state if state.num_processes > 1 else None,
            log=lambda message: print(message, flush=True) if state.is_main_process else None)
        # Logit KD on top reuses the loaded teacher; SFT alone lets it go now.
        self._generation_teacher = teacher if args.kd_weight > 0 else None
        del teacher
        gc.collect()
        return {**sft_kwargs, "train_dataset": generated}

    def _load_teacher_model(self, teacher, args):
        loaded, self._generation_teacher = self._generation_teacher, None
        return loaded  # loaded (with its adapter merged) before generating

    def _set_up_teacher(self, plan: TeacherPlan, args):
        """Step two: the teacher beside the student only when logit KD is on top; at `kd_weight=0` there is none."""
        if args.kd_weight == 0:
            self.teacher_model = None
            return None
        try:
            return super()._set_up_teacher(plan, args)
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
