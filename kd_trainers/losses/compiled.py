"""The engine's chunk terms compiled with `torch.compile`: the student's logit transform, both softmaxes, the
cross-entropy, the divergence, its gradient and the CE/KD mixing fused into a few passes over the `[n, V]` block,
where the eager closed form (`chunk_terms.closed_form_value_and_grad`) makes one pass per operation (JSD: about
eleven, each a read and a write of the whole block). The maths is not written again: the compiled function is the
gradient (`torch.func.grad_and_value`) of the readable loss of one chunk (`chunk_terms.chunk_total`, the autograd
path's own, with the registered divergence as written), which the compiler turns into one fused forward and backward. So it covers every
divergence, a user's too, and every setting of the loss (temperature, mixing, noise, soft-capping, DSKD's gate); a
sparse teacher (a cache, a server) and a mixture reach it as the teacher logits they fill. The chunk's matrix products
(the heads) stay outside, in the BLAS/cuBLAS calls of `fused.py`, which the compiler would not do better.

Why not compile the eager closed form itself: its in-place work in shared buffers is what makes it fast eagerly, and
it is what the compiler is least sure with (Inductor 2.13 reordered a soft-capped, tempered, mixed case's in-place
writes into a wrong gradient); a functional graph is what it is built for.

When it runs (`loss_compile`, `COMPILE_MODES`): `"on"` wherever it can, `"off"` never, `"auto"` (the default) on CUDA
only (`COMPILED_DEVICE_TYPES`: on CPU it measured no faster, below). A compiler that fails (no C++ compiler for the CPU
backend, no Triton for CUDA) is said once, and that case runs the eager engine: a run never stops because the fast path
is unavailable.
"""

from __future__ import annotations

import functools
import logging
import types

import torch

from .chunk_terms import chunk_total
from .settings import LogitTransform, LossSettings


logger = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")

# "auto" compiles on CUDA only. On CPU the compiled chunk measured no faster than the eager one in a whole KD step at a
# 128k vocabulary (benchmarks/README.md, "The compiled loss chunk": 0.97-1.11x the eager step's time, JSD 1.09x,
# forward KL 0.97x): the heads' matrix products dominate there, and the eager closed form, which reuses its buffers,
# pays no allocation per chunk where compiled code does. So the CPU default stays eager and skips the compile.
COMPILED_DEVICE_TYPES = frozenset({"cuda"})

_said: set[str] = set()  # what the fallback has said already: each thing once per process
_failed: set = set()  # the (settings, transform) cases whose compile failed: they run eagerly from then on


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning(message)


def check_compile_mode(mode: str) -> None:
    """Fail, naming `loss_compile` and the value, unless `mode` is one of `COMPILE_MODES`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"loss_compile must be one of {list(COMPILE_MODES)}, got {mode!r}.")


def compile_wanted(mode: str, device: torch.device) -> bool:
    """Whether the engine runs the compiled chunk for `mode` (one of `COMPILE_MODES`) on `device`."""
    check_compile_mode(mode)
    if mode == "auto":
        return torch.device(device).type in COMPILED_DEVICE_TYPES
    return mode == "on"


def say_not_compiled(loss: str, mode: str, device: torch.device) -> None:
    """For a loss with no compiled path (`loss`: its name): say once that it runs eagerly when `mode` asks for
    compiling here ("on", or "auto" on CUDA)."""
    if compile_wanted(mode, device):
        _say_once(f"loss_compile={mode!r}: {loss} has no compiled path; it runs eagerly (same values).")


@functools.lru_cache(maxsize=None)
def _compiled_terms(settings: LossSettings, transform: LogitTransform):
    """The compiled chunk for one configuration of the loss (its settings are constants of the compiled code)."""

    def terms(student_logits, teacher_logits, labels, gate):
        grad, (_, (ce, kd)) = torch.func.grad_and_value(chunk_total, has_aux=True)(
            student_logits, teacher_logits, labels, settings, transform, gate)
        student_logits.copy_(grad)  # into the student's buffer: no [n, V] tensor is returned
        return ce, kd

    # Its own code object: the compiler caches compiled code per code object, with a limit of 8 variants, so cases
    # sharing `terms`'s would evict each other, then fail; one per case keeps each case one compile.
    name = f"chunk_terms_{_compiled_terms.cache_info().currsize}"
    unique = types.FunctionType(terms.__code__.replace(co_name=name), terms.__globals__, name, None,
                                terms.__closure__)
    return torch.compile(unique, fullgraph=True)


def compiled_value_and_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                            settings: LossSettings, student_transform: LogitTransform,
                            kd_token_weights: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(ce_sum, kd_sum)` of one chunk, as `chunk_terms.autograd_value_and_grad` computes them, by the compiled chunk;
    d total / d raw logits is written into `student_logits` `[n, V]` fp32 (raw logits in, gradient out);
    `teacher_logits` `[n, V]` (transformed, noised) is left intact, `kd_token_weights` `[n]` or None. None when the
    compiler failed for this case (said once): the caller then runs the eager engine."""
    key = (settings, student_transform)
    if key in _failed:
        return None
    for tensor in (student_logits, teacher_logits, labels, kd_token_weights):
        if tensor is not None:
            # The last chunk is shorter: one compiled code for every chunk length, not one compile per length.
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    try:
        return _compiled_terms(*key)(student_logits, teacher_logits, labels, kd_token_weights)
    except Exception as error:  # noqa: BLE001 - any compiler failure: the eager engine computes the same terms
        _failed.add(key)
        first_line = str(error).strip().split("\n")[0][:300]
        _say_once(f"The compiled loss chunk failed to build ({type(error).__name__}: {first_line}); the loss runs "
                  "eagerly (same values, more passes over memory). loss_compile='off' skips the attempt.")
        return None
