"""Settings that used to be silently ignored, or misread, each shown to take effect through the trainers: DSKD's
teacher temperature, an MoE student's router loss, SFT's own CE variants, an accumulated batch without label tokens,
heads the engine would compute wrongly, noise keyed to token positions, on-policy GKD normalisation, YAML words,
the teacher-answer cache and the report's intervals."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as scipy_stats
from transformers import GraniteConfig, GraniteForCausalLM, HyperCLOVAXConfig, MixtralConfig, MixtralForCausalLM
from trl import SFTConfig, SFTTrainer

from kd_trainers import DSKDConfig, DSKDTrainer, GKDConfig, GKDTrainer, KDConfig, KDTrainer
from kd_trainers.demo import demo_model
from kd_trainers.losses import distillation_loss

COMMON = dict(bf16=False, max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
              save_strategy="no", report_to=[], disable_tqdm=True, max_length=64, seed=0)


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def small(data, rows=16):
    return data["train"].select(range(rows))


# ---------------------------------------------------------------------------------------------------------------------
# DSKD's teacher temperature reaches the loss


def test_dskd_teacher_temperature_changes_the_t2s_kd_term_through_the_trainer(tmp_path, bpe_tokenizer, demo_data):
    def trainer(tau_t):
        student = demo_model("llama", bpe_tokenizer, "student", seed=2)
        teacher = demo_model("llama", bpe_tokenizer, "teacher", seed=1)
        args = DSKDConfig(output_dir=str(tmp_path / str(tau_t)), teacher_temperature=tau_t, **COMMON)
        return DSKDTrainer(student, teacher, args=args, train_dataset=small(demo_data),
                           processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer)

    plain, tempered = trainer(1.0), trainer(1.5)
    assert tempered.loss_settings.teacher_temperature == 1.5
    batch = first_batch(plain)
    losses = {}
    for name, run in (("plain", plain), ("tempered", tempered)):
        loss = run.compute_loss(run.model, batch)
        run.log({})
        losses[name] = (loss.item(), {k: float(run.state.log_history[-1][k]) for k in ("ce_loss", "t2s_ce_loss",
                                                                                  "t2s_kd_loss", "s2t_kd_loss")})
    (plain_loss, plain_parts), (tempered_loss, tempered_parts) = losses["plain"], losses["tempered"]
    # Only the t2s KD target is tempered: that term changes, the others do not, and the loss moves by w times it.
    assert tempered_parts["t2s_kd_loss"] != pytest.approx(plain_parts["t2s_kd_loss"], rel=1e-2)
    assert tempered_loss - plain_loss == pytest.approx(
        0.5 * (tempered_parts["t2s_kd_loss"] - plain_parts["t2s_kd_loss"]), rel=1e-2)
    for key in ("ce_loss", "t2s_ce_loss", "s2t_kd_loss"):
        assert tempered_parts[key] == pytest.approx(plain_parts[key], rel=1e-6)
    assert tempered.kd_settings()["teacher_temperature"] == 1.5


# ---------------------------------------------------------------------------------------------------------------------
# An MoE student keeps its router loss


def mixtral_student(tokenizer):
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.3, output_router_logits=True, tie_word_embeddings=False,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return MixtralForCausalLM(config)


def test_moe_student_at_kd_weight_zero_is_sft_exactly(tmp_path, bpe_tokenizer, demo_data):
    student = mixtral_student(bpe_tokenizer)
    sft = SFTTrainer(copy.deepcopy(student), SFTConfig(output_dir=str(tmp_path / "sft"), **COMMON),
                     train_dataset=small(demo_data), processing_class=bpe_tokenizer)
    kd = KDTrainer(copy.deepcopy(student), KDConfig(output_dir=str(tmp_path / "kd"), kd_weight=0.0, **COMMON),
                   train_dataset=small(demo_data), processing_class=bpe_tokenizer,
                   teacher_model=copy.deepcopy(student), teacher_processing_class=bpe_tokenizer)
    assert sft.aux_loss_enabled and kd.aux_loss_enabled
    batch = first_batch(sft)
    assert torch.equal(kd.compute_loss(kd.model, dict(batch)), sft.compute_loss(sft.model, dict(batch)))


def test_moe_student_in_dskd_at_kd_weight_zero_is_sft_and_keeps_its_router_loss_beside_kd(tmp_path, bpe_tokenizer,
                                                                                         demo_data):
    student = mixtral_student(bpe_tokenizer)
    sft = SFTTrainer(copy.deepcopy(student), SFTConfig(output_dir=str(tmp_path / "sft"), **COMMON),
                     train_dataset=small(demo_data), processing_class=bpe_tokenizer)
    batch = first_batch(sft)
    losses = {}
    for weight in (0.0, 0.5):
        dskd = DSKDTrainer(copy.deepcopy(student), copy.deepcopy(student),
                           args=DSKDConfig(output_dir=str(tmp_path / str(weight)), kd_weight=weight, **COMMON),
                           train_dataset=small(demo_data), processing_class=bpe_tokenizer,
                           teacher_processing_class=bpe_tokenizer)
        losses[weight] = dskd.compute_loss(dskd.model, dict(batch))
        dskd.log({})
        logged = dskd.state.log_history[-1]
    assert torch.equal(losses[0.0], sft.compute_loss(sft.model, dict(batch)))
    assert float(logged["aux_loss"]) > 0  # beside the dual-space loss, the router loss is there and logged
    parts = sum(float(logged[k]) for k in ("t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss"))
    expected = 0.5 * float(logged["ce_loss"]) + 0.5 * parts + 0.3 * float(logged["aux_loss"])
    assert losses[0.5].item() == pytest.approx(expected, rel=1e-4)


def test_moe_student_keeps_its_router_loss_beside_kd(tmp_path, bpe_tokenizer, demo_data):
    """With the teacher a copy of the student the KD term is 0, so the loss is (1 − w)·NLL + coef·aux, the router
    loss computed by the model's own forward."""
    student = mixtral_student(bpe_tokenizer)
    kd = KDTrainer(student, KDConfig(output_dir=str(tmp_path / "kd"), kd_weight=0.4, **COMMON),
                   train_dataset=small(demo_data), processing_class=bpe_tokenizer,
                   teacher_model=copy.deepcopy(student), teacher_processing_class=bpe_tokenizer)
    batch = first_batch(kd)
    loss = kd.compute_loss(kd.model, dict(batch))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        own = student(**inputs, output_router_logits=True, use_cache=False)
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(own.logits[:, :-1].reshape(-1, own.logits.size(-1)), labels.reshape(-1), ignore_index=-100)
    assert own.aux_loss > 0
    torch.testing.assert_close(loss, 0.6 * nll + 0.3 * own.aux_loss, rtol=1e-4, atol=1e-5)
    kd.log({})
    assert kd.state.log_history[-1]["aux_loss"] == pytest.approx(own.aux_loss.item(), rel=1e-4)


