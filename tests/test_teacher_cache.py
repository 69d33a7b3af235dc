"""The teacher cache: its record format, a trainer that reads it in place of a teacher (the same targets as the
resident teacher's, through the same engine), an interrupted pass resumed, and stale caches refused."""

import json
import os

import pytest
import torch

from kd_trainers import KDConfig, KDTrainer
from kd_trainers.losses import LossSettings, sparse_distillation_terms
from kd_trainers.losses.sparse import sampled_targets, top_k_targets
from kd_trainers.teacher_cache import format as record_format
from kd_trainers.teacher_cache import writer


ROWS = 300  # two blocks of the train split


def cache_args(tmp_path, cache, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), bf16=False, max_steps=3, per_device_train_batch_size=8,
                  learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                  max_length=64, kd_temperature=2.0, kd_weight=0.5, seed=0, teacher_cache=str(cache))
    values.update(overrides)
    return KDConfig(**values)


def cached_trainer(tmp_path, cache, student, tokenizer, train, teacher=None, **overrides):
    return KDTrainer(model=student, teacher_model=teacher, args=cache_args(tmp_path, cache, **overrides),
                     train_dataset=train, processing_class=tokenizer,
                     teacher_processing_class=tokenizer if teacher is not None else None)


def first_batch_loss(trainer, student, teacher):
    """`(loss, labels [B, T-1], the teacher's logits at the label tokens [N, V], the student's hidden states)` of the
    trainer's first batch."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(student, batch)
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits[:, :-1][labels != -100]
        hidden = student.model(**model_inputs).last_hidden_state[:, :-1]
    return loss, labels, teacher_logits, hidden, batch


@pytest.fixture
def train_rows(demo_data):
    return demo_data["train"].select(range(ROWS))


@pytest.mark.parametrize("vocab", [640, 70_000])
def test_record_round_trip(vocab):
    """Ids exactly, log-probabilities within half a step (before the renormalisation that makes each token sum to
    one), the tail in float16; at most k·(id bytes + 1) + 2 bytes a token."""
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(50, vocab, generator=generator)
    id_bytes = record_format.id_bytes_for(vocab)
    assert id_bytes == (2 if vocab < 65_536 else 3)
    exact = top_k_targets(logits, 32)
    record = record_format.encode(exact.ids, exact.log_probs, exact.tail_log_mass, id_bytes)
    assert len(record) <= record_format.raw_size(50, 32, id_bytes)
    decoded = record_format.decode(record, 50, 32, id_bytes, "top_k")
    assert torch.equal(decoded.ids, exact.ids)  # topk's order is the record's: most probable first
    torch.testing.assert_close(decoded.tail_log_mass, exact.tail_log_mass, rtol=1e-3, atol=1e-3)
    shift = decoded.log_probs - (-torch.round(-exact.log_probs * 16) / 16)
    assert (shift - shift[:, :1]).abs().max() < 1e-5  # one renormalising constant per token
    assert (decoded.log_probs - exact.log_probs).abs().max() < 1 / 32 + shift.abs().max() + 1e-6
    total = torch.logaddexp(torch.logsumexp(decoded.log_probs, -1), decoded.tail_log_mass)
    torch.testing.assert_close(total, torch.zeros(50), atol=1e-5, rtol=0)
    draws = sampled_targets(logits, 16, generator)
    decoded = record_format.decode(record_format.encode(draws.ids, draws.log_probs, draws.tail_log_mass, id_bytes),
                                   50, 16, id_bytes, "sampled")
    assert torch.equal(decoded.ids.sort(-1).values, draws.ids.sort(-1).values)


def test_trainer_reads_the_cache_in_place_of_the_teacher(tmp_path, student, teacher, bpe_tokenizer, train_rows):
    """A second trainer with no teacher at all reads the cache the first wrote; its batch's loss is the engine's on
    the resident teacher's own top-k targets of that batch (through the record format), and it trains."""
    cache = tmp_path / "cache"
    writer_trainer = cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, teacher=teacher)
    assert writer_trainer.teacher_model is None
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["complete"] and info["splits"]["train"]["rows"] == ROWS and info["splits"]["train"]["blocks"] == 2
    assert info["components"]["settings"]["k"] == 32 and info["components"]["teacher"]["weights"]

    trainer = cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows)
    assert trainer.teacher_model is None and trainer.teacher_cache.key == info["key"]
    loss, labels, teacher_logits, hidden, batch = first_batch_loss(trainer, student, teacher)
    # The run's temperature is 2: the cache stores the tail at 1 and at 2, and the target is exact at 2.
    assert info["components"]["settings"]["temperatures"] == [1.0, 2.0]
    exact = top_k_targets(teacher_logits, 32, temperature=2.0)
    tails = torch.stack([exact.tail_log_mass, exact.tempered_tail_log_mass])
    stored = record_format.decode(record_format.encode(exact.ids, exact.log_probs, tails, 2),
                                  exact.ids.size(0), 32, 2, "top_k", num_tails=2, tempered_index=1, temperature=2.0)
    reference = sparse_distillation_terms(hidden, student.lm_head, stored, labels,
                                          LossSettings(temperature=2.0, kd_weight=0.5), tail="bucket")
    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)

    # The other tail treatment, on the same batch: the engine's spread-tail loss, which differs.
    spread = cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, teacher_cache_tail="spread")
    spread_batch = spread._prepare_inputs(next(iter(spread.get_train_dataloader())))
    assert torch.equal(spread_batch["input_ids"], batch["input_ids"])
    spread_reference = sparse_distillation_terms(hidden, student.lm_head, stored, labels,
                                                 LossSettings(temperature=2.0, kd_weight=0.5), tail="spread")
    spread_loss = spread.compute_loss(student, spread_batch)
    torch.testing.assert_close(spread_loss, spread_reference.loss, rtol=1e-5, atol=1e-6)
    assert abs(spread_loss - loss) > 1e-4

    before = {name: param.detach().clone() for name, param in student.named_parameters()}
    trainer.train()
    assert all(not torch.equal(param, before[name]) for name, param in student.named_parameters())
    assert trainer.kd_settings()["teacher"].startswith("teacher cache ")
    assert trainer.kd_settings()["teacher_cache_key"] == info["key"]


