"""`kd-quickstart`: the whole job on the built-in demo task, on a laptop CPU, in a few minutes.

1. SFT of a tiny teacher (Llama architecture, 4 layers, width 128) on the demo task's train split;
2. the same tiny student (2 layers, width 64) trained twice from one initialisation and on one data order:
   by SFT alone, and by KD from that teacher (`KDTrainer`, forward KL at T = 2, kd_weight 0.5);
3. all three scored on the test split: per-token NLL of the reference answers and exact match of greedy answers.

With `--dskd`, also across vocabularies: SFT of a second teacher (Qwen2 architecture) with the demo's *other*
tokenizer (WordPiece: lowercase, no BOS, another EOS), then the same student distilled from it by DSKD with
cross-model attention (`DSKDTrainer`), scored like the others.

The numbers are whatever they are; the run is reproducible from `--seed`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import datasets
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from . import DSKDConfig, DSKDTrainer, KDConfig, KDTrainer
from .demo import demo_model, demo_tokenizer, load_demo_dataset
from .demo.scoring import completion_nll, exact_match


class PrintLosses(TrainerCallback):
    """Prints the training losses as they are logged, so that one sees them fall."""

    def __init__(self, label: str):
        self.label = label

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            keys = ("ce_loss", "kd_loss", "t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss", "t2s_accuracy")
            parts = [f"loss {logs['loss']:.3f}"] + [f"{key} {logs[key]:.3f}" for key in keys if key in logs]
            print(f"  [{self.label}] step {state.global_step:4d}  " + "  ".join(parts), flush=True)


def _quiet(trainer):
    # Our own one-line log replaces the Trainer's dict printout.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _common_args(output_dir: str, steps: int, seed: int, learning_rate: float) -> dict:
    return dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=16, learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), logging_steps=max(1, steps // 10),
        save_strategy="no", report_to=[], bf16=False, seed=seed, disable_tqdm=True, max_length=128,
    )


def run(output_dir: str = "kd-quickstart-output", teacher_steps: int = 400, student_steps: int = 300,
        seed: int = 0, dskd: bool = False) -> dict[str, dict[str, float]]:
    """Run the quickstart; returns `{model: {"test_nll": ..., "exact_match": ...}}`."""
    start = time.time()
    tokenizer = demo_tokenizer("bpe", seed=seed)
    data = load_demo_dataset("prompt_completion", seed=seed)
    train, test = data["train"], data["test"]
    print(f"Demo task: {len(train)} train / {len(test)} test question-answer pairs (telecom glossary + arithmetic); "
          f"tokenizer: byte-level BPE, {len(tokenizer)} tokens.")

    total = 5 if dskd else 3
    print(f"\n1/{total}  Teacher SFT ({teacher_steps} steps)")
    teacher = demo_model("llama", tokenizer, "teacher", seed=seed + 1)
    _quiet(SFTTrainer(model=teacher, args=SFTConfig(**_common_args(f"{output_dir}/teacher", teacher_steps, seed, 2e-3)),
                      train_dataset=train, processing_class=tokenizer, callbacks=[PrintLosses("teacher SFT")])).train()

    print(f"\n2/{total}  Student by SFT alone ({student_steps} steps)")
    sft_student = demo_model("llama", tokenizer, "student", seed=seed + 2)
    sft_args = SFTConfig(**_common_args(f"{output_dir}/student-sft", student_steps, seed, 3e-3))
    _quiet(SFTTrainer(model=sft_student, args=sft_args, train_dataset=train, processing_class=tokenizer,
                      callbacks=[PrintLosses("student SFT")])).train()

    print(f"\n3/{total}  Student by KD from the teacher ({student_steps} steps, forward KL, T=2, kd_weight=0.5)")
    kd_student = demo_model("llama", tokenizer, "student", seed=seed + 2)
    kd_args = KDConfig(**_common_args(f"{output_dir}/student-kd", student_steps, seed, 3e-3),
                       divergence="forward_kl", kd_temperature=2.0, kd_weight=0.5)
    kd_trainer = KDTrainer(model=kd_student, teacher_model=teacher, args=kd_args, train_dataset=train,
                           processing_class=tokenizer, teacher_processing_class=tokenizer,
                           callbacks=[PrintLosses("student KD")])
    _quiet(kd_trainer).train()
    kd_trainer.save_model()
    kd_trainer.create_model_card(model_name="student-kd")

    models = [("teacher (SFT)", teacher, tokenizer), ("student, SFT only", sft_student, tokenizer),
              ("student, KD", kd_student, tokenizer)]
    if dskd:
        models += _run_dskd(output_dir, train, tokenizer, teacher_steps, student_steps, seed)

    scores = {}
    for name, model, model_tokenizer in models:
        scores[name] = {"test_nll": completion_nll(model, model_tokenizer, test),
                        "exact_match": exact_match(model, model_tokenizer, test)}
    print("\nTest split scores (NLL: per completion token, lower is better; exact match of the final answer)")
    print(f"  {'model':<30} {'test NLL':>9} {'exact match':>12}")
    for name, score in scores.items():
        print(f"  {name:<30} {score['test_nll']:>9.3f} {score['exact_match']:>12.1%}")
    if dskd:
        print("  (NLL is per token of each model's own tokenizer: the WordPiece teacher's is not comparable with the "
              "BPE models'.)")
    kd, sft = scores["student, KD"], scores["student, SFT only"]
    verdict = "better" if kd["test_nll"] < sft["test_nll"] else "not better"
    print(f"\nKD student vs SFT-only student: test NLL {kd['test_nll']:.3f} vs {sft['test_nll']:.3f} ({verdict}), "
          f"exact match {kd['exact_match']:.1%} vs {sft['exact_match']:.1%}. One seed, no significance test.")
    print(f"KD student saved to {os.path.abspath(kd_args.output_dir)} (with its model card). "
          f"Total time {time.time() - start:.0f} s.")
    return scores


def _run_dskd(output_dir, train, student_tokenizer, teacher_steps, student_steps, seed):
    """Steps 4 and 5: a teacher with the other tokenizer, and a DSKD-CMA student from it."""
    teacher_tokenizer = demo_tokenizer("wordpiece", seed=seed)
    print(f"\n4/5  Teacher SFT with the WordPiece tokenizer ({len(teacher_tokenizer)} tokens; Qwen2, "
          f"{teacher_steps} steps)")
    teacher = demo_model("qwen2", teacher_tokenizer, "teacher", seed=seed + 3)
    _quiet(SFTTrainer(model=teacher, args=SFTConfig(**_common_args(f"{output_dir}/teacher-wordpiece", teacher_steps,
                                                                   seed, 2e-3)),
                      train_dataset=train, processing_class=teacher_tokenizer,
                      callbacks=[PrintLosses("teacher SFT (WordPiece)")])).train()

    print(f"\n5/5  Student (BPE) by DSKD with cross-model attention from that teacher ({student_steps} steps)")
    student = demo_model("llama", student_tokenizer, "student", seed=seed + 2)
    args = DSKDConfig(**_common_args(f"{output_dir}/student-dskd-cma", student_steps, seed, 3e-3), kd_weight=0.5,
                      kd_temperature=2.0, projector_lr=3e-3)
    trainer = DSKDTrainer(student, args, train_dataset=train, processing_class=student_tokenizer,
                          teacher_model=teacher, teacher_processing_class=teacher_tokenizer,
                          callbacks=[PrintLosses("student DSKD-CMA")])
    _quiet(trainer).train()
    trainer.save_model()
    return [("teacher (SFT, WordPiece)", teacher, teacher_tokenizer),
            ("student, DSKD-CMA", student, student_tokenizer)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="kd-quickstart-output")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dskd", action="store_true",
                        help="also distil across vocabularies: a WordPiece teacher and a DSKD-CMA student")
    options = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    run(options.output_dir, options.teacher_steps, options.student_steps, options.seed, options.dskd)


if __name__ == "__main__":
    main()
