"""`SeqKDTrainer`: the student trains on the teacher's own completions of the training prompts."""

from __future__ import annotations

import textwrap

from accelerate import PartialState

from ..kd.trainer import _SFT_POSITIONAL_NAMES, KDTrainer
from ..teacher import check_same_head_size, freeze, load_teacher, load_teacher_tokenizer, model_name
from .config import SeqKDConfig
from .generate import teacher_generated_dataset


class SeqKDTrainer(KDTrainer):
    """Sequence-level knowledge distillation (Kim & Rush, 2016) on top of `KDTrainer`.

    Before training, the teacher completes every training prompt (`teacher_generated_dataset`: batched, cached on disk
    by content, resumable); the student then trains on those completions, by SFT alone (`kd_weight=0`) or with logit
    KD on top. Arguments are `KDTrainer`'s; `train_dataset` is the prompts' dataset (its completions are replaced).
    `self.seqkd_dataset_dir` is the generated set's folder (`datasets.load_from_disk`).
    """

    _tag_names = ["trl", "sft", "kd_trainers", "knowledge-distillation", "seq-kd"]
    _name = "SeqKD"
    _config_class = SeqKDConfig
    _paper = {
        "title": "Sequence-Level Knowledge Distillation",
        "id": "1606.07947",
        "citation": textwrap.dedent("""\
            @inproceedings{kim2016sequence,
                title        = {{Sequence-Level Knowledge Distillation}},
                author       = {Yoon Kim and Alexander M. Rush},
                year         = 2016,
                booktitle    = {Proceedings of EMNLP 2016},
            }"""),
    }

    def __init__(self, model, args: SeqKDConfig | None = None, *sft_args, teacher_model=None,
                 teacher_processing_class=None, **sft_kwargs):
        args = self._as_kd_config(model, args)
        sft_kwargs.update(zip(_SFT_POSITIONAL_NAMES, sft_args))
        teacher = self._required_teacher(teacher_model, args)
        if sft_kwargs.get("train_dataset") is None:
            raise ValueError("SeqKDTrainer needs a train_dataset: its prompts are what the teacher completes.")
        self._refuse_compute_loss_func(args, sft_kwargs.get("compute_loss_func"))
        teacher_tokenizer = load_teacher_tokenizer(teacher, teacher_processing_class,
                                                   sft_kwargs.get("processing_class"))
        loaded = freeze(load_teacher(teacher, args.teacher_model_init_kwargs, args.teacher_adapter_name_or_path))
        if teacher_tokenizer is sft_kwargs.get("processing_class") and teacher_processing_class is None \
                and args.kd_weight > 0 and not isinstance(model, str):
            check_same_head_size(model, loaded)  # the student's tokenizer was assumed for an in-memory teacher
        state = PartialState()
        generated, self.seqkd_dataset_dir = teacher_generated_dataset(
            loaded, teacher_tokenizer, sft_kwargs["train_dataset"], args.generation_settings(), args.seqkd_cache_dir,
            teacher_id=f"{model_name(teacher)}|{args.teacher_adapter_name_or_path}", batch_size=args.seqkd_batch_size,
            state=state if state.num_processes > 1 else None,
            log=lambda message: print(message, flush=True) if state.is_main_process else None)
        sft_kwargs["train_dataset"] = generated
        super().__init__(model, args, teacher_model=loaded, teacher_processing_class=teacher_tokenizer, **sft_kwargs)
        self.teacher_name = model_name(teacher)

    def _load_teacher_model(self, teacher, args):
        return teacher  # loaded (with its adapter merged) before generating

    def _check_tokenizers(self, args, student_tokenizer, teacher_tokenizer, student_name, teacher_name) -> None:
        # SFT on the teacher's text needs no shared vocabulary; logit KD on top does.
        if args.kd_weight > 0:
            super()._check_tokenizers(args, student_tokenizer, teacher_tokenizer, student_name, teacher_name)

    def kd_settings(self) -> dict[str, object]:
        settings = super().kd_settings()
        settings.update(method="Seq-KD" + (" + logit KD" if self.args.kd_weight > 0 else " (SFT on teacher outputs)"),
                        teacher_generation=str(self.args.generation_settings()), seqkd_dataset=self.seqkd_dataset_dir)
        return settings