@pytest.mark.slow
def test_sampled_cache_stores_seeded_draws_and_trains_on_them(tmp_path, student, teacher, bpe_tokenizer,
                                                              train_rows):
    """`teacher_cache_mode=sampled` stores k draws a token (repeats allowed), the same for the same seed and others for
    another; the loss is the engine's on them."""
    settings = dict(teacher_cache_mode="sampled", teacher_cache_k=16, kd_weight=1.0)
    trainer = cached_trainer(tmp_path, tmp_path / "a", student, bpe_tokenizer, train_rows, teacher=teacher,
                             **settings)
    cached_trainer(tmp_path, tmp_path / "b", student, bpe_tokenizer, train_rows, teacher=teacher, **settings)
    cached_trainer(tmp_path, tmp_path / "c", student, bpe_tokenizer, train_rows, teacher=teacher, seed=1,
                   **settings)
    from kd_trainers.teacher_cache import TeacherCache, targets_from_batch

    a, b, c = (TeacherCache.open(str(tmp_path / name)).split("train")["teacher_record"] for name in "abc")
    assert a == b and a != c
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    targets = targets_from_batch(batch, "sampled")
    assert targets.kind == "sampled" and targets.ids.shape[1] == 16
    assert (targets.ids.sort(-1).values.diff(dim=-1) == 0).any()  # draws repeat where the teacher is confident
    labels = batch["labels"][:, 1:]
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        hidden = student.model(**model_inputs).last_hidden_state[:, :-1]
        loss = trainer.compute_loss(student, batch)
    reference = sparse_distillation_terms(hidden, student.lm_head, targets, labels,
                                          LossSettings(temperature=2.0, kd_weight=1.0))
    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)


