"""MinED: the edit-distance alignments (`kd_trainers.data.edit_distance`) against loops written from their
definitions, the mapped loss (`kd_trainers.losses.mapped`) against a full-logits reference written token by token
(values and gradients), and `MinEDTrainer` on the demo's cross-vocabulary pair: its loss on a batch is the reference
from the two models' full logits, `kd_weight=0` is SFTTrainer, and what cannot work is refused naming the field."""

import copy
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from trl import SFTConfig, SFTTrainer

from kd_trainers import MinEDConfig, MinEDTrainer
from kd_trainers.cli import train as cli
from kd_trainers.data.edit_distance import (
    VocabularyMap, edit_distance_partners, representatives, token_texts, vocabulary_map)
from kd_trainers.losses import LossSettings
from kd_trainers.losses.mapped import MappedSide, mapped_distillation_loss
from kd_trainers.losses.reference import add_teacher_noise
from kd_trainers.recipe.catalog import shipped_path

from test_uld_trainer import BASE, pair  # noqa: F401  (the demo's cross-vocabulary pair, a fixture)


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, char_b in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (char_a != char_b))
    return row[-1]


def warping_partners(student, teacher):
    """DTW from its definition: the full table of least path costs, then the path traced back from the last pair
    (preferring the diagonal, then a teacher step, then a student step among equal costs)."""
    student, teacher = [text.lstrip() for text in student], [text.lstrip() for text in teacher]
    inf = float("inf")
    table = [[inf] * (len(student) + 1) for _ in range(len(teacher) + 1)]
    table[0][0] = 0
    for i in range(1, len(teacher) + 1):
        for j in range(1, len(student) + 1):
            table[i][j] = levenshtein(teacher[i - 1], student[j - 1]) + min(
                table[i - 1][j - 1], table[i - 1][j], table[i][j - 1])
    i, j, teachers_of = len(teacher), len(student), [[] for _ in student]
    while True:
        teachers_of[j - 1].append(i - 1)
        if i == 1 and j == 1:
            break
        _, i, j = min([(table[i - 1][j - 1], i - 1, j - 1), (table[i - 1][j], i - 1, j), (table[i][j - 1], i, j - 1)],
                      key=lambda step: step[0])
    return [teachers[0] if len(teachers) == 1 else -1 for teachers in teachers_of]


def test_the_warping_path_is_the_least_cost_one_traced_as_defined():
    generator = random.Random(3)
    for _ in range(200):
        texts = [["".join(generator.choice("ab c") for _ in range(generator.randint(1, 3)))
                  for _ in range(generator.randint(1, 9))] for _ in range(2)]
        assert edit_distance_partners(*texts) == warping_partners(*texts), texts
    # many-to-one pairs each student token with the one teacher token; one-to-many leaves it without a partner
    assert edit_distance_partners([" 4", "2", " dollars"], [" 42", " dollar", "s"]) == [0, 0, -1]
    assert edit_distance_partners([" the", " cat"], [" the", " cat"]) == [0, 1]
    assert edit_distance_partners([], [" a"]) == [] and edit_distance_partners([" a"], []) == [-1]


def test_token_texts_agree_across_tokenizer_families(bpe_tokenizer, wordpiece_tokenizer):
    """A word-initial token reads with its space whether byte-level BPE writes it in (Ġ) or WordPiece leaves it out;
    a WordPiece continuation loses its ##; a lone byte of an accented letter is U+FFFD."""
    assert token_texts(bpe_tokenizer, ["Ġc", "ost", "Ċ", "Ã"]) == [" c", "ost", "\n", "\ufffd"]
    assert token_texts(wordpiece_tokenizer, ["c", "##ost", "42"]) == [" c", "ost", " 42"]
    assert token_texts(bpe_tokenizer, ["</s>"]) == ["</s>"]  # a special token is its own text


