"""Runs that cannot go wrong quietly: a finished run is left alone, a run killed (SIGKILL) during its final save or
during a study's evaluation ends, once re-run, with the same files as one never interrupted; changed settings are
refused; a damaged checkpoint is skipped; a non-finite loss stops the run; secrets and remote code."""

import hashlib
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from faults import StopAt, killed_during

from kd_trainers.cli import evaluate as eval_cli, study as study_cli, train as cli
from kd_trainers.runtime.guards import DroppedExamplesWarning, NonFiniteTrainingError
from kd_trainers.recipe import load_recipe
from kd_trainers.recipe.run import run_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KD = os.path.join(ROOT, "recipes", "vanilla_kd.yaml")
FAST = ["max_steps=4", "save_steps=2", "logging_steps=1", "per_device_train_batch_size=4", "max_length=64",
        "dataset_test_split=null", "lr_scheduler_type=constant", "warmup_steps=0"]


def digest(folder, skip=("run_info.json",)):
    """`{relative path: sha256}` of every file under `folder` (run_info.json records the command and the resume)."""
    result = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if name not in skip:
                result[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return result


def test_a_finished_run_run_again_is_left_alone(tmp_path, capsys):
    output = tmp_path / "run"
    assert cli.main([KD, *FAST, f"output_dir={output}"]) == 0
    assert json.loads((output / "done.json").read_text())["global_step"] == 4
    before = digest(output, skip=())
    capsys.readouterr()
    assert cli.main([KD, *FAST, f"output_dir={output}"]) == 0
    assert "holds a finished run (done.json): left alone" in capsys.readouterr().out
    assert digest(output, skip=()) == before  # not one byte changed: no step 5, no rewritten recipe.yaml
    assert run_recipe(load_recipe(KD, [*FAST, f"output_dir={output}"])) is None


@pytest.mark.slow
@pytest.mark.parametrize("target", [
    "transformers:PreTrainedTokenizerBase.save_pretrained",  # the model is written, the tokenizer is not
    "kd_trainers.runtime.files:write_atomically",  # every file is in place, done.json is not
])
def test_a_run_killed_during_its_final_save_ends_the_same_when_run_again(tmp_path, target):
    # Both runs use the same output_dir (paths are recorded in the files): the straight one is moved aside first.
    straight, killed = tmp_path / "straight", tmp_path / "run"
    assert subprocess.run([sys.executable, "-m", "kd_trainers", KD, *FAST, f"output_dir={killed}"],
                          capture_output=True).returncode == 0
    os.rename(killed, straight)
    # The tokenizer is saved into checkpoint-2, checkpoint-4, then the final folder (3rd); write_atomically writes
    # recipe.yaml and run_info.json, then done.json (3rd).
    assert killed_during(target, 3, [KD, *FAST, f"output_dir={killed}"]) == -9
    assert not (killed / "done.json").exists()
    assert not (killed / "tokenizer.json").exists() or "write_atomically" in target
    # The unfinished folder is not taken for a model.
    assert eval_cli.main(["--model", str(killed), "--output", str(tmp_path / "eval")]) == 2
    assert subprocess.run([sys.executable, "-m", "kd_trainers", KD, *FAST, f"output_dir={killed}"],
                          capture_output=True).returncode == 0
    assert json.loads((killed / "run_info.json").read_text())["resumed_from"].endswith("checkpoint-4")
    assert digest(killed) == digest(straight)  # the same model, tokenizer, checkpoints and marker, byte for byte
    assert not os.listdir(killed / ".staging")


@pytest.mark.slow
def test_a_study_killed_during_evaluation_gives_the_same_report_when_run_again(tmp_path):
    def spec(folder):
        values = {"name": "kill", "base_recipe": KD, "output_dir": str(folder),
                  "overrides": {"max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 4,
                                "max_length": 64, "dataset_test_split": None},
                  "grid": {"T": {"1": {"kd_temperature": 1.0}, "4": {"kd_temperature": 4.0}}}, "seeds": [0, 1],
                  "evaluation": {"metrics": ["ngram", "exact_match"], "answer_extractor": "demo", "limit": 6,
                                 "max_new_tokens": 6, "batch_size": 6},
                  "hypotheses": [{"name": "T", "a": {"T": "1"}, "b": {"T": "4"}, "method": "wilcoxon"}]}
        path = tmp_path / f"{os.path.basename(folder)}.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert study_cli.main([spec(straight)]) == 0
    # Killed while generating the third cell's answers (the fourth generation: the cells' teacher, a demo model, is
    # scored first as the study's reference): two cells are done, the third has trained.
    assert killed_during("kd_trainers.evaluation.pipeline:generate_predictions", 4, [spec(killed)],
                         module="kd_trainers.cli.study") == -9
    cells = killed / "cells"
    markers = [os.path.relpath(root, cells) for root, _, names in os.walk(cells) if "done.json" in names]
    assert sum(not marker.endswith("train") for marker in markers) == 2  # two cells are finished
    assert sum(marker.endswith("train") for marker in markers) == 3  # and the third's training
    assert study_cli.main([spec(killed)]) == 0
    for name in ("all_scores.csv", "summary.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(killed / "report" / name), pd.read_csv(straight / "report" / name))
    report = (killed / "report" / "report.md").read_text().replace(str(killed), "STUDY")
    assert report == (straight / "report" / "report.md").read_text().replace(str(straight), "STUDY")
    for cell in os.listdir(cells):  # and every trained model is the same, none trained past its max_steps
        for seed in ("seed0", "seed1"):
            trained = load_file(str(cells / cell / seed / "train" / "model.safetensors"))
            reference = load_file(str(straight / "cells" / cell / seed / "train" / "model.safetensors"))
            assert all(torch.equal(trained[k], reference[k]) for k in reference), (cell, seed)
            assert json.loads((cells / cell / seed / "train" / "done.json").read_text())["global_step"] == 2


@pytest.mark.slow
def test_changed_settings_in_the_same_output_dir_are_refused_unless_starting_over(tmp_path, capsys):
    output = tmp_path / "run"
    assert cli.main([KD, *FAST, f"output_dir={output}"]) == 0
    recipe_before = (output / "recipe.yaml").read_text()
    capsys.readouterr()
    assert cli.main([KD, *FAST, f"output_dir={output}", "kd_temperature=4.0", "divergence=reverse_kl"]) == 2
    err = capsys.readouterr().err
    assert "holds a run made with other settings (divergence: 'forward_kl' -> 'reverse_kl'; kd_temperature: 2.0 " \
           "-> 4.0)" in err and "overwrite_output_dir=true" in err
    assert (output / "recipe.yaml").read_text() == recipe_before
    # Settings that do not change the model (logging, saving) are not refused: the finished run is left alone.
    assert cli.main([KD, *FAST, f"output_dir={output}", "logging_steps=2"]) == 0
    assert cli.main([KD, *FAST, f"output_dir={output}", "kd_temperature=4.0", "overwrite_output_dir=true"]) == 0
    assert yaml.safe_load((output / "recipe.yaml").read_text())["kd_temperature"] == 4.0
    assert json.loads((output / "run_info.json").read_text())["resumed_from"] is None


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_last_intact_one(tmp_path, capsys):
    settings = [*FAST, "max_steps=6"]
    full = run_recipe(load_recipe(KD, [*settings, f"output_dir={tmp_path / 'full'}"]))
    output = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(KD, [*settings, f"output_dir={output}"]), callbacks=[StopAt(5)])
    weights = output / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a full disk
    capsys.readouterr()
    resumed = run_recipe(load_recipe(KD, [*settings, f"output_dir={output}"]))
    out = capsys.readouterr().out
    assert f"Checkpoint {output / 'checkpoint-4'} is damaged (model.safetensors: SafetensorError" in out
    assert json.loads((output / "run_info.json").read_text())["resumed_from"].endswith("checkpoint-2")
    assert (output / "checkpoint-4.damaged").is_dir() and (output / "checkpoint-4" / "trainer_state.json").exists()
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_a_diverging_run_stops_with_the_step_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    output = tmp_path / "diverged"
    code = cli.main([KD, *FAST, "max_steps=8", "save_steps=1", f"output_dir={output}", "learning_rate=1e30"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Training stopped at step " in err and "gradient norm nan" in err and "learning rate too high" in err
    assert f"The last good checkpoint is {output / 'checkpoint-1'}" in err
    assert not (output / "done.json").exists() and not (output / "model.safetensors").exists()
    assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint")) == ["checkpoint-1"]
    good = load_file(str(output / "checkpoint-1" / "model.safetensors"))
    assert all(torch.isfinite(value).all() for value in good.values())
    state = json.loads((output / "checkpoint-1" / "trainer_state.json").read_text())
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in state["log_history"] if "loss" in log)


def test_a_non_finite_kd_loss_stops_the_python_api_before_the_weights_change(tmp_path):
    from kd_trainers import KDConfig, KDTrainer
    from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset

    tokenizer = demo_tokenizer("bpe")
    student, teacher = demo_model("llama", tokenizer, "student", seed=2), demo_model("llama", tokenizer, "teacher")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = KDConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, max_length=64,
                    report_to="none", bf16=False, kd_weight=0.5, save_strategy="no",
                    kd_temperature=1e-39)  # positive and finite, but logits / T overflow float32
    trainer = KDTrainer(student, args, train_dataset=load_demo_dataset("prompt_completion")["train"],
                        processing_class=tokenizer, teacher_model=teacher)
    with pytest.raises(NonFiniteTrainingError, match=r"Training stopped at step 1: loss nan.*kd_loss nan"):
        trainer.train()
    assert all(torch.equal(value, before[name]) for name, value in trainer.model.state_dict().items())


def test_examples_left_without_a_label_token_are_counted_or_refused(tmp_path):
    from datasets import Dataset

    from kd_trainers.sft import SFTConfig, SFTTrainer
    from kd_trainers.demo import demo_model, demo_tokenizer

    tokenizer = demo_tokenizer("bpe")
    long_prompt = " ".join(["the answer is"] * 40)
    rows = [{"prompt": long_prompt, "completion": " 4"}] * 3 + [{"prompt": "2 + 2 =", "completion": " 4"}]
    args = SFTConfig(output_dir=str(tmp_path), max_length=16, report_to="none", bf16=False)
    with pytest.warns(DroppedExamplesWarning, match=r"3 of 4 examples \(75%\) are left without a label token once "
                                                    r"truncated to max_length=16"):
        trainer = SFTTrainer(demo_model("llama", tokenizer), args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    assert len(trainer.train_dataset) == 1
    with pytest.raises(ValueError, match=r"all 3 examples are left without a label token .* raise max_length"):
        SFTTrainer(demo_model("llama", tokenizer), args, train_dataset=Dataset.from_list(rows[:3]),
                   processing_class=tokenizer)


def test_secrets_are_redacted_from_every_record(tmp_path, monkeypatch):
    from kd_trainers.recipe.run import write_run_info

    monkeypatch.setattr(sys, "argv", ["kd-train", KD, "hub_token=hf_secret1", "--judge-api-key", "sk-secret2"])
    recipe = load_recipe(KD, [f"output_dir={tmp_path}", "hub_token=hf_secret1", "env.WANDB_API_KEY=secret3",
                              'evaluation={"metrics": ["judge"], "judge": {"url": "http://127.0.0.1:1/v1", '
                              '"endpoint_model": "j", "api_key": "sk-secret2"}}'])
    write_run_info(recipe, None)
    for name in ("recipe.yaml", "run_info.json"):
        text = (tmp_path / name).read_text()
        assert not any(secret in text for secret in ("hf_secret1", "sk-secret2", "secret3")), name
        assert "<redacted>" in text


def test_a_recipe_that_enables_remote_code_is_warned_about(tmp_path, capsys):
    path = tmp_path / "remote.yaml"
    path.write_text(open(KD).read() + "model_init_kwargs: {trust_remote_code: true}\n")
    assert cli.main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"WARNING: {path} sets trust_remote_code in model_init_kwargs: the model repository's own Python code " \
           "will run on this machine. A recipe is code: run only recipes you trust." in err
