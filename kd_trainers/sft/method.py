"""Registers `method: sft` for recipes (see `kd_trainers.methods`); light: the classes load when a recipe uses them."""

from ..methods import register_method

register_method("sft", config="kd_trainers.sft.trainer:SFTConfig", trainer="kd_trainers.sft.trainer:SFTTrainer",
                needs_teacher=False)
