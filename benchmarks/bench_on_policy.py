"""On-policy distillation step: the package's GKDTrainer against TRL 1.16's stable `trl.DistillationTrainer`.

Both trainers do the same work each step: the student samples a completion for every prompt, both models score it,
and the student takes one optimizer step on the generalised JSD (β = 0.5, T = 1) over the sampled tokens. Ours is
`kd_trainers.GKDTrainer` with `lmbda=1` (always on-policy), `beta=0.5`, `kd_weight=1`, `kd_temperature=1`; TRL's is
`DistillationTrainer` with `beta=0.5`, `temperature=1`. Both sample at temperature 1 with no top-k/top-p.

Student: Llama, 2 layers, width 128; teacher: Llama, 4 layers, width 256 (random weights). Batch 4, prompts of 64
tokens, 32 sampled tokens, fp32, gradient checkpointing off. Each cell runs in its own process: the step time is the
median of the gaps between consecutive step ends over `--steps` steps after one warm-up step (the gap holds
generation, which TRL does inside the step and ours just before it), and the memory is the peak resident memory
minus the resident memory after the warm-up step, from a second run of the cell with glibc's mmap threshold fixed, so
that resident memory follows live tensors (`bench_kd_step.run_cell`). Every cell is run `--repeats` times, alternating
the trainers.

The `loss_*` cells time the loss alone, forward and backward, on the same shapes (B·32 sampled tokens, random hidden
states and heads): `loss_ours` is `chunked_distillation_loss` (the engine the trainer calls), `loss_trl` is TRL's
`_chunked_divergence_loss`.

Usage: python benchmarks/bench_on_policy.py [--vocab 32000 131072 262144] [--steps 4] [--repeats 2]
       python benchmarks/bench_on_policy.py --gpu-realistic   (bf16, Qwen2.5-0.5B / 1.5B configs, vocabulary 151,936)
Results: benchmarks/results/on_policy_<device>.csv and .md (ratios against TRL's cell of the same repetition).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kd_step import (RESULTS, _baseline_memory, _models, _peak_memory, _sync,  # noqa: E402
                           parse_options, result_row, run_cell, write_results)

METHODS = ("ours", "trl", "loss_ours", "loss_trl")
PROMPT_TOKENS, COMPLETION_TOKENS = 64, 32


def _word_tokenizer(vocab_size: int):
    """Word-level, whitespace-split tokens `t0 … t{V-1}`, left padding (TRL's trainer asks for it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t2", unk_token="t1",
                                   padding_side="left")


def _rows(vocab: int, count: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(0)

    def text(length):
        return " ".join(f"t{i}" for i in torch.randint(3, vocab, (length,), generator=generator).tolist())

    return [{"prompt": text(PROMPT_TOKENS), "completion": text(COMPLETION_TOKENS)} for _ in range(count)]


def measure_trainer(method: str, vocab: int, batch: int, steps: int, realistic: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    device = "cuda" if realistic else "cpu"
    import torch

    student, teacher = _models(vocab, realistic, device, torch.bfloat16 if realistic else torch.float32)
    tokenizer = _word_tokenizer(vocab)
    dataset = Dataset.from_list(_rows(vocab, batch * (steps + 1)))
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            ends.append(time.perf_counter())
            if state.global_step == 1:
                self.baseline = _baseline_memory(device)

    timer = StepEnds()
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=steps + 1, per_device_train_batch_size=batch,
                  learning_rate=1e-5, save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=10**6,
                  bf16=realistic, use_cpu=not realistic, gradient_checkpointing=False, seed=0, temperature=1.0,
                  beta=0.5)
    if method == "ours":
        from kd_trainers import GKDConfig, GKDTrainer

        args = GKDConfig(**common, lmbda=1.0, kd_weight=1.0, kd_temperature=1.0, max_new_tokens=COMPLETION_TOKENS)
        trainer = GKDTrainer(student, teacher, args, train_dataset=dataset, processing_class=tokenizer,
                             teacher_processing_class=tokenizer, callbacks=[timer])
        lengths, replace = [], trainer._replace_completions

        def replace_and_count(inputs):  # sampled tokens per completion, to check both trainers do the same work
            inputs = replace(inputs)
            lengths.append((inputs["labels"] != -100).sum().item() / inputs["labels"].size(0))
            return inputs

        trainer._replace_completions = replace_and_count
    else:
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**common, max_completion_length=COMPLETION_TOKENS, top_k=0, top_p=1.0)
        trainer = DistillationTrainer(student, teacher, args, train_dataset=dataset, processing_class=tokenizer,
                                      callbacks=[timer])
        lengths = trainer._metrics["train"]["completions/mean_length"]  # appended to at every generation
    trainer.train()
    gaps = [later - earlier for earlier, later in zip(ends, ends[1:])]
    return {"step_s": statistics.median(gaps), "memory_growth_mb": (_peak_memory(device) - timer.baseline) / 2**20,
            "completion_tokens": round(statistics.mean(lengths), 2)}


