"""KDTrainer on the demo task: real short trainings, checked for what they change and what they write."""

import os
import textwrap

import pytest
import torch
from trl import SFTConfig

from kd_trainers import KDConfig, KDTrainer
from kd_trainers.demo import demo_model, load_demo_dataset
from kd_trainers.losses import distillation_loss


def kd_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), bf16=False, max_steps=6, per_device_train_batch_size=8,
                  learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                  max_length=64, kd_temperature=2.0, kd_weight=0.5, seed=0)
    values.update(overrides)
    return KDConfig(**values)


def make_trainer(tmp_path, student, teacher, tokenizer, data, **overrides):
    return KDTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path, **overrides),
                     train_dataset=data["train"], processing_class=tokenizer, teacher_processing_class=tokenizer)


def losses_of(trainer, key="loss"):
    return [log[key] for log in trainer.state.log_history if key in log]


def test_kd_trains_student_and_leaves_teacher_untouched(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer = make_trainer(tmp_path, student, teacher, bpe_tokenizer, demo_data, max_steps=15)
    trainer.train()

    losses = losses_of(trainer)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert losses_of(trainer, "ce_loss") and losses_of(trainer, "kd_loss") and losses_of(trainer, "mean_token_accuracy")
    for log in trainer.state.log_history:
        if "ce_loss" in log:  # the logged parts add up to the loss (each a per-token mean of one micro-batch)
            assert log["loss"] == pytest.approx(0.5 * log["ce_loss"] + 0.5 * log["kd_loss"], rel=1e-4)
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, student_before[n])]
    assert len(changed) == len(student_before)
    for name, param in teacher.named_parameters():
        assert torch.equal(param, teacher_before[name]) and not param.requires_grad
    assert not trainer.teacher_model.training
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}


