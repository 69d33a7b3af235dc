"""The settings contract: every field of every method's config is accounted for here, and each one either changes
the trainer's result as it should or is refused before training with a message naming it.

- `SameAsSFT`: fields that change `SFTTrainer`'s loss or batches. At `kd_weight=0` a KD trainer must *be*
  `SFTTrainer`: two optimizer steps give bit-identical weights and losses with the field set, and (unless the field
  only reorganises work) the field changes SFT's result, so the comparison is not vacuous. The SFT-only loss variants
  among them (`loss_type`, `label_smoothing_factor`) are refused beside a KD term, naming the field
  (`test_sft_only_losses_are_refused_beside_kd`).
- `KDLoss`: the distillation loss fields; the trainer's loss on a fixed batch equals the full-logits reference at
  the field's value and differs from the default (or, for the chunk size, equals it).
- `TestedIn`: method fields with their own behaviour tests, named here (the test must exist).
- `Machinery`: fields the transformers `Trainer` applies around the loss (optimizer, schedule, logging, saving,
  hub, devices, distribution), identically for `SFTTrainer` and every KD trainer; the reason is given.

A field added to TRL, transformers or this package later fails `test_every_config_field_is_accounted_for` until
someone decides which of these it is.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import os
from typing import NamedTuple

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from kd_trainers import (DSKDConfig, DSKDTrainer, GKDConfig, GOLDConfig, KDConfig, KDTrainer, MinEDConfig, SeqKDConfig,
                         ULDConfig)
from kd_trainers.demo import demo_model, load_demo_dataset
from kd_trainers.losses import LossSettings, distillation_loss
from kd_trainers.losses.settings import chunk_rows, working_buffers

TESTS = os.path.dirname(os.path.abspath(__file__))


class SameAsSFT(NamedTuple):
    values: dict
    dataset: str = "prompt_completion"
    changes: bool = True  # False: the field reorganises work (processes, columns) without changing the result


class KDLoss(NamedTuple):
    values: dict  # the field's value, with any setting it needs to be read (jsd_beta needs divergence=jsd)
    invariant: bool = False  # True: the result must not change (a performance knob)


class TestedIn(NamedTuple):
    test: str  # "file.py::test_name"; a field several methods read differently: one per method, joined by " + "


class Machinery(NamedTuple):
    reason: str


# The cross-tokenizer methods' on-policy option (the sampling settings reach generation, the batches are replaced).
ON_POLICY = "test_cross_tokenizer_on_policy.py::test_an_on_policy_batch_is_the_students_samples_tokenized_twice"
OPTIMIZER = Machinery("optimizer/scheduler setting: applied by Trainer to the gradients, not part of the loss")
LOGGING = Machinery("logging, progress or reporting only")
SAVING = Machinery("checkpointing, saving or Hub publishing; the saved files are tested in test_recipes*.py")
EVAL_FLOW = Machinery("when and how Trainer evaluates; the eval loss is the same compute_loss")
DEVICES = Machinery("device, precision, compilation or memory strategy applied by accelerate/Trainer to the models "
                    "(bf16 and ZeRO-2/3 runs are tested in test_*distributed.py and test_dskd_trainer.py)")
DISTRIBUTED = Machinery("process-group and distributed-wrapper setting; multi-process runs are tested in "
                        "test_*distributed.py")
RUN_CONTROL = Machinery("what the run does (train/eval/predict, resume); not a loss or batch setting")

CONTRACT: dict[str, object] = {
    # --- SFTTrainer's loss and batches: at kd_weight=0 the KD trainer is SFTTrainer --------------------------------
    "max_length": SameAsSFT({"max_length": 24}),
    "truncation_mode": SameAsSFT({"truncation_mode": "keep_end", "max_length": 24}, dataset="text"),
    "packing": SameAsSFT({"packing": True}),
    "packing_strategy": SameAsSFT({"packing": True, "packing_strategy": "wrapped", "max_length": 32}),
    "padding_free": SameAsSFT({"padding_free": True, "max_length": None}),
    "pad_to_multiple_of": SameAsSFT({"pad_to_multiple_of": 64}, changes=False),
    "completion_only_loss": SameAsSFT({"completion_only_loss": False}),
    "assistant_only_loss": TestedIn("test_config_contract.py::test_assistant_only_loss_is_sfts"),
    "dataset_text_field": SameAsSFT({"dataset_text_field": "question"}, dataset="text_in_question"),
    "dataset_kwargs": SameAsSFT({"dataset_kwargs": {"skip_prepare_dataset": True}}, dataset="tokenized",
                                changes=False),
    "dataset_num_proc": SameAsSFT({"dataset_num_proc": 2}, changes=False),
    "eos_token": SameAsSFT({"eos_token": "<s>"}, dataset="text"),
    "pad_token": SameAsSFT({"pad_token": "<s>"}, changes=False),
    "shuffle_dataset": SameAsSFT({"shuffle_dataset": True}),
    "chat_template_path": TestedIn("test_config_contract.py::test_chat_template_path_is_sfts"),
    "loss_type": SameAsSFT({"loss_type": "dft"}),
    "label_smoothing_factor": SameAsSFT({"label_smoothing_factor": 0.2}),
    "router_aux_loss_coef": TestedIn("test_settings_take_effect.py::test_moe_student_at_kd_weight_zero_is_sft_exactly"),
    "neftune_noise_alpha": SameAsSFT({"neftune_noise_alpha": 5.0}),
    "seed": SameAsSFT({"seed": 7}),
    "data_seed": SameAsSFT({"data_seed": 7}),
    "per_device_train_batch_size": SameAsSFT({"per_device_train_batch_size": 4}),
    "gradient_accumulation_steps": SameAsSFT({"gradient_accumulation_steps": 2}),
    # One process here: the field matters across processes (tested in test_*distributed.py), so no change here.
    "average_tokens_across_devices": SameAsSFT({"average_tokens_across_devices": False,
                                                "gradient_accumulation_steps": 2}, changes=False),
    "dataloader_drop_last": SameAsSFT({"dataloader_drop_last": True, "per_device_train_batch_size": 10,
                                       "max_steps": -1, "num_train_epochs": 1}),
    "train_sampling_strategy": SameAsSFT({"train_sampling_strategy": "sequential"}),
    "length_column_name": SameAsSFT({"length_column_name": "n", "train_sampling_strategy": "group_by_length"},
                                    changes=False),
    "remove_unused_columns": SameAsSFT({"remove_unused_columns": False}, changes=False),
    "label_names": SameAsSFT({"label_names": ["labels"]}, changes=False),
    "gradient_checkpointing": SameAsSFT({"gradient_checkpointing": True}, changes=False),
    "gradient_checkpointing_kwargs": SameAsSFT({"gradient_checkpointing": True,
                                                "gradient_checkpointing_kwargs": {"use_reentrant": False}},
                                               changes=False),
    "activation_checkpointing": SameAsSFT({"activation_checkpointing": True}, changes=False),
    "activation_checkpointing_kwargs": DEVICES,
    "model_init_kwargs": TestedIn("test_config_contract.py::test_model_init_kwargs_and_trust_remote_code_are_sfts"),
    "trust_remote_code": TestedIn("test_config_contract.py::test_model_init_kwargs_and_trust_remote_code_are_sfts"),
    "eval_packing": TestedIn("test_config_contract.py::test_eval_batches_are_sfts"),
    "per_device_eval_batch_size": TestedIn("test_config_contract.py::test_eval_batches_are_sfts"),
    "activation_offloading": DEVICES,
    "use_liger_kernel": Machinery("Liger's kernels patch the model's modules (the same for SFT and KD); its "
                                  "fused CE is refused by SFTTrainer itself. Needs liger-kernel (not installed)."),
    "liger_kernel_config": Machinery("see use_liger_kernel"),
    "use_cache": Machinery("generation-time KV cache; every training forward passes use_cache=False"),
    # --- the distillation loss -------------------------------------------------------------------------------------
    "divergence": KDLoss({"divergence": "reverse_kl"}),
    "jsd_beta": KDLoss({"divergence": "jsd", "jsd_beta": 0.2}),
    "skew_alpha": KDLoss({"divergence": "skew_forward_kl", "skew_alpha": 0.4}),
    "divergence_params": TestedIn("test_config_contract.py::test_divergence_params_reach_a_registered_divergence"),
    "kd_temperature": KDLoss({"kd_temperature": 3.0}),
    "kd_temperature_squared": KDLoss({"kd_temperature": 3.0, "kd_temperature_squared": False}),
    "kd_weight": KDLoss({"kd_weight": 0.8}),
    "loss_chunk_size": KDLoss({"loss_chunk_size": 3}, invariant=True),
    # about 3 tokens a chunk at the demo's ~640-token vocabulary (4 buffers: T = 2, w = 0.5)
    "loss_memory_budget_mb": KDLoss({"loss_memory_budget_mb": 0.03}, invariant=True),
    "loss_compile": TestedIn("test_compiled_loss.py::test_loss_compile_reaches_the_engine_and_trains"),
    "teacher_logit_noise_std": TestedIn(
        "test_settings_take_effect.py::test_trainer_noise_does_not_depend_on_the_chunk_size_and_eval_is_noise_free"),
    "teacher_logit_noise_in_eval": TestedIn(
        "test_settings_take_effect.py::test_trainer_noise_does_not_depend_on_the_chunk_size_and_eval_is_noise_free"),
    # --- the teacher ----------------------------------------------------------------------------------------------
    "teacher_model_name_or_path": TestedIn("test_kd_trainer.py::test_teacher_loaded_by_path_with_adapter"),
    "teacher_adapter_name_or_path": TestedIn("test_kd_trainer.py::test_teacher_loaded_by_path_with_adapter"),
    "teacher_cache": TestedIn("test_teacher_cache.py::test_trainer_reads_the_cache_in_place_of_the_teacher"),
    "teacher_cache_tail": TestedIn("test_teacher_cache.py::test_trainer_reads_the_cache_in_place_of_the_teacher"),
    "teacher_cache_mode": TestedIn("test_teacher_cache.py::test_sampled_cache_stores_seeded_draws_and_trains_on_them"),
    "teacher_cache_k": TestedIn("test_teacher_cache.py::test_sampled_cache_stores_seeded_draws_and_trains_on_them"),
    "teacher_cache_batch_size": TestedIn("test_teacher_cache.py::test_cache_batch_size_changes_the_forwards_only"),
    "teacher_cache_temperatures": TestedIn(
        "test_teacher_cache.py::test_cache_stores_the_tail_at_its_temperatures_and_refuses_another"),
    "teacher_server_approximate_temperature": TestedIn(
        "test_served_teacher.py::test_a_served_teacher_away_from_temperature_one_is_refused_unless_the_approximation_"
        "is_asked_for"),
    "teacher_column": TestedIn("test_several_teachers.py::test_routing_by_column_sends_each_example_to_its_teacher"),
    "teacher_url": TestedIn("test_served_teacher.py::test_served_teacher_trains_as_the_resident_teacher"),
    **{name: TestedIn("test_served_teacher.py::test_served_settings_take_effect") for name in (
        "teacher_server_k", "teacher_server_tail", "teacher_server_batch_size", "teacher_server_concurrency",
        "teacher_server_timeout", "teacher_server_prefetch")},
    "teacher_server_max_wait": TestedIn(
        "test_served_teacher.py::test_faults_are_retried_and_a_server_that_stays_down_stops_the_run_resumably"),
    "teacher_model_init_kwargs": TestedIn("test_config_contract.py::test_teacher_model_init_kwargs_load_the_teacher"),
    # --- DSKD -------------------------------------------------------------------------------------------------------
    "teacher_tokenizer_name_or_path": TestedIn(
        "test_dskd_trainer.py::test_teacher_tokenizer_from_config_path_turns_cma_on"),
    "cross_model_attention": TestedIn("test_dskd_trainer.py::test_cma_from_messages_and_forced_cma_on_one_tokenizer"),
    "projector_lr": TestedIn("test_config_contract.py::test_projector_lr_is_the_projectors_learning_rate"),
    "projector_path": TestedIn(
        "test_dskd_trainer.py::test_checkpoint_holds_projectors_saved_student_is_clean_and_resume_is_exact"),
    "projector_bias": TestedIn("test_dskd_trainer.py::test_pinv_init_maps_teacher_states_to_teacher_logits_in_student_space"),
    "projector_init": TestedIn("test_dskd_trainer.py::test_pinv_init_maps_teacher_states_to_teacher_logits_in_student_space"),
    "t2s_target": TestedIn("test_dskd_trainer.py::test_teacher_argmax_target"),
    "token_alignment": TestedIn("test_dskd_trainer.py::test_exact_token_alignment_is_dskd_at_the_exact_pairs_and_trains"),
    "max_completion_length": TestedIn(ON_POLICY),
    "top_p": TestedIn(ON_POLICY),
    "uld_merge": TestedIn("test_uld_trainer.py::test_the_trainers_loss_is_the_aligned_reference_on_a_batch"),
    "gold_beta": TestedIn("test_uld_trainer.py::test_the_trainers_loss_is_the_aligned_reference_on_a_batch"),
    "gold_matched_weight": TestedIn("test_uld_trainer.py::test_the_trainers_loss_is_the_aligned_reference_on_a_batch"),
    "teacher_temperature": TestedIn(
        "test_settings_take_effect.py::test_dskd_teacher_temperature_changes_the_t2s_kd_term_through_the_trainer"),
    "s2t_divergence": TestedIn("test_config_contract.py::test_s2t_divergence_changes_only_the_teacher_space_term"),
    "max_prompt_length": TestedIn(
        "test_dskd_trainer.py::test_dual_tokenization_keeps_the_response_boundary_and_common_tails"),
    # --- Seq-KD -----------------------------------------------------------------------------------------------------
    "seqkd_max_new_tokens": TestedIn(
        "test_seqkd_trainer.py::test_student_learns_the_teachers_completions_and_the_set_is_reused"),
    "seqkd_do_sample": TestedIn("test_config_contract.py::test_seqkd_generation_settings_reach_generation"),
    "seqkd_temperature": TestedIn("test_config_contract.py::test_seqkd_generation_settings_reach_generation"),
    "seqkd_top_p": TestedIn("test_config_contract.py::test_seqkd_generation_settings_reach_generation"),
    "seqkd_batch_size": TestedIn("test_seqkd_trainer.py::test_an_interrupted_generation_resumes_from_its_finished_parts"),
    "seqkd_cache_dir": TestedIn(
        "test_seqkd_trainer.py::test_student_learns_the_teachers_completions_and_the_set_is_reused"),
    # --- GKD (TRL's fields, TRL's behaviour) ------------------------------------------------------------------------
    "lmbda": TestedIn("test_gkd_trainer.py::test_on_policy_training_samples_from_the_student_and_learns + "
                      + ON_POLICY),
    "beta": TestedIn("test_gkd_trainer.py::test_neutral_settings_equal_trls_gkd_loss_and_gradients"),
    "temperature": TestedIn("test_gkd_trainer.py::test_kd_temperature_applies_to_the_loss + " + ON_POLICY),
    "max_new_tokens": TestedIn("test_settings_take_effect.py::test_on_policy_gkd_normalises_by_the_generated_tokens"),
    "seq_kd": TestedIn("test_config_contract.py::test_gkd_seq_kd_trains_on_the_teachers_completions"),
    "disable_dropout": Machinery("TRL's GKDTrainer turns dropout off in both models at init; no loss setting"),
}
for _names, _kind in (
    (("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args",
      "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_target_modules", "max_grad_norm",
      "num_train_epochs", "max_steps", "auto_find_batch_size"), OPTIMIZER),
    (("logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
      "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name",
      "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "skip_memory_metrics", "debug"),
     LOGGING),
    (("output_dir", "save_only_model", "save_strategy", "save_steps", "save_on_each_node", "save_total_limit",
      "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy",
      "hub_always_push", "hub_revision", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
      "restore_callback_states_from_checkpoint"), SAVING),
    (("eval_strategy", "eval_steps", "eval_delay", "prediction_loss_only", "eval_on_start", "eval_do_concat_batches",
      "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics",
      "bf16_full_eval", "fp16_full_eval"), EVAL_FLOW),
    (("bf16", "fp16", "tf32", "torch_compile", "torch_compile_backend", "torch_compile_mode", "torch_empty_cache_steps",
      "use_cpu", "full_determinism", "dataloader_num_workers", "dataloader_pin_memory",
      "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
      "dataloader_in_order", "accelerator_config"), DEVICES),
    (("ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend",
      "ddp_timeout", "fsdp", "fsdp_config", "deepspeed", "parallelism_config", "local_rank"), DISTRIBUTED),
    (("do_train", "do_eval", "do_predict", "resume_from_checkpoint", "ignore_data_skip"), RUN_CONTROL),
):
    CONTRACT.update(dict.fromkeys(_names, _kind))

CONFIGS = (KDConfig, DSKDConfig, SeqKDConfig, GKDConfig, ULDConfig, GOLDConfig, MinEDConfig)


def all_fields() -> set[str]:
    return {f.name for config in CONFIGS for f in dataclasses.fields(config) if f.init}


def test_every_config_field_is_accounted_for():
    missing = sorted(all_fields() - set(CONTRACT))
    stale = sorted(set(CONTRACT) - all_fields())
    assert not missing, f"Config fields with no decision in CONTRACT (decide: SameAsSFT, KDLoss, ...): {missing}"
    assert not stale, f"CONTRACT names fields no config has: {stale}"


def test_every_named_test_exists():
    for name, kind in CONTRACT.items():
        if isinstance(kind, TestedIn):
            for named in kind.test.split(" + "):
                file, test = named.split("::")
                tree = ast.parse(open(os.path.join(TESTS, file)).read())
                names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
                assert test in names, f"{name}: {named} does not exist"


# ---------------------------------------------------------------------------------------------------------------------
# SameAsSFT


BASE = dict(bf16=False, max_steps=2, per_device_train_batch_size=8, learning_rate=0.05, optim="sgd", logging_steps=1,
            save_strategy="no", report_to=[], disable_tqdm=True, max_length=64, seed=0, lr_scheduler_type="constant")


@pytest.fixture(scope="module")
def datasets(bpe_tokenizer):
    def tokenized(row):
        prompt = bpe_tokenizer(row["prompt"])["input_ids"]
        completion = bpe_tokenizer(row["completion"])["input_ids"] + [bpe_tokenizer.eos_token_id]
        return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}

    pc = load_demo_dataset("prompt_completion")["train"].select(range(24))
    text = load_demo_dataset("text")["train"].select(range(24))
    return {"prompt_completion": pc.map(lambda row: {"n": len(row["prompt"])}), "text": text,
            "text_in_question": text.rename_column("text", "question").add_column("text", ["x y z"] * len(text)),
            "tokenized": pc.map(tokenized, remove_columns=pc.column_names)}


def train_two_steps(trainer_class, config_class, tmp_path, tokenizer, dataset, values, **kd):
    tokenizer = copy.deepcopy(tokenizer)  # SFTTrainer sets eos/pad tokens on the tokenizer it is given
    student = demo_model("llama", tokenizer, "student", seed=2)
    args = config_class(output_dir=str(tmp_path / trainer_class.__name__), **{**BASE, **values}, **kd)
    extra = {}
    if trainer_class is not SFTTrainer:
        extra = dict(teacher_model=demo_model("llama", tokenizer, "teacher", seed=1),
                     teacher_processing_class=tokenizer)
    trainer = trainer_class(student, args, train_dataset=dataset, processing_class=tokenizer, **extra)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return torch.cat([p.detach().flatten() for p in student.parameters()]), losses


SAME_AS_SFT = {name: kind for name, kind in CONTRACT.items() if isinstance(kind, SameAsSFT)}


@pytest.mark.slow  # one short SFT and KD run per field
@pytest.mark.parametrize("name", sorted(SAME_AS_SFT))
def test_sft_fields_at_kd_weight_zero_give_exactly_sfttrainers_result(tmp_path, bpe_tokenizer, datasets, name):
    kind = SAME_AS_SFT[name]
    dataset = datasets[kind.dataset]
    sft_weights, sft_losses = train_two_steps(SFTTrainer, SFTConfig, tmp_path / "sft", bpe_tokenizer, dataset,
                                              kind.values)
    kd_weights, kd_losses = train_two_steps(KDTrainer, KDConfig, tmp_path / "kd", bpe_tokenizer, dataset,
                                            kind.values, kd_weight=0.0)
    assert torch.equal(kd_weights, sft_weights), name
    assert kd_losses == sft_losses, name
    if kind.changes:
        default = {k: v for k, v in kind.values.items() if k != name}
        plain_weights, _ = train_two_steps(SFTTrainer, SFTConfig, tmp_path / "plain", bpe_tokenizer, dataset, default)
        assert not torch.equal(plain_weights, sft_weights), f"{name}={kind.values[name]!r} changed nothing in SFT"


def test_dskd_at_kd_weight_zero_is_sfttrainer(tmp_path, bpe_tokenizer, datasets):
    dataset = datasets["prompt_completion"]
    sft_weights, sft_losses = train_two_steps(SFTTrainer, SFTConfig, tmp_path / "sft", bpe_tokenizer, dataset, {})
    student = demo_model("llama", bpe_tokenizer, "student", seed=2)
    trainer = DSKDTrainer(student, demo_model("llama", bpe_tokenizer, "teacher", seed=1),
                          args=DSKDConfig(output_dir=str(tmp_path / "dskd"), kd_weight=0.0, **BASE),
                          train_dataset=dataset, processing_class=bpe_tokenizer,
                          teacher_processing_class=bpe_tokenizer)
    trainer.train()
    weights = torch.cat([p.detach().flatten() for n, p in student.named_parameters() if "dskd" not in n])
    assert torch.equal(weights, sft_weights)


@pytest.mark.parametrize("field,value", [("loss_type", "dft"), ("label_smoothing_factor", 0.2)])
def test_sft_only_losses_are_refused_beside_kd(tmp_path, field, value):
    for config_class in CONFIGS:
        kd_weight = {"kd_weight": 0.5}
        with pytest.raises(ValueError, match=rf"^{field}={value!r} .*kd_weight=0.5.*Set {field}="):
            config_class(output_dir=str(tmp_path), bf16=False, **kd_weight, **{field: value})


@pytest.mark.parametrize("values", [{"packing": True}, {"completion_only_loss": False}, {"max_length": 24}])
def test_batch_fields_take_effect_beside_kd(tmp_path, bpe_tokenizer, datasets, values):
    """The same batches reach the distillation loss (kd_weight > 0): the field changes the KD result too."""
    dataset = datasets["prompt_completion"]
    with_field, _ = train_two_steps(KDTrainer, KDConfig, tmp_path / "a", bpe_tokenizer, dataset, values,
                                    kd_weight=0.5)
    without, _ = train_two_steps(KDTrainer, KDConfig, tmp_path / "b", bpe_tokenizer, dataset, {}, kd_weight=0.5)
    assert not torch.equal(with_field, without)


def test_eval_batches_are_sfts(tmp_path, bpe_tokenizer, datasets):
    """eval_packing and per_device_eval_batch_size shape the eval batches; at kd_weight=0 the eval loss is SFT's."""
    dataset = datasets["prompt_completion"]
    results = []
    for trainer_class, config_class, kd in ((SFTTrainer, SFTConfig, {}), (KDTrainer, KDConfig, {"kd_weight": 0.0})):
        extra = {} if trainer_class is SFTTrainer else dict(
            teacher_model=demo_model("llama", bpe_tokenizer, "teacher", seed=1), teacher_processing_class=bpe_tokenizer)
        for values in ({}, {"eval_packing": True, "packing": True}, {"per_device_eval_batch_size": 3}):
            args = config_class(output_dir=str(tmp_path / "e"), **{**BASE, **values}, **kd)
            trainer = trainer_class(demo_model("llama", bpe_tokenizer, "student", seed=2), args, train_dataset=dataset,
                                    eval_dataset=dataset, processing_class=bpe_tokenizer, **extra)
            results.append(trainer.evaluate()["eval_loss"])
    sft, kd = results[:3], results[3:]
    assert kd == sft
    assert len(set(sft)) == 3  # each setting changes the eval loss


