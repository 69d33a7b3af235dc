"""DSKDTrainer on the demo task: across the two demo tokenizers (cross-model attention) and under one tokenizer."""

import os

import pytest
import torch
from safetensors.torch import load_file

from kd_trainers import DSKDConfig, DSKDTrainer
from kd_trainers.demo import demo_model, load_demo_dataset
from kd_trainers.data.dual_tokenization import DualTokenizationCollator, DualTokenizer
from kd_trainers.dskd.exact_alignment import exact_pairs
from kd_trainers.dskd.projectors import PROJECTOR_WEIGHTS, DSKDProjectors
from kd_trainers.losses import LossSettings, dual_space_loss


def dskd_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), bf16=False, max_steps=6, per_device_train_batch_size=8,
                  learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                  max_length=64, seed=0)
    values.update(overrides)
    return DSKDConfig(**values)


@pytest.fixture
def cross_vocab_pair(bpe_tokenizer, wordpiece_tokenizer):
    """A Llama student (BPE, width 64, BOS) and a wider Qwen2 teacher (WordPiece, width 128, no BOS, another EOS)."""
    return (demo_model("llama", bpe_tokenizer, "student", seed=2), demo_model("qwen2", wordpiece_tokenizer, "teacher",
                                                                               seed=1))


def cma_trainer(tmp_path, pair, bpe_tokenizer, wordpiece_tokenizer, data, **overrides):
    student, teacher = pair
    return DSKDTrainer(student, dskd_args(tmp_path, **overrides), train_dataset=data, processing_class=bpe_tokenizer,
                       teacher_model=teacher, teacher_processing_class=wordpiece_tokenizer)


def logged(trainer, key):
    return [log[key] for log in trainer.state.log_history if key in log]


def test_cma_trains_student_and_projectors_and_t2s_accuracy_rises(tmp_path, cross_vocab_pair, bpe_tokenizer,
                                                                  wordpiece_tokenizer, demo_data):
    student, teacher = cross_vocab_pair
    trainer = cma_trainer(tmp_path, cross_vocab_pair, bpe_tokenizer, wordpiece_tokenizer, demo_data["train"],
                          max_steps=30, learning_rate=1e-3, projector_lr=3e-3)
    assert trainer.cross_model_attention
    projectors = trainer.projectors
    assert projectors.query.in_features == 2 * 64 and projectors.query.out_features == 2 * 128
    before_student = {n: p.detach().clone() for n, p in student.named_parameters() if "dskd" not in n}
    before_projectors = {n: p.detach().clone() for n, p in projectors.named_parameters()}
    before_teacher = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer.train()

    losses = logged(trainer, "loss")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    t2s_accuracy = logged(trainer, "t2s_accuracy")
    assert t2s_accuracy[0] < 0.05 and max(t2s_accuracy[-5:]) > t2s_accuracy[0] + 0.05
    for key in ("ce_loss", "t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss", "s2t_accuracy"):
        assert len(logged(trainer, key)) == 30
    assert all(not torch.equal(p, before_projectors[n]) for n, p in projectors.named_parameters())
    changed = [n for n, p in student.named_parameters() if "dskd" not in n and not torch.equal(p, before_student[n])]
    assert len(changed) == len(before_student)
    assert all(torch.equal(p, before_teacher[n]) for n, p in teacher.named_parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    # The projectors sit in their own optimizer groups at projector_lr (scheduled like the rest).
    projector_ids = {id(p) for p in projectors.parameters()}
    groups = [g for g in trainer.optimizer.param_groups if any(id(p) in projector_ids for p in g["params"])]
    assert groups and all(all(id(p) in projector_ids for p in g["params"]) for g in groups)
    assert all(g["initial_lr"] == 3e-3 for g in groups)


def test_same_tokenizer_uses_plain_dskd_with_every_format(tmp_path, bpe_tokenizer):
    for data_format in ("prompt_completion", "messages"):
        student = demo_model("llama", bpe_tokenizer, "student", seed=2)
        teacher = demo_model("mistral", bpe_tokenizer, "teacher", seed=1)
        data = load_demo_dataset(data_format)["train"]
        trainer = DSKDTrainer(student, dskd_args(tmp_path, max_steps=3), train_dataset=data,
                              processing_class=bpe_tokenizer, teacher_model=teacher,
                              teacher_processing_class=bpe_tokenizer)
        assert not trainer.cross_model_attention
        trainer.train()
        assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))
        # No gate without attention: t2s_KD is counted on every token.
        assert logged(trainer, "t2s_kd_loss")[0] > 0


