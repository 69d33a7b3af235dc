"""Registers `method: mined` for recipes (see `kd_trainers.methods`); light: its classes load when a recipe asks."""

from ..methods import register_method

register_method("mined", config="kd_trainers.mined.config:MinEDConfig",
                trainer="kd_trainers.mined.trainer:MinEDTrainer", needs_teacher=True)
