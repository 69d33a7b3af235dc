"""Registers `method: kd` for recipes (see `kd_trainers.methods`); light: the classes load when a recipe uses them."""

from ..methods import register_method


register_method("kd", config="kd_trainers.kd.config:KDConfig", trainer="kd_trainers.kd.trainer:KDTrainer",
                needs_teacher=True)
