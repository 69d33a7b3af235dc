"""Token-level divergences between a student's and a teacher's next-token distributions.

Every divergence is a short function with one contract, so that adding one is one function plus one registration:

    fn(student_log_probs [N, V] fp32, teacher_log_probs [N, V] fp32, **params) -> per-token values [N]

`params` are the divergence's own settings, written as keyword-only parameters (`*, jsd_beta`): the engine passes each
function only the settings it declares (as Liger-Kernel's `distillation_loss_fn` takes its own `beta`), and
`register_divergence(..., checks=)` says which values are valid, so a new divergence with a new setting is one function
and its parameters. Both inputs are log-softmaxed at the distillation temperature already. The value of each row is
summed over the vocabulary; masking, reduction and temperature scaling are the engine's job (`reference.py`,
`chunked.py`). Functions must be differentiable with respect to `student_log_probs` through plain torch ops: the
readable reference, and the chunked engine for a divergence without a closed form, take their gradient by autograd.

Every built-in divergence also carries a closed-form gradient, attached with `@closed_form(divergence, buffers=k)`:
`value_and_grad(student_log_probs, teacher_log_probs, *, scratch, **params) -> (values [N], dD/du [N, V])`, where
u = z_S / T are the student's tempered logits. The engine then skips autograd, so the memory of a chunk is a known
number of `[n, V]` fp32 buffers whatever the divergence, and it sizes its chunks from that number and a byte budget. The
result must equal autograd's (the tests check every divergence). The function may overwrite both inputs and the `k`
fp32 `scratch` buffers (same shape), and its gradient may be any of them: the engine does not reuse them. Working in
place matters: on CPU every fresh `[n, V]` tensor costs page faults that take longer than the arithmetic, and on any
device it is memory the budget did not plan for.

Most closed forms follow from one identity: if g = ∂D/∂p_S (the partial derivative in the student's probabilities),
then dD/du = p_S ⊙ (g − ⟨p_S, g⟩) (the softmax's Jacobian). A divergence registered without one still works, through
autograd one chunk at a time; its chunk is then sized for `autograd_buffers` live `[n, V]` tensors (a registration
setting), since autograd's intermediates are not the engine's to place.
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


# How many `[n, V]` fp32 tensors autograd is assumed to hold at once for a divergence without a closed form (the
# built-in ones' autograd forms hold at most 10 at once; a test counts them).
AUTOGRAD_BUFFERS = 12


def register_divergence(name: str, checks: Mapping[str, Check] | None = None, autograd_buffers: int = AUTOGRAD_BUFFERS
                        ) -> Callable[[Divergence], Divergence]:
    """Register a divergence under `name` (the value of `KDConfig.divergence`). Duplicate names are refused.

    Its settings are its keyword-only parameters (recorded as `fn.params`); `checks` maps any of them to the valid
    values, which `check_divergence_params` enforces before a loss is computed. `autograd_buffers`: the `[n, V]`
    tensors its autograd form holds at once, which sizes the engine's chunks until it gets a `closed_form`.
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
        fn.autograd_buffers = autograd_buffers
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


def closed_form(divergence: Divergence, buffers: int = 1) -> Callable[[Callable], Callable]:
    """Attach a closed-form `value_and_grad` to a registered divergence; it needs `buffers` scratch `[n, V]` buffers."""

    def decorator(value_and_grad: Callable) -> Callable:
        divergence.value_and_grad = value_and_grad
        divergence.scratch_buffers = buffers
        return value_and_grad

    return decorator


def divergence_params(name: str, settings: Mapping[str, float]) -> dict[str, float]:
    """The settings divergence `name` reads, picked out of `settings` (which may hold others': a β that the loss never
    reads is not passed, and not checked). A setting it declares and `settings` lacks is an error."""
    fn = get_divergence(name)
    missing = [param for param in fn.params if param not in settings]
    if missing:
        raise ValueError(f"Divergence {name!r} needs the setting(s) {', '.join(missing)} (in a KDConfig or a recipe: "
                         f"divergence_params: {{{', '.join(f'{param}: ...' for param in missing)}}}).")
    return {param: settings[param] for param in fn.params}


def check_divergence_params(name: str, params: Mapping[str, float], names: Mapping[str, str] | None = None) -> None:
    """Fail, naming the setting (as `names` maps it: a config's field name) and the value, when a setting of divergence
    `name` is outside its valid values."""
    for param, (valid, description) in get_divergence(name).checks.items():
        if not valid(params[param]):
            raise ValueError(f"{(names or {}).get(param, param)} must be {description}, got {params[param]}.")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from log-probabilities [N, V] -> [N]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w·p + (1 − w)·q) computed stably in log space. Requires 0 < w < 1."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[n, v]·b[n, v] -> [N], without materialising the product."""
    return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)