def test_trainer_loss_equals_reference_on_full_logits(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    """One batch through compute_loss equals the readable reference on the models' own full logits."""
    trainer = make_trainer(tmp_path, student, teacher, bpe_tokenizer, demo_data, divergence="reverse_kl",
                           kd_weight=0.3, kd_temperature=1.5)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(student, batch)
    model_inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits
    reference = distillation_loss(student(**model_inputs).logits[:, :-1], teacher_logits[:, :-1],
                                  batch["labels"][:, 1:], divergence="reverse_kl", temperature=1.5, kd_weight=0.3)
    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_is_exact(tmp_path, bpe_tokenizer, demo_data):
    """Batch 8 in one step and 4 x 2 accumulated reach the same weights after one optimizer step."""
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        student = demo_model("llama", bpe_tokenizer, "student", seed=2)
        teacher = demo_model("llama", bpe_tokenizer, "teacher", seed=1)
        trainer = make_trainer(tmp_path, student, teacher, bpe_tokenizer, demo_data, max_steps=1,
                               per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                               teacher_logit_noise_std=0.0, optim="sgd", learning_rate=1.0, max_grad_norm=0.0)
        trainer.train()
        results.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("data_format", ["text", "messages", "conversational_prompt_completion"])
def test_every_sft_dataset_format_trains(tmp_path, student, teacher, bpe_tokenizer, data_format):
    data = load_demo_dataset(data_format)
    trainer = make_trainer(tmp_path, student, teacher, bpe_tokenizer, data, max_steps=3)
    trainer.train()
    assert len(losses_of(trainer, "kd_loss")) == 3


def test_packing_peft_and_eval(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    from peft import LoraConfig

    trainer = KDTrainer(
        model=student, teacher_model=teacher, train_dataset=demo_data["train"],
        eval_dataset=demo_data["test"].select(range(16)), processing_class=bpe_tokenizer,
        teacher_processing_class=bpe_tokenizer,
        args=kd_args(tmp_path, packing=True, max_length=128, eval_strategy="steps", eval_steps=3, max_steps=3),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert lora_before and all(not torch.equal(p, lora_before[n])
                               for n, p in trainer.model.named_parameters() if n in lora_before)
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert evals and {"eval_ce_loss", "eval_kd_loss"} <= set(evals[0])


@pytest.mark.slow
def test_teacher_noise_is_reproducible_from_the_seed(tmp_path, bpe_tokenizer, demo_data):
    def final_weights(seed, noise):
        student = demo_model("llama", bpe_tokenizer, "student", seed=2)
        teacher = demo_model("llama", bpe_tokenizer, "teacher", seed=1)
        make_trainer(tmp_path, student, teacher, bpe_tokenizer, demo_data, max_steps=2, seed=seed, data_seed=0,
                     teacher_logit_noise_std=noise, kd_weight=1.0).train()
        return torch.cat([p.detach().flatten() for p in student.parameters()])

    first, again = final_weights(0, 5.0), final_weights(0, 5.0)
    assert torch.equal(first, again)
    assert not torch.equal(first, final_weights(1, 5.0))
    assert not torch.equal(first, final_weights(0, 0.0))


def test_model_card_records_kd_settings(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    trainer = make_trainer(tmp_path, student, teacher, bpe_tokenizer, demo_data, max_steps=1, divergence="jsd",
                           jsd_beta=0.3, teacher_logit_noise_std=1.0)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name="demo-student")
    card = open(os.path.join(trainer.args.output_dir, "README.md")).read()
    assert "knowledge-distillation" in card and "kd_trainers" in card
    for row in ("| `divergence` | jsd |", "| `jsd_beta` | 0.3 |", "| `kd_temperature` | 2.0 |",
                "| `kd_weight` | 0.5 |", "| `teacher_logit_noise_std` | 1.0 |"):
        assert row in card
    assert os.path.exists(os.path.join(trainer.args.output_dir, "model.safetensors"))


def test_different_tokenizer_fails_before_training(tmp_path, student, bpe_tokenizer, wordpiece_tokenizer, demo_data):
    teacher = demo_model("llama", wordpiece_tokenizer, "teacher", seed=1)
    with pytest.raises(ValueError) as error:
        KDTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=demo_data["train"],
                  processing_class=bpe_tokenizer, teacher_processing_class=wordpiece_tokenizer)
    message = str(error.value)
    assert message.startswith("The student (<in-memory LlamaForCausalLM>, 640 tokens) and the teacher "
                              "(<in-memory LlamaForCausalLM>, 480 tokens) use different tokenizers:")
    assert "DSKDTrainer" in message


def test_same_size_different_tokens_is_caught(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    """Like Llama-2 vs Mistral: same number of entries, different tokens. A size check would pass this."""
    import json

    from transformers import PreTrainedTokenizerFast

    state = json.loads(bpe_tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    vocab["Ġstands"], vocab["Ġanswer"] = vocab["Ġanswer"], vocab["Ġstands"]  # two ids swap their tokens
    swapped = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer.backend_tokenizer.from_str(json.dumps(state)),
                                      eos_token="</s>", pad_token="<pad>", bos_token="<s>")
    assert len(swapped) == len(bpe_tokenizer)
    with pytest.raises(ValueError, match=r"2 token ids differ \(id \d+: 'Ġ\w+' vs 'Ġ\w+', id \d+: 'Ġ\w+' vs 'Ġ\w+'\)"):
        KDTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=demo_data["train"],
                  processing_class=bpe_tokenizer, teacher_processing_class=swapped)


def test_in_memory_teacher_without_tokenizer_uses_the_students_with_one_warning(tmp_path, student, teacher,
                                                                              bpe_tokenizer, demo_data):
    """TRL's call (`teacher_model=<model>`, no teacher tokenizer) is accepted: the student's tokenizer is assumed, after
    the checks, with one warning that says so; the loss is the one with the tokenizer given explicitly."""
    from kd_trainers.teachers.loading import AssumedTeacherTokenizer

    with pytest.warns(AssumedTeacherTokenizer, match=r"assuming it uses the student's .* 640 tokens") as caught:
        trainer = KDTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path),
                            train_dataset=demo_data["train"], processing_class=bpe_tokenizer)
    assert len([w for w in caught if w.category is AssumedTeacherTokenizer]) == 1
    assert trainer.teacher_processing_class is bpe_tokenizer
    explicit = make_trainer(tmp_path, student, teacher, bpe_tokenizer, demo_data)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    torch.testing.assert_close(trainer.compute_loss(student, batch), explicit.compute_loss(student, batch))


