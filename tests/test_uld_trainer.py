"""ULDTrainer and GOLDTrainer on the demo's cross-vocabulary pair (a Llama student with the BPE tokenizer, a Qwen2
teacher with the WordPiece one): the trainer's loss on a batch equals the aligned-groups reference from the two
models' full logits at every setting, training moves the student alone, `kd_weight=0` is SFTTrainer, and what cannot
work is refused before anything loads, naming the field."""

import copy
import json

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from kd_trainers import GOLDConfig, GOLDTrainer, ULDConfig, ULDTrainer
from kd_trainers.cli import train as cli
from kd_trainers.data.alignment import shared_token_ids
from kd_trainers.demo import demo_model
from kd_trainers.losses import LossSettings
from kd_trainers.recipe.catalog import shipped_path

from test_aligned_loss import reference_loss

METHODS = {"uld": (ULDConfig, ULDTrainer), "gold": (GOLDConfig, GOLDTrainer)}
BASE = dict(bf16=False, max_steps=2, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
            save_strategy="no", report_to=[], disable_tqdm=True, max_length=64, seed=0)


@pytest.fixture(scope="module")
def pair(bpe_tokenizer, wordpiece_tokenizer):
    return (demo_model("llama", bpe_tokenizer, "student", seed=2),
            demo_model("qwen2", wordpiece_tokenizer, "teacher", seed=1))


def make(method, tmp_path, pair, tokenizers, data, student=None, **values):
    config_class, trainer_class = METHODS[method]
    args = config_class(output_dir=str(tmp_path / method), **{**BASE, **values})
    return trainer_class(copy.deepcopy(pair[0]) if student is None else student, pair[1], args=args,
                         train_dataset=data, processing_class=tokenizers[0], teacher_processing_class=tokenizers[1])


def trainer_and_reference(trainer, tokenizers, pair, seed=None):
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    if seed is not None:  # the noise the trainer draws, fixed so the reference can draw the same
        trainer._noise_seed = lambda mode: seed
    loss = trainer.compute_loss(trainer.model, batch)
    student, teacher = trainer.model, pair[1]
    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher(input_ids=batch["teacher_input_ids"],
                                 attention_mask=batch["teacher_attention_mask"]).logits
    args = trainer.args
    settings = LossSettings(temperature=args.kd_temperature, kd_weight=args.kd_weight,
                            noise_std=args.teacher_logit_noise_std, temperature_squared=args.kd_temperature_squared)
    shared = shared_token_ids(*tokenizers)
    expected, _, kd = reference_loss(
        student_logits[:, :-1].double(), teacher_logits[:, :-1].double(), batch["labels"][:, 1:],
        batch["teacher_labels"][:, 1:], batch["aligned_group"][:, 1:], batch["teacher_aligned_group"][:, 1:],
        settings, args.aligned_settings(), shared, seed)
    return loss, expected.float(), kd


SETTINGS = [
    ("uld", {}),
    ("uld", {"kd_temperature": 2.0, "kd_weight": 0.3, "kd_temperature_squared": True, "uld_merge": "bayesian"}),
    ("uld", {"teacher_logit_noise_std": 0.8, "loss_chunk_size": 3}),
    ("gold", {}),
    ("gold", {"gold_beta": 0.1, "gold_matched_weight": 0.7, "kd_temperature": 1.5}),
]


def test_the_trainers_loss_is_the_aligned_reference_on_a_batch(tmp_path, pair, bpe_tokenizer, wordpiece_tokenizer,
                                                               demo_data):
    """Every setting the two methods read, through the trainer: its loss equals the reference's from the models'
    full logits (so the shift, the groups, the vocabularies and each setting are wired as the loss defines them), and
    each setting moves the loss away from its method's defaults."""
    tokenizers = bpe_tokenizer, wordpiece_tokenizer
    data = demo_data["train"].select(range(8))
    defaults = {}
    for method, values in SETTINGS:
        trainer = make(method, tmp_path, pair, tokenizers, data, **values)
        assert trainer.args.aligned_settings().distance == ("uld" if method == "uld" else "hybrid")
        loss, expected, kd = trainer_and_reference(trainer, tokenizers, pair,
                                                   seed=11 if values.get("teacher_logit_noise_std") else None)
        torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-6)
        assert kd > 0
        if not values:
            defaults[method] = loss
        else:
            assert not torch.isclose(loss, defaults[method], rtol=1e-4), (method, values)


