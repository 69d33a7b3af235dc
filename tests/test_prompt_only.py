"""Prompts without labels: taken by the methods that read no labels (Seq-KD, on-policy GKD), completed by the teacher
beside labelled rows (KD, DSKD), refused before anything loads where labels are needed, and never read where they must
not be (poisoned completions train to the same weights)."""

import json
import os
import subprocess

import pytest
import torch
from datasets import Dataset

from kd_trainers import GKDConfig, GKDTrainer, KDConfig, KDTrainer, SeqKDConfig, SeqKDTrainer
from kd_trainers.demo import demo_model
from kd_trainers.models.generation import generate_predictions
from kd_trainers.kd.prompt_rows import new_prompt_rows
from kd_trainers.data.prompt_completion import unlabelled_rows
from kd_trainers.sft import SFTConfig, SFTTrainer


def common(tmp_path, name, **overrides):
    return dict(output_dir=str(tmp_path / name), bf16=False, max_steps=4, per_device_train_batch_size=4,
                learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                max_length=64, seed=0, **overrides)


def poisoned(rows: Dataset) -> Dataset:
    """The same prompts with wrong answers: completions that say the opposite of the task's."""
    return rows.map(lambda row: {"completion": " Nothing at all, ever."})


def prompt_only(rows: Dataset) -> Dataset:
    return rows.remove_columns("completion")


@pytest.fixture
def rows(demo_data):
    return demo_data["train"].select(range(16))


def weights(model) -> dict:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_seqkd_trains_on_prompts_alone_and_never_reads_a_completion(tmp_path, bpe_tokenizer, teacher, rows):
    trained = {}
    for name, data in {"prompts": prompt_only(rows), "poisoned": poisoned(rows),
                       "hidden": prompt_only(rows).add_column("reference", poisoned(rows)["completion"])}.items():
        student = demo_model("llama", bpe_tokenizer, "student")
        args = SeqKDConfig(**common(tmp_path, name), seqkd_max_new_tokens=12, seqkd_cache_dir=str(tmp_path / "c"))
        trainer = SeqKDTrainer(student, args, train_dataset=data, processing_class=bpe_tokenizer,
                               teacher_model=teacher, teacher_processing_class=bpe_tokenizer)
        assert "Nothing at all" not in " ".join(trainer.train_dataset["completion"])
        trainer.train()
        trained[name] = weights(student)
    assert_same_weights(trained["prompts"], trained["poisoned"])
    assert_same_weights(trained["prompts"], trained["hidden"])
    assert any(not torch.equal(p, q) for p, q in zip(trained["prompts"].values(),
                                                       weights(demo_model("llama", bpe_tokenizer, "student")).values()))


def test_on_policy_gkd_trains_on_prompts_alone_and_never_reads_a_completion(tmp_path, bpe_tokenizer, teacher, rows):
    trained = {}
    for name, data in {"prompts": prompt_only(rows), "poisoned": poisoned(rows),
                       "hidden": prompt_only(rows).add_column("reference", poisoned(rows)["completion"])}.items():
        student = demo_model("llama", bpe_tokenizer, "student")
        args = GKDConfig(**common(tmp_path, name), lmbda=1.0, max_new_tokens=8)
        trainer = GKDTrainer(student, teacher, args=args, processing_class=bpe_tokenizer, train_dataset=data,
                             teacher_processing_class=bpe_tokenizer)
        trainer.train()
        trained[name] = weights(student)
    assert_same_weights(trained["prompts"], trained["poisoned"])
    assert_same_weights(trained["prompts"], trained["hidden"])


