"""The demo task as lm-evaluation-harness tasks, written as task YAMLs over local JSON files (nothing is fetched):

    kd_demo_glossary_mc   multiple choice: each glossary test question with its true answer and three other facts'
                          answers of the same kind, scored by log-likelihood (`acc`, `acc_norm`)
    kd_demo_arithmetic    generation: the arithmetic test problems, the number after "The answer is" against the
                          answer (`exact_match,strict-match`; "the answer is" in any case: a lowercasing tokenizer
                          writes it in lower case)

Both are tagged `kd_demo`. The test items are the demo's own test split (the questions no training row asks); the
few-shot examples, when `num_fewshot` > 0, come from its train split.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile

from .task import demo_pairs


DEMO_TASKS = ("kd_demo_glossary_mc", "kd_demo_arithmetic")
DEMO_TAG = "kd_demo"
_DISTRACTORS = 3


def _multiple_choice(rows: list[dict], rng: random.Random) -> list[dict]:
    """A glossary row -> `{prompt, choices, label}`: the true completion and the same completion with three other
    facts' answers of the same kind (expansions with expansions, definitions with definitions) in its place."""
    def kind(row: dict) -> str:
        return "expansion" if " stands for " in row["completion"] else "definition"

    answers: dict[str, set[str]] = {}
    for row in rows:
        answers.setdefault(kind(row), set()).add(row["answer"])
    items = []
    for row in rows:
        others = sorted(answers[kind(row)] - {row["answer"]})
        wrong = [row["completion"].replace(row["answer"], other) for other in rng.sample(others, _DISTRACTORS)]
        label = rng.randrange(_DISTRACTORS + 1)
        choices = wrong[:label] + [row["completion"]] + wrong[label:]
        items.append({"prompt": row["prompt"], "choices": choices, "label": label})
    return items


def _task_yamls(folder: str) -> dict[str, str]:
    data = {split: os.path.join(folder, f"{{task}}_{split}.jsonl") for split in ("train", "test")}

    def files(task: str) -> str:
        return "\n".join(f"    {split}: {json.dumps(path.format(task=task))}" for split, path in data.items())

    return {
        "kd_demo_glossary_mc": f"""task: kd_demo_glossary_mc
tag: [{DEMO_TAG}]
dataset_path: json
dataset_kwargs:
  data_files:
{files("kd_demo_glossary_mc")}
output_type: multiple_choice
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
""",
        "kd_demo_arithmetic": f"""task: kd_demo_arithmetic
tag: [{DEMO_TAG}]
dataset_path: json
dataset_kwargs:
  data_files:
{files("kd_demo_arithmetic")}
output_type: generate_until
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
fewshot_config:
  sampler: first_n
  doc_to_target: "{{{{completion}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 48
  do_sample: false
filter_list:
  - name: strict-match
    filter:
      - {{function: regex, regex_pattern: "(?i)the answer is (-?[0-9]+)"}}
      - {{function: take_first}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
""",
    }


def _task_rows(seed: int) -> dict[str, dict[str, list[dict]]]:
    """`{task: {split: rows}}` from the demo's splits."""
    splits = demo_pairs(seed=seed)
    rng = random.Random(seed)
    rows = {"kd_demo_glossary_mc": {}, "kd_demo_arithmetic": {}}
    for split, pairs in splits.items():
        glossary = [row for row in pairs if row["kind"] == "glossary"]
        rows["kd_demo_glossary_mc"][split] = _multiple_choice(glossary, rng)
        rows["kd_demo_arithmetic"][split] = [{"prompt": row["prompt"], "completion": row["completion"],
                                              "answer": row["answer"]} for row in pairs if row["kind"] == "arithmetic"]
    return rows


def demo_task_folder(root: str, seed: int = 0) -> str:
    """The folder of the demo's task YAMLs and data under `root` (an lm-eval `include_path`), written once: its name is
    a hash of its content, and it is written to a temporary folder first and renamed, so a reader never sees half."""
    rows = _task_rows(seed)
    probe = _task_yamls("FOLDER")  # the YAMLs with their folder left out: the name hashes the content
    digest = hashlib.sha256(json.dumps([rows, probe], sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(root, f"demo-{digest}")
    if os.path.isdir(folder):
        return folder
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".demo-", dir=root)
    try:
        for task, text in _task_yamls(folder).items():
            with open(os.path.join(staging, f"{task}.yaml"), "w") as handle:
                handle.write(text)
            for split, items in rows[task].items():
                with open(os.path.join(staging, f"{task}_{split}.jsonl"), "w") as handle:
                    handle.writelines(json.dumps(item) + "\n" for item in items)
        try:
            os.rename(staging, folder)
        except OSError:  # another process wrote the same content first
            if not os.path.isdir(folder):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
