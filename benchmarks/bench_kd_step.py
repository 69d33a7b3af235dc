"""Step time and peak memory of a KD step: KDTrainer against TRL's GKDTrainer (off-policy) and a plain PyTorch floor.

One run measures every cell on this machine, each method and shape in a fresh subprocess (so that peak resident memory
is its own), and writes `benchmarks/results/kd_step_<device>.csv` and `.md`. Ratios are taken within the run, against
the floor of the same shape, because these machines are noisy.

- floor: the unavoidable work, in plain PyTorch: teacher forward without grad, student forward and backward with the
  model's own cross-entropy, AdamW step. No Trainer.
- kd: `KDTrainer` (forward KL, T = 2, kd_weight 0.5), one `Trainer` step, with the default `loss_compile="auto"`
  (compiled loss chunks on CUDA, eager on CPU). kd_eager and
  kd_compiled: the same with `loss_compile="off"` and `"on"`. The compile falls in the warm-up step, not in the
  timed ones.
- gkd: TRL's `GKDTrainer` with `lmbda=0` (off-policy) and `beta=0` (forward KL), one `Trainer` step.
- sft: TRL's `SFTTrainer` on the student alone (the student's own SFT step), one `Trainer` step.
- kd_cache: `KDTrainer` reading a teacher cache (top-32, bucket tail) written by the teacher before the timed steps;
  the teacher is then deleted: no teacher forward, no teacher in memory.
- kd_served, kd_served_noprefetch: `KDTrainer(teacher_url=...)` with the teacher behind `kd-serve-teacher` in a
  process of its own on loopback (top-20, bucket tail; the teacher saved to a temporary folder and served from it),
  with `teacher_server_prefetch` on and off. `wait_fraction`: the share of the timed steps the trainer spent blocked
  on the server's answers. The server's process (its memory, and its CPU threads competing with the trainer's on a
  small machine) is not in the cell's memory columns.
- dskd: `DSKDTrainer` under one tokenizer (t2s/s2t projectors, no attention), forward KL, T = 2, kd_weight 0.5.
- dskd_cma: `DSKDTrainer` with cross-model attention: the teacher gets its own tokenizer (`--teacher-vocab` tokens,
  by default the student's count, other tokens) and its own random token sequence of the same length.
- uld, gold: `ULDTrainer` and `GOLDTrainer` (T = 1, kd_weight 0.5) with the teacher's own tokenizer and sequence as
  dskd_cma's, every position its own aligned group on both sides (the most groups a sequence can have). GOLD's
  tokenizers share no token string here (its exact part is empty: the cost is ULD's on both vocabularies).
- mined: `MinEDTrainer` (T = 1, kd_weight 0.5) with the teacher's own tokenizer as dskd_cma's, every student position
  partnered with the same teacher position, whose token the vocabulary map carries to the student's (every position
  distilled through the map: the most work the loss can have). The map (teacher token `u<i>` -> student `t<i>`, by
  edit distance) is computed before the timed steps, once per pair of vocabularies, and kept in the user cache.

Student: Llama, 2 layers, width 128. Teacher: Llama, 4 layers, width 256. Batch 4. Data: random tokens; every position
is a label (the worst case for the chunked engine, which skips unlabelled positions). Time: the median interval
between the ends of consecutive steps after a warm-up step, so that a step's data loading counts (it is where a
served teacher without prefetch waits). Memory: peak RSS minus RSS
before the first timed step, in a second run of the cell with glibc's mmap threshold fixed (`run_cell` says why) (CPU),
or peak allocated CUDA memory minus the allocated memory before it (GPU).

Usage: python benchmarks/bench_kd_step.py [--vocab 32000 128000] [--seq 512 1024] [--steps 3]
       python benchmarks/bench_kd_step.py --methods floor kd --divergences forward_kl jsd tvd   (one KD cell each)
       python benchmarks/bench_kd_step.py --methods kd dskd dskd_cma --seq 512   (DSKD against vanilla KD)
       python benchmarks/bench_kd_step.py --methods sft kd kd_cache   (a cached teacher against the resident one)
       python benchmarks/bench_kd_step.py --methods kd kd_cache kd_served kd_served_noprefetch   (a served teacher)
       python benchmarks/bench_kd_step.py --gpu-realistic   (bf16, 0.5B student / 1.5B teacher configs, seq 2048)
       python benchmarks/bench_kd_step.py --real --methods floor kd gkd dskd_cma --seq 256   (real models, CPU)
       python benchmarks/bench_kd_step.py --methods floor dskd_cma uld gold --vocab 32000 151936 \
           --teacher-vocab 50257 49152   (the cross-tokenizer methods at the anchor vocabulary pairs)

`--real`: pretrained models with their real tokenizers (`kd_trainers.models.real_models`): the student SmolLM2-135M-Instruct
(49,152 tokens), the teacher SmolLM2-135M-Instruct again for floor/kd/gkd (one vocabulary) and Qwen2.5-Coder-0.5B-
Instruct (151,936) for dskd_cma; with `--gpu-realistic` they run in bf16 on CUDA at full size.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from kd_trainers.runtime.smoke import announce, smoke_run


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("floor", "sft", "kd", "kd_eager", "kd_compiled", "kd_cache", "kd_served", "kd_served_noprefetch", "gkd",
           "dskd", "dskd_cma", "uld", "gold", "mined")
CROSS_VOCABULARY = ("dskd_cma", "uld", "gold", "mined")  # cells whose teacher has its own tokenizer and sequence
BASELINES = ("floor", "sft", "gkd", "kd", "dskd_cma")  # ratios are taken against each of these that the run measured
# cells that run once per --divergences entry
DIVERGENCE_METHODS = ("kd", "kd_eager", "kd_compiled", "kd_cache", "dskd", "dskd_cma")


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _vocab_tokenizer(vocab_size: int, prefix: str = "t"):
    """A word-level tokenizer with `vocab_size` entries: the trainers need one for padding, nothing more. Another
    `prefix` gives a tokenizer of the same size with other tokens (DSKD-CMA's teacher)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"{prefix}{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"{prefix}1"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"{prefix}0", eos_token=f"{prefix}2",
                                   unk_token=f"{prefix}1")


