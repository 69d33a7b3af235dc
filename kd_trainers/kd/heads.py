"""The check that keeps the fused loss honest about each model's output head.

The chunked engine never calls a model's own `forward` for its logits: it computes `transform(h @ Wᵀ + b)` from the
last hidden states, with the logit scale and soft-capping read from the config (`LogitTransform.from_config`). An
architecture whose head does something else (HyperCLOVA X multiplies by `logits_scaling` where Granite divides; a
custom head from remote code) would train a wrong objective without an error. So, once, on the first batch, the
engine's logits at a few positions are compared with the model's own forward, and a difference stops the run.
"""

from __future__ import annotations

import contextlib

import torch

from ..models.hidden_states import last_hidden_state
from ..losses import LogitTransform
from ..losses.heads import maybe_gather, weight_and_bias
from ..teachers.loading import model_name


NUM_POSITIONS = 4
# Largest difference allowed, relative to the largest logit: fp32 heads agree to rounding; bf16/fp16 ones differ by
# the order of the matmul's rounding. A scale or cap that is not applied is off by far more.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
LOW_PRECISION_TOLERANCE = 5e-2


def _first_row(inputs: dict) -> dict:
    """The first sequence of a batch: every tensor whose first dimension is the batch's, cut to one row."""
    batch = inputs["input_ids"].size(0)
    return {key: value[:1] if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.size(0) == batch
            else value for key, value in inputs.items()}


def _positions(row: dict) -> torch.Tensor:
    """Up to `NUM_POSITIONS` evenly spaced real (unpadded) positions of a one-row batch."""
    mask = row.get("attention_mask")
    length = row["input_ids"].size(1)
    real = torch.arange(length, device=row["input_ids"].device)
    if mask is not None and mask.dim() == 2:
        real = real[mask[0].bool()]
    pick = torch.linspace(0, real.numel() - 1, steps=min(NUM_POSITIONS, real.numel())).round().long()
    return real[pick.to(real.device)]


def _own_logits(model: torch.nn.Module, row: dict, positions: torch.Tensor) -> torch.Tensor:
    """`[k, V]` logits of the model's own forward at `positions`, computed only there when the model allows it."""
    try:
        logits = model(**row, use_cache=False, logits_to_keep=positions).logits
        if logits.size(1) == positions.numel():
            return logits[0]
    except TypeError:  # a forward without `logits_to_keep`
        pass
    return model(**row, use_cache=False).logits[0, positions]


@contextlib.contextmanager
def _same_random_state(seed: int):
    """Runs the block from the random state `seed` on the CPU and every CUDA device, restoring the state after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def check_engine_logits(role: str, model: torch.nn.Module, inputs: dict, transform: LogitTransform,
                        vocab: int) -> None:
    """Raise when the fused engine's logits for `model` differ from its own forward on the first row of `inputs`.

    Both run in eval mode (no dropout), from the same random state, on the same row; only the first `vocab` columns are compared.
    """
    row = _first_row(inputs)
    positions = _positions(row)
    if positions.numel() == 0:
        return
    was_training = model.training
    model.eval()
    try:
        # Like with like: eval mode turns dropout off, and each pass starts from the same random state, so that a
        # module drawing random numbers whatever the mode (LoRA dropout kept on by a wrapper, stochastic depth)
        # draws the same ones in both passes.
        # The state is restored after each pass, so the check leaves the run's random numbers as they were.
        with _same_random_state(0):
            own = _own_logits(model, row, positions)[:, :vocab].float()
        with _same_random_state(0):
            hidden = last_hidden_state(model, row)[0, positions]
        weight, bias = weight_and_bias(model.get_output_embeddings())
        with maybe_gather(weight, bias):
            engine = hidden.float() @ weight[:vocab].float().T
            if bias is not None:
                engine = engine + bias[:vocab].float()
        engine = transform(engine)
    finally:
        model.train(was_training)
    if not torch.isfinite(own).all():
        raise ValueError(
            f"The {role} ({type(model).__name__}, {model_name(model)}) gives non-finite logits (NaN or inf) on the "
            "first batch from its own forward: its weights (or its dtype's range) are broken; check the checkpoint it "
            "was loaded from, or load it in float32.")
    difference = (engine - own).abs().max().item()
    scale = max(own.abs().max().item(), 1.0)
    tolerance = TOLERANCE.get(weight.dtype, LOW_PRECISION_TOLERANCE)
    if not difference <= tolerance * scale:
        raise ValueError(
            f"The {role}'s logits as the distillation loss computes them differ from its own forward "
            f"({type(model).__name__}, {model_name(model)}): by up to {difference:.4g} where its logits reach "
            f"{scale:.4g}, at {positions.numel()} positions of the first batch. The loss computes "
            f"transform(hidden @ lm_head.weightᵀ + bias) with the transform read from the config (logit scale "
            f"{transform.scale}, softcap {transform.softcap}); this architecture's head does something else, so "
            "distilling it would train a wrong objective. Please report the architecture to kd_trainers."
        )
