"""The cross-tokenizer methods' on-policy option (`lmbda`, `kd_trainers.kd.two_tokenizers`): a micro-batch drawn
on-policy is the student's own completions of its prompts, sampled with the configured settings and tokenized twice
exactly as the dataset's rows are, counted after the replacement; `lmbda=0` never samples; every cross-tokenizer
method trains on-policy; settings out of range, and on-policy under one vocabulary, are refused naming the field."""

import copy
import json

import pytest
import torch

from kd_trainers import DSKDConfig, DSKDTrainer, GOLDConfig, GOLDTrainer, MinEDConfig, MinEDTrainer, ULDConfig
from kd_trainers import ULDTrainer
from kd_trainers.data.dual_tokenization import DualTokenizationCollator, DualTokenizer, with_completion
from kd_trainers.demo import demo_model

from test_uld_trainer import BASE, pair  # noqa: F401  (the demo's cross-vocabulary pair, a fixture)

METHODS = {"uld": (ULDConfig, ULDTrainer, {}), "gold": (GOLDConfig, GOLDTrainer, {}),
           "mined": (MinEDConfig, MinEDTrainer, {}), "dskd_v2": (DSKDConfig, DSKDTrainer, {"token_alignment": "exact"})}


def make(method, tmp_path, pair, tokenizers, data, **values):
    config_class, trainer_class, extra = METHODS[method]
    args = config_class(output_dir=str(tmp_path / method), **{**BASE, **extra, **values})
    return trainer_class(copy.deepcopy(pair[0]), pair[1], args=args, train_dataset=data,
                         processing_class=tokenizers[0], teacher_processing_class=tokenizers[1])


def test_an_on_policy_batch_is_the_students_samples_tokenized_twice(tmp_path, monkeypatch, pair, bpe_tokenizer,
                                                                    wordpiece_tokenizer, demo_data):
    """With lmbda=1 every micro-batch is replaced: the student is asked to sample (at the configured temperature,
    top_p and length) a completion of each row's own prompt, and the batch becomes those completions tokenized twice
    by the dataset's tokenization, aligned groups included; the label count is the new batch's."""
    monkeypatch.setenv("KD_TRAINERS_CACHE", str(tmp_path / "cache"))
    tokenizers = bpe_tokenizer, wordpiece_tokenizer
    data = demo_data["train"].select(range(4))
    asked = []

    def sample(model, tokenizer, prompts, **settings):
        asked.append((tokenizer, list(prompts), settings))
        return [f" sample {index} of {len(prompts)}" for index in range(len(prompts))]

    monkeypatch.setattr("kd_trainers.kd.two_tokenizers.generate_predictions", sample)
    trainer = make("gold", tmp_path, pair, tokenizers, data, lmbda=1.0, temperature=0.7, top_p=0.8,
                   max_completion_length=9)
    batch = next(iter(trainer.get_train_dataloader()))
    replaced, count = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    (tokenizer, prompts, settings), = asked
    assert tokenizer.get_vocab() == bpe_tokenizer.get_vocab()  # the student's own tokenizer
    assert sorted(prompts) == sorted(row["prompt"] for row in data)  # each row's prompt, in the batch's order
    assert settings["do_sample"] and (settings["temperature"], settings["top_p"], settings["max_new_tokens"]) == (
        0.7, 0.8, 9)
    tokenize = DualTokenizer(*tokenizers, max_length=64, align=True, keep_prompt=True)
    expected = DualTokenizationCollator(bpe_tokenizer.pad_token_id, wordpiece_tokenizer.pad_token_id)(
        [tokenize(with_completion(prompt, f" sample {index} of 4")) for index, prompt in enumerate(prompts)])
    assert set(replaced[0]) == {*expected, "student_sampled"} and replaced[0]["student_sampled"] is True
    for key, value in expected.items():
        assert value == replaced[0][key] if key == "on_policy_prompt" else torch.equal(value, replaced[0][key]), key
    assert int(count) == int((expected["labels"][:, 1:] != -100).sum())
    assert [json.loads(text) for text in batch["on_policy_prompt"]] == prompts
    # A sample is distilled, never imitated: its loss is w times the method's loss without the student CE.
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(replaced[0]))
    distil_only = make("gold", tmp_path, pair, tokenizers, data, kd_weight=1.0)
    expected_loss = distil_only.compute_loss(distil_only.model, distil_only._prepare_inputs(expected))
    torch.testing.assert_close(loss, trainer.args.kd_weight * expected_loss, rtol=1e-6, atol=1e-7)

    off = make("gold", tmp_path, pair, tokenizers, data)  # lmbda=0: the dataset's rows, never a sample
    monkeypatch.setattr("kd_trainers.kd.two_tokenizers.generate_predictions",
                        lambda *a, **k: pytest.fail("lmbda=0 sampled the student"))
    batch = next(iter(off.get_train_dataloader()))
    assert "on_policy_prompt" not in batch
    kept, _ = off.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert kept[0] is batch


@pytest.mark.slow  # four short trainings with generation
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_cross_tokenizer_method_trains_on_policy(tmp_path, monkeypatch, pair, bpe_tokenizer,
                                                       wordpiece_tokenizer, demo_data, method):
    """The student really samples (no stand-in): two on-policy steps finish with finite losses, and the student's
    weights move."""
    monkeypatch.setenv("KD_TRAINERS_CACHE", str(tmp_path / "cache"))
    trainer = make(method, tmp_path, pair, (bpe_tokenizer, wordpiece_tokenizer), demo_data["train"].select(range(8)),
                   lmbda=1.0, max_completion_length=8)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert trainer.kd_settings()["lmbda"] == 1.0  # the card and run record say the run was on-policy


@pytest.mark.parametrize("field, value, message", [
    ("lmbda", 1.5, r"lmbda must be a number in \[0, 1\], got 1.5"),
    ("lmbda", True, r"lmbda must be a number in \[0, 1\], got True"),
    ("temperature", 0.0, "temperature must be a finite number > 0, got 0.0"),
    ("top_p", 0.0, r"top_p must be a number in \(0, 1\], got 0.0"),
    ("max_completion_length", 0, "max_completion_length must be a positive integer, got 0"),
])
@pytest.mark.parametrize("config_class", [ULDConfig, MinEDConfig, DSKDConfig])
def test_on_policy_settings_out_of_range_are_refused(tmp_path, config_class, field, value, message):
    with pytest.raises(ValueError, match="^" + message):
        config_class(output_dir=str(tmp_path), **{field: value})


def test_on_policy_without_a_kd_term_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^lmbda=0.5 with kd_weight=0: .* Set kd_weight > 0, or lmbda=0"):
        GOLDConfig(output_dir=str(tmp_path), lmbda=0.5, kd_weight=0.0)


def test_on_policy_under_one_vocabulary_is_refused(tmp_path, bpe_tokenizer, demo_data):
    student = demo_model("llama", bpe_tokenizer, "student", seed=2)
    with pytest.raises(ValueError, match="^lmbda=0.5 samples the student's completions .* use method gkd"):
        DSKDTrainer(student, DSKDConfig(output_dir=str(tmp_path), **{**BASE, "lmbda": 0.5}),
                    train_dataset=demo_data["train"].select(range(4)), processing_class=bpe_tokenizer,
                    teacher_model=copy.deepcopy(student), teacher_processing_class=bpe_tokenizer)