def _softplus_shifted_(out: torch.Tensor, values: torch.Tensor, shift: float) -> torch.Tensor:
    """softplus(values + shift) into `out` [N, V], stably (logaddexp(·, 0)). With values = log p_T − log p_S and
    shift = log(w / (1 − w)), it is log m − log p_S − log(1 − w) for the mixture m = w·p_T + (1 − w)·p_S."""
    torch.add(values, shift, out=out)  # `out` may be `values`
    return torch.logaddexp(out, out.new_zeros(()), out=out)


# ------------------------------------------------------------------------------------------------------------------
# The divergences, each with its closed-form gradient. In the comments, d = log p_T − log p_S and, for a mixture m,
# s' = softplus(d + log(w_T / (1 − w_T))) with w_T the teacher's weight in m, so log m − log p_S = log(1 − w_T) + s'.

@register_divergence("forward_kl")
def forward_kl(student_log_probs, teacher_log_probs):
    """KL(p_T ‖ p_S): mode-covering, the classic Hinton KD objective."""
    return _kl(teacher_log_probs, student_log_probs)


@closed_form(forward_kl)
def _forward_kl_value_and_grad(student_log_probs, teacher_log_probs, *, scratch):
    # D = Σ p_T (log p_T − log p_S);  dD/du = p_S − p_T
    teacher_probs = torch.exp(teacher_log_probs, out=scratch[0])
    log_ratio = teacher_log_probs.sub_(student_log_probs)
    values = _row_dot(teacher_probs, log_ratio)
    return values, student_log_probs.exp_().sub_(teacher_probs)


@register_divergence("reverse_kl")
def reverse_kl(student_log_probs, teacher_log_probs):
    """KL(p_S ‖ p_T): mode-seeking (Rev-KD, MiniLLM)."""
    return _kl(student_log_probs, teacher_log_probs)


@closed_form(reverse_kl)
def _reverse_kl_value_and_grad(student_log_probs, teacher_log_probs, *, scratch):
    # D = Σ p_S (log p_S − log p_T);  dD/du_k = p_S,k · (log p_S,k − log p_T,k − D)
    student_probs = torch.exp(student_log_probs, out=scratch[0])
    log_ratio = student_log_probs.sub_(teacher_log_probs)
    values = _row_dot(student_probs, log_ratio)
    return values, log_ratio.sub_(values[:, None]).mul_(student_probs)


_JSD_BETA: Check = (lambda beta: 0.0 < beta < 1.0, "in (0, 1) (0 and 1 make the JSD vanish)")
_SKEW_ALPHA: Check = (lambda alpha: 0.0 <= alpha < 1.0, "in [0, 1) (1 makes the skewed KL vanish)")


@register_divergence("jsd", checks={"jsd_beta": _JSD_BETA})
def jsd(student_log_probs, teacher_log_probs, *, jsd_beta):
    """Generalised JSD with m = β·p_T + (1−β)·p_S: β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m).

    Equal to TRL's `GKDTrainer.generalized_jsd_loss(beta=β)` for β in (0, 1).
    """
    log_m = _log_mixture(teacher_log_probs, student_log_probs, jsd_beta)
    return jsd_beta * _kl(teacher_log_probs, log_m) + (1.0 - jsd_beta) * _kl(student_log_probs, log_m)


@closed_form(jsd)
def _jsd_value_and_grad(student_log_probs, teacher_log_probs, *, scratch, jsd_beta):
    # KL(p_T ‖ m) = Σ p_T·d − Σ p_T·s' − log(1−β) and KL(p_S ‖ m) = −Σ p_S·s' − log(1−β) (each p sums to 1);
    # g = ∂D/∂p_S = −(1−β)·(s' + log(1−β)), so dD/du = −(1−β)·p_S·(s' + log(1−β) + KL(p_S ‖ m)).
    # One scratch buffer: d, then s' in place; each input becomes its probabilities once its log is used.
    log_rest = math.log1p(-jsd_beta)
    log_ratio = torch.sub(teacher_log_probs, student_log_probs, out=scratch[0])
    teacher_probs = teacher_log_probs.exp_()
    teacher_cross = _row_dot(teacher_probs, log_ratio)
    gap = _softplus_shifted_(log_ratio, log_ratio, math.log(jsd_beta) - log_rest)
    teacher_kl = teacher_cross - _row_dot(teacher_probs, gap) - log_rest
    student_probs = student_log_probs.exp_()
    student_kl = -_row_dot(student_probs, gap) - log_rest
    values = jsd_beta * teacher_kl + (1.0 - jsd_beta) * student_kl
    return values, gap.add_((student_kl + log_rest)[:, None]).mul_(student_probs).mul_(-(1.0 - jsd_beta))