REAL = "KD_BENCH_REAL"  # set by --real for every cell's process


def _real_models(method: str, device: str, dtype, with_teacher: bool):
    """`(student, teacher, student tokenizer, teacher tokenizer)` of the real pair a cell of `method` uses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd_trainers.models.real_models import real_model_path

    student_path = real_model_path("smollm2")
    teacher_path = real_model_path("qwen2.5-coder") if method in CROSS_VOCABULARY else student_path
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=dtype).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=dtype).to(device) if with_teacher else None
    return student, teacher, AutoTokenizer.from_pretrained(student_path), AutoTokenizer.from_pretrained(teacher_path)


def _models(vocab: int, realistic: bool, device: str, dtype, with_teacher: bool = True, teacher_vocab: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kd_trainers.demo import demo_model

    if realistic:  # the configs of Qwen2.5-0.5B and Qwen2.5-1.5B, random weights
        student_config = Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                     max_position_embeddings=4096)
        teacher_config = Qwen2Config(vocab_size=teacher_vocab or vocab, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                     num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                     max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device(device):  # initialised where they run: a 1.5B model's random init takes a minute on CPU
            student = AutoModelForCausalLM.from_config(student_config, dtype=dtype)
            teacher = AutoModelForCausalLM.from_config(teacher_config, dtype=dtype) if with_teacher else None
    else:
        student = demo_model("llama", size="bench_student", vocab_size=vocab, seed=0)
        teacher = demo_model("llama", size="bench_teacher", vocab_size=teacher_vocab or vocab, seed=1) \
            if with_teacher else None
    return student.to(device), None if teacher is None else teacher.to(device)


class _Collator:
    def __call__(self, rows):
        import torch

        batch = {}
        for prefix in ("", "teacher_"):
            if f"{prefix}input_ids" in rows[0]:
                input_ids = torch.tensor([row[f"{prefix}input_ids"] for row in rows])
                batch.update({f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": torch.ones_like(input_ids),
                              f"{prefix}labels": input_ids.clone()})
            if f"{prefix}aligned_group" in rows[0]:
                batch[f"{prefix}aligned_group"] = torch.tensor([row[f"{prefix}aligned_group"] for row in rows])
        if "teacher_partner" in rows[0]:
            batch["teacher_partner"] = torch.tensor([row["teacher_partner"] for row in rows])
        return batch


def measure(method: str, vocab: int, seq: int, batch: int, steps: int, realistic: bool,
            divergence: str = "forward_kl", budget_mb: float | None = None, cache_dir: str | None = None,
            teacher_vocab: int | None = None) -> dict:
    """Run `steps + 1` steps of one method (the first is warm-up) and return its time and memory. `divergence` is
    the KD and DSKD cells' (the floor has none; GKD's is forward KL, β = 0), `budget_mb` their
    `loss_memory_budget_mb` (None: the default). `cache_dir`: the teacher cache that
    `write_cache` writes and `kd_cache` reads (whose process never builds the teacher). `teacher_vocab`: the
    teacher's vocabulary in the cross-vocabulary cells (default: the student's size)."""
    import torch
    from datasets import Dataset

    device = "cuda" if realistic else "cpu"
    dtype = torch.bfloat16 if realistic else torch.float32
    torch.manual_seed(0)
    real = os.environ.get(REAL) == "1"
    tokenizer = teacher_tokenizer = None
    if real:
        student, teacher, tokenizer, teacher_tokenizer = _real_models(
            method, device, dtype, with_teacher=method not in ("sft", "kd_cache"))
        vocab = len(tokenizer)
    else:
        student, teacher = _models(vocab, realistic, device, dtype, with_teacher=method not in ("sft", "kd_cache"),
                                   teacher_vocab=teacher_vocab if method in CROSS_VOCABULARY else None)
    served = None
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, vocab, (seq,), generator=generator).tolist()}
            for _ in range(batch * (steps + 1))]
    if method in CROSS_VOCABULARY:
        teacher_vocab = len(teacher_tokenizer) if real else teacher_vocab or vocab
        for row in rows:
            row["teacher_input_ids"] = torch.randint(3, teacher_vocab, (seq,), generator=generator).tolist()
            if method in ("uld", "gold"):  # one group a position on both sides
                row["aligned_group"] = row["teacher_aligned_group"] = list(range(seq))
            elif method == "mined":  # each position's partner the same position, holding the mapped token
                row["teacher_input_ids"] = [token if token < teacher_vocab else 3 for token in row["input_ids"]]
                row["teacher_partner"] = list(range(seq))
    times: list[float] = []

    if method == "floor":
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
        collate = _Collator()

        def step(index):
            inputs = {k: v.to(device) for k, v in collate(rows[index * batch:(index + 1) * batch]).items()}
            with torch.no_grad():
                teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            student(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for index in range(steps + 1):
            if index == 1:
                baseline = _baseline_memory(device)
            _sync(device)
            start = time.perf_counter()
            step(index)
            _sync(device)
            times.append(time.perf_counter() - start)
        result = {"step_s": statistics.median(times[1:])}  # after the warm-up step
    else:
        from transformers import TrainerCallback

        class StepTimer(TrainerCallback):
            waited = None

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == 1 and self.baseline is None:
                    self.baseline = _baseline_memory(device)

            def on_step_end(self, args, state, control, **kwargs):
                _sync(device)  # from the end of the step before: its data loading counts
                now = time.perf_counter()
                if state.global_step > 1:
                    times.append(now - self.end)
                else:
                    self.waited = _waited()
                self.end = now

        def _waited() -> float:
            client = getattr(trainer, "teacher_client", None)
            return client.wait_seconds if client is not None else 0.0

        timer = StepTimer()
        timer.baseline = None
        common = dict(output_dir=tempfile.mkdtemp(), max_steps=steps + 1, per_device_train_batch_size=batch,
                      learning_rate=1e-5, save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=10**6,
                      bf16=realistic, max_length=None, dataset_kwargs={"skip_prepare_dataset": True},
                      remove_unused_columns=False, dataloader_pin_memory=False, use_cpu=not realistic)
        tokenizer = tokenizer or _vocab_tokenizer(vocab)
        dataset = Dataset.from_list(rows)
        if method == "sft":
            from trl import SFTConfig, SFTTrainer

            trainer = SFTTrainer(model=student, args=SFTConfig(**common), train_dataset=dataset,
                                 processing_class=tokenizer, data_collator=_Collator(), callbacks=[timer])
        elif method in ("kd_cache", "write_cache"):
            from kd_trainers import KDConfig, KDTrainer

            config = KDConfig(**common, divergence=divergence, kd_temperature=2.0, kd_weight=0.5,
                              teacher_cache=cache_dir, loss_memory_budget_mb=budget_mb)
            if method == "write_cache":  # the cache pass, in a process of its own before the cell's
                KDTrainer(model=student, teacher_model=teacher, teacher_processing_class=tokenizer, args=config,
                          train_dataset=dataset, processing_class=tokenizer, data_collator=_Collator())
                return {"step_s": 0.0, "memory_growth_mb": 0.0, "peak_mb": 0.0}
            trainer = KDTrainer(model=student, args=config, train_dataset=dataset, processing_class=tokenizer,
                                data_collator=_Collator(), callbacks=[timer])
        elif method in ("kd_served", "kd_served_noprefetch"):
            from kd_trainers import KDConfig, KDTrainer

            served = _serve(teacher, tokenizer, device)
            del teacher
            # At T = 2 as the other cells: a server's tempered tail is approximated (accepted by name), which costs
            # the same time as the exact one.
            config = KDConfig(**common, divergence=divergence, kd_temperature=2.0, kd_weight=0.5,
                              loss_memory_budget_mb=budget_mb, teacher_url=served[1],
                              teacher_server_prefetch=method == "kd_served",
                              teacher_server_approximate_temperature=True)
            try:
                trainer = KDTrainer(model=student, args=config, train_dataset=dataset, processing_class=tokenizer,
                                    teacher_processing_class=tokenizer, data_collator=_Collator(), callbacks=[timer])
            except BaseException:  # the server would outlive this process and hold its output open
                served[0].terminate()
                raise
        elif method in ("kd", "kd_eager", "kd_compiled"):
            from kd_trainers import KDConfig, KDTrainer

            compile_mode = {"kd": "auto", "kd_eager": "off", "kd_compiled": "on"}[method]
            trainer = KDTrainer(model=student, teacher_model=teacher, teacher_processing_class=tokenizer,
                                args=KDConfig(**common, divergence=divergence, kd_temperature=2.0, kd_weight=0.5,
                                              loss_memory_budget_mb=budget_mb, loss_compile=compile_mode),
                                train_dataset=dataset, processing_class=tokenizer, data_collator=_Collator(),
                                callbacks=[timer])
        elif method in ("dskd", "dskd_cma"):
            from kd_trainers import DSKDConfig, DSKDTrainer

            if method != "dskd_cma":
                teacher_tokenizer = tokenizer
            elif teacher_tokenizer is None:
                teacher_tokenizer = _vocab_tokenizer(teacher_vocab, prefix="u")
            trainer = DSKDTrainer(student, DSKDConfig(**common, divergence=divergence, kd_temperature=2.0,
                                                      kd_weight=0.5),
                                  train_dataset=dataset, processing_class=tokenizer, teacher_model=teacher,
                                  teacher_processing_class=teacher_tokenizer, data_collator=_Collator(),
                                  callbacks=[timer])
        elif method in ("uld", "gold", "mined"):
            import kd_trainers

            name = {"uld": "ULD", "gold": "GOLD", "mined": "MinED"}[method]
            config_class, trainer_class = getattr(kd_trainers, f"{name}Config"), getattr(kd_trainers, f"{name}Trainer")
            teacher_tokenizer = teacher_tokenizer or _vocab_tokenizer(teacher_vocab, prefix="u")
            trainer = trainer_class(student, teacher, args=config_class(**common, kd_temperature=1.0, kd_weight=0.5,
                                                                          loss_memory_budget_mb=budget_mb),
                                    train_dataset=dataset, processing_class=tokenizer,
                                    teacher_processing_class=teacher_tokenizer, data_collator=_Collator(),
                                    callbacks=[timer])
            if method == "mined":  # the map (computed once per pair, then read from the cache) is not a step's
                trainer._vocabulary_map()
        else:
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            trainer = GKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(**common, lmbda=0.0, beta=0.0),
                                 train_dataset=dataset, processing_class=tokenizer, data_collator=_Collator(),
                                 callbacks=[timer])
        try:
            trainer.train()
        finally:
            if served is not None:
                served[0].terminate()
                served[0].wait()
        baseline = timer.baseline
        result = {"step_s": statistics.median(times)}
        if served is not None:
            result["wait_fraction"] = (_waited() - timer.waited) / sum(times)
    return {**result, "memory_growth_mb": (_peak_memory(device) - baseline) / 2**20,
            "peak_mb": _peak_memory(device) / 2**20}


def _serve(teacher, tokenizer, device: str):
    """`(process, url)`: `kd-serve-teacher` serving `teacher` (saved to a temporary folder) on a free loopback port,
    once it answers."""
    import socket

    import requests

    folder = tempfile.mkdtemp()
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dtype = "bfloat16" if device == "cuda" else "float32"
    process = subprocess.Popen([sys.executable, "-m", "kd_trainers.cli.serve", folder, "--port", str(port), "--dtype",
                                dtype, "--device", device], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return process, f"http://127.0.0.1:{port}/v1"
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("kd-serve-teacher did not start")
        time.sleep(0.5)


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _baseline_memory(device) -> int:
    """Memory in use before the first timed step (after warm-up: optimizer state and caches exist)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _rss_bytes()


