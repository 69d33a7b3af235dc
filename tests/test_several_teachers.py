"""Several teachers at once through the trainer: two identical teachers at 0.5/0.5 train exactly as one, whatever
their kind (in memory, served); a cache or a server as the only member is the single-teacher trainer; routing by a
dataset column sends each example to its teacher; the logs carry each teacher's KD term and the model card lists
them; bad lists are refused naming the entry."""

import json

import pytest
import torch
from test_kd_trainer import kd_args

from kd_trainers import KDTrainer
from kd_trainers.demo import demo_model
from kd_trainers.losses import distillation_loss
from kd_trainers.served_teacher.server import LoopbackServer, PromptScorer
from kd_trainers.teachers.entries import ROUTE_KEY, teacher_entries


def args(tmp_path, **overrides):
    return kd_args(tmp_path, **{"max_steps": 2, **overrides})


@pytest.fixture
def rows(demo_data):
    return demo_data["train"].select(range(32))


def _student(tokenizer):
    return demo_model("llama", tokenizer, "student", seed=2)


def _losses(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_two_identical_teachers_at_half_weight_train_as_one(tmp_path, teacher, bpe_tokenizer, rows):
    """A teacher in memory and the same teacher served (k = V), at 0.5/0.5: every logged loss and the weights after
    training are one teacher's; each teacher's own KD term is logged; the model card lists both with their weights."""
    one_student = _student(bpe_tokenizer)
    one = KDTrainer(model=one_student, teacher_model=teacher, args=args(tmp_path / "one"), train_dataset=rows,
                    processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer)
    one.train()
    scorer = PromptScorer(teacher, bpe_tokenizer, "demo:llama/teacher/bpe", max_logprobs=len(bpe_tokenizer))
    with LoopbackServer(scorer) as server:
        two_student = _student(bpe_tokenizer)
        two = KDTrainer(model=two_student, args=args(tmp_path / "two", teacher_server_k=len(bpe_tokenizer)),
                        train_dataset=rows, processing_class=bpe_tokenizer,
                        teacher_models=[{"model": teacher, "weight": 0.5, "name": "resident"},
                                        {"url": server.url, "weight": 0.5, "name": "served",
                                         "tokenizer": bpe_tokenizer}])
        two.train()
        two.create_model_card()
    for a, b in zip(_losses(one), _losses(two)):
        for name in ("loss", "ce_loss", "kd_loss"):
            assert a[name] == pytest.approx(b[name], rel=1e-5)
        assert b["kd_loss_resident"] == pytest.approx(a["kd_loss"], rel=1e-5)
        assert b["kd_loss_served"] == pytest.approx(a["kd_loss"], rel=1e-5)
    start = _student(bpe_tokenizer)
    for trained, reference, initial in zip(two_student.parameters(), one_student.parameters(), start.parameters()):
        update = (reference - initial).abs().max()
        assert update > 1e-3 and (trained - reference).abs().max() < 0.02 * update
    card = (tmp_path / "two" / "out" / "README.md").read_text()
    assert "| `teachers` | resident: " in card and "(weight 0.5); served: served at " in card


def test_a_cache_or_a_server_alone_is_the_single_teacher_trainer(tmp_path, teacher, bpe_tokenizer, rows):
    """Wiring: `teacher_models=[{cache: ...}]` reads the same batch targets as `teacher_cache=`, and
    `[{url: ...}]` as `teacher_url=`."""
    cache = tmp_path / "cache"
    KDTrainer(model=_student(bpe_tokenizer), teacher_model=teacher, args=args(tmp_path, teacher_cache=str(cache)),
              train_dataset=rows, processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer)
    scorer = PromptScorer(teacher, bpe_tokenizer, "demo:llama/teacher/bpe")
    with LoopbackServer(scorer) as server:
        for single, member in (({"teacher_cache": str(cache)}, {"cache": str(cache)}),
                               ({"teacher_url": server.url}, {"url": server.url, "tokenizer": bpe_tokenizer})):
            student = _student(bpe_tokenizer)
            # T = 2 with a top-20 server: the approximation, asked for by name (the cache is exact at its T).
            approximate = {"teacher_server_approximate_temperature": True}
            one = KDTrainer(model=student, args=args(tmp_path, **single, **approximate), train_dataset=rows,
                            processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer)
            several = KDTrainer(model=student, args=args(tmp_path, **approximate), train_dataset=rows,
                                processing_class=bpe_tokenizer, teacher_models=[member])
            losses = [trainer.compute_loss(student, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))
                      for trainer in (one, several)]
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)


