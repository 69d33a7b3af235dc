"""The fused autograd function of the chunked engine and its set-up for any teacher (`engine_terms`): a model's
hidden states and head, a sparse distribution per token, or a mixture of them. The public entry points are
`chunked.py`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .chunk_terms import autograd_value_and_grad, closed_form_value_and_grad, teacher_ce_value_and_grad
from .compiled import compile_wanted, compiled_value_and_grad
from .heads import maybe_gather, project_into, vocabulary_rows, weight_and_bias
from .noise import grid_positions, position_noise_
from .reference import loss_normalizer
from .settings import LogitTransform, LossSettings, chunk_length, uses_closed_form, working_buffers
from .sources import EngineTeacher


@dataclass(frozen=True)
class TeacherTerms:
    """What the engine does with the teacher side beyond serving as the KD target (DSKD's projected teacher).

    ce_weight: weight of the cross-entropy of the teacher-side logits on `teacher_labels`, whose gradient goes into
        the teacher-side hidden states (never the teacher's head). 0 (vanilla KD) skips it.
    gate_kd: count a token's KD term only where the teacher side's argmax equals its `teacher_labels` entry (DSKD-CMA's
        "t2s accuracy" gate, computed on the clean logits, before noise).
    """

    ce_weight: float = 0.0
    gate_kd: bool = False


class ChunkedDistillationOutput(NamedTuple):
    """Everything `chunked_distillation_terms` computes; the means are divided by the loss normaliser."""

    loss: torch.Tensor                 # (1 − w)·ce_loss + w·kd_loss + teacher_ce_weight·teacher_ce_loss
    ce_loss: torch.Tensor
    kd_loss: torch.Tensor              # scaled by T² if set; gated if asked
    teacher_ce_loss: torch.Tensor      # 0 unless teacher_ce_weight > 0
    num_correct: torch.Tensor          # label tokens where the student's argmax is right
    teacher_num_correct: torch.Tensor  # tokens where the teacher side's argmax equals teacher_labels (0 unless
                                       # teacher terms are on)


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs, whatever the teacher (one object from the entry points down):

    ignore_index: label value of positions that are not label tokens.
    num_items_in_batch: global label-token count of the accumulated batch, as in the reference.
    vocab_size: use only the first `vocab_size` rows of the heads (the shared vocabulary when one head is padded);
        defaults to the smallest head.
    chunk_size: tokens per chunk, when set; otherwise sized from `memory_budget_mb` (`chunk_rows`).
    memory_budget_mb: MiB for a chunk's `[n, V]` fp32 working buffers; default `default_memory_budget_mb(device)`.
    student_transform: the student's logit scale and soft-capping.
    noise_seed: seed of the teacher-logit noise (needed when `settings.noise_std > 0`).
    compile: run each chunk's terms compiled (`compiled.py`): "auto" (on CUDA), "on", "off".
    """

    ignore_index: int = -100
    num_items_in_batch: int | torch.Tensor | None = None
    vocab_size: int | None = None
    chunk_size: int | None = None
    memory_budget_mb: float | None = None
    student_transform: LogitTransform = LogitTransform()
    noise_seed: int | None = None
    compile: str = "auto"


class _ChunkPlan(NamedTuple):
    """What the fused function reads besides the four inputs that may take a gradient (rows are label tokens only)."""

    teacher: EngineTeacher               # fills each chunk's teacher logits (`sources.py`, `mixture.py`)
    labels: torch.Tensor                 # [N]
    teacher_labels: torch.Tensor         # [N], targets of the teacher-side terms
    normalizer: torch.Tensor             # scalar: the N the sums are divided by
    settings: LossSettings
    student_transform: LogitTransform
    teacher_terms: TeacherTerms
    chunk_size: int
    noise: tuple | None                  # (seed, rows [N], columns [N]) when settings.noise_std > 0
    report_ce: bool                      # False: the CE at w = 1 feeds nothing, so skip it
    compiled: bool                       # the closed form runs compiled (`compiled.py`)


class _FusedDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, plan: _ChunkPlan):
        """student_hidden `[N, D_S]`, student_weight `[V, D_S]`, student_bias `[V]` or None, teacher_hidden `[N, D_T]`
        (differentiable only for the teacher-side CE); returns the terms of `ChunkedDistillationOutput`."""
        teacher, labels, teacher_labels, normalizer, settings, student_transform, teacher_terms = plan[:7]
        chunk_size, noise, report_ce, compiled = plan[7:]
        num_tokens = student_hidden.size(0)
        device = student_hidden.device
        # Under no_grad (evaluation) nothing needs a gradient, and none is built.
        hidden_needs_grad, weight_needs_grad, bias_needs_grad, teacher_needs_grad = ctx.needs_input_grad[:4]
        grad_hidden = torch.zeros_like(student_hidden) if hidden_needs_grad else None
        # Accumulated in fp32 across chunks whatever the model dtype, then cast once.
        grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=device) \
            if weight_needs_grad else None
        grad_bias = torch.zeros(student_bias.shape, dtype=torch.float32, device=device) if bias_needs_grad else None
        builds_gradient = hidden_needs_grad or weight_needs_grad or bias_needs_grad
        teacher_ce_on = teacher_terms.ce_weight > 0
        grad_teacher_hidden = torch.zeros_like(teacher_hidden) if teacher_ce_on and teacher_needs_grad else None
        sums = torch.zeros(3, dtype=torch.float32, device=device)  # ce, kd, teacher ce
        counts = torch.zeros(2, dtype=torch.long, device=device)   # student correct, teacher correct

        # fp32 [chunk, V] buffers reused by every chunk (`working_buffers` of them): a fresh tensor per operation
        # would cost more in page faults (CPU) or allocator traffic than the arithmetic itself, and would escape the
        # memory budget the chunk was sized by.
        vocab = student_weight.size(0)
        closed_form = uses_closed_form(settings)
        count = working_buffers(settings, student_transform, report_ce) if closed_form else 3
        buffers = [torch.empty(min(chunk_size, num_tokens), vocab, dtype=torch.float32, device=device)
                   for _ in range(count + teacher.extra_buffers)]

        for start in range(0, num_tokens, chunk_size):
            chunk = slice(start, min(start + chunk_size, num_tokens))
            hidden = student_hidden[chunk]
            chunk_labels, chunk_teacher_labels = labels[chunk], teacher_labels[chunk]
            student_logits, teacher_logits, *scratch = (buffer[: hidden.size(0)] for buffer in buffers)
            project_into(student_logits, hidden, student_weight, student_bias)
            # The teacher's raw logits, or the sparse target the closed form takes directly.
            sparse_target = teacher.fill_(teacher_logits, chunk, student_logits, settings, student_transform, scratch,
                                          closed_form and not compiled)  # compiled: a sparse teacher as logits
            if teacher_ce_on or teacher_terms.gate_kd:
                # The transforms are monotone: the argmax of the raw logits is the model's prediction.
                teacher_correct = teacher_logits.argmax(-1) == chunk_teacher_labels
                counts[1] += teacher_correct.sum()
            if teacher_ce_on:
                teacher_ce, teacher_grad = teacher_ce_value_and_grad(teacher_logits, chunk_teacher_labels,
                                                                     teacher.transform, scratch[0])
                sums[2] += teacher_ce
                if grad_teacher_hidden is not None:
                    teacher_grad = teacher_grad.to(teacher_hidden.dtype)
                    torch.mm(teacher_grad, teacher.weight, out=grad_teacher_hidden[chunk])
            teacher.transform.apply_(teacher_logits)
            if settings.noise_std > 0:
                seed, rows, columns = noise
                position_noise_(scratch[0], seed, rows[chunk], columns[chunk])
                teacher_logits.add_(scratch[0], alpha=settings.noise_std)
            counts[0] += (student_logits.argmax(-1) == chunk_labels).sum()
            gate = teacher_correct.float() if teacher_terms.gate_kd else None
            computed = compiled_value_and_grad(student_logits, teacher_logits, chunk_labels, settings,
                                               student_transform, gate) if compiled else None
            if computed is not None:  # the gradient is in the student's logits buffer
                (ce, kd), grad_logits, factor = computed, student_logits, 1.0
            elif closed_form:
                ce, kd, grad_logits, factor = closed_form_value_and_grad(
                    student_logits, teacher_logits, chunk_labels, settings, student_transform, scratch, gate, report_ce,
                    sparse_target)
            else:
                ce, kd, grad_logits = autograd_value_and_grad(student_logits, teacher_logits, chunk_labels, settings,
                                                              student_transform, gate)
                factor = 1.0
            sums[0] += ce
            sums[1] += kd
            if not builds_gradient:
                continue
            # The gradient of the logits is factor·grad_logits; the factor is applied to the small products.
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, student_weight, out=grad_hidden[chunk])
                if factor != 1.0:
                    grad_hidden[chunk] *= factor
            if grad_weight is not None:
                if grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.T, hidden, alpha=factor)
                else:
                    grad_weight.add_(grad_logits.T @ hidden, alpha=factor)
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0), alpha=factor)

        # Scaled in place and kept on ctx rather than saved: the backward hands each one to autograd as the only
        # reference, which then takes it as the parameter's .grad instead of copying a [V, D] tensor.
        inverse = 1.0 / normalizer
        ctx.gradients = [
            None if grad_hidden is None else grad_hidden.mul_(inverse.to(grad_hidden.dtype)),
            None if grad_weight is None else grad_weight.mul_(inverse).to(student_weight.dtype),
            None if grad_bias is None else grad_bias.mul_(inverse).to(student_bias.dtype),
            None if grad_teacher_hidden is None
            else grad_teacher_hidden.mul_((inverse * teacher_terms.ce_weight).to(grad_teacher_hidden.dtype)),
        ]
        ce_mean, kd_mean, teacher_ce_mean = sums * inverse
        loss = (1.0 - settings.kd_weight) * ce_mean + settings.kd_weight * kd_mean \
            + teacher_terms.ce_weight * teacher_ce_mean
        num_correct, teacher_num_correct = counts[0].clone(), counts[1].clone()
        ctx.mark_non_differentiable(ce_mean, kd_mean, teacher_ce_mean, num_correct, teacher_num_correct)
        return loss, ce_mean, kd_mean, teacher_ce_mean, num_correct, teacher_num_correct

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        gradients, ctx.gradients = ctx.gradients, None
        if gradients is None:
            raise RuntimeError("This distillation loss was already backpropagated: its gradients are built in the "
                               "forward and handed to autograd once, so retain_graph cannot replay them. Compute the "
                               "loss again for another backward.")
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # 1 unless scaled (DeepSpeed, a weighted sum)
            gradients = [None if grad is None else grad.mul_(grad_loss.to(grad.dtype)) for grad in gradients]
        return (*gradients, None)


