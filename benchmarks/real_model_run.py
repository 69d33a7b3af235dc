"""One small measured run on real models: DSKD-CMA from Qwen2.5-Coder-0.5B-Instruct into SmolLM2-135M-Instruct
against SFT of the same student, on arithmetic from DeepMind's mathematics_dataset generator, through `kd-study`.

What it is (fixed before it was run; nothing here was tuned on its results):
- models: the two pretrained instruct models whole (`kd_trainers.models.real_models`), float32, on the CPU;
- data: `arithmetic.add_or_sub` at the easy end of the generator's range (difficulty 0.1), 400 training and 100 test
  questions from different seeds, as chat messages (the user's question, the assistant's answer alone);
- cells: SFT (kd_weight 0) and DSKD with cross-model attention (the vocabularies differ: 49,152 and 151,936 tokens;
  forward KL, T = 1, kd_weight 0.5), 40 steps of 8 examples (320 of the 400 questions) at learning rate 5e-5, one
  seed (0): sized to run in about 20 minutes on 2 CPU cores;
- evaluation: greedy answers of at most 16 tokens, the last number compared with the answer (`exact_match`,
  `last_number`), paired per question (McNemar, Holm) by the study's report; the teacher is scored once as the
  reference, and the students before training by kd-eval.

Usage: python benchmarks/real_model_run.py [--output real-model-run]   (about 20 minutes on 2 cores)
Writes the study's folder (report.md, scores) under --output and benchmarks/results/real_model_run.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from kd_trainers.models.real_models import mathematics_questions, real_model_path


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

BASE_RECIPE = """\
method: dskd
model_name_or_path: {student}
teacher_model_name_or_path: {teacher}
dataset_name: {data}
divergence: forward_kl
kd_temperature: 1.0
kd_weight: 0.5
learning_rate: 5.0e-5
lr_scheduler_type: cosine
warmup_steps: 4
max_steps: 40
per_device_train_batch_size: 8
max_length: 96
logging_steps: 10
save_steps: 40
bf16: false
report_to: none
output_dir: {output}/unused
"""

SFT_RECIPE = BASE_RECIPE.replace("method: dskd\n", "method: sft\n").replace("teacher_model_name_or_path: {teacher}\n", "")
for line in ("divergence: forward_kl\n", "kd_temperature: 1.0\n", "kd_weight: 0.5\n"):
    SFT_RECIPE = SFT_RECIPE.replace(line, "")

STUDY = """\
name: real_arithmetic
base_recipe: dskd.yaml
output_dir: {output}/study
grid:
  method:
    sft: {{recipe: sft.yaml}}
    dskd_cma: {{}}
seeds: [0]
evaluation: {{metrics: [exact_match], answer_extractor: last_number, split: test, max_new_tokens: 16}}
hypotheses:
  - {{name: "DSKD-CMA vs SFT", a: {{method: sft}}, b: {{method: dskd_cma}}, method: auto, correction: holm}}
alpha: 0.05
"""


def _rows(pairs):
    return [{"prompt": [{"role": "user", "content": question}],
             "completion": [{"role": "assistant", "content": answer}]} for question, answer in pairs]


def write_data(output: str) -> str:
    """The train (400) and test (100) questions as chat rows under `output/data`; returns that folder."""
    data = os.path.join(output, "data")
    os.makedirs(data, exist_ok=True)
    for split, count, seed in (("train", 400, 0), ("test", 100, 1)):
        with open(os.path.join(data, f"{split}.jsonl"), "w") as handle:
            for row in _rows(mathematics_questions("add_or_sub", count, seed=seed, difficulty=0.1)):
                handle.write(json.dumps(row) + "\n")
    return data


def score_before(output: str, data: str, models: dict[str, str]) -> dict[str, dict]:
    """kd-eval's summary of each named model on the test questions (kept under `output/before`, reused)."""
    before = {}
    for name, model in models.items():
        folder = os.path.join(output, "before", name)
        if not os.path.exists(os.path.join(folder, "summary.json")):
            subprocess.run([sys.executable, "-m", "kd_trainers.cli.evaluate", "--model", model, "--dataset", data,
                            "--split", "test", "--metrics", "exact_match", "--answer-extractor", "last_number",
                            "--max-new-tokens", "16", "--output", folder], check=True)
        with open(os.path.join(folder, "summary.json")) as handle:
            before[name] = json.load(handle)
    return before


def write_report(output: str, title: str, before: dict[str, dict], result_name: str) -> None:
    """`benchmarks/results/<result_name>.md`: the scores before training and the study's report, copied."""
    report = os.path.join(output, "study", "report", "report.md")
    lines = [f"# {title}", "", "Before training (kd-eval on the same 100 test questions):", ""]
    for name, summary in before.items():
        lines.append(f"- {name}: exact_match {summary['exact_match']:.3f}, empty answers "
                     f"{summary['empty_predictions']:.2f}")
    lines += ["", "The study's report (`study/report/report.md` under --output, its plots left there), copied:", ""]
    if os.path.exists(report):
        with open(report) as handle:
            lines.append(handle.read().split("\n## Plots")[0].replace("\n# ", "\n## ").replace("\n## ", "\n### ")
                         .replace("# Study report", "## Study report", 1))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{result_name}.md"), "w") as handle:
        handle.write("\n".join(lines))
    print("\n".join(lines[:8]))


def run_study(doc: str, default_output: str, recipes: dict[str, str], title: str, result_name: str) -> None:
    """The command line of a real-model study script: the data and `recipes` (file name -> text, `study.yaml` among
    them; `{student}`, `{teacher}`, `{data}`, `{output}` filled in) written under --output, the two models scored
    before training, `kd-study` run, and the report copied into `benchmarks/results/<result_name>.md`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=default_output)
    options = parser.parse_args()
    output = os.path.abspath(options.output)
    data = write_data(output)
    student, teacher = real_model_path("smollm2"), real_model_path("qwen2.5-coder")
    for name, text in recipes.items():
        with open(os.path.join(output, name), "w") as handle:
            handle.write(text.format(student=student, teacher=teacher, data=data, output=output))
    before = score_before(output, data, {"student_before": student, "teacher": teacher})
    subprocess.run([sys.executable, "-m", "kd_trainers.cli.study", os.path.join(output, "study.yaml")], check=True)
    write_report(output, title, before, result_name)


def main():
    run_study(__doc__, "real-model-run", {"dskd.yaml": BASE_RECIPE, "sft.yaml": SFT_RECIPE, "study.yaml": STUDY},
              "Real-model run: DSKD-CMA (Qwen2.5-Coder-0.5B-Instruct -> SmolLM2-135M-Instruct) against SFT",
              "real_model_run")


if __name__ == "__main__":
    main()
