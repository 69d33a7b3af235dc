"""The engine with a sparse teacher (top-k or sampled targets) against independent references: the dense engine when
k = V, the readable reference on the reconstructed teacher (spread tail), the coarsened k + 1 category divergence by
autograd (bucket tail), and the teacher's own distribution as the mean of sampled targets."""

import math

import pytest
import torch

from kd_trainers.losses import (LossSettings, SparseTargets, chunked_distillation_terms, distillation_loss,
                                get_divergence, sparse_distillation_terms)
from kd_trainers.losses.sparse import reconstruct_log_probs, sampled_targets, top_k_targets


VOCAB, WIDTH, TEACHER_WIDTH = 37, 8, 12
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def _case(seed=0, batch=3, length=5):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(batch, length, WIDTH, generator=generator)
    student_weight = torch.randn(VOCAB, WIDTH, generator=generator)
    teacher_hidden = torch.randn(batch, length, TEACHER_WIDTH, generator=generator)
    teacher_weight = 0.6 * torch.randn(VOCAB, TEACHER_WIDTH, generator=generator)
    labels = torch.randint(0, VOCAB, (batch, length), generator=generator)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def _teacher_logits(teacher_hidden, teacher_weight, labels):
    return (teacher_hidden @ teacher_weight.T).reshape(-1, VOCAB)[labels.reshape(-1) != -100]


def _grads(fn, student_hidden, student_weight):
    hidden = student_hidden.clone().requires_grad_(True)
    weight = student_weight.clone().requires_grad_(True)
    out = fn(hidden, weight)
    out.loss.backward()
    return out, hidden.grad, weight.grad


CASES = [(divergence, 0.5) for divergence in DIVERGENCES] + [("forward_kl", 0.0)]  # without noise, forward KL is
# taken against the stored target directly (`sparse_forward_kl_value_and_grad`), with noise through the reconstruction


@pytest.mark.parametrize("divergence,noise", CASES)
@pytest.mark.parametrize("tail", ["bucket", "spread"])
def test_whole_vocabulary_top_k_is_the_dense_engine(divergence, noise, tail):
    """k = V keeps the teacher's whole distribution: the loss and both gradients are the dense engine's, with a
    temperature, CE mixing and teacher-logit noise on."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _case()
    settings = LossSettings(divergence=divergence, temperature=2.0, kd_weight=0.7, noise_std=noise)
    targets = top_k_targets(_teacher_logits(teacher_hidden, teacher_weight, labels), VOCAB)
    dense = _grads(lambda h, w: chunked_distillation_terms(h, (w, None), teacher_hidden, (teacher_weight, None),
                                                           labels, settings, noise_seed=3, chunk_size=4),
                   student_hidden, student_weight)
    sparse = _grads(lambda h, w: sparse_distillation_terms(h, (w, None), targets, labels, settings, tail=tail,
                                                           noise_seed=3, chunk_size=4),
                    student_hidden, student_weight)
    for name in ("loss", "ce_loss", "kd_loss"):
        torch.testing.assert_close(getattr(sparse[0], name), getattr(dense[0], name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sparse[2], dense[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence,noise", CASES)
def test_spread_tail_is_the_reference_loss_on_the_reconstructed_teacher(divergence, noise):
    """Top-8 with the tail spread evenly: the readable reference on the reconstructed teacher (its log-probabilities
    as logits), noise and temperature included; gradients by autograd through the reference."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _case(seed=1)
    settings = LossSettings(divergence=divergence, temperature=1.5, kd_weight=0.6, noise_std=noise)
    targets = top_k_targets(_teacher_logits(teacher_hidden, teacher_weight, labels), 8)
    reconstructed = torch.full((labels.numel(), VOCAB), 0.0)
    reconstructed[labels.reshape(-1) != -100] = reconstruct_log_probs(targets, VOCAB)
    _, hidden_grad, weight_grad = _grads(
        lambda h, w: sparse_distillation_terms(h, (w, None), targets, labels, settings, tail="spread", noise_seed=5,
                                               chunk_size=3), student_hidden, student_weight)
    hidden = student_hidden.clone().requires_grad_(True)
    weight = student_weight.clone().requires_grad_(True)
    reference = distillation_loss(hidden @ weight.T, reconstructed.reshape(*labels.shape, VOCAB), labels,
                                  divergence=divergence, temperature=1.5, kd_weight=0.6, noise_std=noise, noise_seed=5)
    reference.loss.backward()
    out = sparse_distillation_terms(student_hidden, (student_weight, None), targets, labels, settings, tail="spread",
                                    noise_seed=5)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_grad, hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight_grad, weight.grad, rtol=1e-4, atol=1e-6)


