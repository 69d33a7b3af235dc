"""The `real` tier: pretrained instruct models with their real tokenizers and chat templates, on real conversations.

The models come from GGUF files that packages on the package index ship (`kd_trainers.models.real_models`): SmolLM2-135M-
Instruct (llama, 49,152 tokens), Qwen2.5-Coder-0.5B-Instruct (qwen2, 151,936) and Gemma 3 270M (262,144), cut to
their first 2 decoder layers where a step must be cheap (tokenizer, template, special tokens, embeddings and head
kept). The data is BYU's chitchat dataset (MIT), as the `chitchat-dataset` package ships it: the first turn of a
conversation and its reply, as plain prompt/completion text and as chat messages.

Built once into `~/.cache/kd_trainers/real_models` (`KD_TRAINERS_REAL_MODELS` to move it): the first run downloads
about 800 MB and converts for about two minutes.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_trainers import (DSKDConfig, DSKDTrainer, GKDConfig, GKDTrainer, KDConfig, KDTrainer, SeqKDConfig,
                         SeqKDTrainer)
from kd_trainers.cli import evaluate as eval_cli, study as study_cli, train as cli
from kd_trainers.demo.harness_tasks import demo_task_folder
from kd_trainers.losses import LossSettings, chunked_distillation_loss, sparse_distillation_terms
from kd_trainers.losses.sparse import top_k_targets
from kd_trainers.data.alignment import aligned_groups, tokens_with_offsets
from kd_trainers.data.dual_tokenization import DualTokenizer
from kd_trainers.data.edit_distance import edit_distance_partners, token_texts
from kd_trainers.data.prompt_completion import prompt_token_ids
from kd_trainers.models.real_models import chitchat_exchanges, real_model_path
from kd_trainers.served_teacher.server import LoopbackServer, PromptScorer


pytestmark = [pytest.mark.real, pytest.mark.slow]

from test_alignment import HARD_TEXTS, reference_groups  # noqa: E402  (the alignment's own tests, on real tokenizers)

REAL_CACHE = os.environ.get("KD_TRAINERS_REAL_MODELS") or os.path.join(
    os.path.expanduser("~"), ".cache", "kd_trainers", "real_models")


def _model(name: str, layers: int | None = None) -> str:
    return real_model_path(name, layers, cache_dir=REAL_CACHE, log=lambda message: print(message, file=sys.stderr))


@pytest.fixture(scope="session")
def smol():
    """SmolLM2-135M-Instruct, first 2 layers: the student everywhere."""
    return _model("smollm2", 2)


@pytest.fixture(scope="session")
def smol_full():
    return _model("smollm2")


@pytest.fixture(scope="session")
def qwen():
    return _model("qwen2.5-coder", 2)


@pytest.fixture(scope="session")
def gemma():
    return _model("gemma3", 2)


@pytest.fixture(scope="session")
def exchanges():
    return chitchat_exchanges(40, cache_dir=REAL_CACHE)


def _rows(exchanges, form: str) -> list[dict]:
    if form == "plain":
        return [{"prompt": f"User: {first}\nAssistant:", "completion": f" {reply}"} for first, reply in exchanges]
    return [{"prompt": [{"role": "user", "content": first}], "completion": [{"role": "assistant", "content": reply}]}
            for first, reply in exchanges]


@pytest.fixture(scope="session")
def data_folders(exchanges, tmp_path_factory):
    """`{form: folder}` with train.jsonl (32 rows) and test.jsonl (8 rows), plain and conversational."""
    folders = {}
    for form in ("plain", "chat"):
        folder = tmp_path_factory.mktemp(f"chitchat_{form}")
        rows = _rows(exchanges, form)
        for name, part in (("train", rows[:32]), ("test", rows[32:])):
            with open(folder / f"{name}.jsonl", "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in part)
        folders[form] = str(folder)
    return folders


QUESTIONS = [(a, b) for a in range(3, 9) for b in range(2, 6)]


@pytest.fixture(scope="session")
def sums_folders(tmp_path_factory):
    """`{form: folder}` of 24 short questions ("What is 3 + 2?") with their answers, plain and conversational: the
    kind of prompt an instruct model answers with its end-of-turn token when it is not given its chat template."""
    folders = {}
    for form in ("plain", "chat"):
        folder = tmp_path_factory.mktemp(f"sums_{form}")
        rows = [{"prompt": f"What is {a} + {b}?", "completion": f" {a + b}"} for a, b in QUESTIONS]
        if form == "chat":
            rows = [{"prompt": [{"role": "user", "content": row["prompt"]}],
                     "completion": [{"role": "assistant", "content": row["completion"].strip()}]} for row in rows]
        for name in ("train", "test"):
            with open(folder / f"{name}.jsonl", "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
        folders[form] = str(folder)
    return folders


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), bf16=False, max_steps=1, per_device_train_batch_size=4,
                  learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                  max_length=96, kd_temperature=1.0, kd_weight=1.0, seed=0)
    values.update(overrides)
    return KDConfig(**values)


# ---- the prompt formatter -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smollm2", "qwen2.5-coder", "gemma3"])
def test_evaluation_prompts_are_the_prompt_part_trl_trains_on(name, exchanges, tmp_path):
    """Generation (evaluation, agreement, teacher answers, Seq-KD) gives a model exactly the tokens TRL's SFTTrainer
    puts before the completion in training, with each real tokenizer's special tokens and chat template (Gemma 3
    base has none: plain text only)."""
    path = _model(name, 2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    forms = ["plain", "chat"] if tokenizer.chat_template else ["plain"]
    for form in forms:
        rows = _rows(exchanges[:6], form)
        trainer = trl.SFTTrainer(model=path, args=trl.SFTConfig(output_dir=str(tmp_path / form), report_to=[],
                                                                 bf16=False, max_length=None),
                                 train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        for row, tokenized in zip(rows, trainer.train_dataset):
            start = next(i for i, label in enumerate(tokenized["labels"]) if label != -100)  # the completion
            assert prompt_token_ids(tokenizer, row["prompt"]) == tokenized["input_ids"][:start], (name, form)


# ---- what the losses compute on real vocabularies -------------------------------------------------------------------

def test_self_distillation_at_temperature_one_is_zero(smol, data_folders, tmp_path):
    """A student distilled from a copy of itself (loaded again from its folder) at T = 1 has a KD loss of 0 on real
    chat data; its cross-entropy is not 0, so the batch has real label tokens."""
    rows = [json.loads(line) for line in open(os.path.join(data_folders["chat"], "train.jsonl"))]
    student = AutoModelForCausalLM.from_pretrained(smol)
    tokenizer = AutoTokenizer.from_pretrained(smol)
    losses = {}
    for weight in (1.0, 0.0):  # KD alone, then CE alone (kd_weight=0: SFTTrainer's own loss)
        trainer = KDTrainer(model=student, teacher_model=smol, args=_args(tmp_path, kd_weight=weight),
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        with torch.no_grad():
            losses[weight] = trainer.compute_loss(student, batch).item()
    assert abs(losses[1.0]) < 1e-5, losses
    assert losses[0.0] > 1.0, losses


def _coarsened_kd(student_logits, teacher_logits, k: int, temperature: float) -> torch.Tensor:
    """The reference, written out: T² · mean over tokens of KL between the teacher's and the student's tempered
    distributions coarsened to k + 1 categories (the teacher's top-k tokens, and everything else)."""
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    q = torch.softmax(student_logits.double() / temperature, -1)
    top = teacher_logits.topk(k, -1).indices
    p_bar = torch.cat([p.gather(1, top), 1 - p.gather(1, top).sum(-1, keepdim=True)], -1)
    q_bar = torch.cat([q.gather(1, top), 1 - q.gather(1, top).sum(-1, keepdim=True)], -1)
    return temperature ** 2 * (p_bar * (p_bar.log() - q_bar.log())).sum(-1).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_and_served_targets_are_the_exact_coarsening_of_the_resident_teacher(temperature, smol, smol_full,
                                                                                   data_folders, tmp_path):
    """On SmolLM2's 49,152-token vocabulary: the KD loss from a top-20 teacher cache equals, within its one-byte
    quantisation, the exact 21-category coarsening of the resident teacher's tempered distribution computed here from
    its full logits, at T = 1 and at T = 2 (where guessing the tail misjudged it: 0.87 of the mass for 0.68); a
    served teacher equals it unquantised at T = 1, and at T = 2 is refused unless the approximation is asked for. At
    k = V the sparse engine gives the resident loss itself."""
    rows = Dataset.from_list([json.loads(line) for line in open(os.path.join(data_folders["chat"], "train.jsonl"))][:8])
    tokenizer = AutoTokenizer.from_pretrained(smol)
    student = AutoModelForCausalLM.from_pretrained(smol)
    teacher = AutoModelForCausalLM.from_pretrained(smol_full)
    common = dict(kd_temperature=temperature, teacher_cache_k=20, teacher_server_k=20)

    cached = KDTrainer(model=student, teacher_model=teacher,
                       args=_args(tmp_path, teacher_cache=str(tmp_path / "cache"), **common),
                       train_dataset=rows, processing_class=tokenizer, teacher_processing_class=tokenizer)
    batch = cached._prepare_inputs(next(iter(cached.get_train_dataloader())))
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits[:, :-1][labels != -100].float()
        student_logits = student(**model_inputs).logits[:, :-1][labels != -100].float()
        hidden = student.model(**model_inputs).last_hidden_state[:, :-1]
        reference = _coarsened_kd(student_logits, teacher_logits, 20, temperature)
        cache_loss = cached.compute_loss(student, batch)
    assert cache_loss.item() == pytest.approx(reference.item(), rel=2e-2)

    scorer = PromptScorer(teacher, tokenizer, smol_full)
    with LoopbackServer(scorer) as server:
        if temperature != 1.0:
            with pytest.raises(ValueError, match="teacher_server_approximate_temperature"):
                KDTrainer(model=student, args=_args(tmp_path, teacher_url=server.url, **common), train_dataset=rows,
                          processing_class=tokenizer, teacher_processing_class=tokenizer)
        else:
            served = KDTrainer(model=student, args=_args(tmp_path, teacher_url=server.url, **common),
                               train_dataset=rows, processing_class=tokenizer, teacher_processing_class=tokenizer)
            served_batch = served._prepare_inputs(next(iter(served.get_train_dataloader())))
            assert torch.equal(served_batch["input_ids"], batch["input_ids"])
            with torch.no_grad():
                served_loss = served.compute_loss(student, served_batch)
            assert served_loss.item() == pytest.approx(reference.item(), rel=1e-3)

    settings = LossSettings(temperature=temperature, kd_weight=1.0)
    with torch.no_grad():
        whole = sparse_distillation_terms(hidden, student.lm_head, top_k_targets(teacher_logits, len(tokenizer)),
                                          labels, settings)
        teacher_hidden = teacher.model(**model_inputs).last_hidden_state[:, :-1]
        resident, _ = chunked_distillation_loss(hidden, student.lm_head, teacher_hidden, teacher.lm_head, labels,
                                                settings)
    # fp32 over 49,152 columns, the model's logits against hidden @ Wᵀ: agreement to rounding.
    torch.testing.assert_close(whole.loss, resident.loss, rtol=1e-3, atol=1e-5)


def test_trl_sft_script_with_lora_and_its_default_dropout_trains_through_kdtrainer(smol, smol_full, data_folders,
                                                                                  tmp_path):
    """TRL's own `trl/scripts/sft.py`, switched by its imports alone (KDTrainer for SFTTrainer, KDConfig for
    SFTConfig) plus the teacher flag, trains a LoRA student with the script's defaults (dropout 0.05) through the
    first-batch head check."""
    source = open(os.path.join(os.path.dirname(trl.__file__), "scripts", "sft.py")).read()
    switched = source.replace("from trl import SFTTrainer, get_dataset",
                              "from kd_trainers import KDTrainer as SFTTrainer\n    from trl import get_dataset")
    switched = switched.replace(
        "from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser",
        "from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser\n"
        "    from kd_trainers import KDConfig as SFTConfig")
    assert switched.count("kd_trainers") == 2, "TRL's sft.py changed its imports: update the switch"
    script = tmp_path / "sft_kd.py"
    script.write_text(switched)
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(script), "--model_name_or_path", smol, "--teacher_model_name_or_path", smol_full,
         "--dataset_name", data_folders["chat"], "--use_peft", "--max_steps", "2", "--per_device_train_batch_size",
         "2", "--max_length", "64", "--output_dir", str(output), "--report_to", "none", "--bf16", "false",
         "--logging_steps", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "adapter_model.safetensors").exists()
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.05
    assert "'kd_loss'" in result.stdout + result.stderr