def test_cache_stores_the_tail_at_its_temperatures_and_refuses_another(tmp_path, student, teacher, bpe_tokenizer,
                                                                        train_rows):
    """teacher_cache_temperatures: a cache written at T = 2 with [4] stores the tail at 1, 2 and 4; a run at T = 4
    reads it with the exact tail at 4 (its loss is the engine's on the exact tempered top-k of the resident teacher,
    through the record format), and a run at T = 3 is refused, naming the stored temperatures."""
    cache = tmp_path / "cache"
    cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, teacher=teacher,
                   teacher_cache_temperatures=[4.0])
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["components"]["settings"]["temperatures"] == [1.0, 2.0, 4.0]

    trainer = cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, kd_temperature=4.0)
    loss, labels, teacher_logits, hidden, _ = first_batch_loss(trainer, student, teacher)
    exact = top_k_targets(teacher_logits, 32)
    tails = torch.stack([exact.tail_log_mass, *(top_k_targets(teacher_logits, 32, temperature=t)
                                                .tempered_tail_log_mass for t in (2.0, 4.0))])
    stored = record_format.decode(record_format.encode(exact.ids, exact.log_probs, tails, 2), exact.ids.size(0),
                                  32, 2, "top_k", num_tails=3, tempered_index=2, temperature=4.0)
    reference = sparse_distillation_terms(hidden, student.lm_head, stored, labels,
                                          LossSettings(temperature=4.0, kd_weight=0.5), tail="bucket")
    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match=r"tail at temperatures \[1\.0, 2\.0, 4\.0\], not at temperature=3\.0"):
        cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, kd_temperature=3.0)


@pytest.mark.slow
def test_cache_batch_size_changes_the_forwards_only(tmp_path, student, teacher, bpe_tokenizer, train_rows):
    """Rows per teacher forward: 300 rows in 38 forwards of 8 or 7 of 50, with the same targets (up to the rounding
    of other matrix shapes: a code may move by one step)."""
    forwards = []
    handle = teacher.model.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        cached_trainer(tmp_path, tmp_path / "small", student, bpe_tokenizer, train_rows, teacher=teacher)
        small = len(forwards)
        cached_trainer(tmp_path, tmp_path / "large", student, bpe_tokenizer, train_rows, teacher=teacher,
                       teacher_cache_batch_size=50)
    finally:
        handle.remove()
    assert (small, len(forwards) - small) == (32 + 6, 6 + 1)  # blocks of 256 and 44 rows
    from kd_trainers.teacher_cache import TeacherCache

    caches = [TeacherCache.open(str(tmp_path / name)) for name in ("small", "large")]
    assert caches[0].key == caches[1].key  # the batch size is not part of what the cache holds
    rows = [cache.split("train") for cache in caches]
    for small_row, large_row in zip(*rows):
        first, second = (record_format.decode(row["teacher_record"], row["teacher_tokens"], 32, 2, "top_k",
                                              num_tails=len(caches[0].temperatures))
                         for row in (small_row, large_row))
        assert (first.ids == second.ids).float().mean() > 0.95
        assert (first.log_probs - second.log_probs).abs().max() <= 1 / 16 + 1e-4


