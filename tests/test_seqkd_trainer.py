"""SeqKDTrainer: the teacher's completions are generated once (cached, resumable), then the student learns them."""

import json
import os

import pytest
import torch
from datasets import load_from_disk

from kd_trainers import SeqKDConfig, SeqKDTrainer
from kd_trainers.models import generation
from kd_trainers.data import teacher_completions as seqkd_generate


def seqkd_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), bf16=False, max_steps=12, per_device_train_batch_size=8,
                  learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                  max_length=64, seed=0, seqkd_max_new_tokens=12, seqkd_batch_size=16,
                  seqkd_cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return SeqKDConfig(**values)


@pytest.fixture
def prompts(demo_data):
    return demo_data["train"].select(range(40))


@pytest.fixture
def generate_calls(monkeypatch):
    calls = []
    real = generation.generate_predictions

    def counting(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(seqkd_generate, "generate_predictions", counting)
    return calls


def test_student_learns_the_teachers_completions_and_the_set_is_reused(tmp_path, student, teacher, bpe_tokenizer,
                                                                        prompts, generate_calls):
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = SeqKDTrainer(student, seqkd_args(tmp_path), train_dataset=prompts, processing_class=bpe_tokenizer,
                           teacher_model=teacher, teacher_processing_class=bpe_tokenizer)
    assert generate_calls == [40]  # one block: 16 * 8 prompts per part
    folder = trainer.seqkd_dataset_dir
    generated = load_from_disk(os.path.join(folder, "dataset"))
    # The completions are the teacher's greedy ones, not the dataset's.
    expected = generation.generate_predictions(teacher, bpe_tokenizer, prompts["prompt"][:3], max_new_tokens=12,
                                               strip=False)
    assert generated["completion"][:3] == [text.rstrip() for text in expected]
    assert generated["completion"] != prompts["completion"] and generated["prompt"] == prompts["prompt"]
    info = json.load(open(os.path.join(folder, "generation.json")))
    assert info["settings"] == {"max_new_tokens": 12, "do_sample": False} and info["num_examples"] == 40

    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert all(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    trainer.save_model()
    trainer.create_model_card()
    assert os.path.exists(os.path.join(tmp_path, "out", "model.safetensors"))
    assert "Seq-KD (SFT on teacher outputs)" in open(os.path.join(tmp_path, "out", "README.md")).read()

    # A second run (another output folder, KD on top) finds the set and generates nothing.
    again = SeqKDTrainer(student, seqkd_args(tmp_path, output_dir=str(tmp_path / "again"), kd_weight=0.5),
                         train_dataset=prompts, processing_class=bpe_tokenizer, teacher_model=teacher,
                         teacher_processing_class=bpe_tokenizer)
    assert generate_calls == [40] and again.seqkd_dataset_dir == folder
    again.train()
    assert [log for log in again.state.log_history if "kd_loss" in log]


def test_an_interrupted_generation_resumes_from_its_finished_parts(tmp_path, student, teacher, bpe_tokenizer,
                                                                   prompts, generate_calls):
    args = seqkd_args(tmp_path, seqkd_batch_size=2)  # 16 prompts per part: parts of 16, 16 and 8
    first = SeqKDTrainer(student, args, train_dataset=prompts, processing_class=bpe_tokenizer,
                         teacher_model=teacher, teacher_processing_class=bpe_tokenizer)
    assert generate_calls == [16, 16, 8]
    folder = first.seqkd_dataset_dir
    complete = load_from_disk(os.path.join(folder, "dataset"))["completion"]
    os.remove(os.path.join(folder, "done.json"))  # as if killed after the first part
    os.remove(os.path.join(folder, "parts", "part-00001.jsonl"))
    os.remove(os.path.join(folder, "parts", "part-00002.jsonl"))
    generate_calls.clear()
    second = SeqKDTrainer(student, seqkd_args(tmp_path, seqkd_batch_size=2), train_dataset=prompts,
                          processing_class=bpe_tokenizer, teacher_model=teacher, teacher_processing_class=bpe_tokenizer)
    assert generate_calls == [16, 8]
    assert load_from_disk(os.path.join(second.seqkd_dataset_dir, "dataset"))["completion"] == complete


def test_sft_alone_needs_no_shared_vocabulary_but_kd_on_top_does(tmp_path, student, bpe_tokenizer,
                                                                 wordpiece_tokenizer, prompts):
    from kd_trainers.demo import demo_model

    other = demo_model("qwen2", wordpiece_tokenizer, "teacher", seed=1)
    trainer = SeqKDTrainer(student, seqkd_args(tmp_path, max_steps=2), train_dataset=prompts,
                           processing_class=bpe_tokenizer, teacher_model=other,
                           teacher_processing_class=wordpiece_tokenizer)
    trainer.train()
    with pytest.raises(ValueError, match="DSKDTrainer"):
        SeqKDTrainer(student, seqkd_args(tmp_path, kd_weight=0.5), train_dataset=prompts,
                     processing_class=bpe_tokenizer, teacher_model=other, teacher_processing_class=wordpiece_tokenizer)


def test_sft_alone_is_two_steps_generation_then_sfttrainer_without_the_teacher(tmp_path, bpe_tokenizer, teacher,
                                                                               prompts, monkeypatch):
    """At kd_weight=0 the teacher generates, is released, and the training is exactly `SFTTrainer` on the generated
    dataset folder: the same weights after the same steps, and no teacher held during the run."""
    import copy
    import gc
    import weakref

    from trl import SFTConfig

    from kd_trainers.demo import demo_model
    from kd_trainers.teachers import resident as teacher_setup
    from kd_trainers.sft import SFTTrainer

    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    loaded = []
    real_load = teacher_setup.load_teacher
    monkeypatch.setattr(teacher_setup, "load_teacher", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    steps = dict(max_steps=3, per_device_train_batch_size=8, learning_rate=3e-3, bf16=False, report_to=[],
                 save_strategy="no", disable_tqdm=True, max_length=64, seed=0, logging_steps=1)

    seqkd = SeqKDTrainer(demo_model("llama", bpe_tokenizer, "student", seed=2),
                         seqkd_args(tmp_path, **steps, output_dir=str(tmp_path / "seqkd")), train_dataset=prompts,
                         processing_class=copy.deepcopy(bpe_tokenizer), teacher_model=str(folder))
    teacher_ref = weakref.ref(loaded.pop())
    gc.collect()
    assert seqkd.teacher_model is None and teacher_ref() is None  # released after generating
    seqkd.train()

    generated = load_from_disk(os.path.join(seqkd.seqkd_dataset_dir, "dataset"))
    sft = SFTTrainer(demo_model("llama", bpe_tokenizer, "student", seed=2),
                     SFTConfig(output_dir=str(tmp_path / "sft"), **steps), train_dataset=generated,
                     processing_class=copy.deepcopy(bpe_tokenizer))
    sft.train()
    for (name, ours), theirs in zip(seqkd.model.named_parameters(), sft.model.parameters()):
        assert torch.equal(ours, theirs), name
    assert [log["loss"] for log in seqkd.state.log_history if "loss" in log] == \
        [log["loss"] for log in sft.state.log_history if "loss" in log]

    # With logit KD on top the teacher loaded for generation is the one kept beside the student.
    kd = SeqKDTrainer(demo_model("llama", bpe_tokenizer, "student", seed=2),
                      seqkd_args(tmp_path, **steps, output_dir=str(tmp_path / "kd"), kd_weight=0.5),
                      train_dataset=prompts, processing_class=copy.deepcopy(bpe_tokenizer), teacher_model=str(folder))
    assert kd.accelerator.unwrap_model(kd.teacher_model) is loaded[-1] and len(loaded) == 1
