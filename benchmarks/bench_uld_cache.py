"""How far ULD and GOLD from a teacher cache of the teacher's own tokenization are from the teacher in memory, on real
models and real chat text.

A cache stores, at each of the teacher's label tokens, its k most probable tokens, their log-probabilities (quantised
to 1/16 nat), the tail's mass at each stored temperature and the label token's own log-probability
(`kd_trainers.teacher_cache`). ULD compares the two models' whole sorted probability vectors, and GOLD's hybrid also
reads the teacher's probability of every token both vocabularies share, so from a top-k cache the teacher's tail is
spread evenly over its other tokens (`teacher_cache_tail=spread`, `kd_trainers.losses.aligned`): exact when k covers
the vocabulary, an approximation otherwise. This script measures it:

- models: Qwen2.5-Coder-0.5B-Instruct as the teacher (151,936 tokens) and SmolLM2-135M-Instruct as the student
  (49,152 tokens), the `real` tier's pair, whole, float32, from `kd_trainers.models.real_models`;
- data: the first 32 chitchat conversations (a user turn, the reply), each tokenized by both chat templates and
  aligned as the trainers align them (`DualTokenizer(align=True)`), at most 128 tokens a side;
- per method (ULD; GOLD with its defaults) and temperature (1, 2), the KD term (kd_weight 1) from the teacher in
  memory and from sparse targets at k = 32 and 256 through the cache's own record (encoded and decoded, as training
  reads it), and at k = 32 unquantised (the tail's treatment alone); for each, its relative error and the cosine
  between its gradient and the resident one (with respect to the student's hidden states: what training follows).

Usage: python benchmarks/bench_uld_cache.py [--k 32 256] [--temperatures 1 2]
Writes benchmarks/results/uld_cache_error_real_cpu.{csv,md}.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_trainers.data.alignment import shared_token_ids
from kd_trainers.data.dual_tokenization import DualTokenizationCollator, DualTokenizer
from kd_trainers.losses import LogitTransform, LossSettings
from kd_trainers.losses.aligned import AlignedSettings, Side, SparseSide, aligned_distillation_loss
from kd_trainers.losses.sparse import top_k_targets
from kd_trainers.models.real_models import chitchat_exchanges, real_model_path
from kd_trainers.teacher_cache.format import decode, encode, id_bytes_for
from kd_trainers.teacher_cache.writer import sparse_rows
from kd_trainers.teacher_cache.cache import CacheSettings

from bench_kd_step import RESULTS, write_results  # noqa: E402  (benchmarks/ is the script's own folder)


def _cached(teacher, hidden, labels, k: int, temperature: float, vocab: int):
    """The targets training reads from a cache: written by the cache pass's own function and record, read back."""
    settings = CacheSettings.for_run("top_k", k, vocab, temperature, tokenization="teacher")
    ids, log_probs, tails, label_log_probs = sparse_rows(teacher, hidden, settings, LogitTransform(), labels=labels)
    id_bytes = id_bytes_for(vocab)
    record = encode(ids, log_probs, tails, id_bytes, label_log_probs)
    index = settings.temperatures.index(float(temperature))
    return decode(record, ids.size(0), k, id_bytes, "top_k", len(settings.temperatures), index, temperature,
                  labels=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    options = parser.parse_args()
    student_path, teacher_path = real_model_path("smollm2"), real_model_path("qwen2.5-coder")
    tokenizers = AutoTokenizer.from_pretrained(student_path), AutoTokenizer.from_pretrained(teacher_path)
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    tokenize = DualTokenizer(*tokenizers, max_length=128, align=True)
    rows = [tokenize({"prompt": [{"role": "user", "content": first}],
                      "completion": [{"role": "assistant", "content": reply}]})
            for first, reply in chitchat_exchanges(32)]
    pads = [t.pad_token_id if t.pad_token_id is not None else t.eos_token_id for t in tokenizers]
    batch = DualTokenizationCollator(*pads)(rows)
    labels, teacher_labels = batch["labels"][:, 1:], batch["teacher_labels"][:, 1:]
    groups, teacher_groups = batch["aligned_group"][:, 1:], batch["teacher_aligned_group"][:, 1:]
    with torch.no_grad():
        student_hidden = student.model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
        teacher_hidden = teacher.model(input_ids=batch["teacher_input_ids"],
                                       attention_mask=batch["teacher_attention_mask"]).last_hidden_state[:, :-1]
    mask = teacher_labels != -100
    vocab, student_vocab = len(tokenizers[1]), len(tokenizers[0])  # the heads' real rows, as the trainers read them
    shared = shared_token_ids(*tokenizers)

    def kd_and_grad(teacher_side, settings, aligned):
        hidden = student_hidden.detach().clone().requires_grad_()
        out = aligned_distillation_loss(Side(hidden, student.get_output_embeddings(), labels, groups,
                                             vocab_size=student_vocab), teacher_side,
                                        settings, aligned, shared_ids=shared)
        (grad,) = torch.autograd.grad(out.loss, hidden)
        return out.kd_loss.item(), grad.reshape(-1)

    results = []
    for method, aligned in (("uld", AlignedSettings()), ("gold", AlignedSettings(distance="hybrid",
                                                                                 matched_beta=0.5))):
        for temperature in options.temperatures:
            settings = LossSettings(temperature=temperature, kd_weight=1.0, temperature_squared=False)
            resident, resident_grad = kd_and_grad(
                Side(teacher_hidden, teacher.get_output_embeddings(), teacher_labels, teacher_groups,
                     vocab_size=vocab), settings,
                aligned)
            variants = [(f"cache k={k}", k, True) for k in options.k] + [(f"top-k k={min(options.k)}, unquantised",
                                                                          min(options.k), False)]
            for name, k, quantised in variants:
                if quantised:
                    targets = _cached(teacher, teacher_hidden[mask], teacher_labels[mask], k, temperature, vocab)
                else:
                    logits = teacher.get_output_embeddings()(teacher_hidden[mask])[:, :vocab].float()
                    targets = top_k_targets(logits, k, temperature)._replace(
                        label_log_probs=logits.log_softmax(-1).gather(1, teacher_labels[mask][:, None])[:, 0])
                kd, grad = kd_and_grad(SparseSide(targets, teacher_labels, teacher_groups, vocab), settings, aligned)
                tail = (targets.tail_log_mass if temperature == 1 else targets.tempered_tail_log_mass).exp()
                results.append({
                    "device": "cpu", "method": method, "temperature": temperature, "teacher": name,
                    "label_tokens": int(mask.sum()), "tail_mass_mean": round(tail.mean().item(), 4),
                    "kd_resident": round(resident, 4), "kd": round(kd, 4),
                    "relative_error": round((kd - resident) / resident, 4),
                    "gradient_cosine": round(torch.nn.functional.cosine_similarity(grad, resident_grad, 0).item(),
                                             4)})
                print(results[-1], flush=True)
    write_results(results, os.path.join(RESULTS, "uld_cache_error_real_cpu"))


if __name__ == "__main__":
    main()
