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

from kd_trainers.served_teacher.server import LoopbackServer, PromptScorer
from kd_trainers.teacher_cache import targets_from_batch

from test_aligned_loss import reconstructed_teacher_logits, reference_loss

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
    ("teacher_cache", "cache-dir", "teacher_cache_tail='bucket': teacher_cache='cache-dir' with {label} compares "
                                   "the two models' sorted probability vectors"),
    ("teacher_url", "http://127.0.0.1:1", "teacher_server_tail='bucket': teacher_url='http://127.0.0.1:1' with "
                                          "{label} compares"),
    ("divergence", "jsd", "divergence='jsd' is not read by {label}"),
    ("jsd_beta", 0.3, "jsd_beta=0.3 is not read by {label}"),
    ("uld_merge", "first", r"uld_merge must be one of \['observed', 'bayesian'\], got 'first'"),
    ("max_prompt_length", 0, "max_prompt_length must be a positive integer or None, got 0"),
])
def test_what_cannot_work_is_refused_naming_the_field(tmp_path, method, field, value, message):
    with pytest.raises(ValueError, match="^" + message.format(label=method.upper())):
        METHODS[method][0](output_dir=str(tmp_path), **{field: value})


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("values, message", [
    ({"kd_temperature": 2.0}, r"kd_temperature=2.0 with teacher_cache='c': {label} from a teacher's top-k spreads "
                              r"the tail's mass evenly over the teacher's other tokens, and at T != 1"),
    ({"teacher_cache": None, "teacher_url": "http://127.0.0.1:1/v1", "teacher_server_tail": "spread",
      "kd_temperature": 1.5, "teacher_server_approximate_temperature": True},
     r"kd_temperature=1.5 with teacher_url='http://127.0.0.1:1/v1': {label} from a teacher's top-k"),
    ({"teacher_cache_mode": "sampled"}, "teacher_cache_mode='sampled': teacher_cache='c' with {label} compares the "
                                        "teacher's sorted probabilities"),
    ({"lmbda": 0.5}, "lmbda=0.5: teacher_cache='c' with {label}: the student's own samples are not in the cache"),
])
def test_what_a_cache_cannot_serve_is_refused_naming_the_field(tmp_path, method, values, message):
    with pytest.raises(ValueError, match="^" + message.format(label=method.upper())):
        METHODS[method][0](output_dir=str(tmp_path), **{"teacher_cache": "c", "teacher_cache_tail": "spread", **values})


@pytest.mark.slow
@pytest.mark.parametrize("method, values", [
    ("uld", {"uld_merge": "bayesian", "teacher_logit_noise_std": 0.5}),
    ("gold", {"teacher_cache_k": 7, "gold_beta": 0.2})])
