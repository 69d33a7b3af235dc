"""Bad input through every CLI: one line naming the field, exit status 2, no traceback, no model loaded, nothing
written. Each case runs in an empty folder of its own, with the files it needs, and compares the folder after."""

import json
import os

import pytest
import torch
import yaml

from kd_trainers.cli import evaluate as eval_cli, study as study_cli, train as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"method": "kd", "model_name_or_path": "demo:llama/student/bpe",
        "teacher_model_name_or_path": "demo:llama/teacher/bpe", "dataset_name": "data.jsonl", "max_steps": 2,
        "max_length": 64, "report_to": "none", "output_dir": "out", "bf16": False}
ROWS = [{"prompt": f"Q{i}: 2 + {i} =", "completion": f" {2 + i}"} for i in range(6)]


def recipe(**changes):
    values = {**GOOD, **changes}
    return yaml.safe_dump({k: v for k, v in values.items() if v is not DROP}, sort_keys=False)


DROP = object()


def study(**changes):
    values = {"name": "s", "base_recipe": "recipe.yaml", "output_dir": "study_out", "seeds": [0],
              "grid": {"t": {"1": {"kd_temperature": 1.0}, "2": {"kd_temperature": 2.0}}},
              "evaluation": {"metrics": ["ngram"], "limit": 2}, **changes}
    return yaml.safe_dump(values, sort_keys=False)


