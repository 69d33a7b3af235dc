"""`kd-quickstart`: the whole pipeline on the built-in demo task, on a laptop CPU, in about five minutes.

It writes its recipes and its study into `<output>/recipes/` (so that every step can be read and re-run with
`kd-train` or `kd-study`), prints the plan, then runs the study:

1. SFT of two tiny teachers on the demo task's whole train split (960 rows, 800 steps): a Llama (4 layers, width 128)
   with the demo's BPE tokenizer, and a Qwen2 of the same size with its WordPiece tokenizer (lowercase, no BOS,
   another EOS). Both are cached by their settings (`$KD_TRAINERS_CACHE/prepare/`): a later quickstart reuses them;
2. a smaller student (Llama, 2 layers, width 64, BPE) with a label budget: a quarter of the train split
   (`train[:25%]`, 240 rows, 300 steps), and all 960 training prompts without their labels (`prompts: train`): the
   channel distillation works by, in practice (many prompts, few labels, a teacher that answers). Trained three
   ways from one initialisation per seed: by SFT on the 240 labels alone (the baseline); by Seq-KD, SFT on the BPE
   teacher's greedy answers to all 960 prompts (Kim & Rush; no label is read); and by DSKD with cross-model attention
   from the WordPiece teacher on the 240 labelled rows plus its answers to the other 720 prompts (forward KL, T = 2,
   kd_weight 0.5, the DSKD paper's settings); three seeds each. The teachers' answers are cached by content
   (`$KD_TRAINERS_CACHE/seqkd/`), as the teachers are;
3. the teachers (the ceiling) and every student evaluated on the test split (n-gram, embedding and final-answer exact
   match) and on the demo's lm-evaluation-harness tasks (`kd_demo`: glossary multiple choice by log-likelihood,
   arithmetic by generation), paired tests of each KD student against the SFT student on every metric (Wilcoxon on
   seed-averaged scores, Holm-corrected), and the report (`<output>/study/report/report.md` and `report.html`).

A re-run in the same folder skips what is finished. The numbers are whatever they are (README: what they are and
why); the run is reproducible from `--seed`.
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd
import yaml


def _recipe(path: str, values: dict, header: str) -> str:
    with open(path, "w") as handle:
        handle.write(f"# {header}\n# Written by kd-quickstart. Launch: kd-train {path}\n")
        yaml.safe_dump(values, handle, sort_keys=False)
    return path


STUDENT_SPLIT = "train[:25%]"


def write_quickstart_study(output_dir: str, teacher_steps: int = 800, student_steps: int = 300, seed: int = 0,
                           eval_limit: int | None = None, seeds: int = 3) -> str:
    """Writes the quickstart's recipes and study into `<output_dir>/recipes/` and returns the study file."""
    from ..recipe.schema import load_recipe
    from ..study.runner import cached_step_folder

    folder = os.path.abspath(os.path.join(output_dir, "recipes"))
    os.makedirs(folder, exist_ok=True)
    study_dir = os.path.abspath(os.path.join(output_dir, "study"))
    common = dict(dataset_name="demo", dataset_config="prompt_completion", per_device_train_batch_size=16,
                  max_length=128, lr_scheduler_type="cosine", save_strategy="no", bf16=False, seed=seed,
                  report_to="none", disable_tqdm=True)

    def steps(count):
        return dict(max_steps=count, warmup_steps=max(1, count // 20), logging_steps=max(1, count // 5))

    teachers = {"teacher": os.path.join(folder, "teacher_sft.yaml"),
                "teacher_wordpiece": os.path.join(folder, "teacher_wordpiece_sft.yaml")}
    _recipe(teachers["teacher"],
            {"method": "sft", "model_name_or_path": "demo:llama/teacher/bpe", **common, **steps(teacher_steps),
             "learning_rate": 2.0e-3}, "Teacher SFT: a tiny Llama with the demo's BPE tokenizer.")
    _recipe(teachers["teacher_wordpiece"],
            {"method": "sft", "model_name_or_path": "demo:qwen2/teacher/wordpiece", **common,
             **steps(teacher_steps), "learning_rate": 2.0e-3},
            "Teacher SFT: a tiny Qwen2 with the demo's WordPiece tokenizer (another vocabulary).")
    # The students' recipes name the teachers' folders in the cache, so that each runs alone with kd-train too.
    cached = {name: cached_step_folder(load_recipe(path, [f"output_dir={os.path.join(study_dir, name)}"]))
              for name, path in teachers.items()}
    # The label budget: the students see a quarter of the labelled rows the teachers learned from.
    student = {"model_name_or_path": "demo:llama/student/bpe", **common, "dataset_train_split": STUDENT_SPLIT,
               **steps(student_steps), "learning_rate": 3.0e-3}
    # The prompts without labels: every training prompt (the 240 labelled ones among them are not asked twice).
    prompts = {"prompts": "train", "per_device_eval_batch_size": 64}  # the teacher answers 64 prompts at a time
    _recipe(os.path.join(folder, "student_sft.yaml"), {"method": "sft", **student},
            "Student by SFT on its 240 labels alone (the baseline).")
    _recipe(os.path.join(folder, "student_seqkd.yaml"),
            {"method": "seqkd", **student, **prompts, "kd_weight": 0.0, "seqkd_max_new_tokens": 48,
             "seqkd_batch_size": 64, "teacher_model_name_or_path": cached["teacher"]},
            "Student by Seq-KD: SFT on the BPE teacher's greedy answers to all 960 training prompts.")
    _recipe(os.path.join(folder, "student_dskd_cma.yaml"),
            {"method": "dskd", **student, **prompts, "kd_temperature": 2.0, "kd_weight": 0.5,
             "divergence": "forward_kl", "projector_lr": 3.0e-3,
             "teacher_model_name_or_path": cached["teacher_wordpiece"]},
            "Student by DSKD with cross-model attention from the WordPiece teacher, on the 240 labelled rows plus "
            "the teacher's answers to the other 720 prompts.")
    study = {
        "name": "quickstart", "base_recipe": "student_seqkd.yaml", "output_dir": study_dir,
        # Cached by their settings: a quickstart in another folder, or a study training the same teacher, reuses them.
        "prepare": [{"name": "teacher", "recipe": "teacher_sft.yaml", "cache": True},
                    {"name": "teacher_wordpiece", "recipe": "teacher_wordpiece_sft.yaml", "cache": True}],
        "grid": {"student": {"sft": {"recipe": "student_sft.yaml"}, "seqkd": {},
                             "dskd_cma": {"recipe": "student_dskd_cma.yaml"}}},
        "seeds": [seed + offset for offset in range(seeds)], "headline_metric": "exact_match",
        "evaluation": {"metrics": ["ngram", "embedding", "exact_match", "lm_eval"], "answer_extractor": "demo",
                       "split": "test", "limit": eval_limit, "max_new_tokens": 40, "batch_size": 32,
                       # The demo as lm-evaluation-harness tasks: glossary multiple choice, arithmetic generation.
                       "lm_eval": {"tasks": ["kd_demo"], "limit": eval_limit, "batch_size": 32}},
        "hypotheses": [{"name": "Seq-KD student vs SFT student", "a": {"student": "sft"}, "b": {"student": "seqkd"}},
                       {"name": "DSKD-CMA student vs SFT student", "a": {"student": "sft"},
                        "b": {"student": "dskd_cma"}}],
    }
    path = os.path.join(folder, "study.yaml")
    with open(path, "w") as handle:
        handle.write(f"# The quickstart study. Launch: kd-study {path}\n")
        yaml.safe_dump(study, handle, sort_keys=False)
    return path


SHOWN_METRICS = ("rouge_l", "bleu_4", "chrf", "embedding_cosine", "bertscore_f1", "exact_match",
                 "kd_demo_glossary_mc/acc", "kd_demo_arithmetic/exact_match,strict-match")


def format_figure(value: float) -> str:
    """A figure as the quickstart prints it (and the README shows it): 3 significant digits."""
    return f"{value:.3g}"


def results_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The quickstart's results: one row per model (the references marked), its mean per shown metric."""
    columns = [c for c in SHOWN_METRICS if c in summary]
    table = summary[["cell", *columns]].copy()
    table["cell"] = [f"{cell} (reference)" if reference else cell
                     for cell, reference in zip(summary["cell"], summary["reference"])]
    return table


def printed_results(report: str) -> str:
    """What the quickstart prints at its end from its report folder: the table of means, then the headline."""
    table = results_table(pd.read_csv(os.path.join(report, "summary.csv")))
    with open(os.path.join(report, "headline.txt")) as handle:
        headline = handle.read().strip()
    return ("Test split, mean per model (higher is better; the references are the teachers):\n"
            + table.to_string(index=False, float_format=format_figure) + "\n\n" + headline)


def run(output_dir: str = "kd-quickstart-output", teacher_steps: int = 800, student_steps: int = 300,
        seed: int = 0, eval_limit: int | None = None, seeds: int = 3, workers: int = 1) -> str:
    """Runs the quickstart study (its stages in `workers` processes) and returns its report folder."""
    from ..study import load_study, run_study

    start = time.time()
    study_file = write_quickstart_study(output_dir, teacher_steps, student_steps, seed, eval_limit, seeds)
    print(f"Recipes and study written to {os.path.dirname(study_file)}")
    report = run_study(load_study(study_file), log=lambda message: print(message, flush=True), workers=workers)
    print("\n" + printed_results(report))
    print(f"\nReport: {os.path.abspath(report)}/report.md and report.html (total {time.time() - start:.0f} s)")
    print("What these numbers mean on the demo, and why: README, section 'What the demo shows'.")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="kd-quickstart-output")
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=3, help="students trained per method, seeds SEED, SEED+1, ...")
    parser.add_argument("--eval-limit", type=int, help="evaluate on the first N test examples only")
    parser.add_argument("--workers", type=int, help="stages side by side in N processes (default: 2 on a machine "
                        "without CUDA and with 2 or more cores, where the tiny models train faster so; else 1)")
    options = parser.parse_args(argv)
    from ..runtime.progress import quiet_libraries

    quiet_libraries()
    import torch

    workers = options.workers or (2 if not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2 else 1)
    run(options.output_dir, options.teacher_steps, options.student_steps, options.seed, options.eval_limit,
        options.seeds, workers)


if __name__ == "__main__":
    main()
