"""The `lm_eval` suite: lm-evaluation-harness tasks defined locally (task YAMLs over JSON files written here), scored
per item through the package's wrapper, against lm-eval called directly and against log-likelihoods computed here;
`kd-eval` on a task that exists only in an include path; the settings' checks."""

import json
import os

import pandas as pd
import pytest
import torch
import yaml

from kd_trainers.cli.evaluate import main as kd_eval
from kd_trainers.evaluation.harness import harness_settings, run_harness
from kd_trainers.evaluation.settings import evaluation_settings
from kd_trainers.recipe.models import resolve_model


MC_ITEMS = [
    {"question": "What does RAN stand for?", "label": 0,
     "choices": ["Radio Access Network", "Remote Antenna Node", "Random Access Number", "Radio Area Net"]},
    {"question": "What does UE stand for?", "label": 2,
     "choices": ["Uplink Entity", "Unified Edge", "User Equipment", "Universal Exchange"]},
    {"question": "What does QoS stand for?", "label": 1,
     "choices": ["Quantity of Signal", "Quality of Service", "Queue of Sessions", "Quick over Spectrum"]},
    {"question": "What does NR stand for?", "label": 3,
     "choices": ["Network Relay", "Node Register", "Noise Ratio", "New Radio"]},
    {"question": "What does MIMO stand for?", "label": 0,
     "choices": ["Multiple Input Multiple Output", "Mobile In Mobile Out", "Many Inputs Many Outputs",
                 "Mixed Interface Mode"]},
    {"question": "What does SIM stand for?", "label": 1,
     "choices": ["Signal Input Module", "Subscriber Identity Module", "Secure Internet Mode", "Single Mode"]},
]
GEN_ITEMS = [{"question": f"What is {x} plus {y}?", "answer": str(x + y)} for x, y in ((2, 3), (4, 4), (7, 1))]


def write_task(folder, name: str, items: list[dict], config: dict) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "doc_to_text": "{{question}}", **config}))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> str:
    """A folder of two lm-eval tasks that exist nowhere else: multiple choice and generation."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    write_task(folder, "tiny_mc", MC_ITEMS, {
        "output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]})
    write_task(folder, "tiny_gen", GEN_ITEMS, {
        "output_type": "generate_until", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        "filter_list": [{"name": "last-number", "filter": [{"function": "regex", "regex_pattern": "(-?[0-9]+)",
                                                             "group_select": -1}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]})
    return str(folder)


def choice_by_likelihood(model, tokenizer, question: str, choices: list[str]) -> int:
    """The choice whose tokens (after the question and a space) the model finds likeliest: the sum of their
    log-probabilities, computed here from the model's logits. The text is tokenized as the tokenizer does by default
    (the demo's BPE puts BOS first), as the model was trained."""
    context = tokenizer(question)["input_ids"]
    totals = []
    for choice in choices:
        whole = tokenizer(question + " " + choice)["input_ids"]
        continuation = whole[len(context):]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].float()
        log_probs = torch.log_softmax(logits[len(context) - 1:-1], dim=-1)
        totals.append(float(log_probs.gather(1, torch.tensor(continuation)[:, None]).sum()))
    return max(range(len(choices)), key=totals.__getitem__)


