"""The built-in demo task: data, tokenizers, models, and a teacher that is worth distilling from."""

import re

import pytest
import torch

from kd_trainers.demo import ARCHITECTURES, GLOSSARY, demo_model, demo_pairs, load_demo_dataset
from kd_trainers.demo.scoring import exact_match, final_answer
from kd_trainers.cli.quickstart import write_quickstart_study
from kd_trainers.recipe.run import run_recipe
from kd_trainers.recipe.schema import load_recipe


def test_demo_pairs_are_deterministic_and_splits_do_not_share_questions():
    first, again = demo_pairs(seed=0), demo_pairs(seed=0)
    assert first == again and demo_pairs(seed=1) != first
    train_prompts = {row["prompt"] for row in first["train"]}
    assert not train_prompts & {row["prompt"] for row in first["test"]}
    kinds = {row["kind"] for row in first["test"]}
    assert kinds == {"glossary", "arithmetic"}
    assert len(first["train"]) == len(GLOSSARY) * 6 + 600


def test_arithmetic_answers_are_correct():
    for row in demo_pairs()["train"]:
        if row["kind"] == "arithmetic":
            left, operator, right, result = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)", row["completion"]).groups()
            operations = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
            assert operations[operator](int(left), int(right)) == int(result) == int(row["answer"])
            assert final_answer(row["completion"]) == row["answer"]


@pytest.mark.parametrize("data_format,columns", [
    ("prompt_completion", {"prompt", "completion"}), ("messages", {"messages"}),
    ("conversational_prompt_completion", {"prompt", "completion"}), ("text", {"text"}),
])
def test_dataset_formats(data_format, columns):
    data = load_demo_dataset(data_format)
    assert columns | {"kind", "answer"} == set(data["train"].column_names)


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="Unknown demo dataset format 'csv'"):
        load_demo_dataset("csv")


def test_the_two_tokenizers_really_differ(bpe_tokenizer, wordpiece_tokenizer):
    assert len(bpe_tokenizer) == 640 and len(wordpiece_tokenizer) == 480
    assert bpe_tokenizer.bos_token == "<s>" and wordpiece_tokenizer.bos_token is None
    assert bpe_tokenizer.eos_token != wordpiece_tokenizer.eos_token
    text = "What does RAN stand for?"
    assert bpe_tokenizer.decode(bpe_tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert wordpiece_tokenizer.decode(wordpiece_tokenizer(text).input_ids) == text.lower()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_models_build_from_configs(arch, bpe_tokenizer):
    model = demo_model(arch, bpe_tokenizer, "student", seed=3)
    assert model.config.model_type == arch and model.config.vocab_size == 640
    again = demo_model(arch, bpe_tokenizer, "student", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 640)


@pytest.mark.slow
def test_the_quickstart_teacher_is_far_better_than_its_sft_student(tmp_path):
    """The demo's promise, pinned: the quickstart's teacher (as its recipe trains it) answers most test questions
    exactly, where the student trained by SFT on its label budget (as its recipe trains it) answers few."""
    write_quickstart_study(str(tmp_path))
    scores = {}
    for name in ("teacher_sft", "student_sft"):
        recipe = load_recipe(str(tmp_path / "recipes" / f"{name}.yaml"), [f"output_dir={tmp_path / name}"])
        trainer = run_recipe(recipe)
        scores[name] = exact_match(trainer.model, trainer.processing_class, load_demo_dataset()["test"])
    assert scores["teacher_sft"] > 0.6, scores  # measured 0.71 (README)
    assert scores["teacher_sft"] - scores["student_sft"] > 0.4, scores  # measured 0.71 vs 0.1


def test_the_domain_text_is_prose_without_questions_or_test_answers():
    """The telecom study's pretraining text: every glossary fact and the training problems' reasoning, no question,
    no "The answer is", and no test problem's reasoning; its test split is the task's, to score the base models."""
    data = load_demo_dataset("domain_text")
    texts = data["train"]["text"]
    assert not any("?" in text or "answer is" in text.lower() for text in texts)
    assert all(any(text.startswith(f"{acronym} stands for {expansion}.") for text in texts)
               for acronym, expansion, _ in GLOSSARY)
    pairs = demo_pairs()
    test_reasoning = {row["completion"].split(" The answer is")[0] for row in pairs["test"]
                      if row["kind"] == "arithmetic"}
    train_reasoning = {row["completion"].split(" The answer is")[0] for row in pairs["train"]
                       if row["kind"] == "arithmetic"}
    assert set(texts) & test_reasoning <= train_reasoning  # only what training teaches anyway
    assert data["test"]["prompt"] == load_demo_dataset()["test"]["prompt"]
