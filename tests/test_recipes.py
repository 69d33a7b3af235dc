"""Recipes: validation with exact messages, every shipped recipe, data mapping, the CLI, resume, atomic checkpoints,
the LoRA SFT -> KD chain and publishing. The multi-process runs are in `test_recipes_distributed.py`."""

import json
import os
import re
import sys

import pytest
import torch
import yaml
from faults import StopAt
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from trl import SFTConfig

from kd_trainers.cli import train as cli
from kd_trainers.demo import demo_model
from kd_trainers.recipe import RecipeError, load_recipe
from kd_trainers.recipe.catalog import shipped, shipped_path
from kd_trainers.recipe.launch import accelerate_config_path, named_accelerate_configs
from kd_trainers.recipe.run import run_recipe


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")
FAST = ["max_steps=4", "save_steps=2", "logging_steps=1", "eval_steps=2", "per_device_train_batch_size=8",
        "max_length=64"]


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BASE = """method: kd
model_name_or_path: demo:llama/student/bpe
teacher_model_name_or_path: demo:llama/teacher/bpe
bf16: false
report_to: none
"""


def test_every_shipped_recipe_validates_and_has_a_header_with_its_launch_line():
    paths = [shipped_path(name) for name in shipped("recipe")]
    names = {os.path.relpath(p, RECIPES) for p in paths}
    assert {"vanilla_kd.yaml", "dskd.yaml", "sft_lora.yaml"} <= names
    assert len([n for n in names if n.startswith("telecom_qa/")]) >= 6
    assert len([n for n in names if n.startswith("analytical/")]) >= 3
    for path in paths:
        recipe = load_recipe(path, portable=True)
        with open(path) as handle:
            text = handle.read()
        assert text.startswith("# "), path
        launch = [line for line in text.splitlines() if line.startswith("# Launch: ")]
        assert launch and f"kd-train {os.path.relpath(path, ROOT)}" in launch[0], path
        assert recipe.method in ("sft", "kd", "dskd", "seqkd", "gkd", "uld", "gold", "mined")
    lora = load_recipe(os.path.join(RECIPES, "sft_lora.yaml"), portable=True).options["peft"]
    assert (lora["r"], lora["lora_alpha"]) == (256, 8)


