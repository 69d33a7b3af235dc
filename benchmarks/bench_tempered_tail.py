"""How far a guessed tempered tail is from the exact one, on a real vocabulary.

A top-k target stores the teacher's k most probable tokens and the mass of the rest (the tail). At a temperature
T != 1 the tempered tail's mass depends on how the tail's mass is shared among its V - k tokens, which the k ids do not
say. A teacher cache stores the tail's mass at each temperature it serves (exact); a served teacher (vLLM returns
temperature-1 log-probabilities only) can only guess it, as V - k equally likely tokens
(`teacher_server_approximate_temperature`). This script measures both against the resident teacher, at every label
token of real conversations:

- tail mass: the tempered teacher's mass outside its top k, exact and as guessed;
- KD loss (forward KL, T^2-scaled, kd_weight 1) of a student: resident (the whole distribution), the exact k + 1
  category coarsening (what the cache's bucket tail computes; a lower bound of the resident loss), and the guessed
  tail with the bucket and with the spread treatment.

Models: SmolLM2-135M-Instruct as the teacher (49,152 tokens), its first 2 layers as the student, from
`kd_trainers.models.real_models`; data: 32 chitchat conversations as chat messages, SmolLM2's template applied.

Usage: python benchmarks/bench_tempered_tail.py [--k 20 32] [--temperatures 1 2 4]
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_trainers.losses import LossSettings, chunked_distillation_loss, sparse_distillation_terms
from kd_trainers.losses.sparse import tempered_top_k, top_k_targets
from kd_trainers.data.prompt_completion import tokenize_prompt_completion
from kd_trainers.models.real_models import chitchat_exchanges, real_model_path


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _batch(tokenizer, exchanges, max_length: int = 128) -> dict:
    rows = []
    for first, reply in exchanges:
        ids, prompt_length = tokenize_prompt_completion(tokenizer, [{"role": "user", "content": first}],
                                                        [{"role": "assistant", "content": reply}])
        ids = ids[:max_length]
        rows.append((ids, [-100] * prompt_length + ids[prompt_length:]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels[:len(ids)] + [-100] * (width - len(ids)) for ids, labels in rows])}


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 32])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    options = parser.parse_args()
    teacher_path, student_path = real_model_path("smollm2"), real_model_path("smollm2", 2)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    batch = _batch(tokenizer, chitchat_exchanges(32))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = batch["labels"][:, 1:]
    teacher_hidden = teacher.model(**inputs).last_hidden_state[:, :-1]
    student_hidden = student.model(**inputs).last_hidden_state[:, :-1]
    teacher_logits = teacher.lm_head(teacher_hidden)[labels != -100].float()
    rows = []
    for k in options.k:
        for temperature in options.temperatures:
            settings = LossSettings(temperature=temperature, kd_weight=1.0)
            resident, _ = chunked_distillation_loss(student_hidden, student.lm_head, teacher_hidden, teacher.lm_head,
                                                    labels, settings)
            exact = top_k_targets(teacher_logits, k, temperature=temperature)
            guessed = top_k_targets(teacher_logits, k)  # no tempered tail: the guess
            vocab = teacher_logits.size(-1)
            guessed_tail = _guessed_tail_mass(guessed, vocab, temperature)
            losses = {
                "exact_bucket": sparse_distillation_terms(student_hidden, student.lm_head, exact, labels, settings,
                                                          tail="bucket").kd_loss.item(),
                "guessed_bucket": sparse_distillation_terms(student_hidden, student.lm_head, guessed, labels,
                                                            settings, tail="bucket").kd_loss.item(),
                "guessed_spread": sparse_distillation_terms(student_hidden, student.lm_head, guessed, labels,
                                                            settings, tail="spread").kd_loss.item(),
            }
            rows.append({"vocab": vocab, "k": k, "temperature": temperature, "tokens": int(exact.ids.size(0)),
                         "tail_mass_exact": round(exact.tempered_tail_log_mass.exp().mean().item(), 4),
                         "tail_mass_guessed": round(guessed_tail.mean().item(), 4),
                         "kd_resident": round(resident.kd_loss.item(), 4),
                         **{f"kd_{name}": round(value, 4) for name, value in losses.items()}})
            print(rows[-1], flush=True)
    path = os.path.join(RESULTS, "tempered_tail_real_cpu")
    with open(path + ".csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(path + ".md", "w") as handle:
        handle.write("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n")
        handle.writelines("| " + " | ".join(str(value) for value in row.values()) + " |\n" for row in rows)
    print(f"written {path}.csv and .md")


def _guessed_tail_mass(targets, vocab: int, temperature: float) -> torch.Tensor:
    """The tempered tail's mass when its V − k tokens are read as equally likely."""
    _, tail_each, normaliser = tempered_top_k(targets, vocab, temperature)
    return (tail_each + torch.log(torch.tensor(float(vocab - targets.ids.size(1)))) - normaliser).exp()


if __name__ == "__main__":
    main()