def jsonl(rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


# (id, cli, argv, {file: text}, text the one line must contain)
CASES = [
    ("unknown key", "train", ["recipe.yaml"], {"recipe.yaml": recipe(max_step=3)}, "Did you mean 'max_steps'"),
    ("wrong type", "train", ["recipe.yaml"], {"recipe.yaml": recipe(max_steps="ten")}, "max_steps: 'ten'"),
    ("infinite temperature", "train", ["recipe.yaml"], {"recipe.yaml": recipe() + "kd_temperature: .inf\n"},
     "kd_temperature: inf is not a finite number"),
    ("nan learning rate", "train", ["recipe.yaml", "learning_rate=.nan"], {"recipe.yaml": recipe()},
     "learning_rate: nan"),
    ("negative learning rate", "train", ["recipe.yaml", "learning_rate=-1.0"], {"recipe.yaml": recipe()},
     "learning_rate: -1.0"),
    ("key given twice", "train", ["recipe.yaml"], {"recipe.yaml": recipe() + "max_steps: 3\n"},
     "'max_steps' is given twice"),
    ("not YAML", "train", ["recipe.yaml"], {"recipe.yaml": "method: [kd,\n"}, "not valid YAML"),
    ("no such recipe", "train", ["nope.yaml"], {}, "'nope.yaml' does not exist"),
    ("a study given to kd-train", "train", ["study.yaml"], {"study.yaml": study(), "recipe.yaml": recipe()},
     "run it with kd-study"),
    ("override without =", "train", ["recipe.yaml", "max_steps"], {"recipe.yaml": recipe()}, "key=value"),
    ("empty output_dir", "train", ["recipe.yaml"], {"recipe.yaml": recipe(output_dir="")}, "output_dir: ''"),
    ("zero steps", "train", ["recipe.yaml"], {"recipe.yaml": recipe(max_steps=0)}, "max_steps: 0"),
    ("zero batch", "train", ["recipe.yaml"], {"recipe.yaml": recipe(per_device_train_batch_size=0)},
     "per_device_train_batch_size: 0"),
    ("zero accumulation", "train", ["recipe.yaml"], {"recipe.yaml": recipe(gradient_accumulation_steps=0)},
     "gradient_accumulation_steps: 0"),
    ("output_dir is a file", "train", ["recipe.yaml"], {"recipe.yaml": recipe(output_dir="taken"), "taken": "x"},
     "output_dir: 'taken' is a file"),
    ("student path missing", "train", ["recipe.yaml"], {"recipe.yaml": recipe(model_name_or_path="./models/none")},
     "model_name_or_path: './models/none' does not exist"),
    ("teacher adapter missing", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_adapter_name_or_path="outputs/sft/teacher")},
     "teacher_adapter_name_or_path: 'outputs/sft/teacher' does not exist"),
    ("bad demo spec", "train", ["recipe.yaml"], {"recipe.yaml": recipe(model_name_or_path="demo:llama/huge/bpe")},
     "model_name_or_path: 'demo:llama/huge/bpe' is not a demo model"),
    ("dataset missing", "train", ["recipe.yaml"], {"recipe.yaml": recipe(dataset_name="data/missing.jsonl")},
     "dataset_name: 'data/missing.jsonl' does not exist"),
    ("dataset empty", "train", ["recipe.yaml"], {"recipe.yaml": recipe(), "data.jsonl": ""}, "is an empty file"),
    ("null completions", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(), "data.jsonl": jsonl(ROWS[:3] + [{"prompt": "Q", "completion": None}])},
     "column 'completion' is null (or not text) in 1 of 4 rows"),
    ("every completion empty", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(), "data.jsonl": jsonl([{"prompt": "Q", "completion": ""}] * 3)},
     "every 'completion' is empty"),
    ("no prompt/completion columns", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(), "data.jsonl": jsonl([{"question": "Q", "answer": "A"}] * 3)},
     "training needs 'prompt' and 'completion'"),
    ("column mapped from nothing", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(columns={"completion": "answer"})}, "columns: completion: 'answer' is not a column"),
    ("template column missing", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(prompt_template="Q: {question}")}, "prompt_template uses column(s) ['question']"),
    ("test split missing", "train", ["recipe.yaml"], {"recipe.yaml": recipe(dataset_test_split="validation")},
     "dataset_test_split: 'validation' is not a split"),
    ("bad answer extractor", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(evaluation={"answer_extractor": "the_anwser_is"})},
     "evaluation.answer_extractor: 'the_anwser_is'"),
    ("evaluation limit 0", "train", ["recipe.yaml"], {"recipe.yaml": recipe(evaluation={"limit": 0})},
     "evaluation.limit: 0"),
    ("evaluation split missing", "train", ["recipe.yaml"], {"recipe.yaml": recipe(evaluation={"split": "dev"})},
     "evaluation.split: 'dev' is not a split"),
    ("validate: evaluation split without responses", "validate", ["recipe.yaml"],
     {"recipe.yaml": recipe(dataset_name="data", evaluation={"split": "test"}),
      "data/train.jsonl": jsonl([{"messages": [{"role": "user", "content": "2 + 2?"},
                                               {"role": "assistant", "content": "4"}]}] * 4),
      "data/test.jsonl": jsonl([{"messages": [{"role": "user", "content": "2 + 3?"}]}] * 2)},
     "evaluation.split 'test': Evaluation needs each example's response: the last message"),
    ("validate: evaluation split missing", "validate", ["recipe.yaml"],
     {"recipe.yaml": recipe(evaluation={"split": "dev"})}, "evaluation.split: 'dev' is not a split"),
    ("evaluating without a test split", "train", ["recipe.yaml"], {"recipe.yaml": recipe(eval_strategy="steps")},
     "eval_strategy: 'steps' evaluates during training, but dataset_test_split names no split"),
    ("unknown scheduler", "train", ["recipe.yaml"], {"recipe.yaml": recipe(lr_scheduler_type="cosin")},
     "lr_scheduler_type: 'cosin'"),
    ("unknown metric", "train", ["recipe.yaml"], {"recipe.yaml": recipe(evaluation={"metrics": ["blue"]})},
     "evaluation.metrics"),
    ("push without token", "train", ["recipe.yaml"], {"recipe.yaml": recipe(push_to_hub=True)},
     "push_to_hub: true needs a Hub token"),
    ("push to a bad repo id", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(push_to_hub=True, hub_model_id="not a repo!")}, "hub_model_id: 'not a repo!'"),
    ("wandb not installed", "train", ["recipe.yaml"], {"recipe.yaml": recipe(report_to="wandb")},
     "report_to: 'wandb' needs the 'wandb' package"),
    ("deepspeed not installed", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(accelerate={"config": "zero2", "num_processes": 2})},
     "pip install 'kd-trainers[deepspeed]'"),
    ("changed settings", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(), "out/run_info.json": json.dumps({"settings": {"kd_temperature": 4.0}}),
      "out/checkpoint-2/trainer_state.json": "{}"},
     "holds a run made with other settings (kd_temperature: 4.0 -> 1.0"),
    ("a MULTI_CPU accelerate config", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(accelerate={"config": "cpu.yaml", "num_processes": 2}),
      "cpu.yaml": yaml.safe_dump({"distributed_type": "MULTI_CPU", "use_cpu": True})},
     "accelerate.config: 'cpu.yaml' is a MULTI_CPU config, which `accelerate launch` starts as one process"),
    pytest.param(
        "an FSDP accelerate config without CUDA", "train", ["recipe.yaml"],
        {"recipe.yaml": recipe(accelerate={"config": "fsdp.yaml", "num_processes": 2}),
         "fsdp.yaml": yaml.safe_dump({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2}})},
        "accelerate.config: 'fsdp.yaml' is an FSDP config, and FSDP needs CUDA devices",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA an FSDP config is a valid launch")),
    ("agreement without a teacher", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(method="sft", teacher_model_name_or_path=DROP, agreement={"every_steps": 1})},
     "agreement: method 'sft' has no teacher"),
    ("agreement with Seq-KD's SFT alone", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(method="seqkd", kd_weight=0.0, agreement={"every_steps": 1})},
     "agreement: method 'seqkd' holds no teacher while training (the teacher is released once it has generated)"),
    ("agreement with a teacher cache", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_cache="cache", agreement={"every_steps": 1})},
     "agreement: method 'kd' holds no teacher while training (teacher_cache='cache' stands in for the teacher)"),
    ("a divergence setting the divergence does not read", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(divergence_params={"gamma": 2.0})},
     "divergence_params has ['gamma'], which divergence='forward_kl' does not read (it reads none)"),
    ("a recipe with neither a teacher nor a complete cache", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_cache="cache", teacher_model_name_or_path=None)},
     "teacher_cache: 'cache' holds no complete teacher cache, and teacher_model_name_or_path is null"),
    ("a cache of the teacher's own tokenization with nothing naming the teacher's tokenizer", "train",
     ["recipe.yaml"], {"recipe.yaml": recipe(method="gold", teacher_cache="cache", teacher_cache_tail="spread",
                                             teacher_model_name_or_path=None)},
     "teacher_cache: 'cache' holds the teacher at its own tokenization, and neither teacher_model_name_or_path nor "
     "teacher_tokenizer_name_or_path names the teacher's tokenizer"),
    ("ULD from a cache with its tail as one category", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(method="uld", teacher_cache="cache")},
     "teacher_cache_tail='bucket': teacher_cache='cache' with ULD compares the two models' sorted probability"),
    ("a teacher server that does not answer", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_url="http://127.0.0.1:9/v1", teacher_model_name_or_path=None)},
     "teacher_url: 'http://127.0.0.1:9/v1' does not answer GET /models (ConnectionError"),
    ("a teacher url that is not one", "train", ["recipe.yaml", "teacher_url=localhost:8000"],
     {"recipe.yaml": recipe()}, "teacher_url must be an http(s) URL ending in /v1"),
    ("a served teacher for DSKD", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(method="dskd", teacher_url="http://127.0.0.1:9/v1")},
     "DSKD needs the teacher's hidden states"),
    ("agreement with a served teacher", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_url="http://127.0.0.1:9/v1", agreement={"every_steps": 1})},
     "holds no teacher while training (teacher_url='http://127.0.0.1:9/v1' stands in for the teacher)"),
    ("several teachers and one more", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teachers=[{"model": "demo:llama/teacher/bpe"}])},
     "teachers: lists the teachers, and teacher_model_name_or_path names one more"),
    ("a teachers entry of two kinds", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_model_name_or_path=None,
                            teachers=[{"model": "demo:llama/teacher/bpe", "cache": "c"}])},
     "teachers[0]: give exactly one of model, cache and url"),
    ("several teachers for DSKD", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(method="dskd", teacher_model_name_or_path=None,
                            teachers=[{"model": "demo:llama/teacher/bpe"}])},
     "teachers: method 'dskd' takes one teacher"),
    ("a teachers entry whose cache is not written", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_model_name_or_path=None, teachers=[{"cache": "nowhere"}])},
     "teachers[0].cache: 'nowhere' holds no complete teacher cache"),
    ("a teachers entry whose server does not answer", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_model_name_or_path=None, teachers=[{"url": "http://127.0.0.1:9/v1"}])},
     "teachers[0].url: 'http://127.0.0.1:9/v1' does not answer GET /models"),
    ("a teachers entry whose tokenizer does not exist", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_model_name_or_path=None,
                            teachers=[{"model": "demo:llama/teacher/bpe", "tokenizer": "./tokenizers/none"}])},
     "teachers[0].tokenizer: './tokenizers/none' does not exist"),
    ("a teachers entry whose model does not exist", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_model_name_or_path=None, teachers=[{"model": "/nonexistent/teacher"}])},
     "teachers[0].model: '/nonexistent/teacher' does not exist"),
    ("teacher metrics with no teacher to answer", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_model_name_or_path=None, teacher_url="http://127.0.0.1:9/v1",
                            evaluation={"metrics": ["reasoning"]})},
     "evaluation.metrics: ['agreement', 'fidelity'] compare the student's answers with the teacher's"),
    ("model path missing", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_model_name_or_path="/nonexistent/teacher")},
     "teacher_model_name_or_path: '/nonexistent/teacher' does not exist"),
    ("validate: data columns", "validate", ["recipe.yaml"],
     {"recipe.yaml": recipe(), "data.jsonl": jsonl([{"question": "Q", "answer": "A"}] * 3)},
     "training needs 'prompt' and 'completion'"),
    ("validate: wandb", "validate", ["recipe.yaml"], {"recipe.yaml": recipe(report_to=["wandb"])},
     "pip install 'wandb'"),
    ("a recipe given to kd-study", "study", ["recipe.yaml"], {"recipe.yaml": recipe()}, "run it with kd-train"),
    ("typo in the last cell", "study", ["study.yaml"],
     {"study.yaml": study(grid={"t": {"1": {"kd_temperature": 1.0}, "2": {"kd_temperatur": 2.0}}}),
      "recipe.yaml": recipe()}, "cell t=2 seed 0"),
    ("bad seeds", "study", ["study.yaml"], {"study.yaml": study(seeds="0,1"), "recipe.yaml": recipe()}, "seeds:"),
    ("no study workers", "study", ["study.yaml", "--workers", "0"], {"study.yaml": study(), "recipe.yaml": recipe()},
     "--workers: 0 should be 1 or more"),
    ("unknown prepare key", "study", ["study.yaml"],
     {"study.yaml": study(prepare=[{"name": "t", "recipe": "recipe.yaml", "cahce": True}]), "recipe.yaml": recipe()},
     "prepare[0]: unknown key(s) ['cahce']"),
    ("a train slice that is no slice", "train", ["recipe.yaml", "dataset_train_split=train[:x]"],
     {"recipe.yaml": recipe()}, "dataset_train_split: 'train[:x]' is neither a split name nor a slice"),
    ("alpha out of range", "study", ["study.yaml"], {"study.yaml": study(alpha=5), "recipe.yaml": recipe()},
     "alpha: 5"),
    ("bad study evaluation", "study", ["study.yaml"],
     {"study.yaml": study(evaluation={"batch_size": 0}), "recipe.yaml": recipe()}, "evaluation.batch_size: 0"),
    ("a negative seed", "train", ["recipe.yaml", "seed=-1"], {"recipe.yaml": recipe()},
     "seed: -1 should be an integer from 0 to 4294967295"),
    ("a folder given as the recipe", "train", ["recipes"], {"recipes/a.yaml": recipe(), "recipes/b.yml": recipe()},
     "'recipes' is a folder, not a YAML file; name a file in it (it holds a.yaml, b.yml)"),
    ("a data file of blank lines", "train", ["recipe.yaml"], {"recipe.yaml": recipe(), "data.jsonl": "\n\n  \n"},
     "dataset_name: 'data.jsonl' holds only blank lines"),
    # Splits of different columns load (prompts alone beside a labelled test split); files of one split must agree.
    ("files of one split with different columns", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(dataset_name="data"), "data/train-0.jsonl": jsonl(ROWS),
      "data/train-1.jsonl": jsonl([{**ROWS[0], "source": "web"}])},
     "dataset_name: 'data' cannot be read (CastError: "),
    ("a routing column that is not one", "train", ["recipe.yaml"],
     {"recipe.yaml": recipe(teacher_model_name_or_path=None, teacher_column="nope",
                            teachers=[{"model": "demo:llama/teacher/bpe"}, {"model": "demo:qwen2/teacher/bpe"}])},
     "teacher_column='nope' is not a column of the train data (it has ['prompt', 'completion'])"),
    ("kd-eval: no such model", "eval", ["--model", "outputs/none/run", "--output", "ev"], {},
     "--model: 'outputs/none/run' does not exist"),
    ("kd-eval: unfinished run", "eval", ["--model", "run", "--output", "ev"],
     {"run/run_info.json": "{}", "run/config.json": "{}"}, "is a run that did not finish"),
    ("kd-eval: limit 0", "eval", ["--model", "demo:llama/student/bpe", "--limit", "0", "--output", "ev"], {},
     "--limit: 0"),
    ("kd-eval: bad answer extractor", "eval", ["--model", "demo:llama/student/bpe", "--metrics", "exact_match",
                                                "--answer-extractor", "nope", "--output", "ev"], {}, "'nope'"),
]
COMMANDS = {"train": cli.main, "validate": lambda argv: cli.main(["validate", *argv]), "study": study_cli.main,
            "eval": eval_cli.main}