def test_gkd_takes_trls_call_with_an_in_memory_teacher(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    """The call of TRL's GKD documentation: model and teacher objects, the student's tokenizer, nothing else."""
    from kd_trainers.teachers.loading import AssumedTeacherTokenizer

    args = GKDConfig(output_dir=str(tmp_path / "gkd"), lmbda=0.0, **COMMON)
    with pytest.warns(AssumedTeacherTokenizer):
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=small(demo_data),
                             processing_class=bpe_tokenizer)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    bigger = demo_model("llama", bpe_tokenizer, "teacher", seed=1, vocab_size=len(bpe_tokenizer) + 64)
    with pytest.raises(ValueError, match=r"different vocabulary size.*DSKDTrainer"):
        GKDTrainer(model=student, teacher_model=bigger, args=args, train_dataset=small(demo_data),
                   processing_class=bpe_tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# SFT's CE variants: applied at kd_weight=0, refused beside KD


@pytest.mark.parametrize("field,value", [("loss_type", "dft"), ("label_smoothing_factor", 0.1)])
def test_sft_loss_variants_apply_at_kd_weight_zero_and_are_refused_beside_kd(tmp_path, student, teacher,
                                                                             bpe_tokenizer, demo_data, field, value):
    sft = SFTTrainer(copy.deepcopy(student), SFTConfig(output_dir=str(tmp_path / "sft"), **{field: value}, **COMMON),
                     train_dataset=small(demo_data), processing_class=bpe_tokenizer)
    kd = KDTrainer(copy.deepcopy(student), KDConfig(output_dir=str(tmp_path / "kd"), kd_weight=0.0,
                                                    **{field: value}, **COMMON),
                   train_dataset=small(demo_data), processing_class=bpe_tokenizer, teacher_model=teacher,
                   teacher_processing_class=bpe_tokenizer)
    batch = first_batch(sft)
    plain = SFTTrainer(copy.deepcopy(student), SFTConfig(output_dir=str(tmp_path / "plain"), **COMMON),
                       train_dataset=small(demo_data), processing_class=bpe_tokenizer)
    sft_loss = sft.compute_loss(sft.model, dict(batch))
    assert sft_loss != plain.compute_loss(plain.model, dict(batch))  # the setting does change SFT's loss
    assert torch.equal(kd.compute_loss(kd.model, dict(batch)), sft_loss)
    with pytest.raises(ValueError, match=rf"^{field}={value!r} .* distillation loss \(kd_weight=0.5\)"):
        KDConfig(output_dir=str(tmp_path / "x"), kd_weight=0.5, **{field: value}, **COMMON)
    with pytest.raises(ValueError, match=rf"^{field}={value!r}"):  # the drop-in path: an SFTConfig with the setting
        KDTrainer(copy.deepcopy(student), SFTConfig(output_dir=str(tmp_path / "y"), **{field: value}, **COMMON),
                  train_dataset=small(demo_data), processing_class=bpe_tokenizer, teacher_model=teacher)


def test_compute_loss_func_applies_at_kd_weight_zero_and_is_refused_beside_kd(tmp_path, student, teacher,
                                                                               bpe_tokenizer, demo_data):
    def doubled(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1]
        return 2 * F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)

    kd = KDTrainer(copy.deepcopy(student), KDConfig(output_dir=str(tmp_path / "kd"), kd_weight=0.0, **COMMON),
                   train_dataset=small(demo_data), processing_class=bpe_tokenizer, teacher_model=teacher,
                   teacher_processing_class=bpe_tokenizer, compute_loss_func=doubled)
    batch = first_batch(kd)
    with torch.no_grad():
        expected = doubled(student(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"])
    torch.testing.assert_close(kd.compute_loss(kd.model, dict(batch)).detach(), expected)
    with pytest.raises(ValueError, match=r"^compute_loss_func .* \(kd_weight=0.5\) cannot include it"):
        KDTrainer(copy.deepcopy(student), KDConfig(output_dir=str(tmp_path / "x"), kd_weight=0.5, **COMMON),
                  train_dataset=small(demo_data), processing_class=bpe_tokenizer, teacher_model=teacher,
                  teacher_processing_class=bpe_tokenizer, compute_loss_func=doubled)


# ---------------------------------------------------------------------------------------------------------------------
# No label token in the accumulated batch


def test_an_accumulated_batch_without_label_tokens_gives_zero_loss_and_gradients(tmp_path, student, teacher,
                                                                                 bpe_tokenizer, demo_data):
    kd = KDTrainer(student, KDConfig(output_dir=str(tmp_path / "kd"), kd_weight=0.5, **COMMON),
                   train_dataset=small(demo_data), processing_class=bpe_tokenizer, teacher_model=teacher,
                   teacher_processing_class=bpe_tokenizer)
    batch = first_batch(kd)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = kd.compute_loss(kd.model, batch, num_items_in_batch=torch.tensor(0))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in student.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Heads the engine would compute wrongly are caught on the first batch


def tiny_config(config_class, tokenizer, **extra):
    return config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **extra)


class MultiplyingGranite(GraniteForCausalLM):
    """A head no config field describes: it multiplies by `logits_scaling` where Granite divides (as HyperCLOVA X
    does, but under Granite's model type), standing for any custom head an engine reading configs cannot know."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * self.config.logits_scaling ** 2
        return output


def kd_on(tmp_path, student, teacher, tokenizer, data, kd_weight=0.5):
    return KDTrainer(student, KDConfig(output_dir=str(tmp_path / "kd"), kd_weight=kd_weight, **COMMON),
                     train_dataset=small(data), processing_class=tokenizer, teacher_model=teacher,
                     teacher_processing_class=tokenizer)


def test_a_head_the_engine_computes_differently_is_refused_on_the_first_batch(tmp_path, student, bpe_tokenizer,
                                                                              demo_data):
    torch.manual_seed(0)
    teacher = MultiplyingGranite(tiny_config(GraniteConfig, bpe_tokenizer, logits_scaling=4.0))
    trainer = kd_on(tmp_path, student, teacher, bpe_tokenizer, demo_data)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with pytest.raises(ValueError, match=r"The teacher's logits as the distillation loss computes them differ from its "
                                         r"own forward \(MultiplyingGranite.*logit scale 0.25.*wrong objective"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())  # stopped before any step


@pytest.mark.parametrize("config_class,extra", [(GraniteConfig, {"logits_scaling": 4.0}),
                                                (HyperCLOVAXConfig, {"logits_scaling": 4.0})])
def test_scaled_heads_pass_the_check_and_the_loss_equals_the_reference(tmp_path, bpe_tokenizer, demo_data,
                                                                       config_class, extra):
    """Granite divides by logits_scaling, HyperCLOVA X multiplies: both distil with their own logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(tiny_config(config_class, bpe_tokenizer, **extra))
    teacher = AutoModelForCausalLM.from_config(tiny_config(config_class, bpe_tokenizer, **extra))
    trainer = kd_on(tmp_path, student, teacher, bpe_tokenizer, demo_data)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    reference = distillation_loss(student(**inputs).logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:],
                                  kd_weight=0.5)
    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Noise: independent of the chunk size, off in evaluation unless asked