def engine_terms(student_hidden: torch.Tensor, student_lm_head, labels: torch.Tensor, settings: LossSettings,
                 source, options: EngineOptions, teacher_terms: TeacherTerms = TeacherTerms(),
                 teacher_labels: torch.Tensor | None = None, report_ce: bool = True):
    """The engine against any teacher `source` (`DenseMember`, `SparseMember`, `MixedTeachers`: each prepares its own
    side, `sources.py`); returns `source`'s output of the terms (`ChunkedDistillationOutput`, or a mixture's)."""
    student_weight, student_bias = weight_and_bias(student_lm_head)
    with maybe_gather(student_weight, student_bias, *source.head_params()):
        # Read inside the gather: under ZeRO-3 a partitioned head has 0 rows until it is gathered.
        head_rows = [student_weight.size(0), *source.head_rows()]
        vocab = min(head_rows) if options.vocab_size is None else options.vocab_size
        if vocab > min(head_rows):
            rows = ", ".join(f"{count} {'teacher' if index else 'student'} rows"
                             for index, count in enumerate(head_rows))
            raise ValueError(f"vocab_size={vocab} exceeds an output head ({rows}).")
        positions = grid_positions(labels)  # (b, t) of every label entry, for the noise
        flat_labels = labels.reshape(-1)
        mask = flat_labels != options.ignore_index
        if mask.any() and int(flat_labels[mask].max()) >= vocab:
            raise ValueError(f"A label id ({int(flat_labels[mask].max())}) is outside the distilled vocabulary of "
                             f"{vocab}.")
        noise = None
        if settings.noise_std > 0:
            if options.noise_seed is None:
                raise ValueError("settings.noise_std > 0 needs a noise_seed (an int): the noise is drawn from it.")
            noise = (options.noise_seed, *(index[mask] for index in positions))
        teacher_labels = flat_labels if teacher_labels is None else teacher_labels.reshape(-1)
        normalizer = loss_normalizer(mask.sum(), options.num_items_in_batch)
        # Boolean indexing keeps the autograd link: the gradient is scattered back to [B, T, D].
        student_rows = student_hidden.reshape(-1, student_hidden.size(-1))[mask]
        teacher = source.prepare(labels, mask, vocab, settings, student_rows, keeps_grad=teacher_terms.ce_weight > 0)
        buffers = working_buffers(settings, options.student_transform, report_ce) + teacher.extra_buffers
        chunk_size = chunk_length(vocab, buffers, student_hidden.device, options.chunk_size, options.memory_budget_mb)
        compiled = compile_wanted(options.compile, student_hidden.device)
        plan = _ChunkPlan(teacher, flat_labels[mask], teacher_labels[mask], normalizer, settings,
                          options.student_transform, teacher_terms, chunk_size, noise, report_ce, compiled)
        inputs = [student_rows, vocabulary_rows(student_weight, vocab), vocabulary_rows(student_bias, vocab),
                  teacher.rows]
        if not torch.is_grad_enabled():
            # Evaluation: an autograd.Function's inputs still say they need gradients under no_grad, so detach them,
            # and the engine builds none (half its matrix products).
            inputs = [None if tensor is None else tensor.detach() for tensor in inputs]
        outputs = _FusedDistillationFunction.apply(*inputs, plan)
    return teacher.finish(ChunkedDistillationOutput(*outputs))