@pytest.mark.slow
def test_interrupted_pass_resumes_to_the_same_cache(tmp_path, monkeypatch, student, teacher, bpe_tokenizer,
                                                   train_rows, demo_data):
    calls = []
    original = writer._write_block

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(args[3])
        return original(*args, **kwargs)

    splits = dict(train_dataset=train_rows, eval_dataset=demo_data["test"].select(range(40)))
    monkeypatch.setattr(writer, "_write_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        KDTrainer(model=student, teacher_model=teacher, args=cache_args(tmp_path, tmp_path / "cache"),
                  processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer, **splits)
    assert calls == [0, 1] and not (tmp_path / "cache" / "cache_info.json").exists()
    monkeypatch.setattr(writer, "_write_block", lambda *args, **kwargs: calls.append(args[3]) or original(*args,
                                                                                                         **kwargs))
    KDTrainer(model=student, teacher_model=teacher, args=cache_args(tmp_path, tmp_path / "cache"),
              processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer, **splits)
    assert calls == [0, 1, 0]  # only the eval split's block was left to write
    KDTrainer(model=student, teacher_model=teacher, args=cache_args(tmp_path, tmp_path / "whole"),
              processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer, **splits)
    resumed, whole = (json.loads((tmp_path / name / "cache_info.json").read_text()) for name in ("cache", "whole"))
    assert resumed["key"] == whole["key"] and resumed["splits"] == whole["splits"]
    from kd_trainers.teacher_cache import TeacherCache

    for split in ("train", "eval"):
        assert TeacherCache.open(str(tmp_path / "cache")).split(split)["teacher_record"] == \
            TeacherCache.open(str(tmp_path / "whole")).split(split)["teacher_record"]
    # A run without an eval split reads the train split alone: the eval rows it does not read do not bind it.
    trainer = KDTrainer(model=student, args=cache_args(tmp_path, tmp_path / "cache"), processing_class=bpe_tokenizer,
                        train_dataset=train_rows)
    assert trainer.teacher_cache.key == resumed["key"] and trainer.eval_dataset is None
    with pytest.raises(ValueError, match=r"data.eval.rows: stored 40, now 39"):  # a split it reads still must match
        KDTrainer(model=student, args=cache_args(tmp_path, tmp_path / "cache"), processing_class=bpe_tokenizer,
                  train_dataset=train_rows, eval_dataset=demo_data["test"].select(range(39)))


def test_a_stale_cache_is_refused_naming_what_differs(tmp_path, student, teacher, bpe_tokenizer, train_rows):
    cache = tmp_path / "cache"
    cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, teacher=teacher)
    with pytest.raises(ValueError, match=r"teacher_cache=.*other data or settings \(data.train.fingerprint: stored "
                                         r"'\w+', now '\w+'; data.train.rows: stored 300, now 299\)"):
        cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows.select(range(ROWS - 1)))
    with pytest.raises(ValueError, match="settings.k: stored 32, now 8"):
        cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, teacher_cache_k=8)
    with pytest.raises(ValueError, match="teacher.name: stored '<in-memory LlamaForCausalLM>', now 'other/teacher'"):
        cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, teacher="other/teacher")
    # A pass of other settings into a folder that holds a cache: refused before the teacher runs.
    with pytest.raises(ValueError, match="holds a cache \\(or a partial pass\\) of another .*settings.mode: stored "
                                         "'top_k', now 'sampled'"):
        os.remove(cache / "cache_info.json")  # as if that pass had been interrupted
        cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, teacher=teacher,
                       teacher_cache_mode="sampled", kd_weight=1.0)


def test_no_teacher_and_no_complete_cache_is_a_clear_error(tmp_path, student, bpe_tokenizer, train_rows):
    with pytest.raises(ValueError, match="holds no complete teacher cache, and no teacher is given to write it"):
        cached_trainer(tmp_path, tmp_path / "missing", student, bpe_tokenizer, train_rows)