def test_the_vocabulary_map_is_the_nearest_student_token_and_is_kept(tmp_path, monkeypatch, bpe_tokenizer,
                                                                     wordpiece_tokenizer):
    monkeypatch.setenv("KD_TRAINERS_CACHE", str(tmp_path))
    mapping = vocabulary_map(wordpiece_tokenizer, bpe_tokenizer)
    ids = list(range(len(wordpiece_tokenizer)))
    teacher = token_texts(wordpiece_tokenizer, wordpiece_tokenizer.convert_ids_to_tokens(ids))
    student = token_texts(bpe_tokenizer, bpe_tokenizer.convert_ids_to_tokens(list(range(len(bpe_tokenizer)))))
    assert mapping.to_student.shape == (len(teacher),)
    # every teacher token against every student token (the search prunes by length: this does not)
    everything = process.cdist(teacher, student, scorer=Levenshtein.distance, dtype=np.int64)
    assert torch.equal(mapping.to_student, torch.from_numpy(everything.argmin(1)))
    assert torch.equal(mapping.distance, torch.from_numpy(everything.min(1)))
    for t in random.Random(0).sample(ids, 20):  # and rapidfuzz's distance is the edit distance written out
        assert everything[t].tolist() == [levenshtein(teacher[t], text) for text in student]
    assert int((mapping.distance == 0).sum()) > len(teacher) // 4  # most short pieces exist in both vocabularies
    kept = list((tmp_path / "vocabulary_maps").glob("*.pt"))
    assert len(kept) == 1
    monkeypatch.setattr("kd_trainers.data.edit_distance._compute_vocabulary_map",
                        lambda *a: pytest.fail("a kept map is computed again"))
    again = vocabulary_map(wordpiece_tokenizer, bpe_tokenizer)
    assert torch.equal(again.to_student, mapping.to_student) and torch.equal(again.distance, mapping.distance)


def word_tokenizer(words):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token=words[0]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=words[0])


def test_a_teacher_token_longer_than_any_student_token_still_finds_its_nearest(tmp_path, monkeypatch):
    """The length pruning widens to the lengths the student has (here 1 and 2 only), then to the best distance."""
    monkeypatch.setenv("KD_TRAINERS_CACHE", str(tmp_path))
    student = word_tokenizer(["x", "ab", "cc", "c"])
    teacher = word_tokenizer(["x", "cccccc", "abab", "zz"])
    mapping = vocabulary_map(teacher, student, cache=False)
    assert mapping.to_student.tolist() == [0, 2, 1, 0] and mapping.distance.tolist() == [0, 4, 2, 2]  # ties: lowest id


def test_each_student_token_takes_its_nearest_teacher_token():
    mapping = VocabularyMap(torch.tensor([2, 0, 2, 5, 2, 1]), torch.tensor([1, 0, 0, 0, 0, 3]))
    student_ids, teacher_ids = representatives(mapping, teacher_rows=5, student_rows=4)  # teacher 5, student 5 out
    assert student_ids.tolist() == [0, 2] and teacher_ids.tolist() == [1, 2]  # 2: distance 0 beats 1, then lowest id


def reference_mapped_loss(student_logits, teacher_logits, labels, partners, mapping, settings, noise_seed=None):
    """Token by token: the teacher's mapped distribution built as a full row of the student's vocabulary (−inf where
    no teacher token maps), its KL to the student's, or the one-hot label's, as the module docstring defines."""
    temperature = settings.temperature
    teacher_logits = add_teacher_noise(teacher_logits.reshape(-1, teacher_logits.size(-1)), partners.new_zeros(
        teacher_logits.shape[:2]), settings.noise_std, noise_seed).reshape(teacher_logits.shape).double()
    student_ids, teacher_ids = mapping
    ce = kd = student_logits.new_zeros(())
    count = 0
    for b in range(labels.size(0)):
        for t in range(labels.size(1)):
            label = int(labels[b, t])
            if label == -100:
                continue
            count += 1
            ce = ce - F.log_softmax(student_logits[b, t], -1)[label]
            log_q = F.log_softmax(student_logits[b, t] / temperature, -1)
            j = int(partners[b, t])
            if j < 0:
                kd = kd - log_q[label]
                continue
            row = torch.full_like(log_q, float("-inf"))
            row[student_ids] = teacher_logits[b, j, teacher_ids] / temperature
            target = F.softmax(row, -1)
            kd = kd + sum(target[k] * (torch.log(target[k]) - log_q[k]) for k in student_ids.tolist())
    scale = temperature**2 if settings.temperature_squared else 1.0
    return ((1 - settings.kd_weight) * ce + settings.kd_weight * scale * kd) / count