def listing(folder):
    return sorted((os.path.relpath(os.path.join(root, name), folder), os.path.getsize(os.path.join(root, name)))
                  for root, _, names in os.walk(folder) for name in names)


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Any model load fails the test: bad input must be refused before."""
    import transformers

    import kd_trainers.recipe.models as models

    def heavy(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "resolve_model", heavy)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", heavy)


def _write_files(files: dict) -> None:
    for path, text in files.items():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)


def refused(command, argv, expected, folder, capsys, prepare=None):
    """Runs the command in `folder` (the current directory), after `prepare()` when given; asserts exit 2, one line
    holding `expected`, no traceback, and the folder as it was."""
    if prepare is not None:
        prepare()
    before = listing(folder)
    code = COMMANDS[command](argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured
    assert len(lines) == 1, lines
    assert "Traceback" not in captured.err + captured.out
    assert expected in lines[0], lines[0]
    after = [entry for entry in listing(folder) if not entry[0].startswith(".hf")]
    assert after == [entry for entry in before if not entry[0].startswith(".hf")]  # nothing written, nothing changed
    return lines[0]


@pytest.fixture
def bare_machine(tmp_path, monkeypatch):
    """An empty folder as the current directory, no Hub token, and neither wandb nor deepspeed installed."""
    import importlib.util

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / ".hf"))  # no stored login either
    real_find_spec = importlib.util.find_spec
    missing = {"wandb", "deepspeed"}  # as on a machine without these extras
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *a: None if module in missing else real_find_spec(module, *a))
    return tmp_path


@pytest.mark.parametrize("name,command,argv,files,expected", CASES,
                         ids=[getattr(case, "values", case)[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_before_any_work(name, command, argv, files, expected, bare_machine, capsys,
                                                      no_heavy_work):
    _write_files({"data.jsonl": jsonl(ROWS), **files})
    refused(command, argv, expected, bare_machine, capsys)


# A teacher cache written for real (the GOOD recipe's teacher over ROWS), then damaged as a disk, an editor or an
# interrupted copy would: (id, command, recipe changes, damage, data rows, text the one line must contain).
def _edit_info(change):
    def damage():
        with open("cache/cache_info.json") as handle:
            info = json.load(handle)
        change(info)
        with open("cache/cache_info.json", "w") as handle:
            json.dump(info, handle)
    return damage


def _arrow_file():
    block = "cache/train/block-000000"
    return os.path.join(block, next(name for name in sorted(os.listdir(block)) if name.endswith(".arrow")))


def _truncate_arrow():
    path = _arrow_file()
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _flip_a_byte():
    path = _arrow_file()
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _cut_info_in_half():
    with open("cache/cache_info.json", "r+") as handle:
        handle.truncate(os.path.getsize("cache/cache_info.json") // 2)


def _remove(path):
    import shutil

    return lambda: shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


FROM_CACHE = {"teacher_model_name_or_path": None, "teacher_cache": "cache"}
CACHE_CASES = [
    ("info without components", "train", FROM_CACHE, _edit_info(lambda info: info.pop("components")), ROWS,
     "teacher_cache='cache': cache_info.json has no field 'components.teacher'; run `kd-train cache-teacher RECIPE "
     "teacher_cache=cache`"),
    ("info cut in half", "train", FROM_CACHE, _cut_info_in_half, ROWS,
     "teacher_cache='cache': cache_info.json cannot be read (JSONDecodeError"),
    ("k edited in the info", "train", FROM_CACHE,
     _edit_info(lambda info: info["components"]["settings"].update(k=16)), ROWS,
     "key: '"),
    ("id_bytes edited in the info", "train", FROM_CACHE, _edit_info(lambda info: info.update(id_bytes=3)), ROWS,
     "cache_info.json: id_bytes: 3 is not 2 (the bytes an id of a 640-token vocabulary takes)"),
    ("complete: false", "train", FROM_CACHE, _edit_info(lambda info: info.update(complete=False)), ROWS,
     "teacher_cache: 'cache' holds an unfinished pass, and teacher_model_name_or_path is null"),
    ("an unfinished pass", "train", FROM_CACHE, _remove("cache/cache_info.json"), ROWS,
     "teacher_cache: 'cache' holds an unfinished pass"),
    ("a block count edited", "train", FROM_CACHE,
     _edit_info(lambda info: info["splits"]["train"].update(blocks=2)), ROWS,
     "cache_info.json: splits.train.blocks: 2 is not 1 (blocks of 256 rows for 6 rows)"),
    ("half an Arrow block truncated", "train", FROM_CACHE, _truncate_arrow, ROWS,
     "teacher_cache='cache': train/block-000000 has its file data-00000-of-00001.arrow at"),
    ("a block's bytes changed", "train", FROM_CACHE, _flip_a_byte, ROWS,
     "train/block-000000 has its file data-00000-of-00001.arrow changed since it was written"),
    ("a block deleted", "train", FROM_CACHE, _remove("cache/train/block-000000"), ROWS,
     "train/block-000000 is missing. Run `kd-train cache-teacher RECIPE teacher_cache=cache`"),
    ("a block's checksum deleted", "train", FROM_CACHE, _remove("cache/train/block-000000/kd_block.json"), ROWS,
     "train/block-000000 has no readable kd_block.json"),
    ("a cache of other data", "train", FROM_CACHE, None, ROWS[:5],
     "teacher_cache: 'cache' holds 6 rows of the train split, and the recipe's data has 5"),
    ("a cache of another tokenizer", "train", {**FROM_CACHE, "model_name_or_path": "demo:llama/student/wordpiece"},
     None, ROWS, "teacher_cache: 'cache' was written for another tokenizer than the student's"),
    ("a cache written with other settings", "train", {**FROM_CACHE, "teacher_cache_k": 8}, None, ROWS,
     "teacher_cache: 'cache' was written with other settings (teacher_cache_k: 8 where the cache has 32)"),
    ("a damaged cache with its teacher named", "train", {"teacher_cache": "cache"},
     _remove("cache/train/block-000000"), ROWS, "train/block-000000 is missing"),
    ("validate: a damaged cache", "validate", FROM_CACHE, _truncate_arrow, ROWS, "train/block-000000 has its file"),
    ("a damaged cache among several teachers", "train",
     {"teacher_model_name_or_path": None, "teachers": [{"cache": "cache"}, {"model": "demo:llama/teacher/bpe"}]},
     _remove("cache/train/block-000000"), ROWS, "teachers[0].cache: teacher_cache='cache': train/block-000000 is "
     "missing"),
]


@pytest.fixture(scope="module")
def written_cache(tmp_path_factory):
    """A complete teacher cache of the GOOD recipe's teacher over ROWS, written by `kd-train cache-teacher`."""
    folder = tmp_path_factory.mktemp("written_cache")
    _in(folder, lambda: _write_files({"data.jsonl": jsonl(ROWS), "recipe.yaml": recipe(teacher_cache="cache")}))
    assert _in(folder, lambda: cli.main(["cache-teacher", "recipe.yaml"])) == 0
    return folder / "cache"


