"""Registers `method: dskd` for recipes (see `kd_trainers.methods`); light: the classes load when a recipe uses them."""

from ..methods import register_method

register_method("dskd", config="kd_trainers.dskd.config:DSKDConfig", trainer="kd_trainers.dskd.trainer:DSKDTrainer",
                needs_teacher=True)