# ---- every method through kd-train ----------------------------------------------------------------------------------

def _recipe(tmp_path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


BASE = """\
    model_name_or_path: {student}
    dataset_name: {data}
    dataset_test_split: test
    max_steps: 1
    per_device_train_batch_size: 4
    max_length: 128
    learning_rate: 1.0e-4
    logging_steps: 1
    save_strategy: "no"
    eval_strategy: "no"
    bf16: false
    seed: 0
    report_to: none
    output_dir: {output}
"""

METHODS = {  # method -> recipe lines beside BASE ({teacher}: SmolLM2 whole; {cross}: Qwen2.5, another tokenizer)
    "kd": "method: kd\nteacher_model_name_or_path: {teacher}\nkd_temperature: 2.0\nkd_weight: 0.5\n",
    "rev_kd": "method: kd\nteacher_model_name_or_path: {teacher}\ndivergence: reverse_kl\n",
    "dskd": "method: dskd\nteacher_model_name_or_path: {teacher}\nkd_weight: 0.5\n",
    "dskd_cma": "method: dskd\nteacher_model_name_or_path: {cross}\nkd_weight: 0.5\n",
    "dskd_v2": "method: dskd\nteacher_model_name_or_path: {cross}\ntoken_alignment: exact\nprojector_bias: false\n"
               "projector_init: pinv\n",
    "uld": "method: uld\nteacher_model_name_or_path: {cross}\nkd_weight: 0.5\n",
    "gold": "method: gold\nteacher_model_name_or_path: {cross}\nkd_weight: 0.5\nloss_chunk_size: 64\n",
    "mined": "method: mined\nteacher_model_name_or_path: {cross}\nkd_weight: 0.5\nkd_temperature: 2.0\n",
    "seqkd": "method: seqkd\nteacher_model_name_or_path: {teacher}\nkd_weight: 0.0\nseqkd_max_new_tokens: 12\n"
             "seqkd_cache_dir: {output}-seqkd\n",  # not the session's shared cache, which test_study.py reads
    "gkd": "method: gkd\nteacher_model_name_or_path: {teacher}\nlmbda: 1.0\nmax_new_tokens: 8\n",
    "cache": "method: kd\nteacher_model_name_or_path: {teacher}\nteacher_cache: {output}-cache\nkd_temperature: 2.0\n",
    "two_teachers": "method: kd\nteachers:\n  - {{model: {teacher}, weight: 0.7, name: whole}}\n"
                    "  - {{model: {student}, weight: 0.3, name: self}}\n",
}


# Plain text differs from chat data in how each method prepares its rows: SFTTrainer's tokenization (KD and the
# cache), the dual tokenization (DSKD-CMA; ULD and GOLD add its aligned groups, MinED its partners), the prompts a
# teacher or the student completes (Seq-KD, GKD). Rev-KD, same-vocabulary DSKD, ULD, GOLD, MinED and two teachers read
# plain rows as KD or DSKD-CMA does, so on plain text the suite runs one of each path; on chat data, every method.
PLAIN_FORM_METHODS = ("kd", "dskd_cma", "seqkd", "gkd", "cache")


def _train(recipe: str, *overrides: str) -> int:
    return cli.main([recipe, *overrides])


@pytest.mark.parametrize("form", ["plain", "chat"])
def test_every_method_trains_on_real_models_through_kd_train(form, smol, smol_full, qwen, data_folders, tmp_path,
                                                             capsys):
    """KD, Rev-KD, DSKD, DSKD-CMA, DSKDv2 (exact alignment), ULD, GOLD and MinED across SmolLM2 and Qwen2.5, Seq-KD,
    on-policy GKD, a teacher cache and two teachers, each one step through `kd-train` on plain and on conversational
    data, with the student's weights saved; the cache's run trains again from the cache alone. Plain text runs one method of each data path
    (`PLAIN_FORM_METHODS`)."""
    for method, lines in METHODS.items():
        if form == "plain" and method not in PLAIN_FORM_METHODS:
            continue
        output = tmp_path / method
        recipe = _recipe(tmp_path, method, (BASE + textwrap.indent(lines, "    ")).format(
            student=smol, teacher=smol_full, cross=qwen, data=data_folders[form], output=output))
        code = _train(recipe)
        captured = capsys.readouterr()
        assert code == 0, (method, captured.err[-2000:])
        assert (output / "model.safetensors").exists(), method
        info = json.loads((output / "run_info.json").read_text())
        assert info["settings"]["model_name_or_path"] == smol, method
        if method == "cache" and form == "chat":
            # and from the cache alone: the pre-load checks (a real tokenizer's identity, the data's rows, every
            # block's checksum) accept the cache the run wrote
            code = _train(recipe, "teacher_model_name_or_path=null", f"output_dir={output}-alone")
            captured = capsys.readouterr()
            assert code == 0, captured.err[-2000:]
            assert (tmp_path / "cache-alone" / "model.safetensors").exists()


def test_seq_kd_stops_when_the_instruct_teacher_answers_plain_questions_with_nothing(smol, smol_full, sums_folders,
                                                                                    tmp_path, capsys):
    """SmolLM2-Instruct given "What is 3 + 2?" as plain text ends its answer at once, every time: Seq-KD stops before
    training with one line naming the cause, and nothing is trained; the same questions as chat messages train."""
    for form in ("plain", "chat"):
        output = tmp_path / form
        recipe = _recipe(tmp_path, form, (BASE + textwrap.indent(METHODS["seqkd"], "    ")).format(
            student=smol, teacher=smol_full, data=sums_folders[form], output=output))
        code = _train(recipe)
        err = capsys.readouterr().err
        if form == "plain":
            assert code == 2, err[-2000:]
            assert "the teacher answered 24 of 24 training prompts with nothing" in err and "chat template" in err
            assert len([line for line in err.splitlines() if "with nothing" in line]) == 1
            assert not (output / "model.safetensors").exists()
        else:
            assert code == 0, err[-2000:]
            assert (output / "model.safetensors").exists()


def test_every_trainer_trains_through_the_python_api_on_chat_data(smol, smol_full, qwen, data_folders, tmp_path):
    """KDTrainer, DSKDTrainer with cross-model attention (Qwen2.5 teacher), SeqKDTrainer and on-policy GKDTrainer,
    built as a TRL user builds them, each train two steps on conversational data and change the student's weights."""
    rows = Dataset.from_list([json.loads(line) for line in open(os.path.join(data_folders["chat"], "train.jsonl"))][:8])
    tokenizer = AutoTokenizer.from_pretrained(smol)
    common = dict(output_dir=str(tmp_path / "out"), bf16=False, max_steps=2, per_device_train_batch_size=4,
                  learning_rate=1e-4, save_strategy="no", report_to=[], disable_tqdm=True, max_length=128, seed=0)
    trainers = {
        "kd": lambda student: KDTrainer(model=student, teacher_model=smol_full, args=KDConfig(**common, kd_weight=0.5),
                                        train_dataset=rows, processing_class=tokenizer),
        "dskd_cma": lambda student: DSKDTrainer(
            model=student, teacher_model=qwen, teacher_processing_class=AutoTokenizer.from_pretrained(qwen),
            args=DSKDConfig(**common, kd_weight=0.5), train_dataset=rows, processing_class=tokenizer),
        "seqkd": lambda student: SeqKDTrainer(
            model=student, teacher_model=smol_full,
            args=SeqKDConfig(**common, kd_weight=0.0, seqkd_max_new_tokens=8, seqkd_cache_dir=str(tmp_path / "seqkd")),
            train_dataset=rows, processing_class=tokenizer),
        "gkd": lambda student: GKDTrainer(model=student, teacher_model=smol_full,
                                          args=GKDConfig(**common, lmbda=1.0, max_new_tokens=8),
                                          train_dataset=rows, processing_class=tokenizer),
    }
    for name, make in trainers.items():
        student = AutoModelForCausalLM.from_pretrained(smol)
        before = {key: value.clone() for key, value in student.state_dict().items() if "layers.1." in key}
        make(student).train()
        after = student.state_dict()
        assert any(not torch.equal(value, after[key]) for key, value in before.items()), name


def test_a_study_of_two_cells_on_real_models(smol, smol_full, sums_folders, tmp_path, capsys):
    """`kd-study` on real models: an SFT cell and a KD cell (SmolLM2 whole as the teacher), one seed each, evaluated
    on chat-formatted sums with exact match, and the report with its paired test."""
    base = BASE.format(student=smol, data=sums_folders["chat"], output=tmp_path / "unused")
    (tmp_path / "kd.yaml").write_text(textwrap.dedent(base) + f"method: kd\nteacher_model_name_or_path: {smol_full}\n")
    (tmp_path / "sft.yaml").write_text(textwrap.dedent(base) + "method: sft\n")
    (tmp_path / "study.yaml").write_text(textwrap.dedent(f"""\
        name: real_two_cells
        base_recipe: kd.yaml
        output_dir: {tmp_path / "study"}
        overrides: {{max_steps: 2, dataset_test_split: null}}
        grid:
          method:
            sft: {{recipe: sft.yaml}}
            kd: {{}}
        seeds: [0]
        evaluation: {{metrics: [exact_match], answer_extractor: last_number, split: test, limit: 6,
                     max_new_tokens: 8}}
        hypotheses:
          - {{name: "KD vs SFT", a: {{method: sft}}, b: {{method: kd}}, method: auto, correction: holm}}
        """))
    assert study_cli.main([str(tmp_path / "study.yaml")]) == 0, capsys.readouterr().err[-2000:]
    report = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "KD vs SFT" in report and "exact_match" in report and "## Empty answers" in report
    for method in ("sft", "kd"):
        (cell,) = (tmp_path / "study" / "cells").glob(f"*{method}*")
        summary = json.loads((cell / "seed0" / "summary.json").read_text())
        assert summary["n"] == 6 and summary["empty_predictions"] < 0.5, (method, summary)


def test_dskd_cma_across_smollm2_and_gemma3(smol, gemma, data_folders, tmp_path, capsys):
    """Cross-model attention between a 49,152- and a 262,144-token vocabulary (Gemma 3, SentencePiece)."""
    output = tmp_path / "gemma"
    recipe = _recipe(tmp_path, "gemma", (BASE + "    method: dskd\n    teacher_model_name_or_path: {cross}\n").format(
        student=smol, cross=gemma, data=data_folders["plain"], output=output))
    assert _train(recipe) == 0, capsys.readouterr().err[-2000:]
    assert (output / "model.safetensors").exists()


def test_a_served_teacher_trains_through_kd_train(smol, smol_full, data_folders, tmp_path, capsys):
    teacher = AutoModelForCausalLM.from_pretrained(smol_full)
    scorer = PromptScorer(teacher, AutoTokenizer.from_pretrained(smol_full), smol_full)
    with LoopbackServer(scorer) as server:
        output = tmp_path / "served"
        recipe = _recipe(tmp_path, "served", (BASE + "    method: kd\n    teacher_url: {url}\n").format(
            student=smol, url=server.url, data=data_folders["chat"], output=output))
        assert _train(recipe) == 0, capsys.readouterr().err[-2000:]
    assert (output / "model.safetensors").exists()


# ---- evaluation ------------------------------------------------------------------------------------------------------

ARITHMETIC = [(a, b) for a, b in ((17, 25), (8, 9), (12, 30), (45, 11), (6, 7), (23, 19), (50, 50), (14, 28),
                                  (9, 33), (71, 18))]


def test_the_qwen_teacher_answers_easy_arithmetic_through_kd_eval_with_its_chat_template(tmp_path, capsys):
    """A real model behaves like one: Qwen2.5-Coder-0.5B-Instruct, asked through kd-eval on conversational prompts
    (its chat template applied by the one prompt formatter), answers most of ten sums correctly."""
    data = tmp_path / "sums"
    data.mkdir()
    with open(data / "test.jsonl", "w") as handle:
        for a, b in ARITHMETIC:
            handle.write(json.dumps({"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with the "
                                                 "number only."}],
                                     "completion": [{"role": "assistant", "content": str(a + b)}]}) + "\n")
    output = tmp_path / "eval"
    code = eval_cli.main(["--model", _model("qwen2.5-coder"), "--dataset", str(data), "--split", "test",
                          "--metrics", "exact_match", "--answer-extractor", "last_number", "--max-new-tokens", "12",
                          "--batch-size", "10", "--output", str(output)])
    assert code == 0, capsys.readouterr().err[-2000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["n"] == 10 and summary["exact_match"] >= 0.7, summary
    assert summary["empty_predictions"] == 0.0


def test_kd_eval_counts_and_warns_of_empty_answers_and_scores_lm_eval_tasks(smol, smol_full, sums_folders,
                                                                            tmp_path, capsys):
    """SmolLM2-Instruct given plain questions answers with its end-of-turn token at once: kd-eval records the share of
    empty answers in summary.json and warns; on the same questions as chat messages it answers. lm-eval tasks score
    the real model too."""
    shares = {}
    for form in ("plain", "chat"):
        output = tmp_path / form
        with pytest.warns(UserWarning, match="answered .* with nothing") if form == "plain" else _no_warning():
            code = eval_cli.main(["--model", smol_full, "--dataset", sums_folders[form], "--split", "test",
                                  "--metrics", "ngram", "--max-new-tokens", "12", "--output", str(output)])
        assert code == 0, capsys.readouterr().err[-2000:]
        shares[form] = json.loads((output / "summary.json").read_text())["empty_predictions"]
    assert shares["plain"] == 1.0 and shares["chat"] == 0.0, shares

    tasks = demo_task_folder(str(tmp_path / "tasks"))
    output = tmp_path / "lm_eval"
    code = eval_cli.main(["--model", smol, "--metrics", "lm_eval", "--lm-eval-tasks", "kd_demo_glossary_mc",
                          "--lm-eval-include-path", tasks, "--lm-eval-limit", "4", "--output", str(output)])
    assert code == 0, capsys.readouterr().err[-2000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["lm_eval_items"] == 4


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.caught if "with nothing" in str(w.message)]
        return False


# ---- aligning two real tokenizations -------------------------------------------------------------------------------

def test_real_tokenizers_align_hard_texts(smol, qwen, gemma):
    """SmolLM2 (byte-level BPE, 49k), Qwen2.5 (byte-level BPE, 152k) and Gemma 3 (SentencePiece with byte fallback,
    262k) over numbers, whitespace runs, accents, emoji and code: the groups equal the definition, partition both
    sequences and end on a character both sides cut after; the texts make many-to-many groups somewhere."""
    tokenizers = {name: AutoTokenizer.from_pretrained(path) for name, path in
                  (("smollm2", smol), ("qwen2.5", qwen), ("gemma3", gemma))}
    uneven = 0
    for student, teacher in (("smollm2", "qwen2.5"), ("smollm2", "gemma3"), ("gemma3", "qwen2.5")):
        for text in HARD_TEXTS:
            student_ids, student_offsets = tokens_with_offsets(tokenizers[student], text)
            teacher_ids, teacher_offsets = tokens_with_offsets(tokenizers[teacher], text)
            groups = aligned_groups(student_offsets, teacher_offsets)
            assert [(list(s), list(t)) for s, t in groups] == reference_groups(student_offsets, teacher_offsets)
            assert [i for s, _ in groups for i in s] == list(range(len(student_ids)))
            assert [i for _, t in groups for i in t] == list(range(len(teacher_ids)))
            for s, t in groups[:-1]:
                assert max(student_offsets[i][1] for i in s) == max(teacher_offsets[i][1] for i in t)
            if text:  # the last group ends at the text's end on both sides (these tokenizers keep every character)
                assert max(end for _, end in student_offsets) == max(end for _, end in teacher_offsets) == len(text)
            uneven += sum(len(s) > 1 and len(t) > 1 for s, t in groups)
    assert uneven > 0


def test_edit_distance_pairs_every_token_both_real_tokenizers_share(smol, qwen, gemma):
    """MinED's alignment on real tokenizers over the hard texts: a word reads the same through byte-level BPE
    (SmolLM2, Qwen2.5) and SentencePiece (Gemma 3), and wherever both tokenizations have one identical token over the
    same characters, the warping path pairs the two."""
    tokenizers = {name: AutoTokenizer.from_pretrained(path) for name, path in
                  (("smollm2", smol), ("qwen2.5", qwen), ("gemma3", gemma))}

    def texts(name, ids):
        return token_texts(tokenizers[name], tokenizers[name].convert_ids_to_tokens(ids))

    for name, tokenizer in tokenizers.items():
        assert texts(name, tokenizer(" the cat\n", add_special_tokens=False)["input_ids"]) == [" the", " cat", "\n"]
    for student, teacher in (("smollm2", "qwen2.5"), ("smollm2", "gemma3")):
        identical = 0
        for text in HARD_TEXTS:
            (student_ids, student_offsets), (teacher_ids, teacher_offsets) = (
                tokens_with_offsets(tokenizers[name], text) for name in (student, teacher))
            student_texts, teacher_texts = texts(student, student_ids), texts(teacher, teacher_ids)
            partners = edit_distance_partners(student_texts, teacher_texts)
            for s, t in aligned_groups(student_offsets, teacher_offsets):
                if len(s) == len(t) == 1 and student_texts[s[0]] == teacher_texts[t[0]]:
                    assert partners[s[0]] == t[0], (student, teacher, text, student_texts[s[0]])
                    identical += 1
        assert identical > 50


@pytest.mark.parametrize("form", ["plain", "chat"])
def test_two_real_chat_templates_align_on_the_answer_text(form, smol, qwen, gemma, exchanges):
    """SmolLM2's and Qwen2.5's chat templates render different prompts (their own system prompts and turn markers)
    around one answer: the dual tokenization's groups, over offsets from the answer's start, pair token runs that
    decode to the same text, every group but the last (the end-of-turn markers differ); on plain text Gemma 3
    (SentencePiece with byte fallback; this one has no chat template) too."""
    tokenizers = {name: AutoTokenizer.from_pretrained(path) for name, path in
                  (("smollm2", smol), ("qwen2.5", qwen), ("gemma3", gemma))}
    for student, teacher in (("smollm2", "qwen2.5"), ("smollm2", "gemma3"))[:2 if form == "plain" else 1]:
        tokenize = DualTokenizer(tokenizers[student], tokenizers[teacher], max_length=None, align=True)
        paired = 0
        for row in _rows(exchanges[:12], form):
            out = tokenize(row)
            groups = {}
            for side, prefix in ((0, ""), (1, "teacher_")):
                for token, group in zip(out[f"{prefix}input_ids"], out[f"{prefix}aligned_group"]):
                    if group >= 0:
                        groups.setdefault(group, ([], []))[side].append(token)
            assert sorted(groups) == list(range(len(groups)))
            for number in range(len(groups) - 1):
                student_ids, teacher_ids = groups[number]
                texts = (tokenizers[student].decode(student_ids), tokenizers[teacher].decode(teacher_ids))
                assert texts[0] == texts[1] or texts[0].strip() == texts[1].strip(), (student, teacher, texts)
                paired += 1
        assert paired > 100