def _in(folder, action):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        return action()
    finally:
        os.chdir(previous)


@pytest.mark.parametrize("name,command,changes,damage,rows,expected", CACHE_CASES,
                         ids=[case[0] for case in CACHE_CASES])
def test_a_damaged_or_mismatched_cache_is_one_line_exit_2_before_any_work(
        name, command, changes, damage, rows, expected, written_cache, bare_machine, capsys, no_heavy_work):
    import shutil

    shutil.copytree(written_cache, "cache")
    _write_files({"data.jsonl": jsonl(rows), "recipe.yaml": recipe(**changes)})
    refused(command, ["recipe.yaml"], expected, bare_machine, capsys, prepare=damage)


def test_there_are_at_least_thirty_cases_over_every_cli():
    assert len(CASES) >= 30
    assert {getattr(case, "values", case)[1] for case in CASES} == set(COMMANDS)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(recipe(max_steps=0))
    from kd_trainers.recipe import RecipeError

    with pytest.raises(RecipeError, match="max_steps: 0"):
        cli.main(["recipe.yaml", "--debug"])


class CappedScorer:
    """A server that answers fewer log-probabilities than asked (a silent cap): 4 a position, whatever k is."""

    def __init__(self, scorer, name=None):
        self.scorer, self.name = scorer, name

    def models(self):
        answer = self.scorer.models()
        if self.name:  # the same model under another name: another tokenizer, as far as a run can tell
            answer["data"][0]["id"] = answer["data"][0]["root"] = self.name
        return answer

    def completions(self, body):
        status, answer = self.scorer.completions({**body, "model": None})
        if status == 200 and not self.name:  # the 4 most probable, and the prompt token itself (as vLLM adds it)
            for choice, ids in zip(answer["choices"], body["prompt"]):
                choice["prompt_logprobs"] = [None if position is None else {
                    key: value for key, value in position.items() if value["rank"] <= 4 or key == str(ids[j])}
                    for j, position in enumerate(choice["prompt_logprobs"])]
        return status, answer


