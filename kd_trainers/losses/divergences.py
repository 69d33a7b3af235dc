"""Token-level divergences between a student's and a teacher's next-token distributions.

Every divergence is a short function with one contract, so that adding one is one function plus one registration:

    fn(student_log_probs [N, V] fp32, teacher_log_probs [N, V] fp32, **params) -> per-token values [N]

`params` are the divergence's own settings, written as keyword-only parameters (`*, jsd_beta`): the engine passes each
function only the settings it declares (as Liger-Kernel's `distillation_loss_fn` takes its own `beta`), and
`register_divergence(..., checks=)` says which values are valid, so a new divergence with a new setting is one function
and its parameters. Both inputs are log-softmaxed at the distillation temperature already. The value of each row is
summed over the vocabulary; masking, reduction and temperature scaling are the engine's job (`reference.py`,
`chunked.py`). Functions must be differentiable with respect to `student_log_probs` through plain torch ops: the
chunked engine takes their gradient with autograd, one chunk at a time.

A divergence may also carry a closed-form `value_and_grad(student_log_probs, teacher_log_probs, *, scratch, **params)
-> (values [N], dD/du [N, V])`, where u = z_S / T are the student's tempered logits. The engine then skips autograd,
which saves several passes over `[n, V]`; the result must equal autograd's (the tests check it). It may overwrite both
inputs and `scratch` (an fp32 buffer of the same shape), and its gradient may be any of the three: the engine does not
reuse them. Working in place matters on CPU, where every fresh `[n, V]` tensor costs page faults that take longer than
the arithmetic.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Mapping, Protocol

import torch


class Divergence(Protocol):
    def __call__(self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, **params: float
                 ) -> torch.Tensor: ...


DIVERGENCES: dict[str, Divergence] = {}

# A check is (predicate, what a valid value is): `(lambda beta: 0 < beta < 1, "in (0, 1) (0 and 1 make ...)")`.
Check = tuple[Callable[[float], bool], str]


def register_divergence(name: str, checks: Mapping[str, Check] | None = None) -> Callable[[Divergence], Divergence]:
    """Register a divergence under `name` (the value of `KDConfig.divergence`). Duplicate names are refused.

    Its settings are its keyword-only parameters (recorded as `fn.params`); `checks` maps any of them to the valid
    values, which `check_divergence_params` enforces before a loss is computed.
    """

    def decorator(fn: Divergence) -> Divergence:
        if name in DIVERGENCES:
            raise ValueError(f"A divergence named {name!r} is already registered.")
        parameters = inspect.signature(fn).parameters.values()
        fn.params = tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)
        unknown = set(checks or {}) - set(fn.params)
        if unknown:
            raise ValueError(f"Divergence {name!r} has checks for {sorted(unknown)}, which it does not take.")
        fn.checks = dict(checks or {})
        DIVERGENCES[name] = fn
        return fn

    return decorator


def get_divergence(name: str) -> Divergence:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            f"Unknown divergence {name!r}. Choose one of: {', '.join(sorted(DIVERGENCES))}."
        ) from None


def divergence_params(name: str, settings: Mapping[str, float]) -> dict[str, float]:
    """The settings divergence `name` reads, picked out of `settings` (which may hold others': a β that the loss never
    reads is not passed, and not checked). A setting it declares and `settings` lacks is an error."""
    fn = get_divergence(name)
    missing = [param for param in fn.params if param not in settings]
    if missing:
        raise ValueError(f"Divergence {name!r} needs the setting(s) {', '.join(missing)}.")
    return {param: settings[param] for param in fn.params}


def check_divergence_params(name: str, params: Mapping[str, float]) -> None:
    """Fail, naming the setting and the value, when a setting of divergence `name` is outside its valid values."""
    for param, (valid, description) in get_divergence(name).checks.items():
        if not valid(params[param]):
            raise ValueError(f"{param} must be {description}, got {params[param]}.")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from log-probabilities [N, V] -> [N]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w·p + (1 − w)·q) computed stably in log space. Requires 0 < w < 1."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


@register_divergence("forward_kl")
def forward_kl(student_log_probs, teacher_log_probs):
    """KL(p_T ‖ p_S): mode-covering, the classic Hinton KD objective."""
    return _kl(teacher_log_probs, student_log_probs)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[n, v]·b[n, v] -> [N], without materialising the product."""
    return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)


