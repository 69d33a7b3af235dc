"""The study runner end to end on a tiny grid, interrupted and resumed, and its report."""

import json
import os
import re

import pandas as pd
import pytest
import yaml

from kd_trainers.study import StudyError, load_study, run_study
from kd_trainers.study import runner as study_runner


pytestmark = pytest.mark.slow  # whole runs and studies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"max_steps": 2, "save_steps": 1, "logging_steps": 1, "per_device_train_batch_size": 4, "max_length": 64,
        "dataset_test_split": None}


def tiny_study(tmp_path, judge_url=None) -> str:
    spec = {
        "name": "tiny",
        "base_recipe": os.path.join(ROOT, "recipes", "vanilla_kd.yaml"),
        "output_dir": str(tmp_path / "study"),
        "prepare": [{"name": "teacher", "recipe": os.path.join(ROOT, "recipes", "sft_lora.yaml"),
                     "overrides": {**FAST, "peft": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}}}],
        "overrides": {**FAST, "teacher_adapter_name_or_path": "{prepare.teacher}"},
        "grid": {"sigma": {"0": {"teacher_logit_noise_std": 0.0}, "1": {"teacher_logit_noise_std": 1.0},
                           "5": {"teacher_logit_noise_std": 5.0}}},
        "seeds": [0],
        "evaluation": {"metrics": ["ngram", "reasoning"], "answer_extractor": "demo", "limit": 8,
                       "max_new_tokens": 6, "batch_size": 8},
        "hypotheses": [{"name": "noise", "a": {"sigma": "0"}, "b": {"sigma": "5"}, "method": "wilcoxon",
                        "correction": "holm"}],
        "correlations": [{"factor": "sigma"}],
    }
    if judge_url:
        spec["evaluation"]["metrics"].append("judge")
        spec["evaluation"]["judge"] = {"url": judge_url, "endpoint_model": "judge-7b",
                                       "metrics": ["answer_correctness"]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_study_runs_resumes_after_an_interruption_and_reports(tmp_path, monkeypatch, endpoint):
    url, received = endpoint
    study = load_study(tiny_study(tmp_path, judge_url=url))
    assert [cell.name for cell in study.cells] == ["sigma=0", "sigma=1", "sigma=5"]

    trained, evaluated = [], []
    real_run, real_evaluate = study_runner.run_recipe, study_runner.evaluate_cell

    def counting_run(recipe, *args, **kwargs):
        trained.append(recipe.config.output_dir)
        return real_run(recipe, *args, **kwargs)

    def evaluate_then_die(study_, recipe, directory):
        evaluated.append(directory)
        if len(evaluated) == 2:
            raise KeyboardInterrupt("killed during the second cell's evaluation")
        return real_evaluate(study_, recipe, directory)

    monkeypatch.setattr(study_runner, "run_recipe", counting_run)
    monkeypatch.setattr(study_runner, "evaluate_cell", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, log=lambda message: None)
    done = [c.name for c in study.cells if os.path.exists(os.path.join(study_runner.cell_dir(study, c, 0), "done.json"))]
    assert done == ["sigma=0"]

    trained.clear()
    monkeypatch.setattr(study_runner, "evaluate_cell", real_evaluate)
    report = run_study(study, log=lambda message: None)
    # The finished prepare step and cell were skipped, and so was the interrupted cell's finished training (only its
    # evaluation was redone); the last cell trained.
    assert [os.path.basename(os.path.dirname(os.path.dirname(p))) for p in trained] == ["sigma-5"]

    scores = pd.read_csv(os.path.join(report, "all_scores.csv"))
    assert sorted(scores["cell"].unique()) == ["sigma=0", "sigma=1", "sigma=5"]
    assert (scores.groupby("cell").size() == 8).all()
    assert {"bleu_4", "rouge_l", "exact_match", "agreement", "fidelity"} <= set(scores.columns)
    assert (scores["judge_answer_correctness"] == 0.75).all()  # the loopback judge, on every example of every cell
    judge = open(os.path.join(study_runner.cell_dir(study, study.cells[0], 0), "judge.json")).read()
    assert '"model": "judge-7b"' in judge and "You grade answers" in judge
    assert "## Repeated-measures ANOVA across configurations" in open(os.path.join(report, "report.md")).read()
    markdown = open(os.path.join(report, "report.md")).read()
    assert "## Headline" in markdown and "## Spearman correlation with sigma" in markdown
    # Direction first, treatment − baseline everywhere: the headline, the section title, the columns, Δ and d.
    table = json.load(open(os.path.join(report, "hypotheses.json")))[0]["table"]
    row = next(r for r in table if r["metric"] == "rouge_l")
    better = sum(r["reject"] and r["delta"] > 0 for r in table)
    worse = sum(r["reject"] and r["delta"] < 0 for r in table)
    headline = open(os.path.join(report, "headline.txt")).read()
    assert (f"sigma=5 better than sigma=0 on {better} of {len(table)} metrics (holm-corrected wilcoxon, α = 0.05), "
            f"worse on {worse}; rouge_l {row['mean_b']:.3g} vs {row['mean_a']:.3g} (Δ {row['delta']:+.3g}, 95% CI "
            f"[{row['delta_ci_low']:+.3g}, {row['delta_ci_high']:+.3g}]).") in headline
    assert row["delta"] == pytest.approx(row["mean_b"] - row["mean_a"])
    assert "**" not in headline and headline in markdown.replace("- ", "")
    assert "## noise: sigma=5 − sigma=0" in markdown
    assert ("| metric | sigma=5 | sigma=0 | Δ | Δ 95% CI | p (corrected) | significant | n | detectable Δ (80% power) "
            "| Cohen's d |") in markdown
    # The teacher (the prepare step) is a reference row and a line in the plots, scored like the students.
    summary_rows = pd.read_csv(os.path.join(report, "summary.csv")).set_index("cell")
    references = pd.read_csv(os.path.join(study.output_dir, "references", "teacher", "scores.csv"))
    assert bool(summary_rows.loc["teacher", "reference"]) and not summary_rows.loc["sigma=0", "reference"]
    assert summary_rows.loc["teacher", "rouge_l"] == pytest.approx(references["rouge_l"].mean())
    assert "| teacher (reference) |" in markdown and "Reference (the ceiling): teacher rouge_l" in headline
    assert os.path.exists(os.path.join(report, "plots", "paired_differences.png"))
    html = open(os.path.join(report, "report.html")).read()
    assert html.count("data:image/png;base64,") >= 2 and "<table" in html
    assert os.path.exists(os.path.join(report, "plots", "rouge_l.png"))
    assert os.path.exists(os.path.join(report, "plots", "sigma_rouge_l.png"))
    summary = pd.read_csv(os.path.join(report, "summary.csv"))
    assert summary.set_index("cell").loc["sigma=1", "rouge_l"] == pytest.approx(
        scores[scores["cell"] == "sigma=1"]["rouge_l"].mean())


@pytest.mark.distributed
@pytest.mark.slow
def test_a_cell_with_an_accelerate_block_runs_in_two_processes_and_is_evaluated_from_its_output(tmp_path,
                                                                                               monkeypatch):
    import deepspeed  # noqa: F401  (the dev extra installs it: missing is a failure, never a skip)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = {"name": "launched", "base_recipe": os.path.join(ROOT, "recipes", "dskd.yaml"),
            "output_dir": str(tmp_path / "study"), "overrides": FAST, "seeds": [0],
            "grid": {"processes": {"1": {}, "2": {"accelerate": {"config": "zero2", "num_processes": 2}}}},
            "evaluation": {"metrics": ["ngram", "reasoning"], "answer_extractor": "demo", "limit": 4,
                           "max_new_tokens": 4, "batch_size": 4}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    study = load_study(str(path))
    launched = []
    real_launch = study_runner.launch_recipe

    def counting_launch(recipe_path, overrides):
        launched.append(overrides)
        return real_launch(recipe_path, overrides)

    monkeypatch.setattr(study_runner, "launch_recipe", counting_launch)
    report = run_study(study, log=lambda message: None)
    assert len(launched) == 1 and any(o.startswith("accelerate=") for o in launched[0])
    train = os.path.join(study_runner.cell_dir(study, study.cells[1], 0), "train")
    assert os.path.exists(os.path.join(train, "model.safetensors"))
    assert os.path.exists(os.path.join(train, "dskd_projectors.safetensors"))
    scores = pd.read_csv(os.path.join(report, "all_scores.csv"))
    assert (scores.groupby("cell").size() == 4).to_dict() == {"processes=1": True, "processes=2": True}
    # The teacher of the launched cell (another vocabulary) was loaded again here for agreement and fidelity.
    assert scores["agreement"].notna().all() and scores["fidelity"].notna().all()


DEMO_STUDIES = ("noise_sweep", "temperature_sweep", "telecom_qa", "methods", "student_size", "teacher_cache")
REAL_STUDIES = ("methods_qwen2.5", "student_size_qwen2.5", "noise_sweep_qwen2.5", "temperature_sweep_qwen2.5")


@pytest.mark.parametrize("name", DEMO_STUDIES + REAL_STUDIES)
def test_shipped_studies_load_and_every_cell_recipe_validates(tmp_path, name):
    from kd_trainers.recipe import load_recipe

    study = load_study(os.path.join(ROOT, "recipes", "studies", f"{name}.yaml"))
    assert len(study.cells) >= 3 and study.hypotheses
    prepared = {step["name"]: str(tmp_path / step["name"]) for step in study.prepare}
    for cell in study.cells:
        values = {**study_runner.cell_values(study, cell, 0), "output_dir": str(tmp_path / "x")}
        # Real-model studies are checked in portable mode: bf16 and GPU launches are fine on other hardware.
        recipe = load_recipe(cell.recipe or study.base_recipe, study_runner._as_overrides(values, prepared),
                             portable=name in REAL_STUDIES)
        assert "{prepare." not in str(recipe.raw) and "{study_dir}" not in str(recipe.raw)
        if name == "teacher_cache" and cell.levels["teacher"] != "dense":  # one cache per level, in the study's folder
            assert recipe.config.teacher_cache == os.path.join(os.path.abspath(study.output_dir), "teacher_cache",
                                                               cell.levels["teacher"])
    if name == "telecom_qa":
        assert len(study.cells) == 12  # 4 teachers x 2 students x 2 algorithms, minus vanilla KD across vocabularies
        assert not any(c.levels["algorithm"] == "kd" and c.levels["teacher"].startswith("different")
                       for c in study.cells)


def shrunk(study, tmp_path):
    """A shipped demo study cut to a few steps, one seed and a few test examples (the same code paths)."""
    study.output_dir = str(tmp_path / study.name)
    study.seeds = [0]
    study.overrides = {**study.overrides, "max_steps": 3, "save_steps": 3, "logging_steps": 1,
                       "per_device_train_batch_size": 8, "max_length": 64,
                       "per_device_eval_batch_size": 64}  # the teacher answers the prompts 64 at a time
    for step in study.prepare:
        step["overrides"] = {**step["overrides"], "max_steps": 3, "save_steps": 3}
    for cell in study.cells:
        method = cell.levels.get("method")
        if method == "seqkd":
            cell.overrides = {**cell.overrides, "seqkd_max_new_tokens": 6}
        if method == "gkd":
            cell.overrides = {**cell.overrides, "max_new_tokens": 6}
    study.evaluation = {**study.evaluation, "limit": 6, "max_new_tokens": 6}
    if study.evaluation.get("lm_eval"):
        study.evaluation["lm_eval"] = {**study.evaluation["lm_eval"], "limit": 6}
    return study


def without_lm_eval(study):
    """The study without its lm-eval suite (tested on its own, and with the student-size study), to keep CI short."""
    study.evaluation = {**study.evaluation, "metrics": [m for m in study.evaluation["metrics"] if m != "lm_eval"],
                        "lm_eval": None}
    return study


def test_the_methods_study_runs_on_the_demo_task_and_reports_its_analyses(tmp_path):
    study = without_lm_eval(shrunk(load_study(os.path.join(ROOT, "recipes", "studies", "methods.yaml")), tmp_path))
    report = run_study(study, log=lambda message: None)
    scores = pd.read_csv(os.path.join(report, "all_scores.csv"))
    assert sorted(scores["method"].unique()) == ["gkd", "kd", "rev_kd", "seqkd", "sft"]
    assert scores.loc[scores["method"] == "sft", "agreement"].isna().all()  # no teacher
    assert scores.loc[scores["method"] != "sft", "agreement"].notna().all()
    markdown = open(os.path.join(report, "report.md")).read()
    for title in ("## GKD vs SFT: method=gkd − method=sft", "## One-way ANOVA across method ∈ {kd, rev_kd, seqkd, gkd}",
                  "## Correlation between metrics"):
        assert title in markdown, title
    assert os.path.exists(os.path.join(report, "plots", "scatter_agreement_exact_match.png"))
    # The teacher's answers to the prompts (Seq-KD's set; KD's and Rev-KD's, generated with other settings) are
    # reusable dataset folders: the whole train split's prompts for Seq-KD, the 720 unlabelled ones for KD.
    from datasets import load_from_disk

    from kd_trainers.study.runner import prepare_folders

    teacher = prepare_folders(study)["teacher"]
    cache = os.path.join(os.environ["KD_TRAINERS_CACHE"], "seqkd")
    sizes = []
    for name in os.listdir(cache):  # the session's cache: other tests' answer sets are there too
        info = os.path.join(cache, name, "generation.json")
        if os.path.exists(info) and json.load(open(info))["teacher"].startswith(f"{teacher}|"):
            sizes.append(len(load_from_disk(os.path.join(cache, name, "dataset"))))
    assert 720 in sizes and 960 in sizes, sizes  # KD's answers to the unlabelled prompts, Seq-KD's to all


def test_the_student_size_study_reports_the_kd_gain_against_size(tmp_path):
    from kd_trainers.study.analyses import gain_table

    study = shrunk(load_study(os.path.join(ROOT, "recipes", "studies", "student_size.yaml")), tmp_path)
    report = run_study(study, log=lambda message: None)
    scores = pd.read_csv(os.path.join(report, "all_scores.csv"))
    gains, _ = gain_table(scores.astype({"width": str}), "method", "sft", "kd", "width", ["rouge_l"])
    # Each gain is the KD cell's mean minus the SFT cell's mean at that width, computed here by hand.
    for width in ("32", "64", "96"):
        at = scores[scores["width"].astype(str) == width]
        by_hand = (at.loc[at["method"] == "kd", "rouge_l"].mean() - at.loc[at["method"] == "sft", "rouge_l"].mean())
        assert gains.set_index("width").loc[width, "rouge_l"] == pytest.approx(by_hand)
    markdown = open(os.path.join(report, "report.md")).read()
    assert "## Gain of method=kd over method=sft against width" in markdown
    assert os.path.exists(os.path.join(report, "plots", "gain_kd_width_rouge_l.png"))
    # The demo's lm-eval tasks, per cell, and the gain's correlation with width task by task.
    assert "## Per-task Spearman of the kd − sft gain with width" in markdown
    assert scores["kd_demo_glossary_mc/acc"].notna().groupby(scores["cell"]).sum().eq(6 * len(study.seeds)).all()


def test_bad_studies_fail_clearly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base_recipe": os.path.join(ROOT, "recipes", "vanilla_kd.yaml"),
                                   "grid": {"sigma": {"0": {}}}, "hypothesis": []}))
    with pytest.raises(StudyError, match="unknown key 'hypothesis'. Did you mean 'hypotheses'?"):
        load_study(str(bad))
    bad.write_text(yaml.safe_dump({"base_recipe": os.path.join(ROOT, "recipes", "vanilla_kd.yaml"),
                                   "grid": {"sigma": {"0": {}, "x": {}}}, "correlations": [{"factor": "sigma"}]}))
    with pytest.raises(StudyError, match=r"the levels of 'sigma' \(\['0', 'x'\]\) must be numbers"):
        load_study(str(bad))
    bad.write_text(yaml.safe_dump({"base_recipe": os.path.join(ROOT, "recipes", "vanilla_kd.yaml"),
                                   "grid": {"sigma": {"0": {}}}, "evaluation": {"metrics": ["judge"]}}))
    with pytest.raises(StudyError, match="evaluation.metrics has 'judge' but evaluation.judge names no judge"):
        load_study(str(bad))