@pytest.mark.slow
def test_every_shipped_recipe_validates_offline_on_a_fresh_machine(tmp_path, monkeypatch, capsys):
    """`kd-train validate` checks a recipe's shape: what is not on this machine yet (a Hub model while offline, an
    adapter an earlier recipe trains, the user's own data, bf16 on a CPU) is a note, with exit 0; running the recipe
    still refuses it before work."""
    monkeypatch.chdir(tmp_path)  # no outputs/ of earlier runs: a fresh machine
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hub cache
    for name in shipped("recipe"):
        assert cli.main(["validate", shipped_path(name)]) == 0, name
        out = capsys.readouterr().out
        assert ": valid (" in out, name
    assert "adapter_name_or_path: 'outputs/telecom_qa/sft_teacher_llama7b' does not exist" in (
        cli.main(["validate", shipped_path("telecom_qa/kd_llama7b_tinyllama")]) == 0 and capsys.readouterr().out)
    assert cli.main([shipped_path("telecom_qa/kd_llama7b_tinyllama"), "bf16=false"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_named_accelerate_configs_are_the_shipped_files():
    configs = named_accelerate_configs()
    assert set(configs) == {"single_process", "multi_process", "zero2", "zero3", "zero3_offload"}
    assert configs["zero3"]["deepspeed_config"]["zero_stage"] == 3
    assert accelerate_config_path("zero2") == os.path.join(RECIPES, "accelerate", "zero2.yaml")


@pytest.mark.parametrize("extra,parts", [
    # (recipe line, what the one-line error must name: the key, the value, the fix) -- not its exact wording
    ("learning_rat: 0.1\n", ["'learning_rat'", "0.1", "Did you mean 'learning_rate'?"]),
    ("max_steps: ten\n", ["max_steps", "'ten'", "int"]),
    ("max_steps: 2.5\n", ["max_steps", "2.5", "int"]),  # not silently 2
    # The type and the help come from the field itself (HfArgumentParser reads both from KDConfig).
    ("kd_temperature: warm\n", ["kd_temperature", "'warm'", "float", "Temperature dividing both models' logits"]),
    ("lr_scheduler_type: cosin\n", ["lr_scheduler_type", "'cosin'", "'cosine_with_restarts'",
                                     "Did you mean 'cosine'?"]),
    ("merge_lora: maybe\n", ["merge_lora", "'maybe'", "bool", "publish the model with its LoRA adapter merged"]),
    ("kd_temperature: 0\n", ["kd_temperature", "0.0", "> 0"]),
    ("divergence: kl\n", ["divergence", "'kl'", "'forward_kl'", "'reverse_kl'"]),
    ("peft: {rank: 8}\n", ["peft.rank", "8", "unknown LoRA setting"]),
    ("peft: {r: 8, lora_alpa: 16}\n", ["peft.lora_alpa", "16", "Did you mean 'lora_alpha'?"]),
    ("accelerate: {config: zero4}\n", ["accelerate.config", "'zero4'", "zero2", "zero3", "existing file"]),
    ("accelerate: {config: zero2, num_procs: 2}\n", ["accelerate.num_procs", "2", "Did you mean 'num_processes'?"]),
])
def test_bad_recipes_fail_naming_file_key_value_and_fix(tmp_path, extra, parts):
    path = write(tmp_path, BASE + extra)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_missing_method_model_or_teacher(tmp_path):
    path = write(tmp_path, "model_name_or_path: x\nmethod: distil\n")
    with pytest.raises(RecipeError, match=r"method: 'distil' is not a method; use one of \['dskd', 'gkd', 'gold', 'kd', 'mined', 'seqkd', 'sft', 'uld'\]"):
        load_recipe(path)
    path = write(tmp_path, "method: kd\nmodel_name_or_path: demo:llama/student/bpe\n")
    with pytest.raises(RecipeError, match="teacher_model_name_or_path is missing: method 'kd' needs a teacher"):
        load_recipe(path)


def test_overrides_win_and_reach_nested_blocks(tmp_path):
    path = write(tmp_path, BASE + "learning_rate: 1.0e-3\npeft: {r: 8, lora_alpha: 16}\n")
    recipe = load_recipe(path, ["learning_rate=5e-4", "peft.r=4", "max_steps=3", "dataset_test_split=test"])
    assert recipe.config.learning_rate == 5e-4 and recipe.config.max_steps == 3
    assert recipe.options["peft"] == {"r": 4, "lora_alpha": 16}
    assert recipe.options["dataset_test_split"] == "test"
    with pytest.raises(RecipeError, match="Override .max_steps. is not key=value"):
        load_recipe(path, ["max_steps"])


def test_local_qa_file_with_template_and_column_mapping(tmp_path):
    from kd_trainers.recipe.data import load_recipe_datasets

    rows = [{"question": f"What is {i}+{i}?", "context": "arithmetic", "answer": f" {2 * i}"} for i in range(10)]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows))
    options = {"dataset_name": str(jsonl), "dataset_config": None, "dataset_train_split": "train",
               "dataset_test_split": None, "columns": {"completion": "answer"},
               "prompt_template": "Context: {context}\nQ: {question}\nA:"}
    train, evaluation = load_recipe_datasets(options)
    assert evaluation is None and len(train) == 10
    assert train[3]["prompt"] == "Context: arithmetic\nQ: What is 3+3?\nA:" and train[3]["completion"] == " 6"
    import datasets

    for suffix in ("csv", "parquet"):
        path = tmp_path / f"qa.{suffix}"
        getattr(datasets.Dataset.from_list(rows), f"to_{suffix}")(str(path))
        train, _ = load_recipe_datasets({**options, "dataset_name": str(path)})
        assert train[0]["completion"] == " 0"
    with pytest.raises(ValueError, match=r"prompt_template uses column\(s\) \['title'\] that the train split does not "
                                         r"have; it has \['question', 'context', 'answer'\]"):
        load_recipe_datasets({**options, "prompt_template": "{title}: {question}"})
    with pytest.raises(ValueError, match=r"columns: completion: 'reply' is not a column of the train split"):
        load_recipe_datasets({**options, "columns": {"completion": "reply"}})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"dataset_name: '.*empty.jsonl' is an empty file."):
        load_recipe_datasets({**options, "dataset_name": str(tmp_path / "empty.jsonl")})
    with pytest.raises(ValueError, match=r"dataset_name: '.*missing.jsonl' does not exist"):
        load_recipe_datasets({**options, "dataset_name": str(tmp_path / "missing.jsonl")})


