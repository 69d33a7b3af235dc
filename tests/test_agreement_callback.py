"""AgreementCallback: generation-time agreement, fidelity and accuracy logged while training, checked by hand."""

import json
import os

import pytest

from kd_trainers import GKDConfig, GKDTrainer, KDConfig, KDTrainer
from kd_trainers.evaluation.callbacks import AgreementCallback
from kd_trainers.evaluation.answers import ANSWER_EXTRACTORS
from kd_trainers.models.generation import generate_predictions
from kd_trainers.recipe import load_recipe
from kd_trainers.recipe.run import run_recipe
from kd_trainers.recipe.schema import RecipeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = dict(bf16=False, max_steps=6, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1,
              save_strategy="no", report_to=[], disable_tqdm=True, max_length=64, seed=0)


@pytest.mark.slow
def test_logged_values_equal_a_hand_computation_on_the_final_models(tmp_path, student, teacher, bpe_tokenizer,
                                                                     demo_data):
    held_out = demo_data["test"]
    callback = AgreementCallback(held_out, every_steps=2, num_samples=12, max_new_tokens=10, answer_extractor="demo")
    trainer = KDTrainer(student, KDConfig(output_dir=str(tmp_path), kd_weight=0.5, **COMMON),
                        train_dataset=demo_data["train"], processing_class=bpe_tokenizer, teacher_model=teacher,
                        teacher_processing_class=bpe_tokenizer, callbacks=[callback])
    trainer.train()
    logs = [log for log in trainer.state.log_history if "gen_agreement" in log]
    assert [log["step"] for log in logs] == [2, 4, 6]
    # The loss logs keep their pooled parts: the callback does not flush them.
    assert all("ce_loss" in log for log in trainer.state.log_history if "loss" in log and "train_loss" not in log)

    prompts, references = held_out["prompt"][:12], held_out["completion"][:12]
    extract = ANSWER_EXTRACTORS["demo"]
    ours = generate_predictions(student, bpe_tokenizer, prompts, max_new_tokens=10)
    theirs = generate_predictions(teacher, bpe_tokenizer, prompts, max_new_tokens=10)
    agreement = sum(extract(a) == extract(b) for a, b in zip(ours, theirs)) / 12
    accuracy = sum(extract(a) == extract(r) for a, r in zip(ours, references)) / 12
    teacher_accuracy = sum(extract(a) == extract(r) for a, r in zip(theirs, references)) / 12
    assert logs[-1]["gen_agreement"] == pytest.approx(agreement)
    assert logs[-1]["gen_exact_match"] == pytest.approx(accuracy)
    assert logs[-1]["gen_teacher_exact_match"] == pytest.approx(teacher_accuracy)
    assert 0.0 <= logs[-1]["gen_fidelity"] <= 1.0


def test_gkd_binds_it_too_and_a_bare_callback_fails_clearly(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    callback = AgreementCallback(demo_data["test"], every_steps=3, num_samples=4, max_new_tokens=4)
    trainer = GKDTrainer(student, teacher, GKDConfig(output_dir=str(tmp_path), lmbda=0.0, max_new_tokens=4,
                                                     **COMMON),
                         train_dataset=demo_data["train"], processing_class=bpe_tokenizer,
                         teacher_processing_class=bpe_tokenizer, callbacks=[callback])
    trainer.train()
    assert [log["step"] for log in trainer.state.log_history if "gen_fidelity" in log] == [3, 6]
    with pytest.raises(RuntimeError, match="AgreementCallback was not bound to a trainer"):
        AgreementCallback(demo_data["test"]).on_step_end(None, trainer.state, None)
    with pytest.raises(ValueError, match=r"needs 'prompt' and 'completion' columns; missing \['prompt'\]"):
        AgreementCallback(demo_data["test"].remove_columns("prompt"))


def test_recipe_agreement_block_logs_while_training_and_bad_blocks_fail(tmp_path):
    recipe = load_recipe(os.path.join(ROOT, "recipes", "vanilla_kd.yaml"), [
        "max_steps=2", "logging_steps=1", "save_steps=2", "dataset_test_split=null", f"output_dir={tmp_path}",
        'agreement={"every_steps": 1, "samples": 4, "max_new_tokens": 4, "answer_extractor": "demo"}'])
    run_recipe(recipe)
    state = json.load(open(os.path.join(tmp_path, "checkpoint-2", "trainer_state.json")))
    assert [log["step"] for log in state["log_history"] if "gen_agreement" in log] == [1, 2]
    with pytest.raises(RecipeError, match=r"agreement.every_step: unknown key. Did you mean 'every_steps'\?"):
        load_recipe(os.path.join(ROOT, "recipes", "vanilla_kd.yaml"), ['agreement={"every_step": 5}'])
    with pytest.raises(RecipeError, match="method 'sft' has no teacher to agree with"):
        load_recipe(os.path.join(ROOT, "recipes", "sft_lora.yaml"), ['agreement={"every_steps": 5}'])