def test_analyses_equal_scipy_on_fixed_data():
    import numpy as np
    from scipy import stats as scipy_stats

    from kd_trainers.study.analyses import anova_across_levels, metric_correlation

    rng = np.random.default_rng(0)
    rows = []
    for index, method in enumerate(["sft", "kd", "rev_kd", "gkd"]):
        for seed in (0, 1):
            for example in range(10):
                rows.append({"cell": f"method={method}", "method": method, "seed": seed, "example_id": example,
                             "exact_match": rng.random() + 0.1 * index, "agreement": rng.random() + 0.2 * index})
    scores = pd.DataFrame(rows)
    table = anova_across_levels(scores, "method", ["kd", "rev_kd", "gkd"], ["exact_match"])
    groups = [scores[scores["method"] == m].groupby("example_id")["exact_match"].mean() for m in ("kd", "rev_kd", "gkd")]
    expected = scipy_stats.f_oneway(*groups)
    assert table.loc[0, "F"] == pytest.approx(expected.statistic) and table.loc[0, "p_unc"] == pytest.approx(
        expected.pvalue)
    means = scores.groupby(["cell", "seed"])[["agreement", "exact_match"]].mean()
    result = metric_correlation(scores, "agreement", "exact_match")
    rho, p = scipy_stats.spearmanr(means["agreement"], means["exact_match"])
    assert result["n"] == 8 and result["r"] == pytest.approx(rho) and result["p_val"] == pytest.approx(p)


