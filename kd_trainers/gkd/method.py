"""Registers `method: gkd` for recipes (see `kd_trainers.methods`); light: the classes load when a recipe uses them."""

from ..methods import register_method

register_method("gkd", config="kd_trainers.gkd.config:GKDConfig", trainer="kd_trainers.gkd.trainer:GKDTrainer",
                needs_teacher=True)