@pytest.fixture(scope="module")
def servers():
    """Loopback teacher servers: the demo teacher with --max-logprobs 8, one that caps its answers at 4, and one that
    names a model of another vocabulary."""
    from kd_trainers.demo import demo_model, demo_tokenizer
    from kd_trainers.served_teacher.server import LoopbackServer, PromptScorer

    tokenizer = demo_tokenizer("bpe")
    scorer = PromptScorer(demo_model("llama", tokenizer, "teacher", seed=1), tokenizer, "demo:llama/teacher/bpe",
                          max_logprobs=8)
    running = {"limited": LoopbackServer(scorer).start(), "capped": LoopbackServer(CappedScorer(scorer)).start(),
               "other vocabulary": LoopbackServer(CappedScorer(scorer, "demo:llama/teacher/wordpiece")).start()}
    yield {name: server.url for name, server in running.items()}
    for server in running.values():
        server.stop()


SERVED = {"teacher_model_name_or_path": None, "kd_temperature": 1.0, "teacher_server_k": 8}
# (id, server, how the recipe names it, recipe changes, text the one line must contain)
SERVER_CASES = [
    ("a URL whose path 404s", "limited", lambda url: url.replace("/v1", "/api/v1"), SERVED,
     "refused GET /models: HTTP 404"),
    ("a URL without /v1", "limited", lambda url: url[: -len("/v1")], SERVED,
     "no such path on this server: the URL is the API's base URL, ending in /v1"),
    ("teacher_server_k above --max-logprobs", "limited", str, {**SERVED, "teacher_server_k": 20},
     "refused a prompt_logprobs request at teacher_server_k=20: HTTP 400"),
    ("a server that answers fewer log-probabilities", "capped", str, SERVED,
     "gave no usable answer to a prompt_logprobs request at teacher_server_k=8 (InvalidAnswer: prompt 0, position 1: "),
    ("a served model of another vocabulary", "other vocabulary", str, SERVED, "use different tokenizers"),
    ("a temperature a server cannot serve", "limited", str, {**SERVED, "kd_temperature": 2.0},
     "kd_temperature=2.0 with teacher_url='http://127.0.0.1:"),
    ("a teachers entry whose path 404s", "limited", lambda url: url.replace("/v1", "/x/v1"),
     {"teacher_model_name_or_path": None, "teacher_server_k": 8, "kd_temperature": 1.0},
     "teachers[0].url: 'http://127.0.0.1:"),
]


