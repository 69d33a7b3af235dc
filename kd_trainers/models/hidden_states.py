"""Hidden states without logits: what the fused loss reads from each model."""

from __future__ import annotations

import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its output head (`LlamaModel` of a `LlamaForCausalLM`), through a PEFT wrapper if any."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def last_hidden_state(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """`[B, T, D]` hidden states after the final norm, without computing the `[B, T, V]` logits."""
    return backbone_of(model)(**inputs, use_cache=False).last_hidden_state


def hidden_state_and_router_loss(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`([B, T, D] last hidden states, MoE load-balancing loss)` of a Mixture-of-Experts model, computed as the model's
    own forward (and TRL's fused head, which `SFTTrainer` uses) computes it, from the backbone's router logits."""
    outputs = backbone_of(model)(**inputs, use_cache=False, output_router_logits=True)
    config = model.config.get_text_config()
    aux_loss = load_balancing_loss_func(outputs.router_logits, config.num_experts, config.num_experts_per_tok,
                                        inputs.get("attention_mask"))
    return outputs.last_hidden_state, aux_loss