def test_trainer_noise_does_not_depend_on_the_chunk_size_and_eval_is_noise_free(tmp_path, student, teacher,
                                                                                bpe_tokenizer, demo_data):
    def trainer(**overrides):
        args = KDConfig(output_dir=str(tmp_path / "kd"), kd_weight=1.0, kd_temperature=2.0, **{**COMMON, **overrides})
        return KDTrainer(student, args, train_dataset=small(demo_data), eval_dataset=small(demo_data, 8),
                         processing_class=bpe_tokenizer, teacher_model=teacher, teacher_processing_class=bpe_tokenizer)

    batch = first_batch(trainer())

    def train_loss(**overrides):
        run = trainer(**overrides)
        run.model.train()
        return run.compute_loss(run.model, dict(batch)).item()

    noisy = train_loss(teacher_logit_noise_std=3.0)
    assert noisy != pytest.approx(train_loss(), rel=1e-3)
    for chunk in (1, 5, 1000):  # a run resumed with another loss_chunk_size draws the same noise
        assert train_loss(teacher_logit_noise_std=3.0, loss_chunk_size=chunk) == pytest.approx(noisy, rel=1e-5)
    clean_eval = trainer().evaluate()["eval_loss"]
    assert trainer(teacher_logit_noise_std=3.0).evaluate()["eval_loss"] == pytest.approx(clean_eval, rel=1e-6)
    noisy_eval = trainer(teacher_logit_noise_std=3.0, teacher_logit_noise_in_eval=True).evaluate()["eval_loss"]
    assert noisy_eval != pytest.approx(clean_eval, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# On-policy GKD divides by the tokens its loss covers


def test_on_policy_gkd_normalises_by_the_generated_tokens(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    """Data completions are a few tokens; the student generates up to 32. The count that divides the loss is the
    generated one, and the loss equals the full-logits reference on the generated batch."""
    args = GKDConfig(output_dir=str(tmp_path / "gkd"), lmbda=1.0, max_new_tokens=32, temperature=1.0,
                     **{**COMMON, "max_length": 128})
    trainer = GKDTrainer(student, teacher, args, train_dataset=small(demo_data), processing_class=bpe_tokenizer,
                         teacher_processing_class=bpe_tokenizer)
    data_batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    data_count = int((data_batch["labels"][:, 1:] != -100).sum())
    trainer.model_wrapped = trainer.model
    (batch,), num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, torch.device("cpu"))
    generated = int((batch["labels"][:, 1:] != -100).sum())
    assert int(num_items) == generated and generated > data_count
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch), num_items_in_batch=num_items)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    reference = distillation_loss(student(**inputs).logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:],
                                  divergence="jsd", jsd_beta=0.5, kd_weight=1.0)
    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Recipe values typed the usual way