def test_cli_list_validate_and_run(tmp_path, capsys):
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "  dskd " in listed and "  studies/methods " in listed and "accelerate" not in listed
    assert cli.main(["validate", os.path.join(RECIPES, "dskd.yaml")]) == 0
    # A recipe chained after another one names its output; validate notes it until that recipe has run (exit 0:
    # the recipe is well formed), and running it refuses it.
    chained = os.path.join(RECIPES, "telecom_qa", "dskd_cma_mistral7b_tinyllama.yaml")
    assert cli.main(["validate", chained]) == 0
    assert ("note: not runnable on this machine as is: teacher_adapter_name_or_path: "
            "'outputs/telecom_qa/sft_teacher_mistral7b' does not exist (no such folder); check the path, or run the "
            "recipe that produces it first.") in capsys.readouterr().out
    assert cli.main([chained, "bf16=false"]) == 2
    assert "sft_teacher_mistral7b' does not exist" in capsys.readouterr().err
    bad = write(tmp_path, BASE + "max_step: 3\n", "bad.yaml")
    assert cli.main(["validate", bad]) == 2
    assert "Did you mean 'max_steps'?" in capsys.readouterr().err

    output = tmp_path / "run"
    code = cli.main([os.path.join(RECIPES, "vanilla_kd.yaml"), *FAST, f"output_dir={output}"])
    assert code == 0
    assert (output / "model.safetensors").exists() and (output / "checkpoint-4").exists()
    resolved = yaml.safe_load((output / "recipe.yaml").read_text())
    assert resolved["max_steps"] == 4 and resolved["method"] == "kd"
    info = json.loads((output / "run_info.json").read_text())
    assert info["seed"] == 0 and {"torch", "transformers", "trl", "kd_trainers"} <= set(info["versions"])
    assert not os.listdir(output / ".staging")


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint_to_the_same_weights(tmp_path):
    recipe = os.path.join(RECIPES, "dskd.yaml")
    full = run_recipe(load_recipe(recipe, [*FAST, "max_steps=6", f"output_dir={tmp_path / 'full'}",
                                           "teacher_logit_noise_std=0.5"]))
    interrupted = load_recipe(recipe, [*FAST, "max_steps=6", f"output_dir={tmp_path / 'killed'}",
                                       "teacher_logit_noise_std=0.5"])
    with pytest.raises(KeyboardInterrupt):
        run_recipe(interrupted, callbacks=[StopAt(3)])
    assert sorted(os.listdir(tmp_path / "killed")).count("checkpoint-2") == 1
    resumed = run_recipe(load_recipe(recipe, [*FAST, "max_steps=6", f"output_dir={tmp_path / 'killed'}",
                                              "teacher_logit_noise_std=0.5"]))
    info = json.loads((tmp_path / "killed" / "run_info.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-2")
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_a_kill_while_saving_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    from transformers import Trainer

    recipe = load_recipe(os.path.join(RECIPES, "vanilla_kd.yaml"), [*FAST, f"output_dir={tmp_path}"])
    original = Trainer._save_rng_state
    calls = []

    def dies_on_second_checkpoint(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while saving")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe)
    checkpoints = sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2"]  # checkpoint-4 was half written, in .staging only
    assert os.path.exists(tmp_path / ".staging" / "checkpoint-4" / "model.safetensors")
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    trainer = run_recipe(load_recipe(os.path.join(RECIPES, "vanilla_kd.yaml"), [*FAST, f"output_dir={tmp_path}"]))
    assert trainer.state.global_step == 4
    assert json.loads((tmp_path / "run_info.json").read_text())["resumed_from"].endswith("checkpoint-2")
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").exists()


@pytest.mark.slow
def test_lora_sft_adapter_is_a_kd_teacher(tmp_path):
    sft_dir = tmp_path / "teacher-sft"
    sft = run_recipe(load_recipe(os.path.join(RECIPES, "sft_lora.yaml"),
                                 [*FAST, "peft.r=8", f"output_dir={sft_dir}", "learning_rate=5e-3"]))
    assert (sft_dir / "adapter_config.json").exists() and (sft_dir / "adapter_model.safetensors").exists()
    kd = run_recipe(load_recipe(os.path.join(RECIPES, "vanilla_kd.yaml"),
                                [*FAST, f"output_dir={tmp_path / 'kd'}", f"teacher_adapter_name_or_path={sft_dir}"]))
    from kd_trainers.demo import demo_model, demo_tokenizer

    base = demo_model("llama", demo_tokenizer("bpe"), "teacher", seed=1)
    merged = kd.accelerator.unwrap_model(kd.teacher_model)
    sft_model = sft.accelerator.unwrap_model(sft.model).merge_and_unload()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])
    torch.testing.assert_close(merged.state_dict()[name], sft_model.state_dict()[name])


