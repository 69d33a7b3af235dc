"""GKDTrainer: TRL's GKD with the package's loss. Pinned against TRL's own loss at neutral settings, then trained."""

import copy

import pytest
import torch
from trl.experimental.gkd import GKDConfig as TRLGKDConfig
from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

from kd_trainers import GKDConfig, GKDTrainer
from kd_trainers.gkd import PromptCompletionCollator


def gkd_args(tmp_path, config_class=GKDConfig, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), bf16=False, max_steps=4, per_device_train_batch_size=8,
                  learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                  max_length=64, max_new_tokens=8, lmbda=0.0, seed=0)
    values.update(overrides)
    return config_class(**values)


def make_trainer(tmp_path, student, teacher, tokenizer, data, **overrides):
    return GKDTrainer(student, teacher, gkd_args(tmp_path, **overrides), train_dataset=data["train"],
                      processing_class=tokenizer, teacher_processing_class=tokenizer)


def one_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def trl_loss_and_grads(tmp_path, student, teacher, tokenizer, data, batch, beta, num_items):
    """TRL's own GKDTrainer.compute_loss on the same batch, with TRL's own config."""
    trl = TRLGKDTrainer(student, teacher, gkd_args(tmp_path / "trl", TRLGKDConfig, beta=beta),
                        data_collator=PromptCompletionCollator(tokenizer, 64), train_dataset=data["train"],
                        processing_class=tokenizer)
    student.zero_grad()
    loss = trl.compute_loss(trl.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_neutral_settings_equal_trls_gkd_loss_and_gradients(tmp_path, student, teacher, bpe_tokenizer, demo_data,
                                                            beta):
    ours = make_trainer(tmp_path, copy.deepcopy(student), teacher, bpe_tokenizer, demo_data, beta=beta)
    batch = one_batch(ours)
    num_items = (batch["labels"][:, 1:] != -100).sum()
    ours.model.zero_grad()
    loss = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ours.model.named_parameters()}

    trl_loss, trl_grads = trl_loss_and_grads(tmp_path, copy.deepcopy(student), teacher, bpe_tokenizer, demo_data,
                                             batch, beta, num_items)
    assert loss.item() > 1e-3  # untrained models: close distributions, but not equal
    torch.testing.assert_close(loss.detach(), trl_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_kd_temperature_applies_to_the_loss(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    """TRL's GKD loss ignores the temperature; here `kd_temperature` divides both logits (× T² if asked)."""
    trainer = make_trainer(tmp_path, student, teacher, bpe_tokenizer, demo_data, beta=0.5, kd_temperature=3.0,
                           kd_temperature_squared=False)
    batch = one_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        expected = TRLGKDTrainer.generalized_jsd_loss(student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1],
                                                      labels=batch["labels"][:, 1:], beta=0.5, temperature=3.0)
        at_one = TRLGKDTrainer.generalized_jsd_loss(student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1],
                                                    labels=batch["labels"][:, 1:], beta=0.5, temperature=1.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - at_one.item()) > 1e-3