@pytest.mark.parametrize("config,fields,message", [
    ("kd", {"teacher_cache_mode": "sampled", "divergence": "reverse_kl"},
     "divergence='reverse_kl' with a sampled teacher cache"),
    ("kd", {"teacher_cache_tail": "uniform"}, "teacher_cache_tail must be one of \\['bucket', 'spread'\\]"),
    ("kd", {"teacher_cache_k": 0}, "teacher_cache_k must be a positive integer, got 0"),
    ("kd", {"packing": True}, "packing=True with teacher_cache="),
    ("dskd", {}, "DSKD needs the teacher's hidden states"),
    ("gkd", {}, "GKD scores the student's own samples"),
    ("seqkd", {"kd_weight": 0.0}, "Seq-KD is then SFT on the teacher's completions"),
])
def test_settings_a_cache_cannot_serve_are_refused(tmp_path, config, fields, message):
    from kd_trainers import DSKDConfig, GKDConfig, SeqKDConfig

    config_class = {"kd": KDConfig, "dskd": DSKDConfig, "gkd": GKDConfig, "seqkd": SeqKDConfig}[config]
    with pytest.raises(ValueError, match=message):
        config_class(output_dir=str(tmp_path), report_to=[], teacher_cache=str(tmp_path / "cache"), **fields)