def _coarse_reference(student_logits, targets, divergence, temperature, **params):
    """The divergence of both distributions coarsened to the k ids and one tail category, per token, by plain ops."""
    k = targets.ids.size(1)
    student = torch.log_softmax(student_logits / temperature, -1)
    student_top = student.gather(-1, targets.ids)
    student_tail = torch.logsumexp(student.scatter(-1, targets.ids, float("-inf")), -1)
    teacher_top = targets.log_probs / temperature
    teacher_tail = (targets.tail_log_mass - math.log(VOCAB - k)) / temperature + math.log(VOCAB - k)
    teacher = torch.cat([teacher_top, teacher_tail[:, None]], -1)
    teacher = teacher - torch.logsumexp(teacher, -1, keepdim=True)
    return get_divergence(divergence)(torch.cat([student_top, student_tail[:, None]], -1), teacher, **params)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bucket_tail_is_the_divergence_over_k_plus_one_categories(divergence):
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _case(seed=2)
    params = {"jsd": {"jsd_beta": 0.5}, "skew_forward_kl": {"skew_alpha": 0.1},
              "skew_reverse_kl": {"skew_alpha": 0.1}}.get(divergence, {})
    settings = LossSettings(divergence=divergence, temperature=2.0, kd_weight=1.0)
    targets = top_k_targets(_teacher_logits(teacher_hidden, teacher_weight, labels), 6)
    out, hidden_grad, weight_grad = _grads(
        lambda h, w: sparse_distillation_terms(h, (w, None), targets, labels, settings, tail="bucket", chunk_size=4),
        student_hidden, student_weight)
    hidden = student_hidden.clone().requires_grad_(True)
    weight = student_weight.clone().requires_grad_(True)
    mask = labels.reshape(-1) != -100
    logits = (hidden @ weight.T).reshape(-1, VOCAB)[mask]
    reference = 4.0 * _coarse_reference(logits, targets, divergence, 2.0, **params).sum() / mask.sum()
    reference.backward()
    torch.testing.assert_close(out.kd_loss, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_grad, hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight_grad, weight.grad, rtol=1e-4, atol=1e-6)


def test_top_k_error_shrinks_with_k_and_bucket_is_below_the_full_divergence():
    """With fewer ids the loss moves away from the dense one; the bucket value never exceeds it (coarsening)."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _case(seed=3)
    settings = LossSettings(divergence="forward_kl", kd_weight=1.0)
    logits = _teacher_logits(teacher_hidden, teacher_weight, labels)
    dense = chunked_distillation_terms(student_hidden, (student_weight, None), teacher_hidden,
                                       (teacher_weight, None), labels, settings).loss
    errors = []
    for k in (2, 8, 32):
        bucket = sparse_distillation_terms(student_hidden, (student_weight, None), top_k_targets(logits, k), labels,
                                           settings).loss
        assert bucket <= dense + 1e-6
        errors.append(abs(bucket - dense).item())
    assert errors[0] > errors[1] > errors[2]


def test_sampled_targets_average_to_the_teacher_gradient():
    """The gradient of forward KL with a sampled target is unbiased: its mean over independent draws tends to the
    dense gradient, at T = 1."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _case(seed=4, batch=1, length=4)
    settings = LossSettings(divergence="forward_kl", kd_weight=1.0)
    logits = _teacher_logits(teacher_hidden, teacher_weight, labels)
    _, _, dense_grad = _grads(lambda h, w: chunked_distillation_terms(
        h, (w, None), teacher_hidden, (teacher_weight, None), labels, settings), student_hidden, student_weight)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([_grads(lambda h, w: sparse_distillation_terms(
        h, (w, None), sampled_targets(logits, 4, generator), labels, settings), student_hidden, student_weight)[2]
        for _ in range(400)])
    relative_error = lambda grad: ((grad - dense_grad).norm() / dense_grad.norm()).item()  # noqa: E731
    # One draw of 4 tokens is far off; the mean of 400 (1,600 tokens a position) is close: the error shrinks as 1/√n,
    # not towards a bias.
    assert relative_error(draws.mean(0)) < 0.05 < relative_error(draws[0])
    assert relative_error(draws.mean(0)) < relative_error(draws[:100].mean(0))


@pytest.mark.parametrize("noise", [0.0, 0.4])
def test_sampled_target_is_the_reference_loss_on_its_reweighted_draws(noise):
    """At T = 2 the draws are reweighted by p^(1/T − 1) and normalised: the readable reference on that distribution
    (as logits T·log t̂), with CE mixing, equals the engine's, directly (no noise) or reconstructed (noise)."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _case(seed=5)
    targets = sampled_targets(_teacher_logits(teacher_hidden, teacher_weight, labels), 6, torch.Generator().manual_seed(1))
    settings = LossSettings(temperature=2.0, kd_weight=0.6, noise_std=noise)
    target = torch.zeros(labels.numel(), VOCAB)
    target[labels.reshape(-1) != -100] = 2.0 * reconstruct_log_probs(targets, VOCAB, temperature=2.0)
    _, hidden_grad, weight_grad = _grads(lambda h, w: sparse_distillation_terms(
        h, (w, None), targets, labels, settings, noise_seed=2, chunk_size=5), student_hidden, student_weight)
    hidden = student_hidden.clone().requires_grad_(True)
    weight = student_weight.clone().requires_grad_(True)
    reference = distillation_loss(hidden @ weight.T, target.reshape(*labels.shape, VOCAB), labels, temperature=2.0,
                                  kd_weight=0.6, noise_std=noise, noise_seed=2)
    reference.loss.backward()
    torch.testing.assert_close(hidden_grad, hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight_grad, weight.grad, rtol=1e-4, atol=1e-6)


def test_sampled_targets_are_refused_for_divergences_they_would_bias():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _case()
    targets = sampled_targets(_teacher_logits(teacher_hidden, teacher_weight, labels), 4)
    with pytest.raises(ValueError, match="divergence='reverse_kl' with a sampled teacher cache.*forward_kl"):
        sparse_distillation_terms(student_hidden, (student_weight, None), targets, labels,
                                  LossSettings(divergence="reverse_kl"))


def test_rows_must_match_the_label_tokens():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _case()
    targets = top_k_targets(_teacher_logits(teacher_hidden, teacher_weight, labels), 4)
    with pytest.raises(ValueError, match="has 11 rows for 12 label tokens"):
        sparse_distillation_terms(student_hidden, (student_weight, None), targets.rows(slice(0, 11)), labels)
    assert isinstance(targets, SparseTargets)