def test_a_teacher_cache_of_the_teachers_own_tokenization(tmp_path, pair, bpe_tokenizer, wordpiece_tokenizer,
                                                          demo_data, method, values):
    """The cache holds the teacher at its own label tokens (each label's probability too); the trainer's loss on a
    batch is the aligned reference whose teacher is the one the batch's cached targets describe (so positions,
    labels and settings are wired through), and, with k the whole vocabulary, the teacher in memory's loss up to the
    cache's quantisation; training from the complete cache needs no teacher model and moves the student."""
    tokenizers = bpe_tokenizer, wordpiece_tokenizer
    data = demo_data["train"].select(range(8))
    vocab = len(wordpiece_tokenizer)
    values = {"teacher_cache_k": vocab, **values, "teacher_cache": str(tmp_path / "cache"),
              "teacher_cache_tail": "spread"}
    cached = make(method, tmp_path, pair, tokenizers, data, **values)
    info = json.loads((tmp_path / "cache" / "cache_info.json").read_text())
    assert info["components"]["settings"]["tokenization"] == "teacher"
    teacher_tokens = sum(int((torch.tensor(row["teacher_completion_mask"][1:]) == 1).sum())
                         for row in cached.train_dataset)
    assert info["splits"]["train"]["label_tokens"] == teacher_tokens

    batch = cached._prepare_inputs(next(iter(cached.get_train_dataloader())))
    seed = 99
    cached._noise_seed = lambda mode: seed
    loss = cached.compute_loss(cached.model, batch)
    targets = targets_from_batch(batch, "top_k", temperature=cached.args.kd_temperature)
    teacher_labels = batch["teacher_labels"][:, 1:]
    with torch.no_grad():
        student_logits = cached.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        exact = pair[1](input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    mask = teacher_labels != -100
    stored = exact[:, :-1][mask].log_softmax(-1).gather(1, teacher_labels[mask][:, None])[:, 0]
    torch.testing.assert_close(targets.label_log_probs, stored, rtol=2e-3, atol=2e-3)  # float16
    teacher_logits = torch.zeros(*teacher_labels.shape, vocab, dtype=torch.float64)
    teacher_logits[mask] = reconstructed_teacher_logits(targets, teacher_labels[mask], vocab, cached.args.kd_temperature)
    args = cached.args
    settings = LossSettings(temperature=args.kd_temperature, kd_weight=args.kd_weight,
                            noise_std=args.teacher_logit_noise_std, temperature_squared=args.kd_temperature_squared)
    expected, _, _ = reference_loss(
        student_logits[:, :-1].double(), teacher_logits, batch["labels"][:, 1:], teacher_labels,
        batch["aligned_group"][:, 1:], batch["teacher_aligned_group"][:, 1:], settings, args.aligned_settings(),
        shared_token_ids(*tokenizers), seed)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)

    if values["teacher_cache_k"] == vocab:  # the whole vocabulary: the teacher itself, to the codes' 1/16 nat
        resident = make(method, tmp_path, pair, tokenizers, data,
                        **{k: v for k, v in values.items() if not k.startswith("teacher_cache")})
        resident._noise_seed = lambda mode: seed
        from_model = resident.compute_loss(resident.model, resident._prepare_inputs(
            next(iter(resident.get_train_dataloader()))))
        torch.testing.assert_close(loss, from_model, rtol=1e-2, atol=0)
        assert loss != from_model

    # the complete cache alone: the teacher's tokenizer named, no teacher model
    config_class, trainer_class = METHODS[method]
    args = config_class(output_dir=str(tmp_path / "again"), **{**BASE, **values})
    student = copy.deepcopy(pair[0])
    before = {name: param.detach().clone() for name, param in student.named_parameters()}
    again = trainer_class(student, None, args=args, train_dataset=data, processing_class=bpe_tokenizer,
                          teacher_processing_class=wordpiece_tokenizer)
    assert again.teacher.kind == "cache" and again.teacher.model is None
    again.train()
    assert any(not torch.equal(before[name], param) for name, param in student.named_parameters())


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


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_served_teacher_asked_at_its_own_tokenization(tmp_path, pair, bpe_tokenizer, wordpiece_tokenizer, demo_data,
                                                        method):
    """A server of the teacher (`kd-serve-teacher`'s scorer, on 127.0.0.1) is asked at the teacher's own tokenization
    of each row: with k its whole vocabulary, the batch's loss is the teacher in memory's; on-policy batches (lmbda)
    are asked of it at the student's samples, tokenized twice again."""
    tokenizers = bpe_tokenizer, wordpiece_tokenizer
    data = demo_data["train"].select(range(8))
    vocab = len(wordpiece_tokenizer)
    scorer = PromptScorer(pair[1], wordpiece_tokenizer, "demo:qwen2/teacher/wordpiece", max_logprobs=vocab)
    with LoopbackServer(scorer) as server:
        served = {"teacher_url": server.url, "teacher_server_k": vocab, "teacher_server_tail": "spread"}
        config_class, trainer_class = METHODS[method]
        trainer = trainer_class(copy.deepcopy(pair[0]), None,
                                args=config_class(output_dir=str(tmp_path / "served"), **{**BASE, **served}),
                                train_dataset=data, processing_class=bpe_tokenizer,
                                teacher_processing_class=wordpiece_tokenizer)
        assert trainer.teacher.kind == "url"
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))
        resident = make(method, tmp_path, pair, tokenizers, data)
        expected = resident.compute_loss(resident.model, resident._prepare_inputs(
            next(iter(resident.get_train_dataloader()))))
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

        student = copy.deepcopy(pair[0])
        before = {name: param.detach().clone() for name, param in student.named_parameters()}
        on_policy = trainer_class(student, None, args=config_class(
            output_dir=str(tmp_path / "on-policy"), **{**BASE, **served, "lmbda": 1.0, "max_completion_length": 6,
                                                       "max_steps": 1}),
            train_dataset=data, processing_class=bpe_tokenizer, teacher_processing_class=wordpiece_tokenizer)
        requests = on_policy.teacher.client.requests_sent
        on_policy.train()
        assert on_policy.teacher.client.requests_sent > requests
        assert any(not torch.equal(before[name], param) for name, param in student.named_parameters())