def measure_loss(method: str, vocab: int, batch: int, steps: int, realistic: bool) -> dict:
    """Forward and backward of the loss alone on `batch × 32` sampled tokens."""
    import torch

    device = "cuda" if realistic else "cpu"
    dtype = torch.bfloat16 if realistic else torch.float32
    student_width, teacher_width = (896, 1536) if realistic else (128, 256)
    generator = torch.Generator().manual_seed(0)
    tokens = batch * COMPLETION_TOKENS

    def tensor(*shape, grad=False):
        value = (torch.randn(*shape, generator=generator) * 0.05).to(device, dtype)
        return value.requires_grad_(grad)

    student_hidden, teacher_hidden = tensor(tokens, student_width, grad=True), tensor(tokens, teacher_width)
    student_head = torch.nn.Parameter(tensor(vocab, student_width))
    teacher_head = tensor(vocab, teacher_width)
    if method == "loss_ours":
        from kd_trainers.losses import LossSettings, chunked_distillation_loss

        settings = LossSettings(divergence="jsd", jsd_beta=0.5, kd_weight=1.0)
        labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)

        def loss():
            return chunked_distillation_loss(student_hidden, (student_head, None), teacher_hidden,
                                             (teacher_head, None), labels, settings)[0].loss
    else:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = torch.ones(1, tokens, dtype=torch.long, device=device)

        def loss():
            return _chunked_divergence_loss(student_hidden[None], teacher_hidden[None], student_head, teacher_head,
                                            mask, beta=0.5)[0]
    times = []
    for index in range(steps + 1):
        if index == 1:
            baseline = _baseline_memory(device)
        _sync(device)
        start = time.perf_counter()
        loss().backward()
        student_head.grad = student_hidden.grad = None
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:]), "memory_growth_mb": (_peak_memory(device) - baseline) / 2**20}


def measure(method: str, vocab: int, batch: int, steps: int, realistic: bool) -> dict:
    if method.startswith("loss_"):
        return measure_loss(method, vocab, batch, steps, realistic)
    return measure_trainer(method, vocab, batch, steps, realistic)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 131072, 262144])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    options = parse_options(parser, measure, steps=4)
    if options is None:
        return
    realistic = options.gpu_realistic
    if realistic:
        options.vocab = [151936]
    device = "gpu_bf16_qwen0.5b_1.5b" if realistic else "cpu_fp32_tiny"
    rows = []
    for vocab in options.vocab:
        for repeat in range(options.repeats):
            # Alternate which trainer runs first, so that neither always meets the machine in the same state.
            methods = options.methods if repeat % 2 == 0 else list(reversed(options.methods))
            cells = {m: run_cell(__file__, [m, vocab, options.batch, options.steps, realistic], gpu=realistic)
                     for m in methods}
            for method in options.methods:
                base = "loss_trl" if method.startswith("loss_") else "trl"  # each against TRL's of its kind
                fixed = {"device": device, "vocab": vocab, "batch": options.batch, "repeat": repeat + 1,
                         "method": method, "completion_tokens": cells[method].get("completion_tokens",
                                                                                   COMPLETION_TOKENS)}
                rows.append(result_row(fixed, cells[method], {"trl": cells[base]} if base in cells else {}))
    write_results(rows, os.path.join(RESULTS, options.name or f"on_policy_{device}"))


if __name__ == "__main__":
    main()