def test_cma_from_messages_and_forced_cma_on_one_tokenizer(tmp_path, cross_vocab_pair, bpe_tokenizer,
                                                           wordpiece_tokenizer):
    data = load_demo_dataset("messages")["train"]
    trainer = cma_trainer(tmp_path, cross_vocab_pair, bpe_tokenizer, wordpiece_tokenizer, data, max_steps=2)
    trainer.train()
    assert len(logged(trainer, "t2s_accuracy")) == 2
    student = demo_model("llama", bpe_tokenizer, "student", seed=2)
    teacher = demo_model("llama", bpe_tokenizer, "teacher", seed=1)
    forced = DSKDTrainer(student, dskd_args(tmp_path, max_steps=1, cross_model_attention=True),
                         train_dataset=load_demo_dataset("prompt_completion")["train"], processing_class=bpe_tokenizer,
                         teacher_model=teacher, teacher_processing_class=bpe_tokenizer)
    assert forced.cross_model_attention
    forced.train()


def test_dual_tokenization_keeps_the_response_boundary_and_common_tails(bpe_tokenizer, wordpiece_tokenizer):
    tokenize = DualTokenizer(bpe_tokenizer, wordpiece_tokenizer, max_length=None)
    example = {"prompt": "What does RAN stand for?", "completion": " Radio Access Network."}
    out = tokenize(example)
    student_completion = [i for i, m in zip(out["input_ids"], out["completion_mask"]) if m]
    teacher_completion = [i for i, m in zip(out["teacher_input_ids"], out["teacher_completion_mask"]) if m]
    assert bpe_tokenizer.decode(student_completion) == " Radio Access Network.</s>"
    assert out["input_ids"][0] == bpe_tokenizer.bos_token_id  # the BPE side has a BOS, the WordPiece side none
    assert wordpiece_tokenizer.decode(teacher_completion) == "radio access network. <|endoftext|>"
    assert out["teacher_input_ids"][0] != wordpiece_tokenizer.bos_token_id

    # Truncation: both sides keep the same completion text prefix, and a cut completion has no EOS on either side.
    long = {"prompt": "Explain the term.", "completion": " " + " ".join(["Radio access network carrier"] * 20)}
    cut = DualTokenizer(bpe_tokenizer, wordpiece_tokenizer, max_length=24)(long)
    assert len(cut["input_ids"]) <= 24 and len(cut["teacher_input_ids"]) <= 24
    student_text = bpe_tokenizer.decode([i for i, m in zip(cut["input_ids"], cut["completion_mask"]) if m])
    teacher_text = wordpiece_tokenizer.decode([i for i, m in zip(cut["teacher_input_ids"],
                                                                 cut["teacher_completion_mask"]) if m])
    assert "</s>" not in student_text and "<|endoftext|>" not in teacher_text
    assert student_text.lower().split() == teacher_text.split()
    assert len(student_text.split()) >= 4  # it kept as much as fits, not nothing

    batch = DualTokenizationCollator(bpe_tokenizer.pad_token_id, wordpiece_tokenizer.pad_token_id)([out, cut])
    assert batch["input_ids"].shape[1] == max(len(out["input_ids"]), len(cut["input_ids"]))
    assert batch["teacher_input_ids"].shape[1] == max(len(out["teacher_input_ids"]), len(cut["teacher_input_ids"]))
    assert (batch["labels"][0] != -100).sum() == sum(out["completion_mask"])
    assert (batch["teacher_labels"][1] != -100).sum() == sum(cut["teacher_completion_mask"])
    assert batch["teacher_attention_mask"][0].sum() == len(out["teacher_input_ids"])