def test_a_study_runs_its_stages_in_two_worker_processes(tmp_path, capfd, package_cache):
    path = tiny_study(tmp_path)
    spec = yaml.safe_load(open(path))
    spec["prepare"][0]["cache"] = True
    spec["seeds"] = [0, 1]
    with open(path, "w") as handle:
        yaml.safe_dump(spec, handle)
    study = load_study(path)
    report = run_study(study, log=print, workers=2)
    printed = capfd.readouterr().out
    # Every stage ran in a worker, printing its own heading; the teacher went to the package cache.
    for cell in ("sigma=0", "sigma=1", "sigma=5"):
        for seed in (0, 1):
            assert f"{cell} seed {seed}: training, then evaluating" in printed
            assert os.path.exists(os.path.join(study_runner.cell_dir(study, study.cells[0], seed), "done.json"))
    teacher = study_runner.prepare_folders(study)["teacher"]
    assert teacher.startswith(os.path.join(package_cache, "prepare")) and os.path.exists(
        os.path.join(teacher, "done.json"))
    scores = pd.read_csv(os.path.join(report, "all_scores.csv"))
    assert (scores.groupby(["cell", "seed"]).size() == 8).all() and len(scores) == 3 * 2 * 8
    # A re-run finds everything done, in the parent, and trains nothing.
    run_study(study, log=print, workers=2)
    again = capfd.readouterr().out
    headings = [line for line in again.splitlines() if re.match(r"\[\d+ s\] \(\d/8\) ", line)]
    assert len(headings) == 8 and all(line.endswith(": done, skipped") for line in headings)
    assert "training" not in again and "(cached: found, skipped)" in again