@pytest.mark.slow
@pytest.mark.distributed
def test_cache_pass_on_two_processes_then_training_without_a_teacher(tmp_path, capsys):
    """`kd-train cache-teacher` on two processes (each writes its share of the blocks) writes the cache one process
    writes; `kd-train RECIPE teacher_model_name_or_path=null` then trains from it, and names it as the teacher."""
    import subprocess
    import sys

    from kd_trainers.cli.train import main
    from kd_trainers.teacher_cache import TeacherCache

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ["max_length=64", "report_to=none", "dataset_test_split=null"]
    done = subprocess.run([sys.executable, "-m", "kd_trainers", "cache-teacher", "vanilla_kd",
                           f"teacher_cache={tmp_path / 'two'}", *common, "accelerate.config=multi_process",
                           "accelerate.num_processes=2"], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # 4 train blocks, round robin: each process writes 2.
    assert "process 0/2 wrote 2 blocks" in done.stdout and "process 1/2 wrote 2 blocks" in done.stdout
    assert main(["cache-teacher", "vanilla_kd", f"teacher_cache={tmp_path / 'one'}", *common]) == 0
    two, one = TeacherCache.open(str(tmp_path / "two")), TeacherCache.open(str(tmp_path / "one"))
    assert two.key == one.key
    assert two.split("train")["teacher_record"] == one.split("train")["teacher_record"]

    output = tmp_path / "run"
    assert main(["vanilla_kd", f"teacher_cache={tmp_path / 'two'}", "teacher_model_name_or_path=null", *common,
                 "max_steps=2", "save_steps=2", f"output_dir={output}"]) == 0
    info = json.loads((output / "run_info.json").read_text())
    assert info["teacher_cache"]["key"] == two.key and info["teacher_cache"]["k"] == 32
    assert info["teacher"].startswith("teacher cache ")
    card = (output / "README.md").read_text()
    assert f"teacher_cache_key` | {two.key}" in card


def test_seqkd_logit_term_reads_the_cache_of_the_teachers_own_completions(tmp_path, student, teacher, bpe_tokenizer,
                                                                          demo_data):
    """Seq-KD with kd_weight > 0: the teacher writes the training set (its completions), then the cache of its
    distribution over that set, and is released; the student trains against the cache."""
    from kd_trainers import SeqKDConfig, SeqKDTrainer

    args = SeqKDConfig(output_dir=str(tmp_path / "out"), bf16=False, max_steps=2, per_device_train_batch_size=8,
                       report_to=[], disable_tqdm=True, save_strategy="no", max_length=64, seqkd_max_new_tokens=8,
                       seqkd_cache_dir=str(tmp_path / "seqkd"), kd_weight=0.5, teacher_cache=str(tmp_path / "cache"))
    trainer = SeqKDTrainer(student, args, train_dataset=demo_data["train"].select(range(24)),
                           processing_class=bpe_tokenizer, teacher_model=teacher,
                           teacher_processing_class=bpe_tokenizer)
    assert trainer.teacher_model is None and trainer._generation_teacher is None
    generated = trainer.train_dataset
    assert trainer.teacher_cache.info["splits"]["train"]["rows"] == len(generated) == 24
    before = {name: param.detach().clone() for name, param in student.named_parameters()}
    trainer.train()
    assert any(not torch.equal(param, before[name]) for name, param in student.named_parameters())
    assert trainer.kd_settings()["teacher_cache_key"] == trainer.teacher_cache.key


def _flip_a_byte(path):
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.slow
def test_a_damaged_cache_is_named_and_a_pass_rewrites_only_what_is_damaged(tmp_path, monkeypatch, student, teacher,
                                                                          bpe_tokenizer, train_rows):
    """Every block carries its checksum: a block whose bytes changed (same size) is refused by name when nothing can
    rewrite it, and a pass with the teacher rewrites that block alone, to the same records; an info file cut in half
    is rebuilt from the plan and the blocks without running the teacher."""
    from kd_trainers.teacher_cache import TeacherCache
    from kd_trainers.teacher_cache.integrity import CacheProblem

    cache = tmp_path / "cache"
    cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, teacher=teacher)
    info = json.loads((cache / "cache_info.json").read_text())
    records = list(TeacherCache.open(str(cache)).split("train")["teacher_record"])  # read now, not memory-mapped
    block = cache / "train" / "block-000001"
    _flip_a_byte(next(block.glob("*.arrow")))
    with pytest.raises(CacheProblem, match=r"teacher_cache='.*cache': train/block-000001 has its file "
                                           r"data-00000-of-00001.arrow changed since it was written .*Run `kd-train "
                                           r"cache-teacher RECIPE teacher_cache=.*cache`"):
        cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows)
    calls = []
    original = writer._write_block
    monkeypatch.setattr(writer, "_write_block", lambda *args, **kwargs: calls.append(args[3]) or original(*args,
                                                                                                         **kwargs))
    cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, teacher=teacher)
    assert calls == [1]
    assert json.loads((cache / "cache_info.json").read_text()) == info
    assert list(TeacherCache.open(str(cache), whole=True).split("train")["teacher_record"]) == records
    text = (cache / "cache_info.json").read_text()
    (cache / "cache_info.json").write_text(text[: len(text) // 2])
    with pytest.raises(CacheProblem, match="cache_info.json cannot be read"):
        cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows)
    cached_trainer(tmp_path, cache, student, bpe_tokenizer, train_rows, teacher=teacher)
    assert calls == [1] and json.loads((cache / "cache_info.json").read_text()) == info
    assert not [name for name in os.listdir(cache / "train") if ".tmp-" in name]


@pytest.mark.slow
def test_a_second_pass_into_the_same_folder_waits_for_the_first_and_leaves_nothing_behind(tmp_path):
    """`kd-train cache-teacher` into a folder another pass is writing (its lock held) says so once, waits, and then
    writes the whole cache; no temporary folder is left."""
    import fcntl
    import subprocess
    import sys

    import yaml

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "method": "kd", "model_name_or_path": "demo:llama/student/bpe",
        "teacher_model_name_or_path": "demo:llama/teacher/bpe", "dataset_name": "demo", "dataset_train_split": "train[:20]",
        "max_length": 64, "report_to": "none", "bf16": False, "output_dir": "out", "teacher_cache": "cache"}))
    os.makedirs(tmp_path / "cache")
    with open(tmp_path / "cache" / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = subprocess.Popen([sys.executable, "-m", "kd_trainers", "cache-teacher", "recipe.yaml"],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        waiting = process.stdout.readline()
        assert "is being written by another process; waiting for it to finish" in waiting, waiting
        fcntl.flock(lock, fcntl.LOCK_UN)
    rest = process.communicate(timeout=300)[0]
    assert process.returncode == 0, rest
    assert "waiting" not in rest and "Teacher cache ready" in rest
    from kd_trainers.teacher_cache import TeacherCache

    assert TeacherCache.open(str(tmp_path / "cache"), whole=True) is not None
    leftovers = [os.path.join(root, name) for root, folders, files in os.walk(tmp_path / "cache")
                 for name in folders + files if ".tmp" in name]
    assert leftovers == []