@pytest.mark.parametrize("values", [{}, {"temperature": 2.0, "kd_weight": 0.3, "temperature_squared": False},
                                    {"noise_std": 0.7, "temperature": 1.5}])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_the_mapped_loss_is_the_token_by_token_reference(values, chunk_size):
    generator = torch.Generator().manual_seed(0)
    student_vocab, teacher_vocab, width_s, width_t, dim_s, dim_t = 11, 13, 6, 7, 5, 4
    student_hidden = torch.randn(2, width_s, dim_s, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(2, width_t, dim_t, generator=generator, dtype=torch.float64)
    student_head = torch.randn(student_vocab, dim_s, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_head = torch.randn(teacher_vocab, dim_t, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, student_vocab, (2, width_s), generator=generator)
    labels[0, :2] = labels[1, :1] = labels[1, -1] = -100
    partners = torch.randint(-1, width_t, (2, width_s), generator=generator)
    mapping = (torch.tensor([0, 2, 3, 7, 10]), torch.tensor([5, 1, 12, 3, 0]))
    settings = LossSettings(**values)
    seed = 5 if values.get("noise_std") else None
    loss = mapped_distillation_loss(MappedSide(student_hidden, (student_head, None)),
                                    MappedSide(teacher_hidden, (teacher_head, None)), labels, partners, mapping,
                                    settings, chunk_size=chunk_size, noise_seed=seed)
    expected = reference_mapped_loss(student_hidden @ student_head.T, teacher_hidden @ teacher_head.T, labels,
                                     partners, mapping, settings, seed)
    torch.testing.assert_close(loss.loss, expected, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(loss.loss, (student_hidden, student_head))
    expected_grads = torch.autograd.grad(expected, (student_hidden, student_head))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)
    assert loss.num_aligned == int(((partners >= 0) & (labels != -100)).sum())




def make(tmp_path, pair, tokenizers, data, student=None, **values):
    args = MinEDConfig(output_dir=str(tmp_path / "mined"), **{**BASE, **values})
    return MinEDTrainer(copy.deepcopy(pair[0]) if student is None else student, pair[1], args=args,
                        train_dataset=data, processing_class=tokenizers[0], teacher_processing_class=tokenizers[1])


def test_the_trainers_loss_is_the_mapped_reference_on_a_batch(tmp_path, monkeypatch, pair, bpe_tokenizer,
                                                              wordpiece_tokenizer, demo_data):
    """Through the trainer, at each setting it reads: the loss equals the reference from the two models' full logits
    at the partners the data carries, kept only where the vocabulary map agrees with the student's token (so the
    shift, the partners, the map and each setting are wired as the loss defines them)."""
    monkeypatch.setenv("KD_TRAINERS_CACHE", str(tmp_path / "cache"))
    tokenizers = bpe_tokenizer, wordpiece_tokenizer
    data = demo_data["train"].select(range(8))
    losses = []
    for values in ({}, {"kd_temperature": 2.0, "kd_weight": 0.3, "kd_temperature_squared": False},
                   {"teacher_logit_noise_std": 0.8, "loss_chunk_size": 3}):
        trainer = make(tmp_path, pair, tokenizers, data, **values)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        seed = 11 if values.get("teacher_logit_noise_std") else None
        if seed is not None:
            trainer._noise_seed = lambda mode: seed
        loss = trainer.compute_loss(trainer.model, batch)
        with torch.no_grad():
            student_logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            teacher_logits = pair[1](input_ids=batch["teacher_input_ids"],
                                     attention_mask=batch["teacher_attention_mask"]).logits
        mapping = vocabulary_map(wordpiece_tokenizer, bpe_tokenizer)
        labels = batch["labels"][:, 1:]
        partners = torch.full_like(labels, -1)
        for b, t in (labels != -100).nonzero().tolist():
            j = int(batch["teacher_partner"][b, t + 1])
            if j >= 1 and mapping.to_student[batch["teacher_input_ids"][b, j]] == labels[b, t]:
                partners[b, t] = j - 1
        assert 0 < int((partners >= 0).sum()) < int((labels != -100).sum())
        args = trainer.args
        settings = LossSettings(temperature=args.kd_temperature, kd_weight=args.kd_weight,
                                noise_std=args.teacher_logit_noise_std,
                                temperature_squared=args.kd_temperature_squared)
        expected = reference_mapped_loss(
            student_logits[:, :-1].double(), teacher_logits[:, :-1].double(), labels, partners,
            representatives(mapping, len(wordpiece_tokenizer), len(bpe_tokenizer)), settings, seed)
        torch.testing.assert_close(loss, expected.float(), rtol=2e-5, atol=2e-6)
        assert all(not torch.isclose(loss, other, rtol=1e-4) for other in losses)
        losses.append(loss)


def test_at_kd_weight_zero_mined_is_sft(tmp_path, monkeypatch, pair, bpe_tokenizer, wordpiece_tokenizer, demo_data):
    monkeypatch.setenv("KD_TRAINERS_CACHE", str(tmp_path / "cache"))
    data = demo_data["train"].select(range(8))
    values = {**BASE, "learning_rate": 0.05, "optim": "sgd", "lr_scheduler_type": "constant"}
    sft = SFTTrainer(copy.deepcopy(pair[0]), SFTConfig(output_dir=str(tmp_path / "sft"), **values),
                     train_dataset=data, processing_class=bpe_tokenizer)
    sft.train()
    mined = MinEDTrainer(copy.deepcopy(pair[0]), pair[1], args=MinEDConfig(output_dir=str(tmp_path / "m"),
                                                                           kd_weight=0.0, **values),
                         train_dataset=data, processing_class=bpe_tokenizer,
                         teacher_processing_class=wordpiece_tokenizer)
    mined.train()
    losses = [[log["loss"] for log in trainer.state.log_history if "loss" in log] for trainer in (sft, mined)]
    assert losses[0] == losses[1]
    for (name, a), (_, b) in zip(sft.model.named_parameters(), mined.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("field, value, message", [
    ("teacher_cache", "cache-dir", "teacher_cache='cache-dir': MinED carries the teacher's whole distribution into "
                                   "the student's vocabulary through the edit-distance map, and a teacher cache holds "
                                   "its top k only"),
    ("teacher_url", "http://127.0.0.1:1", "teacher_url='http://127.0.0.1:1': MinED carries"),
    ("divergence", "reverse_kl", "divergence='reverse_kl' is not read by MinED"),
    ("skew_alpha", 0.3, "skew_alpha=0.3 is not read by MinED"),
    ("max_prompt_length", 0, "max_prompt_length must be a positive integer or None, got 0"),
])
def test_what_cannot_work_is_refused_naming_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match="^" + message):
        MinEDConfig(output_dir=str(tmp_path), **{field: value})


def test_mined_trains_the_student_only_and_logs_its_terms(tmp_path, monkeypatch, pair, bpe_tokenizer,
                                                        wordpiece_tokenizer, demo_data):
    monkeypatch.setenv("KD_TRAINERS_CACHE", str(tmp_path / "cache"))
    student = copy.deepcopy(pair[0])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in pair[1].named_parameters()}
    trainer = make(tmp_path, pair, (bpe_tokenizer, wordpiece_tokenizer), demo_data["train"].select(range(16)),
                   student=student, teacher_logit_noise_std=0.3)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(logs) == 2 and all(log["kd_loss"] > 0 and 0 < log["mapped_tokens"] < 1 for log in logs)
    assert all(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in pair[1].named_parameters())
    settings = trainer.kd_settings()
    assert settings["method"] == "MinED across tokenizers" and settings["mapped_student_tokens"] > 100


@pytest.mark.slow
def test_the_shipped_recipe_trains_through_kd_train(tmp_path, monkeypatch):
    """`kd-train recipes/mined.yaml`: a finished run whose card and run record name the method."""
    monkeypatch.setenv("KD_TRAINERS_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "run"
    code = cli.main([shipped_path("mined"), "max_steps=2", "save_steps=2", "logging_steps=1",
                     "per_device_train_batch_size=4", "max_length=64", f"output_dir={output}"])
    assert code == 0
    assert (output / "done.json").exists() and (output / "model.safetensors").exists()
    info = json.loads((output / "run_info.json").read_text())
    assert "mined" in json.dumps(info).lower()
    assert "MinED across tokenizers" in (output / "README.md").read_text()