def test_checkpoint_holds_projectors_saved_student_is_clean_and_resume_is_exact(
        tmp_path, bpe_tokenizer, wordpiece_tokenizer, demo_data):
    def run(output, **overrides):
        pair = (demo_model("llama", bpe_tokenizer, "student", seed=2),
                demo_model("qwen2", wordpiece_tokenizer, "teacher", seed=1))
        settings = dict(output_dir=str(tmp_path / output), max_steps=4, save_strategy="steps", save_steps=2,
                        teacher_logit_noise_std=0.5)
        trainer = cma_trainer(tmp_path, pair, bpe_tokenizer, wordpiece_tokenizer, demo_data["train"],
                              **{**settings, **overrides})
        return trainer

    full = run("full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / PROJECTOR_WEIGHTS).exists() and (checkpoint / "optimizer.pt").exists()
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert weights and not any("dskd" in key for key in weights)
    full.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert not any("dskd" in key for key in saved)
    reloaded = type(full.model).from_pretrained(str(tmp_path / "final"))
    assert set(reloaded.state_dict()) == set(k for k in full.model.state_dict() if "dskd" not in k)
    projectors = DSKDProjectors.from_saved(str(tmp_path / "final"))
    for name, value in full.projectors.state_dict().items():
        torch.testing.assert_close(projectors.state_dict()[name], value)
    # Published through the trainer's own view of its model: the student alone, projectors back in place after.
    from kd_trainers.recipe.publish import build_publish_folder

    published = load_file(build_publish_folder(full) + "/model.safetensors")
    assert set(published) == set(saved) and not any("dskd" in key for key in published)
    assert any("dskd" in key for key in full.model.state_dict())

    resumed = run("resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert logged(resumed, "loss")[-1] == logged(full, "loss")[-1]

    # And a later run can start its projectors from the saved ones.
    continued = run("continued", projector_path=str(tmp_path / "final"), max_steps=1)
    for name, value in continued.projectors.state_dict().items():
        torch.testing.assert_close(value, projectors.state_dict()[name])


def test_pinv_init_maps_teacher_states_to_teacher_logits_in_student_space(tmp_path, bpe_tokenizer, demo_data):
    student = demo_model("llama", bpe_tokenizer, "student", seed=2)
    teacher = demo_model("llama", bpe_tokenizer, "teacher", seed=1)
    trainer = DSKDTrainer(student, dskd_args(tmp_path, projector_init="pinv", projector_bias=False),
                          train_dataset=demo_data["train"], processing_class=bpe_tokenizer, teacher_model=teacher,
                          teacher_processing_class=bpe_tokenizer)
    w_s, w_t = student.get_output_embeddings().weight.detach(), teacher.get_output_embeddings().weight.detach()
    hidden = torch.randn(16, w_t.shape[1])
    with torch.no_grad():
        residual = (trainer.projectors.t2s(hidden) @ w_s.T - hidden @ w_t.T).norm()
        best = torch.linalg.lstsq(w_s, w_t).solution  # [D_S, D_T], the least-squares optimum
        optimum = (hidden @ best.T @ w_s.T - hidden @ w_t.T).norm()
    torch.testing.assert_close(residual, optimum, rtol=1e-3, atol=1e-3)
    assert trainer.projectors.t2s.bias is None


def test_teacher_argmax_target(tmp_path, bpe_tokenizer, demo_data):
    student = demo_model("llama", bpe_tokenizer, "student", seed=2)
    teacher = demo_model("llama", bpe_tokenizer, "teacher", seed=1)
    trainer = DSKDTrainer(student, dskd_args(tmp_path, t2s_target="teacher_argmax", max_steps=2, loss_chunk_size=7),
                          train_dataset=demo_data["train"], processing_class=bpe_tokenizer, teacher_model=teacher,
                          teacher_processing_class=bpe_tokenizer)
    hidden = torch.randn(2, 9, 128)
    labels = torch.randint(0, 100, (2, 9))
    labels[0, :4] = -100
    targets = trainer._teacher_argmax(hidden, teacher, labels)
    expected = (hidden @ teacher.get_output_embeddings().weight.T)[..., :len(bpe_tokenizer)].argmax(-1)
    assert torch.equal(targets[labels != -100], expected[labels != -100])
    assert (targets[labels == -100] == -100).all()
    trainer.train()


@pytest.mark.parametrize("overrides,message", [
    (dict(cross_model_attention=False),
     "cross_model_attention=False needs one shared vocabulary, but the student (<in-memory LlamaForCausalLM>) and the "
     "teacher (<in-memory Qwen2ForCausalLM>) tokenize differently. Leave cross_model_attention=None (it turns on for "
     "different tokenizers) or use a teacher with the student's tokenizer."),
    (dict(t2s_target="teacher_argmax"),
     "t2s_target='teacher_argmax' needs the teacher's prediction at each student position, which exists only under "
     "one shared vocabulary. Use t2s_target='gold'."),
    (dict(packing=True),
     "packing=True cannot be combined with DSKD across vocabularies, which aligns each example's two tokenizations "
     "separately. Set packing=False."),
    (dict(packing=True, token_alignment="exact"),
     "packing=True cannot be combined with DSKD across vocabularies, which aligns each example's two tokenizations "
     "separately. Set packing=False."),
])
def test_impossible_settings_fail_before_training(tmp_path, cross_vocab_pair, bpe_tokenizer, wordpiece_tokenizer,
                                                  demo_data, overrides, message):
    with pytest.raises(ValueError) as error:
        cma_trainer(tmp_path, cross_vocab_pair, bpe_tokenizer, wordpiece_tokenizer, demo_data["train"], **overrides)
    assert str(error.value) == message


def test_text_data_is_refused_under_cma(tmp_path, cross_vocab_pair, bpe_tokenizer, wordpiece_tokenizer):
    data = load_demo_dataset("text")["train"]
    with pytest.raises(ValueError) as error:
        cma_trainer(tmp_path, cross_vocab_pair, bpe_tokenizer, wordpiece_tokenizer, data)
    assert str(error.value).startswith(
        "DSKD needs prompt/completion or messages data, got columns ['answer', 'kind', 'text']. The 'text' format has "
        "no response boundary")


@pytest.mark.parametrize("field,value,message", [
    ("fp16", True, "DSKD does not train in fp16 (fp16=True): the cross-model attention mask (-1e5) and the "
                   "vocabulary-sized projected logits overflow fp16, and the official code fails there too. Use "
                   "bf16=True, or neither for fp32."),
    ("projector_lr", 0, "projector_lr must be a number > 0, got 0."),
    ("t2s_target", "argmax", "t2s_target must be one of ['gold', 'teacher_argmax'], got 'argmax'."),
    ("token_alignment", "greedy", "token_alignment must be one of ['attention', 'exact'], got 'greedy'."),
    ("s2t_divergence", "kl", "s2t_divergence must be one of ['forward_kl', 'jsd', 'reverse_kl', 'skew_forward_kl', "
                             "'skew_reverse_kl', 'tvd'], got 'kl'."),
])
def test_config_rejects_bad_values(tmp_path, field, value, message):
    with pytest.raises(ValueError) as error:
        dskd_args(tmp_path, **{field: value})
    assert str(error.value) == message


def test_gpt2_teacher_with_tied_head_and_peft_gpt_neox_student(tmp_path, bpe_tokenizer, wordpiece_tokenizer,
                                                              demo_data):
    """Embeddings and heads are found through the transformers API (GPT-2: `wte`, tied; GPT-NeoX: `embed_in` /
    `embed_out`), through PEFT wrappers on both sides."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    student = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=128, pad_token_id=bpe_tokenizer.pad_token_id,
        eos_token_id=bpe_tokenizer.eos_token_id, bos_token_id=bpe_tokenizer.bos_token_id))
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=len(wordpiece_tokenizer), n_embd=64, n_layer=2, n_head=4,
                                         n_positions=128, eos_token_id=wordpiece_tokenizer.eos_token_id,
                                         bos_token_id=wordpiece_tokenizer.eos_token_id))
    assert teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight
    teacher = get_peft_model(teacher, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    trainer = DSKDTrainer(student, dskd_args(tmp_path, max_steps=4), train_dataset=demo_data["train"],
                          processing_class=bpe_tokenizer, teacher_model=teacher,
                          teacher_processing_class=wordpiece_tokenizer,
                          peft_config=LoraConfig(r=4, target_modules=["query_key_value"]))
    assert trainer.cross_model_attention
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                   if "lora_B" in n}
    trainer.train()
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))
    assert any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if n in lora_before)
    trainer.save_model(str(tmp_path / "adapter"))
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any("dskd" in key for key in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert os.path.exists(tmp_path / "adapter" / PROJECTOR_WEIGHTS)


def test_cma_in_bf16_stays_finite(tmp_path, bpe_tokenizer, wordpiece_tokenizer, demo_data):
    """Models in bf16: the fp32 attention scores with the -1e5 mask and the fp32 chunked losses stay finite."""
    student = demo_model("llama", bpe_tokenizer, "student", seed=2).to(torch.bfloat16)
    teacher = demo_model("qwen2", wordpiece_tokenizer, "teacher", seed=1).to(torch.bfloat16)
    trainer = DSKDTrainer(student, teacher, args=dskd_args(tmp_path, max_steps=3), train_dataset=demo_data["train"],
                          processing_class=bpe_tokenizer, teacher_processing_class=wordpiece_tokenizer)
    assert trainer.projectors.query.weight.dtype == torch.bfloat16
    trainer.train()
    for key in ("loss", "ce_loss", "t2s_ce_loss", "t2s_kd_loss", "s2t_kd_loss"):
        assert all(torch.isfinite(torch.tensor(logged(trainer, key)))), key
    assert all(torch.isfinite(p.float()).all() for p in trainer.projectors.parameters())


def test_teacher_tokenizer_from_config_path_turns_cma_on(tmp_path, cross_vocab_pair, bpe_tokenizer,
                                                         wordpiece_tokenizer, demo_data):
    wordpiece_tokenizer.save_pretrained(tmp_path / "teacher-tokenizer")
    student, teacher = cross_vocab_pair
    trainer = DSKDTrainer(student, teacher, args=dskd_args(tmp_path, max_steps=1,
                                                           teacher_tokenizer_name_or_path=str(tmp_path /
                                                                                              "teacher-tokenizer")),
                          train_dataset=demo_data["train"], processing_class=bpe_tokenizer)
    assert trainer.cross_model_attention
    assert trainer.teacher_processing_class.get_vocab() == wordpiece_tokenizer.get_vocab()
    assert trainer.kd_settings()["method"] == "DSKD with cross-model attention"
    trainer.train()
    trainer.create_model_card(model_name="dskd-student")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| `method` | DSKD with cross-model attention |" in card and "dskd" in card and "2406.17328" in card


def test_exact_pairs_are_the_groups_with_one_label_token_each_side():
    """Group 0: one token each (paired); group 1: two student tokens (not exact); group 2: paired; group 3: the
    teacher's alone (its end marker); prompt and padding positions (label -100) never pair."""
    student_labels, student_groups = torch.tensor([[-100, 5, 6, 7, 8, -100]]), torch.tensor([[-1, 0, 1, 1, 2, -1]])
    teacher_labels, teacher_groups = torch.tensor([[-100, -100, 1, 2, 3, 4]]), torch.tensor([[-1, -1, 0, 1, 2, 3]])
    teacher_of_student, student_of_teacher = exact_pairs(student_labels, student_groups, teacher_labels,
                                                         teacher_groups)
    assert teacher_of_student.tolist() == [[-1, 2, -1, -1, 4, -1]]
    assert student_of_teacher.tolist() == [[-1, -1, 1, -1, 4, -1]]


def test_exact_token_alignment_is_dskd_at_the_exact_pairs_and_trains(tmp_path, cross_vocab_pair, bpe_tokenizer,
                                                                    wordpiece_tokenizer, demo_data):
    """DSKDv2's exact token alignment across the demo's two vocabularies: the trainer's loss on a batch is the
    dual-space loss with each student position's t2s state taken from its exact partner (found here by a loop over
    the groups) and the s2t terms on the paired teacher positions only; training moves the student and the
    projectors."""
    trainer = cma_trainer(tmp_path, cross_vocab_pair, bpe_tokenizer, wordpiece_tokenizer, demo_data["train"],
                          token_alignment="exact", max_steps=3, teacher_logit_noise_std=0.0)
    assert trainer.exact_alignment and not trainer.cross_model_attention
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)

    student, teacher = trainer.model, cross_vocab_pair[1]
    projectors = trainer.projectors
    with torch.no_grad():
        student_hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                       ).last_hidden_state[:, :-1]
        teacher_hidden = teacher.model(input_ids=batch["teacher_input_ids"],
                                       attention_mask=batch["teacher_attention_mask"]).last_hidden_state[:, :-1]
    labels, teacher_labels = batch["labels"][:, 1:], batch["teacher_labels"][:, 1:]
    groups, teacher_groups = batch["aligned_group"][:, 1:], batch["teacher_aligned_group"][:, 1:]
    t2s_hidden = torch.zeros_like(student_hidden)
    s2t_hidden = torch.zeros(*teacher_hidden.shape, dtype=student_hidden.dtype)
    t2s_labels, s2t_labels = torch.full_like(labels, -100), torch.full_like(teacher_labels, -100)
    pairs = 0
    for b in range(labels.size(0)):
        for g in set(groups[b].tolist()) - {-1}:
            mine = [i for i in range(labels.size(1)) if groups[b, i] == g and labels[b, i] != -100]
            theirs = [j for j in range(teacher_labels.size(1)) if teacher_groups[b, j] == g
                      and teacher_labels[b, j] != -100]
            if len(mine) == 1 and len(theirs) == 1:
                (i,), (j,) = mine, theirs
                with torch.no_grad():
                    t2s_hidden[b, i] = projectors.t2s(teacher_hidden[b, j])
                    s2t_hidden[b, j] = projectors.s2t(student_hidden[b, i])
                t2s_labels[b, i], s2t_labels[b, j] = labels[b, i], teacher_labels[b, j]
                pairs += 1
    assert 0 < pairs < int((labels != -100).sum())  # some groups are exact pairs, not all
    args = trainer.args
    expected = dual_space_loss(
        student_hidden, student.get_output_embeddings(), t2s_hidden, labels, teacher_hidden,
        teacher.get_output_embeddings(), s2t_hidden, s2t_labels,
        LossSettings(temperature=args.kd_temperature, kd_weight=args.kd_weight, temperature_squared=False),
        gate_t2s_kd=True, t2s_labels=t2s_labels, student_vocab_size=len(bpe_tokenizer),
        teacher_vocab_size=len(wordpiece_tokenizer))
    torch.testing.assert_close(loss.detach(), expected.loss, rtol=1e-5, atol=1e-6)

    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    # every weight but the attention's query projector, which exact alignment has no use for
    assert all(torch.equal(p, before[n]) == ("query" in n) for n, p in student.named_parameters())
    logs = [log for log in trainer.state.log_history if "s2t_accuracy" in log]
    assert len(logs) == 3 and trainer.kd_settings()["method"] == "DSKD with exact token alignment"
