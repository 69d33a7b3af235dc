"""A short cross-vocabulary run on the demo pair (DSKD-CMA, GOLD or MinED), for the multi-process tests: writes the
logged losses as JSON.

Usage: [accelerate launch ...] train_dskd_demo.py OUTPUT_DIR PER_DEVICE_BATCH GRAD_ACCUM MAX_STEPS [dskd|gold|mined]

Writes OUTPUT_DIR/logs.json (the logged steps) and saves the student and its projectors to OUTPUT_DIR/final.
"""

import json
import os
import sys
import tempfile

import torch

from kd_trainers import DSKDConfig, DSKDTrainer, GOLDConfig, GOLDTrainer, MinEDConfig, MinEDTrainer
from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset
from kd_trainers.runtime.distributed import end_process_group, exit_launched_worker


METHODS = {"dskd": (DSKDConfig, DSKDTrainer, {"projector_lr": 1e-2}), "gold": (GOLDConfig, GOLDTrainer, {}),
           "mined": (MinEDConfig, MinEDTrainer, {"kd_temperature": 2.0})}


def main(output, per_device, accumulation, steps, method="dskd"):
    config_class, trainer_class, extra = METHODS[method]
    student_tokenizer, teacher_tokenizer = demo_tokenizer("bpe"), demo_tokenizer("wordpiece")
    student = demo_model("llama", student_tokenizer, "student", seed=2)
    teacher = demo_model("qwen2", teacher_tokenizer, "teacher", seed=1)
    args = config_class(output_dir=tempfile.mkdtemp(), bf16=False, max_steps=steps,
                        per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                        max_length=64, seed=0, lr_scheduler_type="constant",
                        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None, **extra)
    trainer = trainer_class(student, args, train_dataset=load_demo_dataset("prompt_completion")["train"],
                          processing_class=student_tokenizer, teacher_model=teacher,
                          teacher_processing_class=teacher_tokenizer)
    trainer.train()
    trainer.save_model(os.path.join(output, "final"))
    if trainer.is_world_process_zero():
        logs = [log for log in trainer.state.log_history if "loss" in log]
        with open(os.path.join(output, "logs.json"), "w") as handle:
            json.dump({"logs": logs, "world_size": trainer.accelerator.num_processes,
                       "deepspeed": trainer.is_deepspeed_enabled}, handle)
    trainer.accelerator.wait_for_everyone()
    end_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])
    exit_launched_worker(0)