@pytest.mark.slow
def test_the_wrappers_items_are_lm_evals_own_and_accuracy_is_the_likeliest_choice(tasks, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from kd_trainers.demo.harness_tasks import demo_task_folder
    from kd_trainers.runtime.files import user_cache_dir

    model, tokenizer = resolve_model("demo:llama/student/bpe")
    names = ["tiny_mc", "tiny_gen", "kd_demo_glossary_mc", "kd_demo_arithmetic"]
    settings = harness_settings({"tasks": names, "limit": 10, "batch_size": 4, "include_path": tasks}, "test",
                                ValueError)
    frame, figures = run_harness(model, tokenizer, settings, str(tmp_path))

    # lm-eval on its own, called the way its documentation shows.
    manager = TaskManager(include_path=[tasks, demo_task_folder(user_cache_dir("lm_eval_tasks"))],
                          include_defaults=False)
    direct = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=names,
                             limit=10, task_manager=manager, log_samples=True)
    columns = {"tiny_mc": ["acc", "acc_norm"], "tiny_gen": ["exact_match,last-number"],
               "kd_demo_glossary_mc": ["acc", "acc_norm"], "kd_demo_arithmetic": ["exact_match,strict-match"]}
    for task, metrics in columns.items():
        for metric in metrics:
            key = metric if "," in metric else f"{metric},none"
            column = frame[f"{task}/{metric}"].dropna()
            assert len(column) == min(10, direct["n-samples"][task]["original"])
            # The per-item column averages to lm-eval's figure, which the summary keeps, with its standard error.
            assert column.mean() == pytest.approx(direct["results"][task][key], abs=1e-12)
            assert figures[f"{task}/{metric}"] == pytest.approx(direct["results"][task][key], abs=1e-12)
            stderr = key.replace(",", "_stderr,", 1)
            assert figures[f"{task}/{metric.split(',')[0]}_stderr" + (f",{metric.split(',')[1]}" if "," in metric
                                                                      else "")] == pytest.approx(
                direct["results"][task][stderr])
        for sample in direct["samples"][task]:  # item by item, not only on average
            row = frame.set_index("example_id").loc[f"{task}/{sample['doc_id']}"]
            for metric in sample["metrics"]:
                column = f"{task}/{metric}" + ("" if sample["filter"] == "none" else f",{sample['filter']}")
                assert row[column] == float(sample[metric])
    # Accuracy is the model's likeliest choice, computed here from its logits.
    expected = [float(choice_by_likelihood(model, tokenizer, item["question"], item["choices"]) == item["label"])
                for item in MC_ITEMS]
    assert list(frame.set_index("example_id").loc[[f"tiny_mc/{i}" for i in range(6)], "tiny_mc/acc"]) == expected
    # What was measured is on disk: lm-eval's results and its per-item log with the prompts the model saw.
    record = json.load(open(tmp_path / "lm_eval_results.json"))
    assert record["results"]["tiny_mc"]["acc,none"] == pytest.approx(direct["results"]["tiny_mc"]["acc,none"])
    assert record["settings"]["tasks"] == names and record["not_per_item"] == []
    logged = [json.loads(line) for line in open(tmp_path / "lm_eval_samples.jsonl")]
    assert {row["task"] for row in logged} == set(names)
    assert next(row for row in logged if row["task"] == "tiny_gen")["prompt"] == GEN_ITEMS[0]["question"]


