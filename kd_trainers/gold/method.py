"""Registers `method: gold` for recipes (see `kd_trainers.methods`); light: the classes load when a recipe uses them."""

from ..methods import register_method

register_method("gold", config="kd_trainers.gold.config:GOLDConfig", trainer="kd_trainers.gold.trainer:GOLDTrainer",
                needs_teacher=True)