@pytest.mark.slow
def test_publishing_offline_leaves_a_complete_folder_and_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "pub"
    secret = "hf_notARealTokenButASecret123"
    monkeypatch.setattr(sys, "argv", ["kd-train", "recipe.yaml", f"hub_token={secret}"])  # run_info records argv
    code = cli.main([os.path.join(RECIPES, "vanilla_kd.yaml"), *FAST, f"output_dir={output}", "push_to_hub=true",
                     "hub_model_id=kd-trainers-tests/demo-student", "dataset_test_split=test", f"hub_token={secret}"])
    assert code == 3
    # The token given on the command line reached no file: not the resolved recipe, run_info.json, nor the pickled
    # TrainingArguments of the checkpoints and the final folder.
    written = [os.path.join(root, name) for root, _, names in os.walk(output) for name in names]
    assert any(path.endswith("training_args.bin") for path in written)
    assert [path for path in written if secret.encode() in open(path, "rb").read()] == []
    assert "<redacted>" in (output / "recipe.yaml").read_text()
    assert "hub_token=<redacted>" in (output / "run_info.json").read_text()
    err = capsys.readouterr().err
    assert "Uploading to the Hub repository 'kd-trainers-tests/demo-student' failed" in err
    assert f"The complete folder is at {output / 'publish'}" in err
    folder = output / "publish"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(os.listdir(folder))
    assert not (output / "publish.tmp").exists()
    card = ModelCard.load(folder / "README.md", ignore_metadata_errors=False)
    assert "knowledge-distillation" in card.data.tags
    assert card.data.datasets == "demo"
    for text in ("| `method` | vanilla logit KD |", "| `teacher` |", "| `divergence` | forward_kl |", "| `kd_weight` | 0.5 |", "## Evaluation results",
                 "`eval_loss`"):
        assert text in card.text, text
    assert load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_student_sft_adapter_is_merged_before_kd_and_env_is_applied(tmp_path, monkeypatch):
    from kd_trainers.recipe.run import build_trainer

    monkeypatch.delenv("KD_TRAINERS_TEST_MARK", raising=False)
    sft_dir = tmp_path / "student-sft"
    sft = run_recipe(load_recipe(os.path.join(RECIPES, "sft_lora.yaml"),
                                 [*FAST, "peft.r=8", "model_name_or_path=demo:llama/student/bpe",
                                  f"output_dir={sft_dir}", "learning_rate=5e-3"]))
    sft_student = sft.accelerator.unwrap_model(sft.model).merge_and_unload()
    kd = build_trainer(load_recipe(os.path.join(RECIPES, "vanilla_kd.yaml"),
                                   [*FAST, f"output_dir={tmp_path / 'kd'}", f"model_adapter_name_or_path={sft_dir}",
                                    "env.KD_TRAINERS_TEST_MARK=marked"]))
    assert os.environ["KD_TRAINERS_TEST_MARK"] == "marked"
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(kd.model.state_dict()[name], sft_student.state_dict()[name])
    # ... and then trains: PEFT loads an adapter frozen, and a merged student that stayed frozen trained nothing.
    assert all(parameter.requires_grad for parameter in kd.model.parameters())
    kd.train()
    assert not torch.equal(kd.model.state_dict()[name], sft_student.state_dict()[name])