@pytest.mark.parametrize("name,server,named,changes,expected", SERVER_CASES, ids=[case[0] for case in SERVER_CASES])
def test_a_wrong_server_is_refused_in_one_line_before_any_work(name, server, named, changes, expected, servers,
                                                               bare_machine, capsys, no_heavy_work):
    url = named(servers[server])
    if name.startswith("a teachers entry"):
        changes = {**changes, "teachers": [{"url": url}, {"model": "demo:llama/teacher/bpe"}]}
    else:
        changes = {**changes, "teacher_url": url}
    _write_files({"data.jsonl": jsonl(ROWS), "recipe.yaml": recipe(**changes)})
    line = refused("train", ["recipe.yaml"], expected, bare_machine, capsys)
    assert "fewer than asked for" in line or server != "capped"
    assert "_Retryable" not in line and "start the teacher's server first" not in line.lower()


def test_a_run_stopped_before_its_first_step_does_not_bind_the_next(bare_machine):
    """Other settings are refused once the folder holds a checkpoint; before that, only `run_info.json` is there,
    and the corrected run may start."""
    from kd_trainers.recipe.output import check_output_dir
    from kd_trainers.recipe.schema import load_recipe

    _write_files({"data.jsonl": jsonl(ROWS), "recipe.yaml": recipe(),
                  "out/run_info.json": json.dumps({"settings": {"kd_temperature": 4.0}})})
    check_output_dir(load_recipe("recipe.yaml"))
    _write_files({"out/checkpoint-1/trainer_state.json": "{}"})
    from kd_trainers.recipe import RecipeError

    with pytest.raises(RecipeError, match="holds a run made with other settings"):
        check_output_dir(load_recipe("recipe.yaml"))


