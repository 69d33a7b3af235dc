"""Registers `method: uld` for recipes (see `kd_trainers.methods`); light: the classes load when a recipe uses them."""

from ..methods import register_method

register_method("uld", config="kd_trainers.uld.config:ULDConfig", trainer="kd_trainers.uld.trainer:ULDTrainer",
                needs_teacher=True)
