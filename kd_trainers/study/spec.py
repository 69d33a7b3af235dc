"""Study files: a base recipe, a grid of overrides, seeds, an evaluation suite and the hypotheses to test.

    name: noise_sweep
    base_recipe: ../vanilla_kd.yaml            # relative to this file
    overrides: {max_steps: 200}                # for every cell
    prepare:                                   # runs before the grid; cells refer to its output as {prepare.NAME};
                                               # each step's model is evaluated too, as a reference row (the teacher)
      - {name: teacher, recipe: ../sft_lora.yaml, overrides: {max_steps: 300}, cache: true}
                                               # cache: true trains it into the user cache, keyed by its settings,
                                               # where every study that trains the same teacher finds it
    grid:                                      # factor -> level -> overrides; the cells are the product
      sigma: {"0": {teacher_logit_noise_std: 0}, "2": {teacher_logit_noise_std: 2}}
    exclude: [{sigma: "2", ...}]               # cells to leave out (every listed level must match)

A level's overrides may hold `recipe: PATH` (relative to the study file): that level's cells start from this recipe
instead of `base_recipe` (an SFT-only student beside KD students, for example). `{study_dir}` in a cell's string
values is the study's output folder: `teacher_cache: "{study_dir}/teacher_cache"` gives every cell one teacher cache,
written by the first cell that needs it.
    seeds: [0, 1]
    evaluation: {metrics: [ngram, reasoning], answer_extractor: demo, split: test, limit: 60, max_new_tokens: 40}
    # with `judge` among the metrics: judge: {url: http://localhost:8000/v1, endpoint_model: NAME} or {model: PATH}
    # with `lm_eval` among the metrics: lm_eval: {tasks: [kd_demo], num_fewshot: 0, limit: 100, batch_size: 16,
    #                                            include_path: tasks/}   (lm-evaluation-harness tasks; see
    #                                            kd_trainers.evaluation.harness)
    hypotheses:                                # paired tests between two cells on every metric
      - {name: "noise hurts", a: {sigma: "0"}, b: {sigma: "2"}, method: auto, correction: holm}
                                               # method: auto (default: McNemar's exact test on 0/1 item scores,
                                               # Wilcoxon otherwise), wilcoxon, ttest, mcnemar or both;
                                               # correction across the metrics: holm, bh, bonferroni or none
    correlations:                              # Spearman between a numeric factor and each metric
      - {factor: sigma}
    anovas: [{factor: method, levels: [kd, rev_kd]}]             # one-way ANOVA across some levels
    gains: [{factor: method, baseline: sft, treatment: kd, against: width}]   # gain vs a numeric factor
    metric_correlations: [{x: agreement, y: exact_match}]        # Spearman between two metrics
    alpha: 0.05
    headline_metric: rouge_l                   # the metric the headline quotes (default: rouge_l, exact_match, bleu_4)
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

from ..evaluation.settings import evaluation_settings
from ..recipe.yaml_files import read_yaml_mapping
from ..runtime.smoke import capped_seeds
from ..evaluation.stats import COMPARE_METHODS, CORRECTIONS
from ..runtime.suggest import did_you_mean

DEFAULT_TEST = "auto"  # a hypothesis's paired test when it names none

STUDY_KEYS = ("name", "base_recipe", "overrides", "prepare", "grid", "exclude", "seeds", "evaluation", "hypotheses",
              "correlations", "anovas", "gains", "metric_correlations", "alpha", "output_dir", "headline_metric")


class StudyError(ValueError):
    """A study file that cannot run, with the file, the key and the fix."""


@dataclass
class Cell:
    """One configuration of the grid: its levels (factor -> level) and its recipe overrides."""

    levels: dict[str, str]
    overrides: dict[str, object]
    recipe: str | None = None  # a level's own recipe, instead of the study's base recipe

    @property
    def name(self) -> str:
        return ",".join(f"{factor}={level}" for factor, level in self.levels.items()) or "base"


@dataclass
class Study:
    path: str
    name: str
    base_recipe: str
    overrides: dict
    prepare: list[dict]
    cells: list[Cell]
    seeds: list[int]
    evaluation: dict
    hypotheses: list[dict]
    correlations: list[dict]
    alpha: float
    output_dir: str
    factors: dict[str, list[str]] = field(default_factory=dict)
    anovas: list[dict] = field(default_factory=list)
    gains: list[dict] = field(default_factory=list)
    headline_metric: str | None = None  # the metric the headline quotes (default: rouge_l, exact_match or bleu_4)
    metric_correlations: list[dict] = field(default_factory=list)


def load_study(path: str) -> Study:
    values = read_yaml_mapping(path, StudyError)
    if "method" in values and "base_recipe" not in values:
        raise StudyError(f"{path}: this is a recipe (it has method), not a study: run it with kd-train {path}.")
    for key in values:
        if key not in STUDY_KEYS:
            raise StudyError(f"{path}: unknown key {key!r}.{did_you_mean(key, STUDY_KEYS)}")
    here = os.path.dirname(os.path.abspath(path))
    base = values.get("base_recipe")
    if not base:
        raise StudyError(f"{path}: base_recipe is missing: the recipe every cell starts from.")
    base = base if os.path.isabs(base) else os.path.join(here, base)
    if not os.path.isfile(base):
        raise StudyError(f"{path}: base_recipe: {values['base_recipe']!r} does not exist (relative to the study file).")
    grid = values.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(levels, dict) and levels for levels in grid.values()):
        raise StudyError(f"{path}: grid: a mapping factor -> {{level: {{recipe overrides}}}}, got {grid!r}.")
    factors = {str(f): [str(level) for level in levels] for f, levels in grid.items()}
    exclusions = [{str(k): str(v) for k, v in rule.items()} for rule in values.get("exclude") or []]
    for index, rule in enumerate(exclusions):
        unknown = {k: v for k, v in rule.items() if k not in factors or v not in factors[k]}
        if unknown:
            raise StudyError(f"{path}: exclude[{index}]: {unknown} names no factor level of {factors}.")
    cells = []
    for combination in itertools.product(*[[(f, str(l), o or {}) for l, o in levels.items()]
                                           for f, levels in grid.items()]):
        chosen = {f: l for f, l, _ in combination}
        if any(all(chosen[k] == v for k, v in rule.items()) for rule in exclusions):
            continue
        overrides, recipe = {}, None
        for _, _, level_overrides in combination:
            level_overrides = dict(level_overrides)
            if "recipe" in level_overrides:
                recipe = level_overrides.pop("recipe")
                recipe = recipe if os.path.isabs(recipe) else os.path.join(here, recipe)
                if not os.path.isfile(recipe):
                    raise StudyError(f"{path}: grid: recipe {recipe!r} does not exist.")
            overrides.update(level_overrides)
        cells.append(Cell(chosen, overrides, recipe))
    evaluation = evaluation_settings(values.get("evaluation"), path, StudyError)
    hypotheses = values.get("hypotheses") or []
    names = {cell.name for cell in cells}
    for index, hypothesis in enumerate(hypotheses):
        for side in ("a", "b"):
            levels = {str(k): str(v) for k, v in (hypothesis.get(side) or {}).items()}
            if Cell({f: levels.get(f) for f in factors}, {}).name not in names:
                raise StudyError(f"{path}: hypotheses[{index}].{side}: {hypothesis.get(side)!r} is not a cell; "
                                 f"name one level of each factor {factors}.")
        method, correction = hypothesis.get("method", DEFAULT_TEST), hypothesis.get("correction", "holm")
        if method not in COMPARE_METHODS:
            raise StudyError(f"{path}: hypotheses[{index}].method: {method!r} is not one of {list(COMPARE_METHODS)}."
                             f"{did_you_mean(str(method), COMPARE_METHODS)}")
        if correction not in CORRECTIONS:
            raise StudyError(f"{path}: hypotheses[{index}].correction: {correction!r} is not one of "
                             f"{sorted(CORRECTIONS)}.{did_you_mean(str(correction), CORRECTIONS)}")
    for index, correlation in enumerate(values.get("correlations") or []):
        factor = correlation.get("factor")
        if factor not in factors:
            raise StudyError(f"{path}: correlations[{index}].factor: {factor!r} is not a factor of the grid "
                             f"({sorted(factors)}).")
        _require_numeric_levels(factors, factor, f"{path}: correlations[{index}]")
    _check_analyses(values, factors, path)
    seeds = values.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(seed, int) and not isinstance(seed, bool)
                                                            for seed in seeds) or len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: seeds: {seeds!r} should be a list of distinct integers, e.g. [0, 1, 2].")
    seeds = capped_seeds(seeds)  # a smoke run trains the first only
    alpha = values.get("alpha", 0.05)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < 1:
        raise StudyError(f"{path}: alpha: {alpha!r} should be a number between 0 and 1, e.g. 0.05.")
    for index, step in enumerate(values.get("prepare") or []):
        if not isinstance(step, dict) or not step.get("name") or not step.get("recipe"):
            raise StudyError(f"{path}: prepare[{index}]: {{name: NAME, recipe: PATH, overrides: {{...}}}}, got {step!r}.")
        unknown = sorted(set(step) - {"name", "recipe", "overrides", "cache"})
        if unknown:
            raise StudyError(f"{path}: prepare[{index}]: unknown key(s) {unknown}; a step has name, recipe, "
                             "overrides and cache.")
        if not isinstance(step.get("cache", False), bool):
            raise StudyError(f"{path}: prepare[{index}].cache: {step['cache']!r} should be true or false.")
        recipe = step["recipe"] if os.path.isabs(step["recipe"]) else os.path.join(here, step["recipe"])
        if not os.path.isfile(recipe):
            raise StudyError(f"{path}: prepare[{index}].recipe: {step['recipe']!r} does not exist (relative to the "
                             "study file).")
    if not isinstance(values.get("overrides") or {}, dict):
        raise StudyError(f"{path}: overrides: a mapping of recipe keys to values, got {values['overrides']!r}.")
    name = values.get("name") or os.path.splitext(os.path.basename(path))[0]
    return Study(path=path, name=name, base_recipe=base, overrides=values.get("overrides") or {},
                 prepare=values.get("prepare") or [], cells=cells, seeds=seeds,
                 evaluation=evaluation, hypotheses=hypotheses, correlations=values.get("correlations") or [],
                 alpha=float(alpha),
                 output_dir=values.get("output_dir") or os.path.join("outputs", "studies", name), factors=factors,
                 anovas=values.get("anovas") or [], gains=values.get("gains") or [],
                 metric_correlations=values.get("metric_correlations") or [],
                 headline_metric=_headline_metric(values.get("headline_metric"), path))


def _headline_metric(value, path: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise StudyError(f"{path}: headline_metric: {value!r} should be a metric name, e.g. rouge_l.")
    return value


def _require_numeric_levels(factors: dict[str, list[str]], factor: str, where: str) -> None:
    try:
        [float(level) for level in factors[factor]]
    except ValueError:
        raise StudyError(f"{where}: the levels of {factor!r} ({factors[factor]}) must be numbers.") from None


def _check_analyses(values: dict, factors: dict[str, list[str]], path: str) -> None:
    """`anovas` and `gains` name factors and levels of the grid; `gains.against` is numeric."""
    def level(key: str, index: int, factor, name) -> None:
        if factor not in factors:
            raise StudyError(f"{path}: {key}[{index}].factor: {factor!r} is not a factor of the grid "
                             f"({sorted(factors)}).")
        if str(name) not in factors[factor]:
            raise StudyError(f"{path}: {key}[{index}]: {name!r} is not a level of {factor!r} ({factors[factor]}).")

    for index, anova in enumerate(values.get("anovas") or []):
        for name in anova.get("levels") or factors.get(anova.get("factor"), []):
            level("anovas", index, anova.get("factor"), name)
    for index, gain in enumerate(values.get("gains") or []):
        for side in ("baseline", "treatment"):
            level("gains", index, gain.get("factor"), gain.get(side))
        against = gain.get("against")
        if against not in factors or against == gain.get("factor"):
            raise StudyError(f"{path}: gains[{index}].against: {against!r} must be another factor of the grid "
                             f"({sorted(factors)}).")
        _require_numeric_levels(factors, against, f"{path}: gains[{index}]")
    for index, pair in enumerate(values.get("metric_correlations") or []):
        if not isinstance(pair, dict) or not pair.get("x") or not pair.get("y"):
            raise StudyError(f"{path}: metric_correlations[{index}]: {{x: METRIC, y: METRIC}}, got {pair!r}.")


def references_file(study: Study) -> str:
    """The list of the study's reference rows (prepare steps, then the cells' other teachers), written by its run."""
    return os.path.join(study.output_dir, "references.json")


def reference_dir(study: Study, step_name: str) -> str:
    """The folder of a prepare step's model scored as a reference (a teacher: the ceiling the students are read
    against): its predictions and scores, its `done.json`."""
    return os.path.join(study.output_dir, "references", step_name)


def cell_dir(study: Study, cell: Cell, seed: int) -> str:
    """The folder of a cell's seed: its `train/` run, its predictions and scores, its `done.json`."""
    safe = cell.name.replace("/", "_").replace(",", "__").replace("=", "-")
    return os.path.join(study.output_dir, "cells", safe, f"seed{seed}")