@pytest.mark.parametrize("make", [
    lambda tmp, tok, teacher, data: SFTTrainer(demo_model("llama", tok, "student"), SFTConfig(**common(tmp, "sft")),
                                               train_dataset=data, processing_class=tok),
    lambda tmp, tok, teacher, data: KDTrainer(demo_model("llama", tok, "student"), KDConfig(**common(tmp, "kd")),
                                              train_dataset=data, processing_class=tok, teacher_model=teacher),
    lambda tmp, tok, teacher, data: KDTrainer(demo_model("llama", tok, "student"),
                                              KDConfig(**common(tmp, "rev"), divergence="reverse_kl"),
                                              train_dataset=data, processing_class=tok, teacher_model=teacher),
    lambda tmp, tok, teacher, data: GKDTrainer(demo_model("llama", tok, "student"), teacher,
                                               args=GKDConfig(**common(tmp, "gkd"), lmbda=0.5), train_dataset=data,
                                               processing_class=tok),
], ids=["sft", "kd", "rev_kd", "gkd_lmbda_0.5"])
def test_methods_that_train_on_labels_refuse_prompts_alone_naming_rows_and_methods(tmp_path, bpe_tokenizer, rows,
                                                                                 make, monkeypatch):
    import kd_trainers.teachers.resident as teacher_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a teacher was loaded before the data was refused")

    monkeypatch.setattr(teacher_module, "load_teacher", no_loading)
    half = Dataset.from_list([{**row, "completion": row["completion"] if i % 2 else None}
                              for i, row in enumerate(rows)])
    with pytest.raises(ValueError) as error:
        make(tmp_path, bpe_tokenizer, "unused-teacher", half)
    message = str(error.value)
    assert "8 of 16 rows with a prompt and no completion (first: row 0)" in message
    assert "seqkd" in message and "gkd at lmbda=1" in message and "prompt_dataset=" in message


def test_kd_completes_the_prompts_no_labelled_row_asks_and_trains_on_both(tmp_path, bpe_tokenizer, teacher,
                                                                           demo_data):
    labelled = demo_data["train"].select(range(8))
    prompts = prompt_only(demo_data["train"].select(range(4, 20)))  # rows 4-7 are labelled already
    student = demo_model("llama", bpe_tokenizer, "student")
    before = weights(student)
    trainer = KDTrainer(student, KDConfig(**common(tmp_path, "kd"), kd_weight=0.5, kd_temperature=2.0),
                        train_dataset=labelled, prompt_dataset=prompts, processing_class=bpe_tokenizer,
                        teacher_model=teacher, teacher_processing_class=bpe_tokenizer)
    data = trainer.train_dataset
    assert len(data) == 8 + 12
    # The labelled rows keep their labels; the 12 new prompts carry the teacher's greedy answers.
    expected = generate_predictions(teacher, bpe_tokenizer, prompts["prompt"][4:7], max_new_tokens=64, strip=False)
    completed = json.load(open(os.path.join(trainer.completions_dir, "generation.json")))
    assert completed["num_examples"] == 12 and completed["settings"] == {"max_new_tokens": 64, "do_sample": False}
    from datasets import load_from_disk

    generated = load_from_disk(os.path.join(trainer.completions_dir, "dataset"))
    assert generated["prompt"][:3] == prompts["prompt"][4:7]
    assert generated["completion"][:3] == [text.rstrip() for text in expected]
    assert trainer.teacher_model is not None
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert [log for log in trainer.state.log_history if "kd_loss" in log]