def test_kd_serve_teacher_on_a_busy_port_says_so_before_loading_the_model(capsys, no_heavy_work):
    import socket

    from kd_trainers.cli import serve as serve_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = serve_cli.main(["demo:llama/teacher/bpe", "--port", str(port)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert f"--port {port}: 127.0.0.1:{port} is in use" in lines[0] and "choose another --port" in lines[0]


def test_a_recipe_files_own_problems_are_said_before_torch_is_imported(tmp_path):
    """A missing recipe, a folder, a file that is not YAML, a study given to kd-train, an override without `=`:
    answered from the file alone, in a fraction of a second (nothing heavy is imported)."""
    import subprocess
    import sys

    (tmp_path / "recipes").mkdir()
    (tmp_path / "bad.yaml").write_text("method: [kd,\n")
    (tmp_path / "study.yaml").write_text(study())
    (tmp_path / "recipe.yaml").write_text(recipe())
    code = ("import sys; from kd_trainers.cli import train as cli; codes = [cli.main(argv) for argv in (['nope.yaml'], ['recipes'], "
            "['bad.yaml'], ['study.yaml'], ['recipe.yaml', 'max_steps'], ['validate', 'nope.yaml'])]; "
            "print(codes, sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip() == "[2, 2, 2, 2, 2, 2] []", result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 6


@pytest.mark.parametrize("command, prefix", [("study", "Study error: kd-study"), ("evaluate", "kd-eval: kd-eval")])
def test_a_command_without_the_eval_extra_names_it_in_one_line(command, prefix, monkeypatch, capsys, tmp_path):
    """kd-study and kd-eval installed without `[eval]` (here: its packages hidden) stop at once with one line naming
    the missing packages and the install, exit status 2, and write nothing."""
    import importlib
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("scipy", "evaluate") else real_find_spec(name, *args))
    monkeypatch.chdir(tmp_path)
    cli = importlib.import_module(f"kd_trainers.cli.{command}")
    argv = ["methods"] if command == "study" else ["--model", "demo:llama/student/bpe", "--output", "ev"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(prefix) and "\n" not in err
    assert "evaluate, scipy not installed" in err and "pip install 'kd-trainers[eval]'" in err
    assert os.listdir(tmp_path) == []
