"""Several teachers at once in the engine (`mixture_distillation_terms`), against independent references: two
identical teachers at 0.5/0.5 are one teacher; a weighted mixture is the readable reference on the mixed distribution;
per-row weights route each row to its teacher; a sparse member with k = V is its dense teacher."""

import pytest
import torch
from test_sparse_targets import _grads  # the same loss-and-gradients helper

from kd_trainers.losses import (DenseMember, LossSettings, SparseMember, chunked_distillation_terms, distillation_loss,
                                mixture_distillation_terms)
from kd_trainers.losses.sparse import top_k_targets


VOCAB, WIDTH, TEACHER_WIDTH = 37, 8, 12
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd"]


def _case(seed=0, batch=3, length=5):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(batch, length, WIDTH, generator=generator)
    student_weight = torch.randn(VOCAB, WIDTH, generator=generator)
    teachers = [(torch.randn(batch, length, TEACHER_WIDTH, generator=generator),
                 scale * torch.randn(VOCAB, TEACHER_WIDTH, generator=generator)) for scale in (0.6, 0.9)]
    labels = torch.randint(0, VOCAB, (batch, length), generator=generator)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return student_hidden, student_weight, teachers, labels


def _reference(student_hidden, student_weight, teacher_log_probs, labels, settings, temperature):
    """The readable reference with a teacher given by its tempered log-probabilities `[B, T, V]` (as logits
    T · log p, whose softmax at T is p)."""
    return _grads(lambda h, w: distillation_loss(
        h @ w.T, temperature * teacher_log_probs, labels, divergence=settings.divergence, temperature=temperature,
        kd_weight=settings.kd_weight), student_hidden, student_weight)


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.loss if hasattr(x, "loss") else x, y.loss if hasattr(y, "loss") else y,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_two_identical_teachers_at_half_weight_are_one_teacher(divergence):
    """Loss, both gradients and the KD term equal one teacher's (with temperature, CE mixing and noise), and each
    member's own KD term is that teacher's."""
    student_hidden, student_weight, [(teacher_hidden, teacher_weight), _], labels = _case()
    settings = LossSettings(divergence=divergence, temperature=2.0, kd_weight=0.7, noise_std=0.5)
    one = _grads(lambda h, w: chunked_distillation_terms(h, (w, None), teacher_hidden, (teacher_weight, None), labels,
                                                         settings, noise_seed=3, chunk_size=4),
                 student_hidden, student_weight)
    member = DenseMember(teacher_hidden, (teacher_weight, None))
    two = _grads(lambda h, w: mixture_distillation_terms(h, (w, None), [member, member], torch.tensor([0.5, 0.5]),
                                                         labels, settings, noise_seed=3, chunk_size=4),
                 student_hidden, student_weight)
    _assert_same(one, two)
    torch.testing.assert_close(two[0].kd_loss, one[0].kd_loss, rtol=1e-5, atol=1e-6)
    clean = chunked_distillation_terms(student_hidden, (student_weight, None), teacher_hidden, (teacher_weight, None),
                                       labels, LossSettings(divergence=divergence, temperature=2.0, kd_weight=0.7))
    # The members' own terms are noise-free (the noise is the mixture's): each is the clean teacher's KD term.
    tokens = (labels != -100).sum()
    assert two[0].member_token_counts.tolist() == [tokens, tokens]
    torch.testing.assert_close(two[0].member_kd_sums / tokens, clean.kd_loss.repeat(2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_weighted_mixture_is_the_reference_on_the_mixed_distribution(divergence):
    student_hidden, student_weight, teachers, labels = _case(seed=1)
    settings = LossSettings(divergence=divergence, temperature=2.0, kd_weight=0.6)
    members = [DenseMember(hidden, (weight, None)) for hidden, weight in teachers]
    mixed = _grads(lambda h, w: mixture_distillation_terms(h, (w, None), members, torch.tensor([0.6, 1.4]), labels,
                                                           settings, chunk_size=5),
                   student_hidden, student_weight)
    probs = [torch.softmax(hidden @ weight.T / 2.0, -1) for hidden, weight in teachers]
    reference = _reference(student_hidden, student_weight, (0.3 * probs[0] + 0.7 * probs[1]).log(), labels, settings,
                           2.0)
    _assert_same(mixed, reference)


def test_per_row_weights_send_each_row_to_its_teacher():
    """Weights [B, M] of 0 and 1: each row's target is its own teacher's distribution, and nothing of the other's."""
    student_hidden, student_weight, teachers, labels = _case(seed=2)
    settings = LossSettings(divergence="reverse_kl", temperature=1.5, kd_weight=0.8)
    members = [DenseMember(hidden, (weight, None)) for hidden, weight in teachers]
    route = torch.tensor([1, 0, 1])
    weights = torch.nn.functional.one_hot(route, 2).float()
    routed = _grads(lambda h, w: mixture_distillation_terms(h, (w, None), members, weights, labels, settings,
                                                            chunk_size=3),
                    student_hidden, student_weight)
    log_probs = [torch.log_softmax(hidden @ weight.T / 1.5, -1) for hidden, weight in teachers]
    chosen = torch.where(route[:, None, None] == 0, log_probs[0], log_probs[1])
    _assert_same(routed, _reference(student_hidden, student_weight, chosen, labels, settings, 1.5))
    valid = labels != -100
    assert routed[0].member_token_counts.tolist() == [valid[route == 0].sum(), valid[route == 1].sum()]


@pytest.mark.parametrize("tail", ["bucket", "spread"])
def test_a_sparse_member_with_the_whole_vocabulary_is_its_dense_teacher(tail):
    """A cache's or a server's top-k (here k = V) mixes as the teacher it came from; the mixture's support is the
    union of its members'."""
    student_hidden, student_weight, teachers, labels = _case(seed=3)
    settings = LossSettings(divergence="jsd", temperature=2.0, kd_weight=0.5)
    (hidden_a, weight_a), (hidden_b, weight_b) = teachers
    mask = labels.reshape(-1) != -100
    targets = top_k_targets((hidden_b @ weight_b.T).reshape(-1, VOCAB)[mask], VOCAB)
    dense = [DenseMember(hidden_a, (weight_a, None)), DenseMember(hidden_b, (weight_b, None))]
    sparse = [DenseMember(hidden_a, (weight_a, None)), SparseMember(targets, tail)]
    weights = torch.tensor([0.25, 0.75])
    _assert_same(_grads(lambda h, w: mixture_distillation_terms(h, (w, None), dense, weights, labels, settings),
                        student_hidden, student_weight),
                 _grads(lambda h, w: mixture_distillation_terms(h, (w, None), sparse, weights, labels, settings),
                        student_hidden, student_weight))


def test_bad_weights_are_refused():
    student_hidden, student_weight, [(hidden, weight), _], labels = _case()
    member = DenseMember(hidden, (weight, None))
    for weights, message in ((torch.tensor([1.0]), "for M = 2"), (torch.tensor([-1.0, 2.0]), "non-negative"),
                             (torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]), "sum to 0")):
        with pytest.raises(ValueError, match=message):
            mixture_distillation_terms(student_hidden, (student_weight, None), [member, member], weights, labels)