@pytest.mark.slow
def test_fewshot_limit_and_batch_size_take_effect_and_a_peft_model_is_scored_merged(tasks, tmp_path, monkeypatch):
    from lm_eval.models import huggingface
    from peft import LoraConfig, get_peft_model

    model, tokenizer = resolve_model("demo:llama/student/bpe")
    seen = {}
    real_init = huggingface.HFLM.__init__

    def recording_init(self, *args, **kwargs):
        seen.update(kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(huggingface.HFLM, "__init__", recording_init)
    settings = harness_settings({"tasks": ["kd_demo_arithmetic"], "limit": 3, "num_fewshot": 2, "batch_size": 3},
                                "test", ValueError)
    frame, figures = run_harness(model, tokenizer, settings, str(tmp_path / "fewshot"))
    assert len(frame) == 3 and seen["batch_size"] == 3
    prompts = [json.loads(line)["prompt"] for line in open(tmp_path / "fewshot" / "lm_eval_samples.jsonl")]
    # Two solved training problems before each question: two "The answer is" in every prompt.
    assert all(prompt.count("The answer is") == 2 for prompt in prompts)
    assert json.load(open(tmp_path / "fewshot" / "lm_eval_results.json"))["n-shot"]["kd_demo_arithmetic"] == 2

    # A LoRA student (its B matrices made non-zero, so the adapter changes the outputs) is scored as the merged
    # model: the same scores as the merge made by hand, and the adapter is left unmerged after.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    settings = harness_settings({"tasks": ["kd_demo_glossary_mc"], "limit": 8}, "test", ValueError)
    adapted, _ = run_harness(peft_model, tokenizer, settings)
    assert not any(getattr(module, "merged", False) for module in peft_model.modules())
    merged, _ = run_harness(peft_model.merge_and_unload(), tokenizer, settings)
    pd.testing.assert_frame_equal(adapted, merged)


@pytest.mark.slow
def test_kd_eval_scores_a_task_defined_only_in_an_include_path(tasks, tmp_path, capfd, monkeypatch):
    capsys = capfd  # what git, started by lm-eval, writes to the terminal is seen too
    monkeypatch.chdir(tmp_path)  # outside any git repository
    output = tmp_path / "eval"
    code = kd_eval(["--model", "demo:llama/student/bpe", "--metrics", "lm_eval", "--lm-eval-tasks", "tiny_mc",
                    "tiny_gen", "--lm-eval-include-path", tasks, "--output", str(output)])
    assert code == 0
    scores = pd.read_csv(output / "scores.csv")
    summary = json.load(open(output / "summary.json"))
    record = json.load(open(output / "lm_eval_results.json"))
    assert list(scores["example_id"]) == [f"tiny_mc/{i}" for i in range(6)] + [f"tiny_gen/{i}" for i in range(3)]
    for column, key in (("tiny_mc/acc", ("tiny_mc", "acc,none")),
                        ("tiny_gen/exact_match,last-number", ("tiny_gen", "exact_match,last-number"))):
        assert scores[column].mean() == pytest.approx(record["results"][key[0]][key[1]], abs=1e-12)
        assert summary[column] == pytest.approx(record["results"][key[0]][key[1]], abs=1e-12)
    # Nothing was generated on a dataset: lm-eval brought its own items.
    assert not os.path.exists(output / "predictions.jsonl") and summary["lm_eval_items"] == 9
    captured = capsys.readouterr()
    assert "tiny_mc/acc" in captured.out and "fatal:" not in captured.err  # lm-eval's git call kept quiet

    # Bad input: one line naming the flag, exit status 2, nothing written.
    for argv, message in (
            (["--lm-eval-tasks", "tiny_mcq", "--lm-eval-include-path", tasks],
             "--lm-eval-tasks: 'tiny_mcq' is not an lm-eval task, tag or group. Did you mean 'tiny_mc'?"),
            (["--lm-eval-tasks", "tiny_mc", "--lm-eval-include-path", str(tmp_path / "nowhere")],
             "--lm-eval-include-path: "),
            ([], "--metrics lm_eval needs --lm-eval-tasks"),
            (["--lm-eval-tasks", "tiny_mc", "--lm-eval-limit", "0"], "--lm-eval-limit: 0 should be an integer ≥ 1")):
        bad = tmp_path / "bad"
        assert kd_eval(["--model", "demo:llama/student/bpe", "--metrics", "lm_eval", *argv, "--output",
                        str(bad)]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1 and not bad.exists()
    assert kd_eval(["--model", "demo:llama/student/bpe", "--metrics", "ngram", "--lm-eval-tasks", "tiny_mc",
                    "--output", str(tmp_path / "bad")]) == 2
    assert "--lm-eval-tasks apply to the lm_eval suite, which --metrics does not name" in capsys.readouterr().err


def test_the_evaluation_block_refuses_an_lm_eval_setting_that_would_not_run(tmp_path):
    where = str(tmp_path / "study.yaml")
    for block, message in (
            ({"metrics": ["lm_eval"]}, "evaluation.metrics has lm_eval but there is no evaluation.lm_eval block"),
            ({"metrics": ["ngram"], "lm_eval": {"tasks": ["arc_easy"]}},
             "evaluation.lm_eval is set but evaluation.metrics lacks lm_eval"),
            ({"metrics": ["lm_eval"], "lm_eval": {"tasks": ["arc_easy"], "fewshot": 5}},
             "evaluation.lm_eval.fewshot: unknown key. Did you mean 'num_fewshot'?"),
            ({"metrics": ["lm_eval"], "lm_eval": {"tasks": []}}, "evaluation.lm_eval.tasks: [] should be a list"),
            ({"metrics": ["lm_eval"], "lm_eval": {"tasks": ["arc_easy"], "num_fewshot": -1}},
             "evaluation.lm_eval.num_fewshot: -1 should be an integer ≥ 0"),
            ({"metrics": ["lm_eval"], "lm_eval": {"tasks": ["arc_easy"], "batch_size": "auto"}},
             "evaluation.lm_eval.batch_size: 'auto' should be an integer ≥ 1"),
            ({"metrics": ["lm_eval"], "lm_eval": {"tasks": ["arc_easy"], "include_path": "my_tasks"}},
             f"evaluation.lm_eval.include_path: {str(tmp_path / 'my_tasks')!r} is not a folder")):
        with pytest.raises(ValueError, match=None) as raised:
            evaluation_settings(block, where, ValueError)
        assert message in str(raised.value)
    (tmp_path / "my_tasks").mkdir()
    settings = evaluation_settings({"metrics": ["ngram", "lm_eval"], "lm_eval": {"tasks": "kd_demo",
                                                                                  "include_path": "my_tasks"}},
                                   where, ValueError)
    # A relative include path is the study's (or recipe's) folder's; the defaults are filled in.
    assert settings["lm_eval"] == {"tasks": ["kd_demo"], "num_fewshot": None, "limit": None, "batch_size": 16,
                                   "include_path": [str(tmp_path / "my_tasks")]}


@pytest.mark.slow
def test_a_recipe_naming_an_unknown_task_is_refused_before_training(tasks, tmp_path, capsys):
    from kd_trainers.cli.train import main as kd_train

    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "sft.yaml")
    harness = {"tasks": ["kd_demo_glossary"], "include_path": tasks}  # the path kd-eval's test indexed already
    code = kd_train([recipe, "max_steps=1", f"output_dir={tmp_path / 'run'}",
                     "evaluation=" + json.dumps({"metrics": ["lm_eval"], "lm_eval": harness})])
    error = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "run").exists()
    assert ("evaluation.lm_eval.tasks: 'kd_demo_glossary' is not an lm-eval task, tag or group. Did you mean "
            "'kd_demo_glossary_mc'?") in error