def test_a_study_scores_lm_eval_tasks_per_cell_with_paired_tests_and_per_task_correlations(tmp_path, monkeypatch):
    import numpy as np
    from scipy import stats as sps
    from statsmodels.stats.multitest import multipletests

    from kd_trainers.evaluation import pipeline
    from kd_trainers.recipe import evaluate as recipe_evaluate

    spec = {
        "name": "tasks", "base_recipe": os.path.join(ROOT, "recipes", "vanilla_kd.yaml"),  # its teacher: a demo model
        "output_dir": str(tmp_path / "study"), "overrides": {**FAST, "max_steps": 3, "learning_rate": 5.0e-3},
        "grid": {"width": {"32": {"model_name_or_path": "demo:llama/student_xs/bpe"},
                           "64": {"model_name_or_path": "demo:llama/student/bpe"}},
                 "method": {"sft": {"recipe": os.path.join(ROOT, "recipes", "sft.yaml")}, "kd": {}}},
        "seeds": [0],
        "evaluation": {"metrics": ["exact_match", "agreement", "lm_eval"], "answer_extractor": "demo", "limit": 4,
                       "max_new_tokens": 4, "batch_size": 8, "lm_eval": {"tasks": ["kd_demo"], "limit": 16}},
        "hypotheses": [{"name": "KD vs SFT", "a": {"width": "64", "method": "sft"},
                        "b": {"width": "64", "method": "kd"}}],
        "gains": [{"factor": "method", "baseline": "sft", "treatment": "kd", "against": "width"}],
        "correlations": [{"factor": "width"}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    study = load_study(str(path))
    scored = []
    real_harness = pipeline.run_harness

    def counting_harness(model, tokenizer, settings, directory=None):
        scored.append(directory)
        return real_harness(model, tokenizer, settings, directory)

    monkeypatch.setattr(pipeline, "run_harness", counting_harness)
    teacher_generations = []
    real_generate = recipe_evaluate.generate_predictions
    monkeypatch.setattr(recipe_evaluate, "generate_predictions",
                        lambda *args, **kwargs: teacher_generations.append(1) or real_generate(*args, **kwargs))
    report = run_study(study, log=lambda message: None)
    # Four cells and the cells' one teacher, scored once for the whole study (a reference row), not once per cell.
    teacher = os.path.join(study.output_dir, "references", "teacher_demo_llama_teacher_bpe")
    assert len(scored) == 5 and sum(directory == teacher for directory in scored) == 1
    # Its answers, generated for its reference row, are the ones the KD cells' agreement compares with: no second pass.
    assert teacher_generations == []
    answers = [row["prediction"] for row in map(json.loads, open(os.path.join(teacher, "predictions.jsonl")))]
    assert pd.read_csv(os.path.join(study_runner.cell_dir(study, study.cells[1], 0), "scores.csv"))[
        "agreement"].notna().sum() == 4 and len(answers) == 4
    scored.clear()
    run_study(study, log=lambda message: None)
    assert scored == []  # finished: nothing scored again

    scores = pd.read_csv(os.path.join(report, "all_scores.csv"))
    tasks = ["kd_demo_arithmetic/exact_match,strict-match", "kd_demo_glossary_mc/acc", "kd_demo_glossary_mc/acc_norm"]
    for cell, rows in scores.groupby("cell"):
        assert rows["example_id"].astype(str).str.startswith("kd_demo_").sum() == 32  # 16 items of each task
        assert rows["exact_match"].notna().sum() == 4 and all(rows[task].notna().sum() == 16 for task in tasks)
    summary = pd.read_csv(os.path.join(report, "summary.csv")).set_index("cell")
    assert bool(summary.loc["teacher_demo_llama_teacher_bpe", "reference"])
    assert summary.loc["teacher_demo_llama_teacher_bpe", tasks[1]] == pytest.approx(
        pd.read_csv(os.path.join(teacher, "scores.csv"))[tasks[1]].mean())

    # The paired test on the tasks' items: one seed, so every item is right or wrong and McNemar's exact test applies;
    # Holm-corrected across every metric of the hypothesis, the tasks included.
    table = pd.DataFrame(json.load(open(os.path.join(report, "hypotheses.json")))[0]["table"]).set_index("metric")
    a = scores[scores["cell"] == "width=64,method=sft"].set_index("example_id")
    b = scores[scores["cell"] == "width=64,method=kd"].set_index("example_id")
    for task in tasks:
        assert table.loc[task, "method"] == "mcnemar" and table.loc[task, "n"] == 16
        x, y = a[task].dropna(), b[task].dropna().loc[a[task].dropna().index]
        only_a, only_b = int(((x == 1) & (y == 0)).sum()), int(((y == 1) & (x == 0)).sum())
        expected = sps.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        assert table.loc[task, "p_val"] == pytest.approx(expected)
    np.testing.assert_allclose(table["p_corr"], multipletests(table["p_val"], method="holm")[1])

    # Per task: the KD gain over SFT against width (Table 3), a row for every task.
    correlations = pd.read_csv(os.path.join(report, "lm_eval_correlations.csv"))
    gains = correlations[correlations["analysis"] == "Per-task Spearman of the kd − sft gain with width"]
    assert len(gains) == len(tasks)
    for _, row in gains.iterrows():
        # Two widths, one seed: two points, too few for a correlation (the numbers: the next test); the row is there.
        assert np.isnan(row["r"]) and not row["n"] >= 3
    markdown = open(os.path.join(report, "report.md")).read()
    assert "## Benchmark tasks (lm-evaluation-harness)" in markdown
    assert "## Per-task Spearman of the kd − sft gain with width" in markdown
    assert "## Per-task Spearman correlation with width" in markdown
    task_table = pd.read_csv(os.path.join(report, "lm_eval_tasks.csv"))
    assert list(task_table["task"] + "/" + task_table["metric"]) == tasks
    assert task_table.set_index("metric").loc["acc", "width=64,method=kd"] == pytest.approx(
        scores[scores["cell"] == "width=64,method=kd"]["kd_demo_glossary_mc/acc"].mean())
    assert "teacher_demo_llama_teacher_bpe (reference)" in task_table.columns


def test_the_report_tests_and_correlates_lm_eval_tasks_as_computed_here(tmp_path):
    """The report's numbers on lm-eval items, from scores written here (no training): the seed-averaged paired test,
    the per-task gain correlation with width and its correction across tasks, each against scipy/statsmodels."""
    import numpy as np
    import pingouin as pg
    from scipy import stats as sps
    from statsmodels.stats.multitest import multipletests

    from kd_trainers.runtime.files import write_done
    from kd_trainers.study.report import write_report

    spec = {"name": "synthetic", "base_recipe": os.path.join(ROOT, "recipes", "vanilla_kd.yaml"),
            "output_dir": str(tmp_path / "study"),
            "grid": {"width": {"32": {}, "64": {}, "96": {}}, "method": {"sft": {}, "kd": {}}}, "seeds": [0, 1],
            "evaluation": {"metrics": ["rouge_l", "lm_eval"], "lm_eval": {"tasks": ["a", "b"]}},
            "hypotheses": [{"name": "KD vs SFT", "a": {"width": "96", "method": "sft"},
                            "b": {"width": "96", "method": "kd"}, "correction": "bh"}],
            "gains": [{"factor": "method", "baseline": "sft", "treatment": "kd", "against": "width"}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    study = load_study(str(path))
    rng = np.random.default_rng(0)
    items = 40
    for cell in study.cells:
        width, kd = int(cell.levels["width"]), cell.levels["method"] == "kd"
        for seed in study.seeds:
            # Task a: KD helps more the wider the student; task b: no effect. Item difficulty is shared.
            p_a = 0.35 + (0.004 * (width - 32) if kd else 0.0)
            rows = [{"example_id": i, "rouge_l": rng.uniform(0.2, 0.6) + (0.1 if kd else 0.0)} for i in range(10)]
            rows += [{"example_id": f"a/{i}", "a/acc": float(rng.random() < p_a)} for i in range(items)]
            rows += [{"example_id": f"b/{i}", "b/exact_match,strict-match": float(rng.random() < 0.5)}
                     for i in range(items)]
            directory = study_runner.cell_dir(study, cell, seed)
            os.makedirs(directory)
            pd.DataFrame(rows).to_csv(os.path.join(directory, "scores.csv"), index=False)
            write_done(directory, {"cell": cell.name})
    report = write_report(study)

    scores = pd.read_csv(os.path.join(report, "all_scores.csv"))
    tasks = ["a/acc", "b/exact_match,strict-match"]
    # The paired test: seed-averaged items (0, 0.5 or 1: not right-or-wrong) by Wilcoxon, BH across all metrics.
    table = pd.DataFrame(json.load(open(os.path.join(report, "hypotheses.json")))[0]["table"]).set_index("metric")
    averaged = scores.groupby(["cell", "example_id"])[["rouge_l", *tasks]].mean()
    for metric in ["rouge_l", *tasks]:
        x = averaged.loc["width=96,method=sft", metric].dropna()
        y = averaged.loc["width=96,method=kd", metric].dropna().loc[x.index]
        assert table.loc[metric, "method"] == "wilcoxon" and table.loc[metric, "n"] == len(x)
        # pingouin's Wilcoxon (scipy's, with pingouin's settings for tied and zero differences)
        assert table.loc[metric, "p_val"] == pytest.approx(pg.wilcoxon(x, y)["p_val"].iloc[0])
    assert table.loc["rouge_l", "p_val"] == pytest.approx(sps.wilcoxon(
        averaged.loc["width=96,method=sft", "rouge_l"].dropna(), averaged.loc["width=96,method=kd", "rouge_l"].dropna()
    ).pvalue)  # no ties there: scipy's exact test, the same number
    np.testing.assert_allclose(table["p_corr"], multipletests(table["p_val"], method="fdr_bh")[1])

    # Per task: KD − SFT at each width and seed, Spearman with width, Holm across the two tasks.
    correlations = pd.read_csv(os.path.join(report, "lm_eval_correlations.csv"))
    per_task = correlations[correlations["analysis"] == "Per-task Spearman of the kd − sft gain with width"]
    means = scores.groupby(["width", "seed", "method"])[tasks].mean()
    expected_p = []
    for task in tasks:
        widths, gains = zip(*[(width, means.loc[(width, seed, "kd"), task] - means.loc[(width, seed, "sft"), task])
                              for width in (32, 64, 96) for seed in (0, 1)])
        expected = sps.spearmanr(widths, gains)
        row = per_task[per_task["task"] + "/" + per_task["metric"] == task].iloc[0]
        assert row["r"] == pytest.approx(expected.statistic) and row["n"] == 6
        # pingouin's p-value, which the report quotes (scipy's differs in the fourth digit at n = 6)
        assert row["p_val"] == pytest.approx(pg.corr(list(widths), list(gains), method="spearman")["p_val"].iloc[0])
        expected_p.append(row["p_val"])
    np.testing.assert_allclose(per_task["p_corr"], multipletests(expected_p, method="holm")[1])
    assert per_task.set_index("task").loc["a", "r"] > 0.5  # the designed effect is found
    markdown = open(os.path.join(report, "report.md")).read()
    assert "80 lm-eval items" in markdown and "| a | acc |" in markdown
    assert os.path.exists(os.path.join(report, "plots", "a_acc.png"))
    assert os.path.exists(os.path.join(report, "plots", "gain_kd_width_b_exact_match_strict-match.png"))