def test_in_memory_teacher_with_another_head_size_points_to_dskd(tmp_path, student, bpe_tokenizer, demo_data):
    bigger = demo_model("llama", bpe_tokenizer, "teacher", seed=1, vocab_size=len(bpe_tokenizer) + 64)
    with pytest.raises(ValueError, match=r"output head has 704 rows where the student's has 640: a different "
                                         r"vocabulary size.*DSKDTrainer"):
        KDTrainer(model=student, teacher_model=bigger, args=kd_args(tmp_path), train_dataset=demo_data["train"],
                  processing_class=bpe_tokenizer)
    smaller = demo_model("llama", bpe_tokenizer, "teacher", seed=1, vocab_size=len(bpe_tokenizer) - 40)
    with pytest.raises(ValueError, match=r"output head has 600 rows, fewer than the student's tokenizer's 640 "
                                         r"tokens.*DSKDTrainer"):
        KDTrainer(model=student, teacher_model=smaller, args=kd_args(tmp_path), train_dataset=demo_data["train"],
                  processing_class=bpe_tokenizer)


def test_in_memory_teacher_with_other_special_tokens_is_refused(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    teacher.config.eos_token_id = bpe_tokenizer.eos_token_id + 1
    with pytest.raises(ValueError, match=rf"its config's eos_token_id is {bpe_tokenizer.eos_token_id + 1} where the "
                                         rf"student's tokenizer has {bpe_tokenizer.eos_token_id}"):
        KDTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=demo_data["train"],
                  processing_class=bpe_tokenizer)


def test_missing_teacher_is_a_clear_error(tmp_path, student, bpe_tokenizer, demo_data):
    with pytest.raises(ValueError, match=r"^KDTrainer needs a teacher: pass teacher_model=<model or name> or set "
                                         r"KDConfig.teacher_model_name_or_path.$"):
        KDTrainer(model=student, args=kd_args(tmp_path), train_dataset=demo_data["train"],
                  processing_class=bpe_tokenizer)


@pytest.mark.parametrize("field,value,message", [
    ("divergence", "kl", "divergence must be one of ['forward_kl', 'jsd', 'reverse_kl', 'skew_forward_kl', "
                         "'skew_reverse_kl', 'tvd'], got 'kl'."),
    ("kd_weight", 2.0, "kd_weight must be in [0, 1], got 2.0."),
    ("kd_temperature", -1.0, "kd_temperature must be a finite number > 0, got -1.0."),
    ("kd_temperature", float("inf"), "kd_temperature must be a finite number > 0, got inf."),
    ("teacher_logit_noise_std", -0.5, "teacher_logit_noise_std must be a finite number >= 0, got -0.5."),
    ("jsd_beta", 0.0, None),  # forward KL never reads beta: accepted
    ("skew_alpha", 1.0, None),
    ("loss_chunk_size", 0, "loss_chunk_size must be a positive integer or None, got 0."),
    ("loss_memory_budget_mb", 0, "loss_memory_budget_mb must be a finite number of MiB > 0 or None, got 0."),
    ("loss_memory_budget_mb", "64MB", "loss_memory_budget_mb must be a finite number of MiB > 0 or None, got '64MB'."),
])
def test_config_rejects_bad_values_with_exact_messages(tmp_path, field, value, message):
    if message is None:
        assert getattr(kd_args(tmp_path, **{field: value}), field) == value
        return
    with pytest.raises(ValueError) as error:
        kd_args(tmp_path, **{field: value})
    assert str(error.value) == message


def test_chunk_size_and_memory_budget_are_one_choice(tmp_path):
    with pytest.raises(ValueError) as error:
        kd_args(tmp_path, loss_chunk_size=32, loss_memory_budget_mb=64)
    assert str(error.value) == ("loss_chunk_size=32 and loss_memory_budget_mb=64 both size the loss's chunks: set one "
                                "of them.")


