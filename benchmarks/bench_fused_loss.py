"""The distillation loss alone, from hidden states and heads (forward and backward): our chunked engine, eager and
compiled, against Liger-Kernel's fused linear losses and a plain-PyTorch floor, on the same shapes and settings.

Setting: T = 1, CE mixed in at weight 0.5 (`kd_weight=0.5`; Liger's `weight_hard_loss = weight_soft_loss = 0.5`), every
token a label. Divergences: forward KL and JSD (β = 0.5). Cells, each in a fresh process (`bench_kd_step.run_cell`):
- floor: full `[N, V]` logits of both heads, `F.log_softmax`, the divergence written in plain PyTorch, CE, autograd.
- ours_eager / ours_compiled: `kd_trainers.losses.chunked_distillation_terms` with `compile="off"` / `"on"`, chunks
  from the default memory budget.
- liger_chunked: `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss` (torch.compile of its chunk, 1,024-token chunks
  by default; `beta=0` is its forward KL), which runs on CPU and GPU.
- liger_fused_kl (CUDA only): `liger_kernel.ops.fused_linear_kl_div.LigerFusedLinearKLDivFunction` (Triton), forward
  KL without a CE term (Liger's fused linear KL has none), against the teacher's probabilities `[N, V]` (its input:
  made from the teacher's head in the timed step, as a user must), so it is compared with ours at kd_weight = 1
  (`ours_*_kd1`) in an fp32 accumulator of the head's gradient.

Time: the median of `--repeats` forward+backward passes after one warm-up (the compile falls in the warm-up).
Memory: peak resident memory (CPU, in a second run with the mmap threshold fixed) or peak allocated CUDA memory, minus
what the inputs held before the first timed pass. Liger-Kernel is a benchmark-only dependency:
`pip install liger-kernel` (with Triton, which its chunked loss does not need on CPU).

Usage: python benchmarks/bench_fused_loss.py                  (CPU: N 2048, H 576 / 896, V 128k, fp32)
       python benchmarks/bench_fused_loss.py --cells ours_eager liger_chunked --memory-budget-mb 1536
                                                              (ours with chunks as long as Liger's memory allows)
       python benchmarks/bench_fused_loss.py --gpu-realistic  (CUDA bf16: N 8192, H 4096, V 128k, Liger's PR 1423 shape)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kd_step import (RESULTS, _baseline_memory, _peak_memory, _sync, parse_options,  # noqa: E402
                           result_row, run_cell, write_results)

CELLS = ("floor", "ours_eager", "ours_compiled", "liger_chunked")
GPU_CELLS = ("liger_fused_kl", "ours_eager_kd1", "ours_compiled_kd1")


def _floor_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence):
    import math

    import torch
    import torch.nn.functional as F

    student = F.log_softmax((student_hidden @ student_weight.T).float(), -1)
    teacher = F.log_softmax((teacher_hidden @ teacher_weight.T).float(), -1)
    if divergence == "forward_kl":
        kd = (teacher.exp() * (teacher - student)).sum(-1)
    else:
        mixture = torch.logaddexp(teacher + math.log(0.5), student + math.log(0.5))
        kd = 0.5 * (teacher.exp() * (teacher - mixture)).sum(-1) + 0.5 * (student.exp() * (student - mixture)).sum(-1)
    return 0.5 * F.nll_loss(student, labels) + 0.5 * kd.mean()


def measure(cell: str, tokens: int, student_width: int, teacher_width: int, vocab: int, divergence: str, repeats: int,
            realistic: bool, budget_mb: float | None = None) -> dict:
    import torch

    device = "cuda" if realistic else "cpu"
    dtype = torch.bfloat16 if realistic else torch.float32
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    student_hidden = tensor(tokens, student_width).requires_grad_()
    student_weight = tensor(vocab, student_width, scale=student_width**-0.5).requires_grad_()
    teacher_hidden = tensor(tokens, teacher_width)
    teacher_weight = tensor(vocab, teacher_width, scale=teacher_width**-0.5 * 2)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    kd_weight = 1.0 if cell.endswith("_kd1") else 0.5

    if cell == "floor":
        def loss():
            return _floor_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence)
    elif cell.startswith("ours"):
        from kd_trainers.losses import LossSettings, chunked_distillation_terms

        settings = LossSettings(divergence=divergence, kd_weight=kd_weight, jsd_beta=0.5)
        mode = "on" if "compiled" in cell else "off"

        def loss():
            return chunked_distillation_terms(student_hidden[None], (student_weight, None), teacher_hidden[None],
                                              (teacher_weight, None), labels[None], settings, compile=mode,
                                              memory_budget_mb=budget_mb).loss
    elif cell == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        module = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5,
                                         beta=0.0 if divergence == "forward_kl" else 0.5, temperature=1.0)

        def loss():
            return module(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    elif cell == "liger_fused_kl":
        from liger_kernel.ops.fused_linear_kl_div import LigerFusedLinearKLDivFunction

        def loss():  # KL(teacher ‖ student) per token, mean, no CE; it takes the teacher as probabilities [N, V]
            target = torch.softmax((teacher_hidden @ teacher_weight.T).float(), -1)
            return LigerFusedLinearKLDivFunction.apply(student_hidden, student_weight, target, labels, "batchmean",
                                                       -100, 1.0, 1e-10, torch.float32)
    else:
        raise ValueError(cell)

    def step():
        student_hidden.grad = student_weight.grad = None
        loss().backward()
        _sync(device)

    step()  # warm-up: the compile, the allocator's first blocks
    baseline = _baseline_memory(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "memory_growth_mb": (_peak_memory(device) - baseline) / 2**20,
            "peak_mb": _peak_memory(device) / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--vocab", type=int, nargs="+", default=[128000])
    parser.add_argument("--divergences", nargs="+", default=["forward_kl", "jsd"])
    parser.add_argument("--cells", nargs="+", default=None, choices=CELLS + GPU_CELLS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-budget-mb", type=float, default=None,
                        help="our cells' memory_budget_mb (default: the package's, 96 MiB on CPU, 512 on a GPU)")
    options = parse_options(parser, measure, steps=5)
    if options is None:
        return
    realistic = options.gpu_realistic
    tokens = options.tokens or (8192 if realistic else 2048)
    widths = (4096, 4096) if realistic else (576, 896)
    cells = options.cells or (CELLS + GPU_CELLS if realistic else CELLS)
    device = "gpu_bf16" if realistic else "cpu_fp32"
    rows = []
    for vocab in options.vocab:
        for divergence in options.divergences:
            results = {}
            for cell in cells:
                if cell == "liger_fused_kl" and divergence != "forward_kl":
                    continue  # Liger's fused linear KL is forward KL only
                if cell.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
                    print(f"{cell}: not run, liger-kernel is not installed (pip install liger-kernel)", flush=True)
                    continue
                results[cell] = run_cell(__file__, [cell, tokens, *widths, vocab, divergence, options.repeats,
                                                    realistic, options.memory_budget_mb], gpu=realistic)
            for cell, result in results.items():
                # KD alone (kd_weight 1) is compared with Liger's fused KL; CE + KD with the floor and Liger's JSD.
                alone = cell.endswith("_kd1") or cell == "liger_fused_kl"
                bases = {name: results[name] for name in (("liger_fused_kl",) if alone else ("floor", "liger_chunked"))
                         if name in results}
                fixed = {"device": device, "tokens": tokens, "widths": f"{widths[0]}/{widths[1]}", "vocab": vocab,
                         "divergence": divergence, "cell": cell, "budget_mb": options.memory_budget_mb or "default"}
                rows.append(result_row(fixed, result, bases))
    write_results(rows, os.path.join(RESULTS, options.name or f"fused_loss_{device}"))


if __name__ == "__main__":
    main()
