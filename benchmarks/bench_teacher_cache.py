"""What a teacher cache costs: bytes per label token, and how far its targets are from the dense teacher's.

For each teacher distribution, mode (`top_k`, `sampled`) and k, the teacher's targets at N label tokens go through the
cache's own record format (quantised, compressed, decoded) and are compared with the full distribution:

- bytes_per_token: compressed record bytes / label tokens (raw_bytes_per_token: before zstd).
- kl_mean, kl_p99: KL(p ‖ p̂) per token of the full distribution p from the reconstruction p̂ (the `spread` tail: the
  tail's mass evenly over the other tokens, DistillKit's "uniform" tail); infinite for a sampled target, which puts no
  mass on tokens it did not draw (not reported).
- loss_rel_error_bucket / _spread: |L̂ − L| / L of the KD loss (forward KL at `temperature`: 1, and 2 as in the demo
  recipes), the student's hidden states and head against the dense teacher, per tail treatment (sampled: one value,
  its only treatment).
- grad_cosine_bucket / _spread: cosine between the loss's gradient in the student's output head from the cache and
  from the dense teacher.
- exact_top_k_uniform: the same measures for exact fp32 top-k log-probabilities with the spread tail (no quantisation),
  the reference the issue names (top-128 with a uniform tail).

Teachers:
- `demo`: the demo task's teacher SFT'd as in the shipped studies (its prepare step, trained here if the user cache
  lacks it), on the demo test split's label tokens; the student is the demo student at initialisation. A real trained
  distribution, but a 640-token vocabulary.
- `zipf152k_flat`, `zipf152k_peaked`: synthetic next-token distributions over Qwen2.5's 151,936 tokens: probabilities
  ∝ rank^(−s), with s drawn per token in [1.0, 1.6] (flat: a mean entropy of 4.9 nats) or [1.6, 2.6] (peaked:
  1.6 nats), ids in random order (the worst case for id compression), and a random student head of width 896.
  Not a real model's distribution (none can be downloaded here): they measure the format at a realistic vocabulary
  size, at two ends of the entropies a teacher has; `teacher_entropy` gives each case's mean, to place a real teacher.

A sampled target's loss value holds the entropy of the empirical target where the dense loss holds the teacher's, so its
`loss_rel_error` is large by construction; only its gradient estimates the teacher's (unbiased for forward KL at T = 1;
here T = 2, self-normalised), and `grad_cosine` is that of one draw, not of the mean over a run.

Usage: python benchmarks/bench_teacher_cache.py [--ks 8 32 64 128 192 256] [--tokens 2048] [--teachers demo ...]
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from bench_kd_step import RESULTS, smallest_cell, write_results  # noqa: E402  (benchmarks/ is the script's own folder)


TEMPERATURES = (1.0, 2.0)
CASES = {"demo": None, "zipf152k_flat": (1.0, 1.6), "zipf152k_peaked": (1.6, 2.6)}  # the exponent range of each


def demo_case(tokens: int):
    """`(teacher logits [N, V], student hidden [N, D], student head weight [V, D], name)` on the demo task."""
    from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset
    from kd_trainers.models.hidden_states import last_hidden_state
    from kd_trainers.study.runner import prepare_folders, train
    from kd_trainers.study.spec import load_study

    study = load_study(os.path.join(os.path.dirname(__file__), "..", "recipes", "studies", "teacher_cache.yaml"))
    folder = prepare_folders(study)["teacher"]
    if not os.path.exists(os.path.join(folder, "done.json")):
        from kd_trainers.study.runner import _as_overrides, step_recipe

        step = study.prepare[0]
        train(step_recipe(study, step), _as_overrides({**step["overrides"], "output_dir": folder}, {}))
    from transformers import AutoModelForCausalLM

    tokenizer = demo_tokenizer("bpe")
    teacher = AutoModelForCausalLM.from_pretrained(folder).eval()
    student = demo_model("llama", tokenizer, "student", seed=2).eval()
    data = load_demo_dataset("prompt_completion")["test"]
    teacher_rows, student_rows = [], []
    with torch.no_grad():
        for example in data:
            prompt = tokenizer(example["prompt"])["input_ids"]
            full = tokenizer(example["prompt"] + example["completion"])["input_ids"]
            inputs = {"input_ids": torch.tensor([full])}
            positions = torch.arange(len(prompt) - 1, len(full) - 1)  # the completion's tokens are the labels
            teacher_rows.append(teacher(**inputs).logits[0, positions])
            student_rows.append(last_hidden_state(student, inputs)[0, positions])
            if sum(row.size(0) for row in teacher_rows) >= tokens:
                break
    return (torch.cat(teacher_rows)[:tokens].float(), torch.cat(student_rows)[:tokens].float(),
            student.lm_head.weight.detach().float(), "demo (V=640)")


def zipf_case(tokens: int, low: float, high: float, name: str, vocab: int = 151_936, width: int = 896):
    generator = torch.Generator().manual_seed(0)
    exponents = low + (high - low) * torch.rand(tokens, 1, generator=generator)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = -exponents * torch.log(ranks)[None, :]
    order = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(tokens)])
    teacher = torch.empty_like(logits).scatter_(1, order, logits)
    hidden = torch.randn(tokens, width, generator=generator)
    head = torch.randn(vocab, width, generator=generator) / math.sqrt(width)
    return teacher, hidden, head, f"{name} (V={vocab:,}, synthetic)"


def loss_and_head_grad(hidden, head, labels, temperature, teacher=None, targets=None, tail="bucket"):
    from kd_trainers.losses import LossSettings, sparse_distillation_terms
    from kd_trainers.losses.sparse import top_k_targets

    weight = head.clone().requires_grad_(True)
    settings = LossSettings(divergence="forward_kl", temperature=temperature, kd_weight=1.0)
    if targets is None:  # the whole vocabulary as a sparse target: the dense engine exactly (test_sparse_targets)
        targets = top_k_targets(teacher, teacher.size(1))
    out = sparse_distillation_terms(hidden, (weight, None), targets, labels, settings, tail=tail)
    out.loss.backward()
    return out.loss.item(), weight.grad.reshape(-1)


def measure(case, ks, modes):
    from kd_trainers.losses.sparse import reconstruct_log_probs, sampled_targets, tail_log_masses, top_k_targets
    from kd_trainers.teacher_cache import format as record_format

    teacher, hidden, head, name = case
    vocab = teacher.size(1)
    labels = teacher.argmax(-1)  # any ids: forward KL at kd_weight 1 does not read them
    log_p = torch.log_softmax(teacher, -1)
    entropy = round(-(log_p.exp() * log_p).sum(-1).mean().item(), 2)
    dense = {temperature: loss_and_head_grad(hidden, head, labels, temperature, teacher=teacher)
             for temperature in TEMPERATURES}
    id_bytes = record_format.id_bytes_for(vocab)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for mode in modes:
        for k in ks:
            if k >= vocab:
                continue
            exact = top_k_targets(teacher, k) if mode == "top_k" else sampled_targets(teacher, k, generator)
            # A top-k record stores the tail's mass at every temperature measured, as a cache written for them does
            # (`teacher_cache_temperatures`); the targets at T carry the tail at T (exact: `top_k_targets(..., T)`).
            tails = torch.stack(tail_log_masses(teacher, exact.ids, TEMPERATURES)) if mode == "top_k" \
                else exact.tail_log_mass
            record = record_format.encode(exact.ids, exact.log_probs, tails, id_bytes)
            num_tails = tails.size(0) if tails.dim() == 2 else 1

            def stored_at(temperature: float):
                if mode != "top_k":
                    return record_format.decode(record, teacher.size(0), k, id_bytes, mode)
                return record_format.decode(record, teacher.size(0), k, id_bytes, mode, num_tails=len(TEMPERATURES),
                                            tempered_index=TEMPERATURES.index(temperature), temperature=temperature)

            stored = stored_at(1.0)
            variants = [("stored", stored_at)] + ([("exact_top_k_uniform", lambda temperature: top_k_targets(
                teacher, k, temperature))] if mode == "top_k" else [])
            kl = ("inf", "inf")
            if mode == "top_k":
                per_token = (log_p.exp() * (log_p - reconstruct_log_probs(stored, vocab))).sum(-1)
                kl = (round(per_token.mean().item(), 5), round(per_token.quantile(0.99).item(), 5))
            for variant, targets_at in variants:
                if variant != "stored":
                    per_token = (log_p.exp() * (log_p - reconstruct_log_probs(targets_at(1.0), vocab))).sum(-1)
                    kl = (round(per_token.mean().item(), 5), round(per_token.quantile(0.99).item(), 5))
                for temperature in TEMPERATURES:
                    dense_loss, dense_grad = dense[temperature]
                    row = {"device": "cpu", "teacher": name, "teacher_entropy": entropy, "mode": mode, "k": k,
                           "variant": variant, "temperature": temperature,
                           "bytes_per_token": round(len(record) / teacher.size(0), 1) if variant == "stored" else "",
                           "raw_bytes_per_token": record_format.raw_size(1, k, id_bytes, num_tails)
                           if variant == "stored" else "",
                           "kl_mean": kl[0], "kl_p99": kl[1]}
                    for tail in (("bucket", "spread") if mode == "top_k" else ("bucket",)):
                        loss, grad = loss_and_head_grad(hidden, head, labels, temperature,
                                                        targets=targets_at(temperature), tail=tail)
                        row[f"loss_rel_error_{tail}"] = round(abs(loss - dense_loss) / dense_loss, 5)
                        row[f"grad_cosine_{tail}"] = round(torch.nn.functional.cosine_similarity(  # fp64: 136M terms
                            grad.double(), dense_grad.double(), dim=0).item(), 5)
                    row.setdefault("loss_rel_error_spread", "")
                    row.setdefault("grad_cosine_spread", "")
                    print(row, flush=True)
                    rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64, 128, 192, 256])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--teachers", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--name", default="teacher_cache_storage")
    options = smallest_cell(parser.parse_args())
    torch.manual_seed(0)
    rows = []
    for teacher in options.teachers:
        case = demo_case(options.tokens) if teacher == "demo" else zipf_case(min(options.tokens, 512), *CASES[teacher],
                                                                               teacher)
        rows += measure(case, options.ks, ("top_k", "sampled"))
    write_results(rows, os.path.join(RESULTS, options.name))


if __name__ == "__main__":
    main()