def test_the_demo_tasks_hold_the_demo_test_split_as_lm_eval_items(tmp_path):
    import re

    from kd_trainers.demo import demo_pairs
    from kd_trainers.demo.harness_tasks import demo_task_folder

    folder = demo_task_folder(str(tmp_path))
    assert demo_task_folder(str(tmp_path)) == folder  # written once, found again by its content
    test = demo_pairs()["test"]
    glossary = {row["prompt"]: row["completion"] for row in test if row["kind"] == "glossary"}
    items = [json.loads(line) for line in open(os.path.join(folder, "kd_demo_glossary_mc_test.jsonl"))]
    assert len(items) == len(glossary)
    for item in items:  # the true completion at `label`, three others of the same form, all different
        assert item["choices"][item["label"]] == glossary[item["prompt"]]
        assert len(set(item["choices"])) == 4
        assert all(choice.split()[0] == item["choices"][0].split()[0] for choice in item["choices"])
    assert len({item["label"] for item in items}) == 4  # the answer is not always in one place
    arithmetic = [json.loads(line) for line in open(os.path.join(folder, "kd_demo_arithmetic_test.jsonl"))]
    assert [item["answer"] for item in arithmetic] == [row["answer"] for row in test if row["kind"] == "arithmetic"]
    config = yaml.safe_load(open(os.path.join(folder, "kd_demo_arithmetic.yaml")))
    pattern = config["filter_list"][0]["filter"][0]["regex_pattern"]
    # The final answer in either case: the WordPiece tokenizer lowercases what its models write.
    for text in ("7 + 4 = 11. The answer is 11.", "7 + 4 = 11. the answer is 11."):
        assert re.search(pattern, text).group(1) == "11"


@pytest.mark.slow
def test_lm_evals_own_task_names_are_indexed_once_and_kept(tmp_path, monkeypatch):
    """An unknown task makes lm-eval index its own 14,000 task files (about ten seconds): the names are kept in the
    user cache, per lm-eval version, and the next check reads them instead of indexing again."""
    import lm_eval.tasks

    from kd_trainers.evaluation import harness

    monkeypatch.setenv("KD_TRAINERS_CACHE", str(tmp_path / "cache"))
    settings = harness_settings({"tasks": ["no_such_task_x"]}, "test", ValueError)
    with pytest.raises(ValueError, match="'no_such_task_x' is not an lm-eval task"):
        harness.check_harness(settings, "test", ValueError)
    kept = list((tmp_path / "cache" / "lm_eval_tasks").glob("default_task_names-*.json"))
    assert len(kept) == 1 and "arc_easy" in json.loads(kept[0].read_text())

    def no_indexing(*args, **kwargs):
        if kwargs.get("include_defaults", True):
            raise AssertionError("lm-eval's own tasks were indexed again")
        return real_manager(*args, **kwargs)

    real_manager = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", no_indexing)
    harness._MANAGERS.clear()
    with pytest.raises(ValueError, match="'no_such_task_y' is not an lm-eval task"):
        harness.check_harness(harness_settings({"tasks": ["no_such_task_y"]}, "test", ValueError), "test",
                              ValueError)
    harness.check_harness(harness_settings({"tasks": ["arc_easy"]}, "test", ValueError), "test", ValueError)
