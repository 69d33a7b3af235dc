"""The shipped demo recipes under DeepSpeed ZeRO-2 and ZeRO-3 with two CPU processes, launched as a user would:
`python -m kd_trainers RECIPE accelerate.config=... accelerate.num_processes=2` (which relaunches itself under
`accelerate launch`), and `accelerate launch --config_file recipes/accelerate/zero2.yaml -m kd_trainers RECIPE`."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kd_trainers.recipe.launch import free_port

from kd_trainers.demo import demo_model, demo_tokenizer

import deepspeed  # noqa: F401,E402  (the dev extra installs it: missing is a failure, never a skip)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["max_steps=2", "save_steps=2", "logging_steps=1", "per_device_train_batch_size=4", "max_length=64",
        "learning_rate=1e-2"]


def launch(command):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def assert_trained_consolidated_student(output):
    """The final save is a whole transformers model (ZeRO-3 shards gathered), and training changed it."""
    saved = load_file(os.path.join(output, "model.safetensors"))
    initial = demo_model("llama", demo_tokenizer("bpe"), "student", seed=2).state_dict()
    assert set(saved) == {k for k in initial if k != "lm_head.weight" or k in saved}
    for name, value in saved.items():
        assert value.shape == initial[name].shape, name
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    assert not any("dskd" in key for key in saved)


# Both stages for vanilla KD; DSKD and LoRA SFT under ZeRO-3, the stage that partitions what they add (projectors,
# adapters). DSKD under ZeRO-2 is compared with one process in test_dskd_distributed.py.
@pytest.mark.parametrize("recipe,stage", [("vanilla_kd", "zero2"), ("vanilla_kd", "zero3"), ("dskd", "zero3"),
                                          ("sft_lora", "zero3")])
def test_recipe_under_zero_with_two_processes(tmp_path, recipe, stage):
    output = str(tmp_path / "out")
    extra = ["peft.r=8"] if recipe == "sft_lora" else []
    # Evaluated afterwards by the launching process, from what the run saved.
    extra.append('evaluation={"metrics": ["ngram", "reasoning"], "limit": 4, "max_new_tokens": 4, '
                 '"answer_extractor": "demo"}')
    stdout = launch([sys.executable, "-m", "kd_trainers", f"recipes/{recipe}.yaml", *FAST, *extra,
                     f"output_dir={output}", f"accelerate.config={stage}", "accelerate.num_processes=2"])
    assert "Launching: " in stdout and "accelerate.commands.launch" in stdout
    scores = pd.read_csv(os.path.join(output, "eval", "scores.csv"))
    assert len(scores) == 4 and scores["bleu_1"].notna().all()
    # Agreement needs the teacher, loaded again from the recipe (with another vocabulary for DSKD); SFT has none.
    assert scores["agreement"].isna().all() == (recipe == "sft_lora")
    assert "Not evaluated here" not in stdout
    assert os.path.exists(os.path.join(output, "checkpoint-2", "trainer_state.json"))
    if recipe == "sft_lora":
        adapter = load_file(os.path.join(output, "adapter_model.safetensors"))
        lora_a = [v for k, v in adapter.items() if "lora_A" in k]
        assert lora_a and all(v.shape[0] == 8 and v.numel() > 0 for v in lora_a)
        assert any(torch.count_nonzero(v) for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    else:
        assert_trained_consolidated_student(output)
    if recipe == "dskd":
        projectors = load_file(os.path.join(output, "dskd_projectors.safetensors"))
        assert projectors["query.weight"].shape == (2 * 128, 2 * 64)


def test_accelerate_launch_module_form_with_a_shipped_config(tmp_path):
    output = str(tmp_path / "out")
    launch([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
            "--config_file", "recipes/accelerate/zero2.yaml",
            "-m", "kd_trainers", "recipes/vanilla_kd.yaml", *FAST, f"output_dir={output}"])
    assert_trained_consolidated_student(output)


# ZeRO-3 only: what these methods add under DeepSpeed (generating from partitioned, gathered weights) exists there
# alone; ZeRO-2 is covered by the recipes above.
@pytest.mark.parametrize("recipe,stage", [("seqkd", "zero3"), ("gkd", "zero3")])
def test_analytical_methods_under_zero_with_two_processes(tmp_path, recipe, stage):
    """Seq-KD (each rank generates its share of the teacher's completions from a gathered, partitioned teacher) and
    on-policy GKD (the student samples mid-training) under DeepSpeed ZeRO-3 with two CPU processes."""
    output = str(tmp_path / "out")
    extra = (["seqkd_max_new_tokens=6", "seqkd_batch_size=4", "kd_weight=0.5", f"seqkd_cache_dir={tmp_path}/cache"]
             if recipe == "seqkd" else ["max_new_tokens=6", "lmbda=1.0"])
    launch([sys.executable, "-m", "kd_trainers", f"recipes/{recipe}.yaml", *FAST, *extra, "dataset_test_split=null",
            f"output_dir={output}", f"accelerate.config={stage}", "accelerate.num_processes=2"])
    assert_trained_consolidated_student(output)
    if recipe == "seqkd":
        (folder,) = os.listdir(tmp_path / "cache")
        parts = os.listdir(tmp_path / "cache" / folder / "parts")
        assert len(parts) >= 2  # 4 x 8 prompts per part over the demo's training set, shared by both ranks
        assert os.path.exists(tmp_path / "cache" / folder / "done.json")


def test_two_cpu_processes_train_as_one_process_with_the_whole_batch(tmp_path):
    """DDP over gloo on CPU (`multi_process`, two processes of 4 examples) logs the same losses and gradient norms and
    ends with the same weights as one process of 8. Without `use_cpu` (which kd-train now sets), accelerate joined
    no process group on a machine without CUDA: each process trained a copy of its own, logging 2x the loss."""
    import json

    from kd_trainers.recipe import load_recipe
    from kd_trainers.recipe.models import resolve_model
    from kd_trainers.recipe.run import run_recipe

    runs = {}
    # SGD, whose step is linear in the gradient: Adam divides by sqrt(v), which turns the allreduce's different
    # summation order on a near-zero gradient into a visibly different step (one lm_head element of 40960, 3e-5).
    settings = ["max_steps=3", "logging_steps=1", "save_steps=3", "eval_steps=100", "max_length=64", "warmup_steps=0",
                "learning_rate=1e-1", "optim=sgd", "report_to=none"]
    for name, processes, batch in (("one", 1, 8), ("two", 2, 4)):
        output = tmp_path / name
        overrides = [*settings, f"per_device_train_batch_size={batch}", f"output_dir={output}"]
        if processes == 1:  # the reference, here in the test's process
            run_recipe(load_recipe(os.path.join(ROOT, "recipes", "vanilla_kd.yaml"), overrides))
        else:
            launch([sys.executable, "-m", "kd_trainers", "recipes/vanilla_kd.yaml", *overrides,
                    "accelerate.config=multi_process", f"accelerate.num_processes={processes}"])
        logs = json.load(open(output / "checkpoint-3" / "trainer_state.json"))["log_history"]
        runs[name] = ([(log["loss"], log["grad_norm"], log["ce_loss"]) for log in logs if "loss" in log],
                      load_file(os.path.join(output, "model.safetensors")))
    (one_logs, one_weights), (two_logs, two_weights) = runs["one"], runs["two"]
    assert len(one_logs) == 3
    torch.testing.assert_close(torch.tensor(two_logs), torch.tensor(one_logs), rtol=1e-4, atol=1e-5)
    for key, value in one_weights.items():
        torch.testing.assert_close(two_weights[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # ... and the comparison can fail: training moved the weights far beyond its tolerance.
    initial = resolve_model("demo:llama/student/bpe", None)[0].state_dict()
    moved = max((one_weights[key] - initial[key]).abs().max().item() for key in one_weights)
    assert 100 * 1e-5 < moved < 0.05, moved  # (at most a few steps: from this initialisation, not another)


def test_processes_that_accelerate_did_not_join_are_refused(tmp_path):
    """Launched with a multi-GPU config on a machine without CUDA and without use_cpu, accelerate sets up no
    distributed training; the trainer refuses to start instead of training one copy per process."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA the multi-GPU config joins the processes")  # the refusal is for machines without it
    script = tmp_path / "script.py"
    script.write_text(
        "from kd_trainers import KDConfig, KDTrainer\n"
        "from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset\n"
        "tokenizer = demo_tokenizer('bpe')\n"
        f"args = KDConfig(output_dir={str(tmp_path / 'out')!r}, max_steps=1, bf16=False, report_to=[], "
        "ddp_backend='gloo')\n"
        "KDTrainer(demo_model('llama', tokenizer, 'student', seed=2), args, "
        "train_dataset=load_demo_dataset('prompt_completion')['train'].select(range(8)), processing_class=tokenizer, "
        "teacher_model=demo_model('llama', tokenizer, 'teacher', seed=1), teacher_processing_class=tokenizer)\n")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "recipes/accelerate/multi_process.yaml", "--num_processes", "2", "--main_process_port",
                           str(free_port()), str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "2 processes were started but accelerate set up no distributed training" in done.stderr
    assert "set use_cpu=True" in done.stderr