@register_divergence("skew_forward_kl", checks={"skew_alpha": _SKEW_ALPHA})
def skew_forward_kl(student_log_probs, teacher_log_probs, *, skew_alpha):
    """KL(p_T ‖ α·p_T + (1−α)·p_S) (DistiLLM's skew KL)."""
    if skew_alpha == 0.0:
        return forward_kl(student_log_probs, teacher_log_probs)
    return _kl(teacher_log_probs, _log_mixture(teacher_log_probs, student_log_probs, skew_alpha))


@closed_form(skew_forward_kl)
def _skew_forward_kl_value_and_grad(student_log_probs, teacher_log_probs, *, scratch, skew_alpha):
    # m = α·p_T + (1−α)·p_S: D = Σ p_T·d − Σ p_T·s' − log(1−α); g = −(1−α)·p_T / m, and p_S / m = exp(−s') / (1−α),
    # so with r = p_T·exp(−s'): dD/du = p_S·g − p_S·⟨p_S, g⟩ = p_S·Σr − r.
    if skew_alpha == 0.0:
        return _forward_kl_value_and_grad(student_log_probs, teacher_log_probs, scratch=scratch)
    log_ratio = torch.sub(teacher_log_probs, student_log_probs, out=scratch[0])
    teacher_probs = teacher_log_probs.exp_()
    teacher_cross = _row_dot(teacher_probs, log_ratio)
    gap = _softplus_shifted_(log_ratio, log_ratio, math.log(skew_alpha) - math.log1p(-skew_alpha))
    values = teacher_cross - _row_dot(teacher_probs, gap) - math.log1p(-skew_alpha)
    r = gap.neg_().exp_().mul_(teacher_probs)
    return values, student_log_probs.exp_().mul_(r.sum(-1, keepdim=True)).sub_(r)


@register_divergence("skew_reverse_kl", checks={"skew_alpha": _SKEW_ALPHA})
def skew_reverse_kl(student_log_probs, teacher_log_probs, *, skew_alpha):
    """KL(p_S ‖ α·p_S + (1−α)·p_T) (DistiLLM's skew reverse KL)."""
    if skew_alpha == 0.0:
        return reverse_kl(student_log_probs, teacher_log_probs)
    return _kl(student_log_probs, _log_mixture(student_log_probs, teacher_log_probs, skew_alpha))


@closed_form(skew_reverse_kl)
def _skew_reverse_kl_value_and_grad(student_log_probs, teacher_log_probs, *, scratch, skew_alpha):
    # m = α·p_S + (1−α)·p_T (teacher weight 1−α): log m − log p_S = log α + s'; D = −Σ p_S·s' − log α;
    # g = log p_S − log m + 1 − α·p_S / m = −s' − exp(−s') + (1 − log α), and the constant cancels in
    # dD/du = p_S·(g − ⟨p_S, g⟩): with h = s' + exp(−s'), dD/du = −p_S·(h − ⟨p_S, h⟩).
    if skew_alpha == 0.0:
        return _reverse_kl_value_and_grad(student_log_probs, teacher_log_probs, scratch=scratch)
    log_ratio = torch.sub(teacher_log_probs, student_log_probs, out=scratch[0])
    gap = _softplus_shifted_(log_ratio, log_ratio, math.log1p(-skew_alpha) - math.log(skew_alpha))
    student_probs = student_log_probs.exp_()
    values = -_row_dot(student_probs, gap) - math.log(skew_alpha)
    h = torch.neg(gap, out=teacher_log_probs).exp_().add_(gap)
    return values, h.sub_(_row_dot(student_probs, h)[:, None]).mul_(student_probs).neg_()


@register_divergence("tvd")
def total_variation(student_log_probs, teacher_log_probs):
    """Total variation distance ½·Σ|p_T − p_S|."""
    return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)


@closed_form(total_variation)
def _total_variation_value_and_grad(student_log_probs, teacher_log_probs, *, scratch):
    # g = ½·sign(p_S − p_T) (0 where they are equal, as autograd's abs)
    student_probs = student_log_probs.exp_()
    difference = torch.sub(student_probs, teacher_log_probs.exp_(), out=scratch[0])
    values = 0.5 * torch.linalg.vector_norm(difference, ord=1, dim=-1)
    g = difference.sign_().mul_(0.5)
    return values, g.sub_(_row_dot(student_probs, g)[:, None]).mul_(student_probs)