def test_prompt_rows_drop_prompts_already_labelled_and_never_keep_a_completion(demo_data):
    labelled = demo_data["train"].select(range(3))
    prompts = demo_data["train"].select(range(6))
    rows = new_prompt_rows(labelled, prompts)
    assert rows["prompt"] == prompts["prompt"][3:] and "completion" not in rows.column_names
    messages = Dataset.from_list([{"messages": [{"role": "user", "content": "Hi?"}]},
                                  {"messages": [{"role": "user", "content": "Yo?"},
                                                {"role": "assistant", "content": "secret"}]}])
    rows = new_prompt_rows(None, messages)
    assert rows["prompt"] == [[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": "Yo?"}]]
    assert unlabelled_rows(messages) == [0]
    # What SFT trains on whole is labelled: text rows, and data tokenized beforehand (even beside a prompt).
    assert unlabelled_rows(Dataset.from_list([{"text": "Q A"}])) == []
    assert unlabelled_rows(Dataset.from_list([{"prompt": "Q", "input_ids": [1, 2]}])) == []


def test_prompts_with_a_teacher_cache_are_refused_before_loading(tmp_path, bpe_tokenizer, rows):
    args = KDConfig(**common(tmp_path, "kd"), teacher_cache=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="prompt_dataset with teacher_cache: the teacher completes the prompts"):
        KDTrainer(demo_model("llama", bpe_tokenizer, "student"), args, train_dataset=rows,
                  prompt_dataset=prompt_only(rows), processing_class=bpe_tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes: `prompts:` beside the labelled split, `kd-train validate` says what each row trains on, refusals exit 2

@pytest.fixture
def kd_train(capsys, monkeypatch):
    """`kd-train ARGS` in this process (the CLI's own entry point): its status, what it printed and its errors."""
    from kd_trainers.cli.train import main

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        status = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, status, out, err)

    return run


def write(path, text):
    path.write_text(text)
    return str(path)


TEACHER_RECIPE = """
method: {method}
model_name_or_path: demo:llama/student/bpe
teacher_model_name_or_path: demo:llama/teacher/bpe
dataset_name: demo
dataset_train_split: train[:8]
per_device_train_batch_size: 4
max_steps: 2
max_length: 64
save_strategy: "no"
report_to: none
bf16: false
"""


@pytest.mark.parametrize("method, extra, says", [
    ("seqkd", "prompts: train[:20]\nseqkd_max_new_tokens: 8\n",
     "trains on: the teacher's completions of the prompts of 8 rows of 'train[:8]' and 12 prompts of 'train[:20]' "
     "(8 of its 20 already asked"),
    ("kd", "prompts: train[:20]\n",
     "trains on: 8 rows of 'train[:8]' with their completions, 12 prompts of 'train[:20]' (8 of its 20 already "
     "asked by a row above or repeated), each completed by the teacher first."),
    ("gkd", "prompts: train[:20]\nlmbda: 1.0\nmax_new_tokens: 8\n",
     "trains on: the prompts of 8 rows of 'train[:8]' and 12 prompts"),
])
def test_a_recipe_names_labels_and_prompts_together_and_validate_says_what_each_row_trains_on(tmp_path, method, extra,
                                                                                           says, kd_train):
    recipe = write(tmp_path / "r.yaml", TEACHER_RECIPE.format(method=method) + extra
                   + f"output_dir: {tmp_path / 'out'}\nseqkd_cache_dir: {tmp_path / 'c'}\n" * (method == "seqkd")
                   + f"output_dir: {tmp_path / 'out'}\n" * (method != "seqkd"))
    result = kd_train("validate", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert says in result.stdout, result.stdout


@pytest.mark.parametrize("method, extra, refusal", [
    ("sft", "prompts: train\n", "prompts: method 'sft' trains on labels and has no teacher to complete prompts"),
    ("gkd", "prompts: train\nlmbda: 0.5\n", "prompts: gkd at lmbda=0.5 trains off-policy batches on labels"),
    ("kd", "prompts: {split: train, template: x}\n", "prompts.template: unknown key"),
    ("kd", "prompts: train\nteacher_cache: /nowhere\n",
     "prompts: the teacher completes the prompts before training, with the model in memory, and teacher_cache"),
])
def test_prompts_for_a_method_that_cannot_use_them_are_refused_in_one_line(tmp_path, method, extra, refusal,
                                                                         kd_train):
    text = TEACHER_RECIPE.format(method=method) + extra
    if method == "sft" or "teacher_cache" in extra:
        text = text.replace("teacher_model_name_or_path: demo:llama/teacher/bpe\n", "")
    recipe = write(tmp_path / "r.yaml", text)
    result = kd_train("validate", recipe, cwd=tmp_path)
    assert result.returncode == 2 and refusal in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_data_folder_of_prompts_beside_a_labelled_test_split_loads_and_trains_seqkd_only(tmp_path, demo_data,
                                                                                          kd_train):
    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as handle:
        for row in demo_data["train"].select(range(12)):
            handle.write(json.dumps({"prompt": row["prompt"]}) + "\n")
    with open(folder / "test.jsonl", "w") as handle:
        for row in demo_data["test"].select(range(4)):
            handle.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n")
    base = TEACHER_RECIPE.replace("dataset_name: demo", f"dataset_name: {folder}").replace("train[:8]", "train")
    seqkd = write(tmp_path / "seqkd.yaml", base.format(method="seqkd") + "dataset_test_split: test\n"
                  f"seqkd_max_new_tokens: 8\nseqkd_cache_dir: {tmp_path / 'c'}\noutput_dir: {tmp_path / 'out'}\n")
    result = kd_train("validate", seqkd, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trains on: the teacher's completions of the prompts of 12 rows of 'train' (0 labelled)" in result.stdout
    result = kd_train(seqkd, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(tmp_path / "out" / "done.json")

    kd = write(tmp_path / "kd.yaml", base.format(method="kd") + f"output_dir: {tmp_path / 'kd'}\n")
    result = kd_train(kd, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert ("method kd trains on labels, but dataset_train_split 'train' has 12 of 12 rows with a prompt and no "
            "completion (first: row 0)") in result.stderr
    assert not os.path.exists(tmp_path / "kd")