def test_teacher_loaded_by_path_with_adapter(tmp_path, student, teacher, bpe_tokenizer, demo_data):
    """A teacher given by path: its tokenizer is found beside it, and a LoRA adapter is merged in."""
    from peft import LoraConfig, get_peft_model

    teacher_dir, adapter_dir = tmp_path / "teacher", tmp_path / "adapter"
    teacher.save_pretrained(teacher_dir)
    bpe_tokenizer.save_pretrained(teacher_dir)
    adapted = get_peft_model(demo_model("llama", bpe_tokenizer, "teacher", seed=1),
                             LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    adapted.save_pretrained(adapter_dir)
    trainer = KDTrainer(model=student, args=kd_args(tmp_path, teacher_model_name_or_path=str(teacher_dir),
                                                    teacher_adapter_name_or_path=str(adapter_dir), max_steps=2),
                        train_dataset=demo_data["train"], processing_class=bpe_tokenizer)
    merged = adapted.merge_and_unload()
    for name, param in trainer.teacher_model.named_parameters():
        torch.testing.assert_close(param, merged.get_parameter(name))
    assert trainer.teacher_name == str(teacher_dir)
    trainer.train()


DROP_IN_SCRIPT = textwrap.dedent("""
    from trl import SFTConfig, SFTTrainer
    from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset

    tokenizer = demo_tokenizer("bpe")
    dataset = load_demo_dataset()["train"]
    model = demo_model("llama", tokenizer, "student", seed=2)
    args = SFTConfig(output_dir=OUTPUT, max_steps=3, per_device_train_batch_size=8, bf16=False, report_to=[],
                     save_strategy="no", logging_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
""")


def test_drop_in_replacement_of_sft_trainer(tmp_path):
    """A TRL SFT script runs as KD after changing the import and passing a teacher, nothing else."""
    sft_namespace = {"OUTPUT": str(tmp_path / "sft")}
    exec(DROP_IN_SCRIPT, sft_namespace)
    kd_script = DROP_IN_SCRIPT.replace("from trl import SFTConfig, SFTTrainer",
                                       "from trl import SFTConfig\nfrom kd_trainers import KDTrainer as SFTTrainer")
    kd_script = kd_script.replace("processing_class=tokenizer)",
                                  "processing_class=tokenizer,\n                     "
                                  "teacher_model=demo_model('llama', tokenizer, 'teacher', seed=1))")
    kd_namespace = {"OUTPUT": str(tmp_path / "kd")}
    exec(kd_script, kd_namespace)
    trainer = kd_namespace["trainer"]
    assert isinstance(trainer.args, KDConfig) and isinstance(trainer, KDTrainer)
    assert trainer.args.max_steps == 3 and trainer.args.output_dir == str(tmp_path / "kd")
    assert len(losses_of(trainer, "kd_loss")) == 3
    assert isinstance(sft_namespace["trainer"].args, SFTConfig)


def test_a_student_built_in_memory_without_processing_class_is_told_what_to_pass(tmp_path, student, teacher,
                                                                               demo_data):
    """TRL loads the tokenizer from the model's name; a model built in memory has none, and the error says so."""
    from kd_trainers import GKDConfig, GKDTrainer

    rows = demo_data["train"].select(range(8))
    with pytest.raises(ValueError, match=r"processing_class is missing: the student <in-memory LlamaForCausalLM> was "
                                         r"built in memory.*Pass processing_class=<the student's tokenizer>"):
        KDTrainer(model=student, teacher_model=teacher, args=kd_args(tmp_path), train_dataset=rows)
    with pytest.raises(ValueError, match="processing_class is missing: the student <in-memory LlamaForCausalLM>"):
        GKDTrainer(model=student, teacher_model=teacher, train_dataset=rows,
                   args=GKDConfig(output_dir=str(tmp_path / "gkd"), report_to=[], bf16=False))