def _forward_kl_value_and_grad(student_log_probs, teacher_log_probs, *, scratch):
    # D = Σ p_T (log p_T − log p_S);  dD/du = p_S − p_T
    teacher_probs = torch.exp(teacher_log_probs, out=scratch)
    log_ratio = teacher_log_probs.sub_(student_log_probs)
    values = _row_dot(teacher_probs, log_ratio)
    return values, student_log_probs.exp_().sub_(teacher_probs)


forward_kl.value_and_grad = _forward_kl_value_and_grad


@register_divergence("reverse_kl")
def reverse_kl(student_log_probs, teacher_log_probs):
    """KL(p_S ‖ p_T): mode-seeking (Rev-KD, MiniLLM)."""
    return _kl(student_log_probs, teacher_log_probs)


def _reverse_kl_value_and_grad(student_log_probs, teacher_log_probs, *, scratch):
    # D = Σ p_S (log p_S − log p_T);  dD/du_k = p_S,k · (log p_S,k − log p_T,k − D)
    student_probs = torch.exp(student_log_probs, out=scratch)
    log_ratio = student_log_probs.sub_(teacher_log_probs)
    values = _row_dot(student_probs, log_ratio)
    return values, log_ratio.sub_(values[:, None]).mul_(student_probs)


reverse_kl.value_and_grad = _reverse_kl_value_and_grad

_JSD_BETA: Check = (lambda beta: 0.0 < beta < 1.0, "in (0, 1) (0 and 1 make the JSD vanish)")
_SKEW_ALPHA: Check = (lambda alpha: 0.0 <= alpha < 1.0, "in [0, 1) (1 makes the skewed KL vanish)")


@register_divergence("jsd", checks={"jsd_beta": _JSD_BETA})
def jsd(student_log_probs, teacher_log_probs, *, jsd_beta):
    """Generalised JSD with m = β·p_T + (1−β)·p_S: β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m).

    Equal to TRL's `GKDTrainer.generalized_jsd_loss(beta=β)` for β in (0, 1).
    """
    log_m = _log_mixture(teacher_log_probs, student_log_probs, jsd_beta)
    return jsd_beta * _kl(teacher_log_probs, log_m) + (1.0 - jsd_beta) * _kl(student_log_probs, log_m)


@register_divergence("skew_forward_kl", checks={"skew_alpha": _SKEW_ALPHA})
def skew_forward_kl(student_log_probs, teacher_log_probs, *, skew_alpha):
    """KL(p_T ‖ α·p_T + (1−α)·p_S) (DistiLLM's skew KL)."""
    if skew_alpha == 0.0:
        return forward_kl(student_log_probs, teacher_log_probs)
    return _kl(teacher_log_probs, _log_mixture(teacher_log_probs, student_log_probs, skew_alpha))


@register_divergence("skew_reverse_kl", checks={"skew_alpha": _SKEW_ALPHA})
def skew_reverse_kl(student_log_probs, teacher_log_probs, *, skew_alpha):
    """KL(p_S ‖ α·p_S + (1−α)·p_T) (DistiLLM's skew reverse KL)."""
    if skew_alpha == 0.0:
        return reverse_kl(student_log_probs, teacher_log_probs)
    return _kl(student_log_probs, _log_mixture(student_log_probs, teacher_log_probs, skew_alpha))


@register_divergence("tvd")
def total_variation(student_log_probs, teacher_log_probs):
    """Total variation distance ½·Σ|p_T − p_S|."""
    return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)
