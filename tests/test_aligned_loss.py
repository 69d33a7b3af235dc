"""`kd_trainers.losses.aligned`: ULD and GOLD's hybrid at the aligned groups of two tokenizations, chunked, against a
full-logits reference written out group by group (values and gradients), and the merge of a group's tokens against
TRL's own `ULDLoss._merge_probabilities_with_alignment_groups` and `_compute_hybrid_uld_loss`."""

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl.experimental.gold.gold_trainer import ULDLoss

from kd_trainers.data.alignment import aligned_groups, shared_token_ids
from kd_trainers.demo.tokenizers import demo_tokenizer
from kd_trainers.losses import LossSettings
from kd_trainers.losses.aligned import AlignedSettings, Side, SparseSide, aligned_distillation_loss
from kd_trainers.losses.reference import add_teacher_noise
from kd_trainers.losses.sparse import top_k_targets
from kd_trainers.losses.uld import hybrid_of_probabilities, sorted_distance


def merged(probs, labels, positions, merge):
    """A group's merged distribution, by its definition: the base token's distribution times the probabilities of
    the group's other tokens (written with Python floats and a loop, not the engine's scatter)."""
    base = positions[0] if merge == "observed" else positions[-1]
    factor = 1.0
    for position in positions:
        if position != base:
            factor = factor * probs[position, labels[position]]
    return probs[base] * factor


def reference_loss(student_logits, teacher_logits, student_labels, teacher_labels, student_groups, teacher_groups,
                   settings, aligned, shared=None, noise_seed=None):
    temperature = settings.temperature
    teacher_logits = add_teacher_noise(teacher_logits.reshape(-1, teacher_logits.size(-1)), teacher_labels,
                                       settings.noise_std, noise_seed).reshape(teacher_logits.shape)
    mask = student_labels != -100
    ce = F.cross_entropy(student_logits[mask], student_labels[mask], reduction="sum")
    kd = student_logits.new_zeros(())
    for b in range(student_logits.size(0)):
        student_probs = F.softmax(student_logits[b] / temperature, -1)
        teacher_probs = F.softmax(teacher_logits[b] / temperature, -1)
        student_of = {}
        for t, g in enumerate(student_groups[b].tolist()):
            if g >= 0 and student_labels[b, t] != -100:
                student_of.setdefault(g, []).append(t)
        teacher_of = {}
        for t, g in enumerate(teacher_groups[b].tolist()):
            if g >= 0 and teacher_labels[b, t] != -100:
                teacher_of.setdefault(g, []).append(t)
        for g in sorted(set(student_of) & set(teacher_of)):
            q_s = merged(student_probs, student_labels[b], student_of[g], aligned.merge)[None]
            q_t = merged(teacher_probs, teacher_labels[b], teacher_of[g], aligned.merge)[None]
            if aligned.distance == "uld":
                kd = kd + sorted_distance(q_s, q_t).sum()
            else:
                kd = kd + hybrid_of_probabilities(q_s, q_t, *shared, beta=aligned.matched_beta,
                                                  matched_weight=aligned.matched_weight).sum()
    n = mask.sum()
    scale = temperature**2 if settings.temperature_squared else 1.0
    return ((1 - settings.kd_weight) * ce + settings.kd_weight * scale * kd) / n, ce / n, kd / n