def test_a_model_with_nothing_to_train_is_refused_before_the_first_step(tmp_path, bpe_tokenizer, demo_data):
    from kd_trainers.sft.trainer import SFTTrainer

    frozen = demo_model("llama", bpe_tokenizer, "student").requires_grad_(False)
    trainer = SFTTrainer(model=frozen, args=SFTConfig(output_dir=str(tmp_path), max_steps=2, bf16=False,
                                                      report_to=[], per_device_train_batch_size=2),
                         train_dataset=demo_data["train"].select(range(8)), processing_class=bpe_tokenizer)
    with pytest.raises(ValueError, match="has no trainable parameter: every one has requires_grad=False"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.slow
def test_recipe_evaluation_block_evaluates_after_training(tmp_path):
    output = tmp_path / "kd"
    code = cli.main([os.path.join(RECIPES, "vanilla_kd.yaml"), *FAST, f"output_dir={output}",
                     'evaluation={"metrics": ["ngram", "reasoning"], "answer_extractor": "demo", "limit": 5, '
                     '"max_new_tokens": 5}'])
    assert code == 0
    import pandas as pd

    scores = pd.read_csv(output / "eval" / "scores.csv")
    assert len(scores) == 5 and {"rouge_l", "exact_match", "agreement", "fidelity"} <= set(scores.columns)
    assert (output / "eval" / "predictions.jsonl").exists() and (output / "eval" / "summary.json").exists()
    # kd-eval on the saved run, with the teacher answers the recipe cached, goes through the same pipeline: the same
    # predictions and the same scores.
    from kd_trainers.cli import evaluate as eval_cli

    teacher = next((output / "eval" / "teachers").glob("*/predictions.jsonl"))
    assert eval_cli.main(["--model", str(output), "--dataset", "demo", "--split", "test", "--limit", "5",
                          "--metrics", "ngram", "reasoning", "--answer-extractor", "demo", "--max-new-tokens", "5",
                          "--teacher-predictions", str(teacher), "--output", str(tmp_path / "kd-eval")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "kd-eval" / "scores.csv"), scores)
    assert json.loads((tmp_path / "kd-eval" / "summary.json").read_text()) == json.loads(
        (output / "eval" / "summary.json").read_text())
    path = write(tmp_path, BASE + "evaluation: {metrics: [ngram], answer_extractr: demo}\n")
    with pytest.raises(RecipeError, match="evaluation.answer_extractr: unknown key. Did you mean 'answer_extractor'"):
        load_recipe(path)
    path = write(tmp_path, BASE + "evaluation: {metrics: [bleurt]}\n")
    with pytest.raises(RecipeError, match="evaluation.metrics: Unknown metric or suite 'bleurt'"):
        load_recipe(path)


def test_a_listing_cut_short_by_its_reader_ends_quietly(monkeypatch, capsys):
    """`kd-train list | head -1`: the reader closes the pipe; that is not an error."""
    import io

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert cli.main(["list"]) == 0
    assert "Broken pipe" not in capsys.readouterr().err


def test_pinned_memory_is_off_by_default_without_cuda(tmp_path):
    """Pinning needs an accelerator: on a CPU machine a recipe does not ask for it (torch would warn at every data
    loader); an explicit value is kept."""
    import torch

    path = write(tmp_path, BASE)
    assert load_recipe(path).config.dataloader_pin_memory == torch.cuda.is_available()
    assert load_recipe(path, ["dataloader_pin_memory=true"]).config.dataloader_pin_memory is True


def test_split_slices_read_as_datasets_reads_them(demo_data):
    from kd_trainers.recipe.data import load_recipe_datasets

    options = {"dataset_name": "demo", "dataset_config": None, "columns": None, "prompt_template": None,
               "dataset_test_split": "test[10:20]+train[:5]"}
    train, test = load_recipe_datasets({**options, "dataset_train_split": "train[:25%]"})
    assert train["prompt"] == demo_data["train"]["prompt"][:240]  # a quarter of 960, the first rows in order
    assert test["prompt"] == demo_data["test"]["prompt"][10:20] + demo_data["train"]["prompt"][:5]
    assert load_recipe_datasets({**options, "dataset_train_split": "train"})[0]["prompt"] == demo_data["train"]["prompt"]
    for spec, message in (("trian[:5]", "dataset_train_split: 'trian' is not a split of 'demo'; it has ['train', "
                                        "'test']"),
                          ("train[:x]", "dataset_train_split: 'train[:x]' is neither a split name nor a slice")):
        with pytest.raises(ValueError, match=re.escape(message)):
            load_recipe_datasets({**options, "dataset_train_split": spec})
