"""Registers `method: seqkd` for recipes (see `kd_trainers.methods`); light: the classes load when a recipe uses them."""

from ..methods import register_method

register_method("seqkd", config="kd_trainers.seqkd.config:SeqKDConfig", trainer="kd_trainers.seqkd.trainer:SeqKDTrainer",
                needs_teacher=True)
