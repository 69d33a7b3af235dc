"""`kd_trainers.losses.uld` (ULD and GOLD's hybrid, one value per aligned position) against TRL's own
`trl.experimental.gold.ULDLoss` on the same inputs, and against the definitions written out element by element."""

from types import SimpleNamespace

import pytest
import torch
from trl.experimental.gold.gold_trainer import ULDLoss

from kd_trainers.data.alignment import shared_token_ids
from kd_trainers.demo.tokenizers import demo_tokenizer
from kd_trainers.losses.uld import hybrid_uld_distance, hybrid_uld_terms, sorted_distance, uld_distance


def trl_uld(hybrid=False, beta=0.5, student_temperature=1.0, teacher_temperature=1.0, tokenizers=(None, None)):
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=student_temperature,
        uld_teacher_temperature=teacher_temperature, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=beta)
    return ULDLoss(config, student_tokenizer=tokenizers[0], teacher_tokenizer=tokenizers[1])


def one_sequence(student_vocab, teacher_vocab, seed=0, prompt=(3, 5), answer=(7, 9)):
    """One sequence a side, with prompts of different lengths masked out of the labels and answers of different
    lengths (TRL's positional ULD compares the first min(7, 9) answer positions)."""
    generator = torch.Generator().manual_seed(seed)
    student_length, teacher_length = prompt[0] + answer[0], prompt[1] + answer[1]
    student_logits = torch.randn(1, student_length, student_vocab, generator=generator) * 3
    teacher_logits = torch.randn(1, teacher_length, teacher_vocab, generator=generator) * 3
    student_labels = torch.randint(0, student_vocab, (1, student_length), generator=generator)
    teacher_labels = torch.randint(0, teacher_vocab, (1, teacher_length), generator=generator)
    student_labels[:, :prompt[0]] = -100
    teacher_labels[:, :prompt[1]] = -100
    rows = min(answer)
    aligned = (student_logits[0, prompt[0]:prompt[0] + rows], teacher_logits[0, prompt[1]:prompt[1] + rows])
    return (student_logits, teacher_logits, student_labels, teacher_labels), aligned


@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 1.0), (1.5, 3.0)])
def test_uld_equals_trls_positional_uld(temperatures):
    inputs, (student, teacher) = one_sequence(50, 80)
    expected = trl_uld(student_temperature=temperatures[0], teacher_temperature=temperatures[1])._compute_distillation_loss(
        *inputs, inputs[2].clamp_min(0), inputs[3].clamp_min(0))
    ours = uld_distance(student, teacher, *temperatures)
    assert ours.shape == (7,)
    torch.testing.assert_close(ours.mean(), expected.reshape(()), rtol=1e-6, atol=1e-6)


def test_the_sorted_distance_written_out():
    student = torch.tensor([[0.1, 0.6, 0.3]])
    teacher = torch.tensor([[0.5, 0.05, 0.25, 0.2]])
    # sorted: [0.6, 0.3, 0.1, 0] against [0.5, 0.25, 0.2, 0.05]
    expected = abs(0.6 - 0.5) + abs(0.3 - 0.25) + abs(0.1 - 0.2) + abs(0 - 0.05)
    torch.testing.assert_close(sorted_distance(student, teacher), torch.tensor([expected]))
    # the same distribution over relabelled tokens is at distance 0, whatever the vocabularies' sizes
    assert sorted_distance(teacher, teacher[:, [2, 0, 3, 1]]).item() == 0


def test_the_gradient_reaches_the_student_and_matches_trls():
    inputs, (student, teacher) = one_sequence(50, 80, seed=1)
    student_logits = inputs[0].clone().requires_grad_()
    expected = trl_uld()._compute_distillation_loss(student_logits, *inputs[1:], inputs[2].clamp_min(0),
                                                      inputs[3].clamp_min(0))
    expected_grad, = torch.autograd.grad(expected.sum(), student_logits)
    rows = student_logits[0, 3:10]
    ours = uld_distance(rows, teacher).mean()
    ours_grad, = torch.autograd.grad(ours, student_logits)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-6, atol=1e-7)
    assert ours_grad.abs().sum() > 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_gold_hybrid_equals_trls_on_the_demo_pair(beta):
    """The demo's BPE (student) and WordPiece (teacher) vocabularies share some token strings: GOLD's exact part on
    them and ULD on the rest, weighted by the shared share of the teacher's vocabulary, as TRL computes it."""
    tokenizers = demo_tokenizer("bpe"), demo_tokenizer("wordpiece")
    student_vocab, teacher_vocab = len(tokenizers[0]), len(tokenizers[1])
    student_shared, teacher_shared = shared_token_ids(*tokenizers)
    assert 0 < student_shared.numel() < min(student_vocab, teacher_vocab)
    inputs, (student, teacher) = one_sequence(student_vocab, teacher_vocab, seed=2)
    expected = trl_uld(hybrid=True, beta=beta, tokenizers=tokenizers)._compute_distillation_loss(
        *inputs, inputs[2].clamp_min(0), inputs[3].clamp_min(0))
    ours = hybrid_uld_distance(student, teacher, student_shared, teacher_shared, beta)
    torch.testing.assert_close(ours.mean(), expected.reshape(()), rtol=1e-5, atol=1e-6)


def test_the_hybrid_parts_written_out():
    """Three student tokens, four teacher tokens; student 0 is teacher 2 and student 2 is teacher 0."""
    student_logits = torch.tensor([[0.5, -1.0, 2.0]])
    teacher_logits = torch.tensor([[1.0, 0.0, -0.5, 0.3]])
    student_shared, teacher_shared = torch.tensor([0, 2]), torch.tensor([2, 0])
    p, q = student_logits.softmax(-1)[0], teacher_logits.softmax(-1)[0]
    beta = 0.3
    shared_p, shared_q = p[[0, 2]], q[[2, 0]]
    mixture = beta * shared_q + (1 - beta) * shared_p
    jsd = beta * (shared_q * (shared_q / mixture).log()).sum() + (1 - beta) * (shared_p * (shared_p / mixture).log()).sum()
    rest_p, rest_q = p[[1]], q[[1, 3]].sort(descending=True).values
    uld = (rest_p[0] - rest_q[0]).abs() + rest_q[1]
    matched, unmatched = hybrid_uld_terms(student_logits, teacher_logits, student_shared, teacher_shared, beta)
    torch.testing.assert_close(matched, jsd.reshape(1))
    torch.testing.assert_close(unmatched, uld.reshape(1))
    torch.testing.assert_close(hybrid_uld_distance(student_logits, teacher_logits, student_shared, teacher_shared, beta),
                               (0.5 * jsd + 0.5 * uld).reshape(1))  # 2 shared of 4 teacher tokens