def test_assistant_only_loss_is_sfts(tmp_path, bpe_tokenizer):
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    tokenizer = copy.deepcopy(bpe_tokenizer)
    tokenizer.chat_template = template
    dataset = load_demo_dataset("messages")["train"].select(range(24))
    values = {"assistant_only_loss": True}
    sft, _ = train_two_steps(SFTTrainer, SFTConfig, tmp_path / "sft", tokenizer, dataset, values)
    kd, _ = train_two_steps(KDTrainer, KDConfig, tmp_path / "kd", tokenizer, dataset, values, kd_weight=0.0)
    plain, _ = train_two_steps(SFTTrainer, SFTConfig, tmp_path / "plain", tokenizer, dataset, {})
    assert torch.equal(kd, sft) and not torch.equal(plain, sft)


def test_chat_template_path_is_sfts(tmp_path, bpe_tokenizer):
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    dataset = load_demo_dataset("messages")["train"].select(range(24))
    tokenizer = copy.deepcopy(bpe_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    values = {"chat_template_path": str(path)}
    sft, _ = train_two_steps(SFTTrainer, SFTConfig, tmp_path / "sft", copy.deepcopy(tokenizer), dataset, values)
    kd, _ = train_two_steps(KDTrainer, KDConfig, tmp_path / "kd", copy.deepcopy(tokenizer), dataset, values,
                            kd_weight=0.0)
    plain, _ = train_two_steps(SFTTrainer, SFTConfig, tmp_path / "plain", copy.deepcopy(tokenizer), dataset, {})
    assert torch.equal(kd, sft) and not torch.equal(plain, sft)


def test_model_init_kwargs_and_trust_remote_code_are_sfts(tmp_path, bpe_tokenizer, datasets):
    """A student loaded by path: model_init_kwargs (dtype) reaches the loading in both trainers alike."""
    folder = tmp_path / "student"
    demo_model("llama", bpe_tokenizer, "student", seed=2).save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    dtypes = []
    for trainer_class, config_class, extra in (
            (SFTTrainer, SFTConfig, {}),
            (KDTrainer, KDConfig, {"teacher_model": demo_model("llama", bpe_tokenizer, "teacher", seed=1),
                                   "teacher_processing_class": bpe_tokenizer})):
        kd = {} if trainer_class is SFTTrainer else {"kd_weight": 0.5}
        args = config_class(output_dir=str(tmp_path / "o"), model_init_kwargs={"dtype": "bfloat16"},
                            trust_remote_code=False, **BASE, **kd)
        trainer = trainer_class(str(folder), args, train_dataset=datasets["prompt_completion"],
                                processing_class=bpe_tokenizer, **extra)
        dtypes.append(trainer.model.dtype)
    assert dtypes == [torch.bfloat16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------------------
# KDLoss


KD_LOSS = {name: kind for name, kind in CONTRACT.items() if isinstance(kind, KDLoss)}
REFERENCE_NAMES = {"divergence": "divergence", "jsd_beta": "jsd_beta", "skew_alpha": "skew_alpha",
                   "kd_temperature": "temperature", "kd_temperature_squared": "temperature_squared",
                   "kd_weight": "kd_weight"}


def loss_on_fixed_batch(tmp_path, tokenizer, dataset, values, calls=None):
    student = demo_model("llama", tokenizer, "student", seed=2)
    teacher = demo_model("llama", tokenizer, "teacher", seed=1)
    args = KDConfig(output_dir=str(tmp_path / "kd"), **{**BASE, "kd_temperature": 2.0, "kd_weight": 0.5, **values})
    trainer = KDTrainer(student, args, train_dataset=dataset, processing_class=tokenizer, teacher_model=teacher,
                        teacher_processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    settings = {"temperature": args.kd_temperature, "kd_weight": args.kd_weight, "divergence": args.divergence,
                "jsd_beta": args.jsd_beta, "skew_alpha": args.skew_alpha,
                "temperature_squared": args.kd_temperature_squared}
    reference = distillation_loss(student(**inputs).logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:],
                                  **settings)
    return loss, reference.loss


@pytest.mark.parametrize("name", sorted(KD_LOSS))
def test_kd_loss_fields_change_the_loss_as_the_reference_says(tmp_path, bpe_tokenizer, datasets, name, monkeypatch):
    kind = KD_LOSS[name]
    dataset = datasets["prompt_completion"]
    chunk_sizes = []
    from kd_trainers.losses import fused as chunked_module

    original = chunked_module._FusedDistillationFunction.apply
    monkeypatch.setattr(chunked_module._FusedDistillationFunction, "apply",
                        lambda *args: chunk_sizes.append(args[-1].chunk_size) or original(*args))
    loss, reference = loss_on_fixed_batch(tmp_path, bpe_tokenizer, dataset, kind.values)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    default = {k: v for k, v in kind.values.items() if k != name}
    default_loss, _ = loss_on_fixed_batch(tmp_path, bpe_tokenizer, dataset, default)
    if kind.invariant:
        torch.testing.assert_close(loss, default_loss, rtol=1e-5, atol=1e-6)
        # the chunks this field asked for: its token count, or the longest whose working buffers fit its budget
        settings = LossSettings(divergence="forward_kl", temperature=2.0, kd_weight=0.5)
        expected = kind.values.get("loss_chunk_size") or chunk_rows(
            len(bpe_tokenizer), working_buffers(settings), kind.values.get("loss_memory_budget_mb"))
        assert 1 < chunk_sizes[0] == expected != chunk_sizes[-1]
    else:
        assert loss.item() != default_loss.item(), f"{name}={kind.values[name]!r} changed nothing"


# ---------------------------------------------------------------------------------------------------------------------
# Method fields without a test elsewhere


def test_divergence_params_reach_a_registered_divergence(tmp_path, bpe_tokenizer, datasets):
    """A divergence registered with a setting of its own gets it from `KDConfig.divergence_params`: the trainer's loss
    equals an independent power-divergence loss at that γ and differs at another; a name it does not read, or a value
    its checks refuse, is refused when the config is made."""
    from kd_trainers.losses import register_divergence
    from kd_trainers.losses.divergences import DIVERGENCES

    @register_divergence("contract_power", checks={"gamma": (lambda g: g > 0, "> 0")})
    def contract_power(student_log_probs, teacher_log_probs, *, gamma):
        log_ratio = teacher_log_probs - student_log_probs
        return ((teacher_log_probs + gamma * log_ratio).exp().sum(-1) - 1.0) / (gamma * (gamma + 1.0))

    try:
        dataset = datasets["prompt_completion"]
        values = {"divergence": "contract_power", "divergence_params": {"gamma": 0.5}, "kd_weight": 1.0}

        def loss_and_reference(gamma):
            """The trainer's loss on one batch, and the power divergence's from probabilities: T² · the mean over
            label tokens of (Σ p_T (p_T/p_S)^γ − 1) / (γ(γ + 1))."""
            student = demo_model("llama", bpe_tokenizer, "student", seed=2)
            teacher = demo_model("llama", bpe_tokenizer, "teacher", seed=1)
            args = KDConfig(output_dir=str(tmp_path / f"kd{gamma}"), **{**BASE, "kd_temperature": 2.0, **values,
                                                                       "divergence_params": {"gamma": gamma}})
            trainer = KDTrainer(student, args, train_dataset=dataset, processing_class=bpe_tokenizer,
                                teacher_model=teacher, teacher_processing_class=bpe_tokenizer)
            batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
            loss = trainer.compute_loss(trainer.model, batch)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                p_s = torch.softmax(student(**inputs).logits[:, :-1].double() / 2.0, -1)
                p_t = torch.softmax(teacher(**inputs).logits[:, :-1].double() / 2.0, -1)
            per_token = ((p_t * (p_t / p_s) ** gamma).sum(-1) - 1.0) / (gamma * (gamma + 1.0))
            return trainer, loss, 4.0 * per_token[batch["labels"][:, 1:] != -100].mean()

        trainer, loss, expected = loss_and_reference(0.5)
        torch.testing.assert_close(loss.detach().double(), expected, rtol=1e-4, atol=1e-6)
        _, other, other_expected = loss_and_reference(2.0)
        torch.testing.assert_close(other.detach().double(), other_expected, rtol=1e-4, atol=1e-6)
        assert abs(other.item() - loss.item()) > 1e-4, "gamma changed nothing"
        assert trainer.kd_settings()["gamma"] == 0.5  # and the model card says so
        with pytest.raises(ValueError, match=r"divergence_params has \['delta'\], which divergence='contract_power' "
                                             r"does not read \(it reads \['gamma'\]\)"):
            KDConfig(output_dir=str(tmp_path / "x"), **{**BASE, **values, "divergence_params": {"gamma": 1.0,
                                                                                              "delta": 1.0}})
        with pytest.raises(ValueError, match="gamma must be > 0, got -1.0"):
            KDConfig(output_dir=str(tmp_path / "x"), **{**BASE, **values, "divergence_params": {"gamma": -1.0}})
        with pytest.raises(ValueError, match=r"needs the setting\(s\) gamma \(in a KDConfig or a recipe: "
                                             r"divergence_params: \{gamma: ...\}\)"):
            KDConfig(output_dir=str(tmp_path / "x"), **{**BASE, "divergence": "contract_power"})
    finally:
        DIVERGENCES.pop("contract_power")


def test_teacher_model_init_kwargs_load_the_teacher(tmp_path, bpe_tokenizer, datasets):
    folder = tmp_path / "teacher"
    demo_model("llama", bpe_tokenizer, "teacher", seed=1).save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    args = KDConfig(output_dir=str(tmp_path / "o"), teacher_model_name_or_path=str(folder),
                    teacher_model_init_kwargs={"dtype": "bfloat16"}, **BASE)
    trainer = KDTrainer(demo_model("llama", bpe_tokenizer, "student", seed=2), args,
                        train_dataset=datasets["prompt_completion"], processing_class=bpe_tokenizer)
    assert trainer.accelerator.unwrap_model(trainer.teacher_model).dtype == torch.bfloat16


def test_projector_lr_is_the_projectors_learning_rate(tmp_path, bpe_tokenizer, datasets):
    args = DSKDConfig(output_dir=str(tmp_path / "o"), projector_lr=0.123, **BASE)
    trainer = DSKDTrainer(demo_model("llama", bpe_tokenizer, "student", seed=2),
                          demo_model("llama", bpe_tokenizer, "teacher", seed=1), args=args,
                          train_dataset=datasets["prompt_completion"], processing_class=bpe_tokenizer,
                          teacher_processing_class=bpe_tokenizer)
    optimizer = trainer.create_optimizer()
    projector_ids = {id(p) for p in trainer.projectors.parameters()}
    rates = {group["lr"] for group in optimizer.param_groups if {id(p) for p in group["params"]} <= projector_ids}
    assert rates == {0.123}


def test_s2t_divergence_changes_only_the_teacher_space_term(tmp_path, bpe_tokenizer, datasets):
    parts = []
    for divergence in ("forward_kl", "reverse_kl"):
        args = DSKDConfig(output_dir=str(tmp_path / divergence), s2t_divergence=divergence, **BASE)
        trainer = DSKDTrainer(demo_model("llama", bpe_tokenizer, "student", seed=2),
                              demo_model("llama", bpe_tokenizer, "teacher", seed=1), args=args,
                              train_dataset=datasets["prompt_completion"], processing_class=bpe_tokenizer,
                              teacher_processing_class=bpe_tokenizer)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.compute_loss(trainer.model, batch)
        trainer.log({})
        parts.append({k: float(trainer.state.log_history[-1][k]) for k in ("t2s_kd_loss", "s2t_kd_loss")})
    assert parts[0]["t2s_kd_loss"] == pytest.approx(parts[1]["t2s_kd_loss"], rel=1e-6)
    assert parts[0]["s2t_kd_loss"] != pytest.approx(parts[1]["s2t_kd_loss"], rel=1e-3)


def test_seqkd_generation_settings_reach_generation(tmp_path):
    args = SeqKDConfig(output_dir=str(tmp_path), bf16=False, seqkd_do_sample=True, seqkd_temperature=0.7,
                       seqkd_top_p=0.9, seed=5)
    assert args.generation_settings() == {"max_new_tokens": 128, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                          "seed": 5}
    assert SeqKDConfig(output_dir=str(tmp_path), bf16=False, seqkd_temperature=0.7).generation_settings() == {
        "max_new_tokens": 128, "do_sample": False}


def test_gkd_seq_kd_trains_on_the_teachers_completions(tmp_path, bpe_tokenizer):
    from kd_trainers import GKDTrainer

    teacher = demo_model("llama", bpe_tokenizer, "teacher", seed=1)
    # TRL samples at `temperature`; near 0 the teacher's samples are its greedy completions.
    args = GKDConfig(output_dir=str(tmp_path), lmbda=0.0, seq_kd=True, max_new_tokens=5, temperature=1e-4, **BASE)
    trainer = GKDTrainer(demo_model("llama", bpe_tokenizer, "student", seed=2), teacher, args,
                         train_dataset=load_demo_dataset()["train"].select(range(8)), processing_class=bpe_tokenizer,
                         teacher_processing_class=bpe_tokenizer)
    trainer.model_wrapped = trainer.model
    (batch,), _ = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, torch.device("cpu"))
    prompt_length = batch["prompts"].shape[1]
    with torch.no_grad():
        expected = teacher.generate(input_ids=batch["prompts"], attention_mask=batch["prompt_attention_mask"],
                                    max_new_tokens=5, do_sample=False, pad_token_id=bpe_tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"][:, prompt_length:][:, :expected.shape[1] - prompt_length],
                       expected[:, prompt_length:])