def test_on_policy_training_samples_from_the_student_and_learns(tmp_path, student, teacher, bpe_tokenizer,
                                                                demo_data, monkeypatch):
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    samples = []
    real = TRLGKDTrainer.generate_on_policy_outputs

    def counting(model, inputs, generation_config):
        samples.append(model)
        return real(model, inputs, generation_config)

    monkeypatch.setattr(TRLGKDTrainer, "generate_on_policy_outputs", staticmethod(counting))
    trainer = make_trainer(tmp_path, student, teacher, bpe_tokenizer, demo_data, lmbda=0.5, max_steps=16,
                           kd_weight=0.8, kd_temperature=2.0, teacher_logit_noise_std=0.5, divergence="reverse_kl",
                           save_strategy="steps", save_steps=16)
    trainer.train()
    assert 2 <= len(samples) <= 14  # lmbda = 0.5: some batches on-policy, some from the dataset
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert all(name in trainer.state.log_history[0] for name in ("ce_loss", "kd_loss", "mean_token_accuracy"))
    assert all(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert (tmp_path / "out" / "checkpoint-16" / "model.safetensors").exists()


def test_on_policy_generation_keeps_the_kv_cache_under_gradient_checkpointing(tmp_path, student, teacher,
                                                                             bpe_tokenizer, demo_data):
    """With gradient checkpointing on, the student still generates with its KV cache (each decoding step feeds one
    new token), and trains with checkpointing on again afterwards."""
    trainer = make_trainer(tmp_path, student, teacher, bpe_tokenizer, demo_data, lmbda=1.0, max_steps=1,
                           gradient_checkpointing=True, max_new_tokens=6)
    fed, checkpointing = [], []

    def record(module, args, kwargs):
        fed.append(kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else None)
        checkpointing.append(trainer.accelerator.unwrap_model(trainer.model).is_gradient_checkpointing)

    handle = trainer.accelerator.unwrap_model(trainer.model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()
    # the prompt, then five steps of one token each (later forwards without checkpointing: the first-batch head check)
    generation = [length for length, on in zip(fed, checkpointing) if not on]
    assert generation[0] > 1 and generation[1:6] == [1] * 5, generation
    assert checkpointing[-1] and trainer.accelerator.unwrap_model(trainer.model).is_gradient_checkpointing


def test_gkd_config_keeps_one_beta(tmp_path):
    with pytest.raises(ValueError, match=r"jsd_beta \(0.3\) and beta \(0.5\) are the same setting in GKDConfig: "
                                         "set beta only."):
        gkd_args(tmp_path, jsd_beta=0.3)
    # beta = 0 and 1 run as forward and reverse KL, without rewriting the config's fields.
    for beta, divergence in ((0.0, "forward_kl"), (1.0, "reverse_kl"), (0.3, "jsd")):
        config = gkd_args(tmp_path, beta=beta)
        assert config.divergence == "jsd" and config.jsd_beta is None
        assert config.loss_settings().divergence == divergence and config.loss_settings().jsd_beta == beta


def test_gkd_config_round_trips_and_checks_beta_only_where_used(tmp_path):
    """TRL's scripts set beta whatever the divergence: a beta the loss never reads is not an error, and a config
    survives `dataclasses.replace` (which `__post_init__` rewriting fields used to break)."""
    import dataclasses

    config = gkd_args(tmp_path, beta=0.0)
    copy_ = dataclasses.replace(config)
    assert (copy_.beta, copy_.divergence, copy_.jsd_beta) == (0.0, "jsd", None)
    assert copy_.loss_settings() == config.loss_settings()
    assert gkd_args(tmp_path, beta=0.0, divergence="reverse_kl").loss_settings().divergence == "reverse_kl"
    assert dataclasses.replace(gkd_args(tmp_path, beta=1.0), lmbda=0.5).loss_settings().divergence == "reverse_kl"
    with pytest.raises(ValueError, match=r"^beta must be in \(0, 1\)"):
        gkd_args(tmp_path, beta=1.5)


def test_prompt_completion_collator_masks_prompts_and_left_pads_them(bpe_tokenizer):
    collate = PromptCompletionCollator(bpe_tokenizer, max_length=64)
    batch = collate([{"prompt": "What is 2 + 3?", "completion": " 5"},
                     {"prompt": "Define a long glossary term please:", "completion": " a definition here"}])
    for row in range(2):
        prompt = batch["prompts"][row][batch["prompt_attention_mask"][row] == 1]
        length = len(prompt)
        assert torch.equal(batch["input_ids"][row, :length], prompt)
        assert (batch["labels"][row, :length] == -100).all() and batch["labels"][row, length] != -100
    assert batch["prompt_attention_mask"][0, 0] == 0 or batch["prompt_attention_mask"][1, 0] == 0  # left-padded
