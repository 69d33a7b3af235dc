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
    assert "| metric | sigma=5 | sigma=0 | Δ | Δ 95% CI | p (corrected) | significant | Cohen's d |" in markdown
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


DEMO_STUDIES = ("noise_sweep", "temperature_sweep", "telecom_qa", "methods", "student_size")
REAL_STUDIES = ("methods_qwen2.5", "student_size_qwen2.5", "noise_sweep_qwen2.5", "temperature_sweep_qwen2.5")


@pytest.mark.parametrize("name", DEMO_STUDIES + REAL_STUDIES)
def test_shipped_studies_load_and_every_cell_recipe_validates(tmp_path, name):
    from kd_trainers.recipe import load_recipe

    study = load_study(os.path.join(ROOT, "recipes", "studies", f"{name}.yaml"))
    assert len(study.cells) >= 3 and study.hypotheses
    prepared = {step["name"]: str(tmp_path / step["name"]) for step in study.prepare}
    for cell in study.cells:
        values = {**study.overrides, **cell.overrides, "output_dir": str(tmp_path / "x")}
        # Real-model studies are checked in portable mode: bf16 and GPU launches are fine on other hardware.
        recipe = load_recipe(cell.recipe or study.base_recipe, study_runner._as_overrides(values, prepared),
                             portable=name in REAL_STUDIES)
        assert "{prepare." not in str(recipe.raw)
    if name == "telecom_qa":
        assert len(study.cells) == 12  # 4 teachers x 2 students x 2 algorithms, minus vanilla KD across vocabularies
        assert not any(c.levels["algorithm"] == "kd" and c.levels["teacher"].startswith("different")
                       for c in study.cells)


def shrunk(study, tmp_path):
    """A shipped demo study cut to a few steps, one seed and a few test examples (the same code paths)."""
    study.output_dir = str(tmp_path / study.name)
    study.seeds = [0]
    study.overrides = {**study.overrides, "max_steps": 3, "save_steps": 3, "logging_steps": 1,
                       "per_device_train_batch_size": 8, "max_length": 64}
    for step in study.prepare:
        step["overrides"] = {**step["overrides"], "max_steps": 3, "save_steps": 3}
    for cell in study.cells:
        method = cell.levels.get("method")
        if method == "seqkd":
            cell.overrides = {**cell.overrides, "seqkd_max_new_tokens": 6}
        if method == "gkd":
            cell.overrides = {**cell.overrides, "max_new_tokens": 6}
    study.evaluation = {**study.evaluation, "limit": 6, "max_new_tokens": 6}
    return study


def test_the_methods_study_runs_on_the_demo_task_and_reports_its_analyses(tmp_path):
    study = shrunk(load_study(os.path.join(ROOT, "recipes", "studies", "methods.yaml")), tmp_path)
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
    # The Seq-KD cell's generated set is a reusable dataset folder.
    from datasets import load_from_disk

    (folder,) = os.listdir(os.path.join(os.environ["KD_TRAINERS_CACHE"], "seqkd"))
    assert len(load_from_disk(os.path.join(os.environ["KD_TRAINERS_CACHE"], "seqkd", folder, "dataset"))) > 100


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