def test_yaml_words_keep_their_text_in_string_fields_and_are_booleans_in_boolean_fields(tmp_path):
    from kd_trainers.recipe.schema import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("method: kd\nmodel_name_or_path: demo:llama/student/bpe\n"
                    "teacher_model_name_or_path: demo:llama/teacher/bpe\nsave_strategy: no\nbf16: no\n"
                    "logging_first_step: yes\ninclude_num_input_tokens_seen: no\nkd_temperature_squared: off\n")
    recipe = load_recipe(str(path), ["eval_strategy=no", "disable_tqdm=on"])
    config = recipe.config
    assert config.save_strategy == "no" and config.eval_strategy == "no"
    assert config.bf16 is False and config.logging_first_step is True and config.disable_tqdm is True
    assert config.kd_temperature_squared is False
    assert config.include_num_input_tokens_seen == "no"  # a str | bool field keeps the text
    assert load_recipe("recipes/vanilla_kd.yaml", ["save_strategy=no"]).config.save_strategy == "no"


# ---------------------------------------------------------------------------------------------------------------------
# The teacher-answer cache and the report's intervals


def test_teacher_answers_are_cached_by_prompt_content_and_generation_settings(tmp_path, bpe_tokenizer):
    from kd_trainers.recipe.evaluate import TrainedModels, teacher_predictions
    from kd_trainers.recipe.schema import load_recipe

    teacher = demo_model("llama", bpe_tokenizer, "teacher", seed=1)
    loads = []

    def loader():
        loads.append(1)
        return teacher, bpe_tokenizer

    trained = TrainedModels(teacher, bpe_tokenizer, loader)
    recipe = load_recipe("recipes/vanilla_kd.yaml")
    evaluation = {"max_new_tokens": 3, "batch_size": 2}
    first = teacher_predictions(evaluation, str(tmp_path), trained, recipe, ["What is 2 + 3?", "Define a cat:"])
    again = teacher_predictions(evaluation, str(tmp_path), trained, recipe, ["What is 2 + 3?", "Define a cat:"])
    assert again == first and len(loads) == 1  # same prompts, same settings: cached
    other = teacher_predictions(evaluation, str(tmp_path), trained, recipe, ["What is 7 + 1?", "Define a dog:"])
    assert len(loads) == 2 and len(other) == 2  # as many prompts, other content: generated again
    teacher_predictions({**evaluation, "batch_size": 1}, str(tmp_path), trained, recipe,
                        ["What is 2 + 3?", "Define a cat:"])
    assert len(loads) == 3


def test_summary_intervals_use_the_t_quantile():
    from kd_trainers.study.report import summary_table

    values = [0.1, 0.5, 0.2, 0.9, 0.4]
    table = summary_table(pd.DataFrame({"cell": ["a"] * 5, "example_id": range(5), "m": values}), ["m"])
    expected = scipy_stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / math.sqrt(5)
    assert table.loc[0, "m_ci"] == pytest.approx(expected)
    assert table.loc[0, "m_ci"] > 1.96 * np.std(values, ddof=1) / math.sqrt(5) * 1.3


def test_the_head_check_keeps_the_users_gradient_checkpointing_kwargs(tmp_path, student, teacher, bpe_tokenizer,
                                                                      demo_data):
    """The first-batch check unwraps the student as for generation, which switches checkpointing off and on again:
    it must come back with the user's `gradient_checkpointing_kwargs`, not the library defaults."""
    args = KDConfig(output_dir=str(tmp_path / "kd"), gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": True}, **COMMON)
    trainer = KDTrainer(student, args, train_dataset=small(demo_data), processing_class=bpe_tokenizer,
                        teacher_model=teacher, teacher_processing_class=bpe_tokenizer)
    trainer.train()
    layer = student.model.layers[0]
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": True}