def _peak_memory(device) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()


_INLINE_MEASURE = None  # a smoke run's cell measure, called in this process (set by `parse_options`)


def run_cell(script: str, cell: list, gpu: bool) -> dict:
    """Run one cell (`script --cell JSON`) in fresh processes, so that its peak resident memory is its own; a smoke
    run (`KD_TRAINERS_SMOKE=1`, which measures nothing) runs each cell in this process instead, to check the commands
    without paying an interpreter's start per cell.

    On CPU it runs twice: once as it is, for the time, and once with glibc's mmap threshold fixed at 128 KiB, for the
    memory. By default glibc raises that threshold as large blocks are freed and then keeps them in its heap, so how
    much of a step's memory shows in the resident set depends on the allocation history of the process (the same cell
    measured 48 and 288 MiB). With the threshold fixed, every large tensor is mapped when allocated and returned when
    freed, so peak resident memory follows live tensors. The time is not taken from that run, because fresh mappings
    slow down code that allocates a new tensor per operation."""
    run = _run_cell_inline if smoke_run() and _INLINE_MEASURE is not None else _run_cell_process
    if cell[0] == "kd_cache":  # the teacher writes its cache first, in a process of its own
        cell = [*cell[:8], os.path.join(tempfile.mkdtemp(), "cache"), *cell[9:]]  # measure's `cache_dir`
        written = run(script, ["write_cache", *cell[1:]], {})
        if written["note"]:
            return written
    timed = run(script, cell, {})
    if gpu or smoke_run():  # CUDA counts allocated memory exactly; a smoke run measures nothing
        return timed
    measured = _run_cell_process(script, cell, {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
    # The memory of the measuring run: every figure it took (a script's cells may not all take a peak).
    memory = {key: measured[key] for key in ("memory_growth_mb", "peak_mb") if key in measured}
    return {**timed, **memory, "note": timed["note"] or measured["note"]}


def _run_cell_inline(script: str, cell: list, env: dict) -> dict:
    """A smoke run's cell, measured in this process; a failure is the cell's note, as in its own process."""
    import traceback

    try:
        return {**_INLINE_MEASURE(*cell), "note": ""}
    except Exception:  # noqa: BLE001  (reported as the cell's failure, as a failed process is)
        print(traceback.format_exc()[-2000:], file=sys.stderr)
        return {"step_s": float("nan"), "memory_growth_mb": float("nan"), "peak_mb": float("nan"),
                "note": "failed (in process)"}


def _run_cell_process(script: str, cell: list, env: dict) -> dict:
    command = [sys.executable, os.path.abspath(script), "--cell", json.dumps(cell)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        reason = "out of memory (killed)" if done.returncode in (-9, 137) else f"failed (exit {done.returncode})"
        print(done.stderr[-2000:], file=sys.stderr)
        return {"step_s": float("nan"), "memory_growth_mb": float("nan"), "peak_mb": float("nan"), "note": reason}
    return {**json.loads(lines[-1][len("RESULT "):]), "note": ""}


def result_row(fixed: dict, cell: dict, baselines: dict[str, dict]) -> dict:
    """A results row: `fixed` columns, the cell's time and memory, its ratios to each baseline cell, its note."""
    row = {**fixed, "step_s": round(cell["step_s"], 4), "memory_growth_mb": round(cell["memory_growth_mb"], 1)}
    if "peak_mb" in cell:  # whole-process peak (CPU: resident set; GPU: allocated), models and optimizer included
        row["peak_mb"] = round(cell["peak_mb"], 1)
    for name, base in baselines.items():
        row[f"time_vs_{name}"] = round(cell["step_s"] / base["step_s"], 3)
        row[f"memory_vs_{name}"] = round(cell["memory_growth_mb"] / base["memory_growth_mb"], 3)
    if "wait_fraction" in cell:
        row["wait_fraction"] = round(cell["wait_fraction"], 3)
    row["note"] = cell["note"]
    print(row, flush=True)
    return row


def write_results(rows: list[dict], path: str) -> None:
    """`path`.csv (every column) and `path`.md (a table without the device column); in a smoke run under
    `results/smoke/`, so that it never replaces a measurement."""
    if smoke_run():
        path = os.path.join(os.path.dirname(path), "smoke", os.path.basename(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row if key != "note")) + ["note"]
    with open(path + ".csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    columns = fields[1:]
    with open(path + ".md", "w") as handle:
        handle.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
        for row in rows:
            handle.write("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |\n")
    print(f"wrote {path}.csv and {path}.md")
    failed = [row for row in rows if str(row.get("note", "")).startswith("failed")]
    if failed:  # written, so that the other cells are kept, but never a success
        sys.exit(f"{len(failed)} of {len(rows)} cells failed (their error is printed above): "
                 + ", ".join(str(row.get("method")) for row in failed))


def parse_options(parser: argparse.ArgumentParser, measure_cell, steps: int):
    """The options every benchmark shares (`--batch`, `--steps`, `--name`, `--gpu-realistic`), parsed. In a cell's own
    process (`--cell JSON`) it measures that cell with `measure_cell`, prints the result and returns None."""
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--name", help="results file stem")
    parser.add_argument("--gpu-realistic", action="store_true", help="bf16 on CUDA, Qwen2.5-0.5B/1.5B configs")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.cell:
        print("RESULT " + json.dumps(measure_cell(*json.loads(options.cell))), flush=True)
        return None
    global _INLINE_MEASURE
    _INLINE_MEASURE = measure_cell
    return smallest_cell(options)


def smallest_cell(options: argparse.Namespace) -> argparse.Namespace:
    """In a smoke run (`KD_TRAINERS_SMOKE=1`), the options cut to the smallest cell of each axis (the first divergence,
    the first teacher), measured once with one step: every method still runs, in its own process, through the same
    code."""
    if not smoke_run():
        return options
    announce()
    paired = getattr(options, "teacher_vocab", None)
    if paired and len(paired) == len(options.vocab):  # the teacher's vocabulary of the smallest student's
        options.teacher_vocab = [paired[options.vocab.index(min(options.vocab))]]
    for axis in ("vocab", "seq", "ks"):
        if getattr(options, axis, None):
            setattr(options, axis, [min(getattr(options, axis))])
    if getattr(options, "seq", None):
        options.seq = [min(options.seq[0], 64)]
    for axis in ("divergences", "teachers"):  # the first of each
        if getattr(options, axis, None):
            setattr(options, axis, getattr(options, axis)[:1])
    for count, value in (("repeats", 1), ("steps", 1), ("tokens", 64)):
        if getattr(options, count, None):
            setattr(options, count, min(getattr(options, count), value))
    return options


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--methods", nargs="+", default=["floor", "kd", "gkd"], choices=METHODS)
    parser.add_argument("--loss-memory-budget-mb", type=float, default=None,
                        help="loss_memory_budget_mb of the kd and kd_cache cells (default: the package's)")
    parser.add_argument("--divergences", nargs="+", default=["forward_kl"],
                        help="run the kd/dskd cells once per divergence (jsd β and skew α at their defaults)")
    parser.add_argument("--teacher-vocab", type=int, nargs="+", default=None,
                        help="the teacher's vocabulary in the dskd_cma, uld, gold and mined cells, one per --vocab "
                             "entry (default: the student's)")
    parser.add_argument("--real", action="store_true",
                        help="pretrained SmolLM2-135M / Qwen2.5-Coder-0.5B with their tokenizers (see above)")
    options = parse_options(parser, measure, steps=3)
    if options is None:
        return
    realistic = options.gpu_realistic
    if options.real:
        os.environ[REAL] = "1"
        options.vocab = [49152]  # the student's; the cell reads it from the tokenizer
        if realistic:
            options.seq = [2048]
        device = "gpu_bf16_real_smollm2_qwen" if realistic else "cpu_fp32_real_smollm2_qwen"
    elif realistic:
        options.vocab, options.seq = [151936], [2048]
    if not options.real:
        device = "gpu_bf16_qwen0.5b_1.5b" if realistic else "cpu_fp32_tiny"
    teacher_vocabs = options.teacher_vocab or [None] * len(options.vocab)
    if len(teacher_vocabs) != len(options.vocab):
        parser.error(f"--teacher-vocab needs one entry per --vocab entry ({len(options.vocab)}), got "
                     f"{len(teacher_vocabs)}")
    rows = []
    for vocab, teacher_vocab in zip(options.vocab, teacher_vocabs):
        for seq in options.seq:
            cells = {}
            for method in options.methods:
                for divergence in (options.divergences if method in DIVERGENCE_METHODS else [None]):
                    name = method if divergence is None or options.divergences == ["forward_kl"] \
                        else f"{method}:{divergence}"
                    cells[name] = run_cell(__file__, [method, vocab, seq, options.batch, options.steps, realistic,
                                                      divergence or "forward_kl", options.loss_memory_budget_mb, None,
                                                      teacher_vocab], gpu=realistic)
            for method, cell in cells.items():
                fixed = {"device": device, "vocab": vocab, **({"teacher_vocab": teacher_vocab} if teacher_vocab
                                                             else {}),
                         "seq": seq, "batch": options.batch, "method": method}
                rows.append(result_row(fixed, cell, {base: cells[base] for base in BASELINES if base in cells}))
    write_results(rows, os.path.join(RESULTS, options.name or f"kd_step_{device}"))

if __name__ == "__main__":
    main()