def batch(student_vocab=40, teacher_vocab=56, seed=0):
    """Two rows; the student's and teacher's completions of each cover one text in different token counts. Groups
    are built by `aligned_groups` from random cuts of a shared length, so some are many-to-one, some many-to-many
    (tokens cut differently inside), and each side ends with a token the other lacks (an end marker)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_s, prompt_t, characters in ((3, 5, 24), (2, 2, 17)):
        def cuts():
            inner = sorted(torch.randperm(characters - 1, generator=generator)[: characters // 3].add(1).tolist())
            ends = inner + [characters]
            return [(start, end) for start, end in zip([0] + ends[:-1], ends)]
        student_offsets, teacher_offsets = cuts() + [(characters, characters + 1)], cuts()
        groups = aligned_groups(student_offsets, teacher_offsets)
        student_group = [-1] * prompt_s + [0] * len(student_offsets)
        teacher_group = [-1] * prompt_t + [0] * len(teacher_offsets)
        for number, (s_range, t_range) in enumerate(groups):
            for i in s_range:
                student_group[prompt_s + i] = number
            for i in t_range:
                teacher_group[prompt_t + i] = number
        rows.append((student_group, teacher_group))
    length_s = max(len(s) for s, _ in rows)
    length_t = max(len(t) for _, t in rows)
    student_groups = torch.tensor([s + [-1] * (length_s - len(s)) for s, _ in rows])
    teacher_groups = torch.tensor([t + [-1] * (length_t - len(t)) for _, t in rows])
    student_labels = torch.randint(0, student_vocab, student_groups.shape, generator=generator)
    teacher_labels = torch.randint(0, teacher_vocab, teacher_groups.shape, generator=generator)
    student_labels[student_groups < 0] = -100
    teacher_labels[teacher_groups < 0] = -100
    hidden = 12, 16
    student_hidden = torch.randn(*student_groups.shape, hidden[0], generator=generator, dtype=torch.float64)
    teacher_hidden = torch.randn(*teacher_groups.shape, hidden[1], generator=generator, dtype=torch.float64)
    student_head = torch.randn(student_vocab, hidden[0], generator=generator, dtype=torch.float64) * 0.7
    teacher_head = torch.randn(teacher_vocab, hidden[1], generator=generator, dtype=torch.float64) * 0.7
    return (student_hidden, student_head, student_labels, student_groups,
            teacher_hidden, teacher_head, teacher_labels, teacher_groups)


CASES = [
    (dict(), dict()),
    (dict(temperature=2.0, kd_weight=0.3), dict(merge="bayesian")),
    (dict(temperature=1.5, noise_std=0.7, temperature_squared=False), dict()),
    (dict(kd_weight=1.0), dict(distance="hybrid", matched_beta=0.5)),
    (dict(temperature=2.0), dict(distance="hybrid", matched_beta=0.0, merge="bayesian", matched_weight=0.3)),
]


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("settings, aligned", CASES)
def test_the_chunked_loss_equals_the_reference_in_values_and_gradients(settings, aligned, chunk_size):
    (student_hidden, student_head, student_labels, student_groups,
     teacher_hidden, teacher_head, teacher_labels, teacher_groups) = batch()
    settings, aligned = LossSettings(**settings), AlignedSettings(**aligned)
    shared = (torch.tensor([0, 3, 5, 7, 11]), torch.tensor([2, 3, 50, 9, 1]))
    seed = 1234 if settings.noise_std else None

    student_hidden.requires_grad_()
    student_head.requires_grad_()
    out = aligned_distillation_loss(
        Side(student_hidden, (student_head, None), student_labels, student_groups),
        Side(teacher_hidden, (teacher_head, None), teacher_labels, teacher_groups), settings, aligned,
        shared_ids=shared, chunk_size=chunk_size, noise_seed=seed)
    grads = torch.autograd.grad(out.loss, (student_hidden, student_head))

    hidden_ref = student_hidden.detach().clone().requires_grad_()
    head_ref = student_head.detach().clone().requires_grad_()
    expected, ce, kd = reference_loss(hidden_ref @ head_ref.T, teacher_hidden @ teacher_head.T, student_labels,
                                      teacher_labels, student_groups, teacher_groups, settings, aligned, shared, seed)
    expected_grads = torch.autograd.grad(expected, (hidden_ref, head_ref))

    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.ce_loss, ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.kd_loss, kd, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)
    assert kd > 0 and out.num_pairs == len(set(student_groups[0].tolist()) - {-1}) - 1 + len(
        set(student_groups[1].tolist()) - {-1}) - 1  # the student's end marker is alone in its group: unpaired


def test_the_noise_changes_the_teachers_side_only():
    inputs = batch()
    sides = (Side(inputs[0], (inputs[1], None), inputs[2], inputs[3]),
             Side(inputs[4], (inputs[5], None), inputs[6], inputs[7]))
    clean = aligned_distillation_loss(*sides, LossSettings())
    noisy = aligned_distillation_loss(*sides, LossSettings(noise_std=1.0), noise_seed=7)
    again = aligned_distillation_loss(*sides, LossSettings(noise_std=1.0), noise_seed=7, chunk_size=2)
    assert noisy.ce_loss == clean.ce_loss and noisy.kd_loss != clean.kd_loss
    torch.testing.assert_close(noisy.kd_loss, again.kd_loss, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="noise_seed"):
        aligned_distillation_loss(*sides, LossSettings(noise_std=1.0))


def trl_uld(merge="observed", beta=1.0, tokenizers=(None, None)):
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False, use_extended_uld=False,
        uld_token_merge_strategy=merge, uld_use_hybrid_loss=tokenizers[0] is not None,
        uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=beta)
    return ULDLoss(config, student_tokenizer=tokenizers[0], teacher_tokenizer=tokenizers[1])


@pytest.mark.parametrize("merge", ["observed", "bayesian"])
@pytest.mark.parametrize("hybrid", [False, True])
def test_merged_groups_and_the_hybrid_equal_trls(merge, hybrid):
    """On one real pair of tokenizations (the demo's BPE student, WordPiece teacher), TRL merges each group of the
    same alignment and scores the merged rows; ours, with kd_weight=1 and N set to the group count, is TRL's
    per-sequence mean."""
    tokenizers = demo_tokenizer("bpe"), demo_tokenizer("wordpiece")
    text = "It is 42, the café said: x = 3.14 (twice)!"
    student = tokenizers[0](text, add_special_tokens=False, return_offsets_mapping=True)
    teacher = tokenizers[1](text, add_special_tokens=False, return_offsets_mapping=True)
    groups = aligned_groups(student["offset_mapping"], teacher["offset_mapping"])
    assert any(len(s) > 1 or len(t) > 1 for s, t in groups)
    generator = torch.Generator().manual_seed(3)
    vocab = len(tokenizers[0]), len(tokenizers[1])
    student_hidden = torch.randn(1, len(student["input_ids"]), 8, generator=generator, dtype=torch.float64)
    teacher_hidden = torch.randn(1, len(teacher["input_ids"]), 8, generator=generator, dtype=torch.float64)
    student_head = torch.randn(vocab[0], 8, generator=generator, dtype=torch.float64) * 2
    teacher_head = torch.randn(vocab[1], 8, generator=generator, dtype=torch.float64) * 2
    student_labels, teacher_labels = torch.tensor([student["input_ids"]]), torch.tensor([teacher["input_ids"]])
    student_groups = torch.tensor([[g for g, (s, _) in enumerate(groups) for _ in s]])
    teacher_groups = torch.tensor([[g for g, (_, t) in enumerate(groups) for _ in t]])

    loss = trl_uld(merge, beta=0.5, tokenizers=tokenizers if hybrid else (None, None))
    student_probs = F.softmax(student_hidden[0] @ student_head.T, -1)
    teacher_probs = F.softmax(teacher_hidden[0] @ teacher_head.T, -1)
    student_merged = loss._merge_probabilities_with_alignment_groups(
        student_probs, [list(s) for s, _ in groups], student_labels[0])
    teacher_merged = loss._merge_probabilities_with_alignment_groups(
        teacher_probs, [list(t) for _, t in groups], teacher_labels[0])
    if hybrid:
        expected = loss._compute_hybrid_uld_loss(student_merged, teacher_merged)
    else:  # TRL's sorted L1 of the merged rows (`__call__`'s non-hybrid branch), per group
        width = max(vocab)
        student_sorted = F.pad(student_merged.sort(-1, descending=True).values, (0, width - vocab[0]))
        teacher_sorted = F.pad(teacher_merged.sort(-1, descending=True).values, (0, width - vocab[1]))
        expected = F.l1_loss(student_sorted, teacher_sorted, reduction="sum") / len(groups)
    ours = aligned_distillation_loss(
        Side(student_hidden, (student_head, None), student_labels, student_groups),
        Side(teacher_hidden, (teacher_head, None), teacher_labels, teacher_groups), LossSettings(kd_weight=1.0),
        AlignedSettings(distance="hybrid" if hybrid else "uld", merge=merge, matched_beta=0.5),
        shared_ids=shared_token_ids(*tokenizers), num_items_in_batch=len(groups), chunk_size=4)
    assert ours.num_pairs == len(groups)
    torch.testing.assert_close(ours.loss, expected.to(ours.loss.dtype).reshape(()), rtol=1e-6, atol=1e-8)
    assert ours.loss > 0


def test_no_vocabulary_sized_tensor_is_kept_for_the_backward():
    """What the forward leaves for the backward is each chunk's inputs and the gradients it already took: nothing of
    `[rows, V]` size survives to the backward, however many rows the batch has (a chunk's logits and sorts live and
    die inside its own step)."""
    inputs = list(batch(student_vocab=4000, teacher_vocab=3000))
    inputs[0].requires_grad_()
    inputs[1].requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = aligned_distillation_loss(Side(inputs[0], (inputs[1], None), inputs[2], inputs[3]),
                                        Side(inputs[4], (inputs[5], None), inputs[6], inputs[7]), LossSettings(),
                                        chunk_size=2)
    gc.collect()
    alive = [ref() for ref in saved if ref() is not None]
    rows = int((inputs[2] != -100).sum())
    # Besides the head and its gradient (one head's size each), the hidden rows and scalars: less than one
    # [rows, V] buffer all together (without the chunking every chunk's logits and probabilities would stay).
    kept = sum(tensor.numel() for tensor in {id(t): t for t in alive}.values() if tensor.numel() != inputs[1].numel())
    assert rows > 10 and kept < rows * 4000 / 4
    out.loss.backward()
    assert inputs[1].grad.abs().sum() > 0 and inputs[0].grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# The teacher as sparse targets at its own label tokens (a teacher cache of the teacher's tokenization)

def sparse_teacher(teacher_logits, teacher_labels, k, temperature):
    """`SparseSide` of full teacher logits `[B, T, V_T]`: the top k at each label token, the tail at `temperature`
    and each label's log-probability, as a cache pass writes them (unquantised)."""
    mask = teacher_labels != -100
    rows = teacher_logits[mask].float()
    targets = top_k_targets(rows, k, temperature)
    label_log_probs = rows.log_softmax(-1).gather(1, teacher_labels[mask][:, None])[:, 0]
    return targets._replace(label_log_probs=label_log_probs)


def reconstructed_teacher_logits(targets, labels, vocab, temperature):
    """The teacher a top-k target with its label describes, written out a row at a time: the k tempered probabilities
    scaled to 1 − B_T, the label's own (tempered by the same scale) where it is not among the k, B_T shared evenly by
    the other tokens, renormalised; returned as `T · log p` so that the reference's softmax at T gives it back."""
    rows = []
    for i in range(targets.ids.size(0)):
        ids, k = targets.ids[i].tolist(), targets.ids.size(1)
        tail = targets.tail_log_mass[i] if temperature == 1 else targets.tempered_tail_log_mass[i]
        tempered = (targets.log_probs[i].double() / temperature).exp()
        scale = (1 - tail.double().exp()) / tempered.sum()
        probs = torch.full((vocab,), float(tail.double().exp()) / max(1, vocab - k), dtype=torch.float64)
        probs[ids] = tempered * scale
        label = int(labels[i])
        if label not in ids:
            probs[label] = (targets.label_log_probs[i].double() / temperature).exp() * scale
        rows.append(temperature * (probs / probs.sum()).log())
    return torch.stack(rows)


@pytest.mark.parametrize("k", [5, 56])
@pytest.mark.parametrize("settings, aligned", CASES)
def test_a_sparse_teacher_equals_the_reference_of_the_teacher_it_describes(settings, aligned, k):
    """Values and gradients against the full-logits reference whose teacher is the one the top-k targets describe
    (written out row by row); at k = V_T (56) that teacher is the model's own distribution."""
    (student_hidden, student_head, student_labels, student_groups,
     teacher_hidden, teacher_head, teacher_labels, teacher_groups) = batch()
    settings, aligned = LossSettings(**settings), AlignedSettings(**aligned)
    shared = (torch.tensor([0, 3, 5, 7, 11]), torch.tensor([2, 3, 50, 9, 1]))
    seed = 1234 if settings.noise_std else None
    targets = sparse_teacher(teacher_hidden @ teacher_head.T, teacher_labels, k, settings.temperature)
    assert k == 56 or not all(int(y) in row for y, row in zip(teacher_labels[teacher_labels != -100],
                                                               targets.ids.tolist()))  # some labels outside the k

    student_hidden.requires_grad_()
    student_head.requires_grad_()
    out = aligned_distillation_loss(
        Side(student_hidden, (student_head, None), student_labels, student_groups),
        SparseSide(targets, teacher_labels, teacher_groups, 56), settings, aligned, shared_ids=shared, chunk_size=3,
        noise_seed=seed)
    grads = torch.autograd.grad(out.loss, (student_hidden, student_head))

    mask = teacher_labels != -100
    teacher_logits = torch.zeros(*teacher_labels.shape, 56, dtype=torch.float64)
    teacher_logits[mask] = reconstructed_teacher_logits(targets, teacher_labels[mask], 56, settings.temperature)
    if k == 56:  # the whole vocabulary: the model's own logits, up to a constant per row
        exact = teacher_hidden @ teacher_head.T
        torch.testing.assert_close(F.softmax(teacher_logits[mask] / settings.temperature, -1),
                                   F.softmax(exact[mask] / settings.temperature, -1), rtol=1e-5, atol=1e-7)
    hidden_ref = student_hidden.detach().clone().requires_grad_()
    head_ref = student_head.detach().clone().requires_grad_()
    expected, ce, kd = reference_loss(hidden_ref @ head_ref.T, teacher_logits, student_labels, teacher_labels,
                                      student_groups, teacher_groups, settings, aligned, shared, seed)
    expected_grads = torch.autograd.grad(expected, (hidden_ref, head_ref))
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.kd_loss, kd, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_a_sparse_teacher_is_refused_without_what_it_needs():
    inputs = batch()
    student = Side(inputs[0], (inputs[1], None), inputs[2], inputs[3])
    targets = sparse_teacher(inputs[4] @ inputs[5].T, inputs[6], 5, 2.0)
    side = SparseSide(targets, inputs[6], inputs[7], 56)
    with pytest.raises(ValueError, match="label_log_probs"):
        aligned_distillation_loss(student, side._replace(targets=targets._replace(label_log_probs=None)),
                                  LossSettings())
    with pytest.raises(ValueError, match="top_k"):
        aligned_distillation_loss(student, side._replace(targets=targets._replace(kind="sampled")), LossSettings())