@pytest.mark.slow
def test_uld_and_gold_train_the_student_only_and_log_their_terms(tmp_path, pair, bpe_tokenizer, wordpiece_tokenizer,
                                                                 demo_data):
    for method in METHODS:
        student = copy.deepcopy(pair[0])
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        teacher_before = {n: p.detach().clone() for n, p in pair[1].named_parameters()}
        trainer = make(method, tmp_path, pair, (bpe_tokenizer, wordpiece_tokenizer), demo_data["train"],
                       student=student, max_steps=3, teacher_logit_noise_std=0.3)
        trainer.train()
        logs = [log for log in trainer.state.log_history if "kd_loss" in log]
        assert len(logs) == 3 and all(log["kd_loss"] > 0 and 0 < log["aligned_groups"] <= 1 for log in logs)
        assert all(not torch.equal(p, before[n]) for n, p in student.named_parameters())
        assert all(torch.equal(p, teacher_before[n]) for n, p in pair[1].named_parameters())
        settings = trainer.kd_settings()
        assert settings["method"] == f"{method.upper()} across tokenizers"
        assert settings["divergence"] == ("uld" if method == "uld" else "hybrid")


def test_at_kd_weight_zero_uld_is_sft(tmp_path, pair, bpe_tokenizer, wordpiece_tokenizer, demo_data):
    """The student's side of the two tokenizations is what SFTTrainer builds, so at kd_weight=0 two steps give the
    same weights and losses as SFTTrainer on the same data."""
    data = demo_data["train"].select(range(8))
    values = {**BASE, "learning_rate": 0.05, "optim": "sgd", "lr_scheduler_type": "constant"}
    sft = SFTTrainer(copy.deepcopy(pair[0]), SFTConfig(output_dir=str(tmp_path / "sft"), **values),
                     train_dataset=data, processing_class=bpe_tokenizer)
    sft.train()
    uld = ULDTrainer(copy.deepcopy(pair[0]), pair[1], args=ULDConfig(output_dir=str(tmp_path / "u"), kd_weight=0.0,
                                                                     **values),
                     train_dataset=data, processing_class=bpe_tokenizer, teacher_processing_class=wordpiece_tokenizer)
    uld.train()
    losses = [[log["loss"] for log in trainer.state.log_history if "loss" in log] for trainer in (sft, uld)]
    assert losses[0] == losses[1]
    for (name, a), (_, b) in zip(sft.model.named_parameters(), uld.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("field, value, message", [
    ("teacher_cache", "cache-dir", "teacher_cache='cache-dir': {label} reads the teacher's distribution at every "
                                   "position of the teacher's own tokenization"),
    ("teacher_url", "http://127.0.0.1:1", "teacher_url='http://127.0.0.1:1': {label} reads"),
    ("divergence", "jsd", "divergence='jsd' is not read by {label}"),
    ("jsd_beta", 0.3, "jsd_beta=0.3 is not read by {label}"),
    ("uld_merge", "first", r"uld_merge must be one of \['observed', 'bayesian'\], got 'first'"),
    ("max_prompt_length", 0, "max_prompt_length must be a positive integer or None, got 0"),
])
def test_what_cannot_work_is_refused_naming_the_field(tmp_path, method, field, value, message):
    with pytest.raises(ValueError, match="^" + message.format(label=method.upper())):
        METHODS[method][0](output_dir=str(tmp_path), **{field: value})


@pytest.mark.parametrize("field, value", [("gold_beta", 1.5), ("gold_matched_weight", -0.1), ("gold_beta", True)])
def test_gold_settings_out_of_range_are_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be a number in \[0, 1\]"):
        GOLDConfig(output_dir=str(tmp_path), **{field: value})


def test_packing_and_text_data_are_refused_before_training(tmp_path, pair, bpe_tokenizer, wordpiece_tokenizer,
                                                           demo_data):
    with pytest.raises(ValueError, match="^packing=True cannot be combined with ULD"):
        make("uld", tmp_path, pair, (bpe_tokenizer, wordpiece_tokenizer), demo_data["train"].select(range(4)),
             packing=True)
    text = demo_data["train"].select(range(4)).map(lambda row: {"text": row["prompt"] + row["completion"]},
                                                   remove_columns=["prompt", "completion"])
    with pytest.raises(ValueError, match="The 'text' format has no response boundary"):
        make("gold", tmp_path, pair, (bpe_tokenizer, wordpiece_tokenizer), text)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_shipped_recipe_trains_through_kd_train(tmp_path, method):
    """`kd-train recipes/<method>.yaml`: a finished run with a clean student, whose card and run record name the
    method and its settings."""
    output = tmp_path / "run"
    code = cli.main([shipped_path(method), "max_steps=2", "save_steps=2", "logging_steps=1",
                     "per_device_train_batch_size=4", "max_length=64", f"output_dir={output}"])
    assert code == 0
    assert (output / "done.json").exists() and (output / "model.safetensors").exists()
    info = json.loads((output / "run_info.json").read_text())
    assert method in json.dumps(info).lower()
    card = (output / "README.md").read_text()
    assert f"{method.upper()} across tokenizers" in card and "uld_merge" in card