def test_routing_by_column_sends_each_example_to_its_teacher(tmp_path, teacher, bpe_tokenizer, rows):
    """Each example's `teacher` column names its teacher: the batch's loss is the readable reference with each row's
    target from its own teacher's logits; each teacher's KD term is over its own examples."""
    other = demo_model("llama", bpe_tokenizer, "teacher", seed=7)
    routed_rows = rows.add_column("teacher", ["a" if index % 3 else "b" for index in range(len(rows))])
    student = _student(bpe_tokenizer)
    trainer = KDTrainer(model=student, args=args(tmp_path, teacher_column="teacher"), train_dataset=routed_rows,
                        processing_class=bpe_tokenizer,
                        teacher_models=[{"model": teacher, "name": "a"}, {"model": other, "name": "b"}])
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    route = batch[ROUTE_KEY]
    assert set(route.tolist()) == {0, 1}
    loss = trainer.compute_loss(student, batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logits = [model(**inputs).logits[:, :-1] for model in (teacher, other)]
        student_logits = student(**inputs).logits[:, :-1]
    chosen = torch.where(route[:, None, None] == 0, *logits)
    reference = distillation_loss(student_logits, chosen, batch["labels"][:, 1:], temperature=2.0, kd_weight=0.5)
    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)
    # The route is each example's own column: the prepared rows kept it, and the collator reads it.
    prepared = [trainer.train_dataset[index] for index in range(8)]
    routed = trainer.data_collator(prepared)[ROUTE_KEY]
    assert routed.tolist() == [["a", "b"].index(row["teacher"]) for row in prepared]
    trainer.train()
    logged = _losses(trainer)[0]
    assert logged["kd_loss_a"] != logged["kd_loss_b"]


@pytest.mark.parametrize("entries, message", [
    ([], "non-empty list"),
    ([{"model": "x", "url": "http://h/v1"}], r"teacher_models\[0\]: give exactly one of model, cache and url"),
    ([{"model": "x", "wieght": 2}], r"teacher_models\[0\]: unknown key\(s\) \['wieght'\]"),
    ([{"model": "x", "weight": 0}], r"teacher_models\[0\].weight: 0 should be a number > 0"),
    ([{"cache": "c", "adapter": "a"}], r"teacher_models\[0\].adapter: only a teacher in memory"),
    ([{"cache": "c", "tokenizer": "t"}], r"teacher_models\[0\].tokenizer: a cache's tokenizer is the student's"),
    (["x", {"model": "y", "name": "teacher0"}], "the names .* repeat"),
])
def test_bad_teacher_lists_are_refused(entries, message):
    with pytest.raises(ValueError, match=message):
        teacher_entries(entries)


def test_routing_settings_are_checked_before_training(tmp_path, teacher, student, bpe_tokenizer, rows):
    routed_rows = rows.add_column("teacher", ["a"] * (len(rows) - 1) + ["c"])
    members = [{"model": teacher, "name": "a"}, {"model": teacher, "name": "b"}]
    with pytest.raises(ValueError, match=r"teacher_column='teacher': the value 'c' names no teacher; the teachers "
                                         r"are \['a', 'b'\]"):
        KDTrainer(model=student, args=args(tmp_path, teacher_column="teacher"), train_dataset=routed_rows,
                  processing_class=bpe_tokenizer, teacher_models=members)
    with pytest.raises(ValueError, match="teacher_column='teacher' routes each example to one teacher, so the "
                                         r"weights of \['a'\] would do nothing"):
        KDTrainer(model=student, args=args(tmp_path, teacher_column="teacher"), train_dataset=routed_rows,
                  processing_class=bpe_tokenizer, teacher_models=[{**members[0], "weight": 2.0}, members[1]])
    with pytest.raises(ValueError, match="teacher_column='teacher' routes examples among several teachers, and "
                                         "KDTrainer has one"):
        KDTrainer(model=student, teacher_model=teacher, args=args(tmp_path, teacher_column="teacher"),
                  train_dataset=routed_rows, processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer)
    with pytest.raises(ValueError, match="teacher_models lists the teachers, and teacher_model names one more"):
        KDTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=rows,
                  processing_class=bpe_tokenizer, teacher_models=members)


@pytest.mark.slow
def test_a_recipe_with_teachers_trains_from_both(tmp_path):
    """`teachers:` in a recipe (two demo teachers, weights 0.3/0.7): kd-train trains, logs each teacher's KD term,
    and run_info.json and the model card list both with their weights. A demo spec names its tokenizer: no warning
    that one was assumed."""
    import yaml

    from kd_trainers.cli import train as cli

    recipe = tmp_path / "two_teachers.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "kd", "model_name_or_path": "demo:llama/student/bpe", "dataset_name": "demo",
        "dataset_config": "prompt_completion", "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 64,
        "logging_steps": 1, "save_steps": 2, "report_to": "none", "bf16": False, "output_dir": str(tmp_path / "out"),
        "teachers": [{"model": "demo:llama/teacher/bpe", "weight": 0.3, "name": "wide"},
                     {"model": "demo:qwen2/teacher/bpe", "weight": 0.7, "name": "qwen"}]}))
    import warnings

    from kd_trainers.teachers.loading import AssumedTeacherTokenizer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main([str(recipe)]) == 0
    assert not [warning for warning in caught if issubclass(warning.category, AssumedTeacherTokenizer)]
    out = tmp_path / "out"
    info = json.loads((out / "run_info.json").read_text())
    assert [(t["name"], t["kind"], t["teacher"], t["weight"]) for t in info["teachers"]] == [
        ("wide", "model", "demo:llama/teacher/bpe", 0.3), ("qwen", "model", "demo:qwen2/teacher/bpe", 0.7)]
    card = (out / "README.md").read_text()
    assert "| `teachers` | wide: demo:llama/teacher/bpe (weight 0.3); qwen: demo:qwen2/teacher/bpe (weight 0.7) |" \
        in card
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "kd_loss" in entry]
    assert len(logged) == 2 and all(entry["kd_loss_wide"] > 0 and entry["kd_loss_qwen"] > 0 for entry in logged)
