"""The cross-tokenizer study's real-model twin: DSKD-CMA, DSKDv2 (exact alignment), ULD, GOLD and MinED from
Qwen2.5-Coder-0.5B-Instruct (151,936 tokens) into SmolLM2-135M-Instruct (49,152 tokens) against SFT of the same
student, on the arithmetic questions of `real_model_run.py`, through `kd-study`.

What it is (fixed before it was run; nothing here was tuned on its results):
- models, data, steps and evaluation as `real_model_run.py`: the two pretrained instruct models whole, float32, on
  the CPU; 400 training and 100 test `add_or_sub` questions as chat messages; 40 steps of 8 at learning rate 5e-5;
  greedy answers of at most 16 tokens, exact match on the last number, McNemar per question, Holm-corrected;
- arms, with the demo study's settings (`recipes/studies/cross_tokenizer.yaml`), kd_weight 0.5 in each: SFT;
  DSKD-CMA and DSKDv2 (exact alignment, bias-free projectors, pseudo-inverse initialisation) at T = 2; ULD and GOLD
  at T = 1; MinED at T = 2. All on the same labelled rows (no prompts channel: SFT is CE on the same rows);
- one seed (0): the six cells take about an hour on 2 CPU cores; the demo study has the three seeds;
- tests: each method against SFT, GOLD against ULD, and a one-way ANOVA across the five distilled arms.

Usage: python benchmarks/cross_tokenizer_real.py [--output cross-tokenizer-real]   (about an hour on 2 cores)
Writes the study's folder under --output and benchmarks/results/cross_tokenizer_real.md.
"""

from __future__ import annotations

from real_model_run import BASE_RECIPE, SFT_RECIPE, run_study

ARMS = {  # arm -> (its recipe's method, overrides in the study's grid)
    "dskd_cma": ("dskd", "kd_temperature: 2.0"),
    "dskd_v2": ("dskd", "kd_temperature: 2.0, token_alignment: exact, projector_bias: false, projector_init: pinv"),
    "uld": ("uld", "kd_temperature: 1.0"),
    "gold": ("gold", "kd_temperature: 1.0"),
    "mined": ("mined", "kd_temperature: 2.0"),
}
LABELS = {"dskd_cma": "DSKD-CMA", "dskd_v2": "DSKDv2 (exact alignment)", "uld": "ULD", "gold": "GOLD",
          "mined": "MinED"}

STUDY = """\
name: cross_tokenizer_real
base_recipe: sft.yaml
output_dir: {{output}}/study
grid:
  method:
    sft: {{{{}}}}
{arms}
seeds: [0]
evaluation: {{{{metrics: [exact_match], answer_extractor: last_number, split: test, max_new_tokens: 16}}}}
hypotheses:
{hypotheses}
  - {{{{name: "GOLD vs ULD", a: {{{{method: uld}}}}, b: {{{{method: gold}}}}, method: auto, correction: holm}}}}
anovas:
  - {{{{factor: method, levels: [{levels}]}}}}
alpha: 0.05
""".format(
    arms="\n".join(f"    {arm}: {{{{recipe: {method}.yaml, {overrides}}}}}" for arm, (method, overrides) in ARMS.items()),
    hypotheses="\n".join(f'  - {{{{name: "{LABELS[arm]} vs SFT", a: {{{{method: sft}}}}, b: {{{{method: {arm}}}}}, '
                         'method: auto, correction: holm}}' for arm in ARMS),
    levels=", ".join(ARMS))


def main():
    recipes = {"sft.yaml": SFT_RECIPE, "study.yaml": STUDY}
    for method in sorted({method for method, _ in ARMS.values()}):
        recipes[f"{method}.yaml"] = BASE_RECIPE.replace("method: dskd\n", f"method: {method}\n")
    run_study(__doc__, "cross-tokenizer-real", recipes,
              "The cross-tokenizer study on real models: Qwen2.5-Coder-0.5B-Instruct -> SmolLM2-135M-Instruct",
              "cross_tokenizer_real")


if __name__ == "__main__":
    main()
