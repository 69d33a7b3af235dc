"""DSKD-CMA (and GOLD under ZeRO-3) under DeepSpeed ZeRO-2 and ZeRO-3 with two CPU processes (gloo), against one process with the same global
batch (per-device 4 × 2 accumulation steps = 2 processes × 4): the same logged losses step by step, and the same
projectors at the end, which shows their gradients are synchronised across ranks. A real `accelerate launch`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kd_trainers.recipe.launch import free_port

import deepspeed  # noqa: F401,E402  (the dev extra installs it: missing is a failure, never a skip)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed", "train_dskd_demo.py")
STEPS = 3
KEYS = ("loss", "ce_loss", "t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss", "t2s_accuracy", "s2t_accuracy")


def run(command, output):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(os.path.join(output, "logs.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("single"))
    return output, run([sys.executable, SCRIPT, output, "4", "2", str(STEPS)], output)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_two_processes_matches_one_process(tmp_path, single_process, stage):
    reference_dir, reference = single_process
    output = str(tmp_path)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
               "--num_processes", "2", "--use_deepspeed",
               "--zero_stage", str(stage), "--mixed_precision", "no", "--gradient_accumulation_steps", "1"]
    if stage == 3:
        command += ["--zero3_init_flag", "false", "--zero3_save_16bit_model", "true"]
    result = run(command + [SCRIPT, output, "4", "1", str(STEPS)], output)

    assert result["world_size"] == 2 and result["deepspeed"] and reference["world_size"] == 1
    assert len(result["logs"]) == len(reference["logs"]) == STEPS
    for step, (got, want) in enumerate(zip(result["logs"], reference["logs"]), start=1):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (step, key)
    assert reference["logs"][-1]["loss"] < reference["logs"][0]["loss"]

    # The projectors, consolidated from the shards under ZeRO-3, equal the one-process ones after the updates.
    saved = load_file(os.path.join(output, "final", "dskd_projectors.safetensors"))
    expected = load_file(os.path.join(reference_dir, "final", "dskd_projectors.safetensors"))
    assert set(saved) == set(expected) == {f"{m}.{p}" for m in ("query", "t2s", "s2t") for p in ("weight", "bias")}
    for name in expected:
        torch.testing.assert_close(saved[name], expected[name], rtol=1e-4, atol=1e-6)
    student = load_file(os.path.join(output, "final", "model.safetensors"))
    assert student and not any("dskd" in key for key in student)


@pytest.mark.parametrize("method, logged", [("gold", "aligned_groups"), ("mined", "mapped_tokens")])
def test_cross_tokenizer_losses_under_zero3_with_two_processes_match_one_process(tmp_path, method, logged):
    """GOLD's aligned loss and MinED's mapped loss recompute each chunk's label logits in the backward (activation
    checkpointing) and take the scored chunks' head gradients in the forward: under ZeRO-3 both read the partitioned
    heads, so the two-process run must still give one process's losses step by step and its weights at the end."""
    single = str(tmp_path / "single")
    reference = run([sys.executable, SCRIPT, single, "4", "2", str(STEPS), method], single)
    output = str(tmp_path / "zero3")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
               "--num_processes", "2", "--use_deepspeed", "--zero_stage", "3", "--mixed_precision", "no",
               "--gradient_accumulation_steps", "1", "--zero3_init_flag", "false", "--zero3_save_16bit_model", "true"]
    result = run(command + [SCRIPT, output, "4", "1", str(STEPS), method], output)
    assert result["world_size"] == 2 and result["deepspeed"]
    for step, (got, want) in enumerate(zip(result["logs"], reference["logs"]), start=1):
        for key in ("loss", "ce_loss", "kd_loss", logged, "mean_token_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (step, key)
    saved = load_file(os.path.join(output, "final", "model.safetensors"))
    expected = load_file(os.path.join(single, "final", "model.safetensors"))
    assert set(saved) == set(expected)
    for name in expected:
        torch.testing.assert_close(saved[name], expected[name], rtol=1e-4, atol=1e-5)
