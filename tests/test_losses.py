"""The loss engine against an independent, naive reference written here from the definitions.

The naive reference uses only softmax, log and sums over explicit probability tensors, and none of the package's
divergence code, so a shared mistake cannot hide.
"""

import math
import weakref

import pytest
import torch
from kd_trainers.losses.noise import mix_seed

from kd_trainers.losses import (DIVERGENCES, LogitTransform, LossSettings, chunked_distillation_loss,
                                distillation_loss)


def naive_divergence(name, p_s, p_t, beta, alpha):
    """Per-row divergence from probabilities [N, V], straight from the textbook definitions."""
    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)
    if name == "forward_kl":
        return kl(p_t, p_s)
    if name == "reverse_kl":
        return kl(p_s, p_t)
    if name == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if name == "skew_forward_kl":
        return kl(p_t, alpha * p_t + (1 - alpha) * p_s)
    if name == "skew_reverse_kl":
        return kl(p_s, alpha * p_s + (1 - alpha) * p_t)
    if name == "tvd":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    raise AssertionError(name)


def naive_loss(student_logits, teacher_logits, labels, *, divergence, temperature=1.0, beta=0.5, alpha=0.1,
               kd_weight=1.0, temperature_squared=True, ignore_index=-100, num_items=None):
    """Loops over tokens; float64 throughout."""
    z_s = student_logits.reshape(-1, student_logits.size(-1)).double()
    z_t = teacher_logits.reshape(-1, teacher_logits.size(-1)).double()
    labels = labels.reshape(-1)
    ce_total = z_s.new_zeros(())
    kd_total = z_s.new_zeros(())
    count = 0
    for i in range(z_s.size(0)):
        if labels[i] == ignore_index:
            continue
        count += 1
        p = torch.exp(z_s[i]) / torch.exp(z_s[i]).sum()
        ce_total = ce_total - torch.log(p[labels[i]])
        p_s = torch.exp(z_s[i] / temperature) / torch.exp(z_s[i] / temperature).sum()
        p_t = torch.exp(z_t[i] / temperature) / torch.exp(z_t[i] / temperature).sum()
        kd_total = kd_total + naive_divergence(divergence, p_s[None], p_t[None], beta, alpha)[0]
    n = num_items if num_items is not None else max(count, 1)
    kd = kd_total * (temperature**2 if temperature_squared else 1.0) / n
    ce = ce_total / n
    return (1 - kd_weight) * ce + kd_weight * kd, ce, kd


def make_inputs(B=3, T=47, Ds=31, Dt=40, V=123, ignore_index=-100, seed=0, dtype=torch.float32, bias=True):
    """Odd shapes, different hidden sizes, a masked prefix and a masked row."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, Ds, generator=g).to(dtype).requires_grad_(True)
    ht = torch.randn(B, T, Dt, generator=g).to(dtype)
    ws = (torch.randn(V, Ds, generator=g) * 0.3).to(dtype).requires_grad_(True)
    wt = (torch.randn(V, Dt, generator=g) * 0.3).to(dtype)
    bs = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_(True) if bias else None
    bt = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :13] = ignore_index
    labels[1, :] = ignore_index
    return hs, ws, bs, ht, wt, bt, labels


def logits_of(h, w, b):
    z = h @ w.T
    return z + b if b is not None else z


def assert_matches_naive(out, expected, ce, kd, params):
    """Loss, its CE and KD parts, and the gradients w.r.t. `params` all equal the naive reference's."""
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce_loss.double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd_loss.double(), kd, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.loss, params, retain_graph=True)
    naive_grads = torch.autograd.grad(expected, params)
    for got, want in zip(grads, naive_grads):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)


SETTINGS = [(d, t, w) for d in sorted(DIVERGENCES) for t, w in ((1.0, 1.0), (2.0, 0.4))]


@pytest.mark.parametrize("divergence,temperature,kd_weight", SETTINGS)
def test_reference_matches_naive_values_and_gradients(divergence, temperature, kd_weight):
    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    z_s, z_t = logits_of(hs, ws, bs), logits_of(ht, wt, bt)
    out = distillation_loss(z_s, z_t, labels, divergence=divergence, temperature=temperature, kd_weight=kd_weight,
                            jsd_beta=0.3, skew_alpha=0.2)
    expected, ce, kd = naive_loss(z_s, z_t, labels, divergence=divergence, temperature=temperature, beta=0.3,
                                  alpha=0.2, kd_weight=kd_weight)
    assert_matches_naive(out, expected, ce, kd, [hs, ws, bs])


@pytest.mark.parametrize("divergence,temperature,kd_weight", SETTINGS)
def test_chunked_matches_naive_values_and_gradients(divergence, temperature, kd_weight):
    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    settings = LossSettings(divergence=divergence, temperature=temperature, kd_weight=kd_weight, jsd_beta=0.3,
                            skew_alpha=0.2)
    out, _ = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, settings, chunk_size=10)
    expected, ce, kd = naive_loss(logits_of(hs, ws, bs), logits_of(ht, wt, bt), labels, divergence=divergence,
                                  temperature=temperature, beta=0.3, alpha=0.2, kd_weight=kd_weight)
    assert_matches_naive(out, expected, ce, kd, [hs, ws, bs])


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_bf16_matches_fp32_reference(divergence):
    hs, ws, bs, ht, wt, bt, labels = make_inputs(dtype=torch.bfloat16, bias=False, ignore_index=-7)
    settings = LossSettings(divergence=divergence, temperature=2.0, kd_weight=0.5)
    out, _ = chunked_distillation_loss(hs, (ws, None), ht, (wt, None), labels, settings, chunk_size=16,
                                       ignore_index=-7)
    hs32, ws32 = hs.detach().float().requires_grad_(True), ws.detach().float().requires_grad_(True)
    ref = distillation_loss(hs32 @ ws32.T, ht.float() @ wt.float().T, labels, divergence=divergence,
                            temperature=2.0, kd_weight=0.5, ignore_index=-7)
    torch.testing.assert_close(out.loss.float(), ref.loss, rtol=2e-2, atol=2e-2)
    got = torch.autograd.grad(out.loss, [hs, ws])
    want = torch.autograd.grad(ref.loss, [hs32, ws32])
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-3)


def test_non_default_ignore_index_and_chunk_sizes_agree():
    hs, ws, bs, ht, wt, bt, labels = make_inputs(ignore_index=-1)
    settings = LossSettings(divergence="forward_kl", temperature=1.5, kd_weight=0.7)
    results = []
    for chunk in (1, 7, 64, 1000):
        out, correct = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, settings, chunk_size=chunk,
                                                 ignore_index=-1)
        results.append((out.loss, torch.autograd.grad(out.loss, hs)[0], correct))
    expected, _, _ = naive_loss(logits_of(hs, ws, bs), logits_of(ht, wt, bt), labels, divergence="forward_kl",
                                temperature=1.5, kd_weight=0.7, ignore_index=-1)
    for loss, grad, correct in results:
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1])
        assert correct == results[0][2]
    mask = labels != -1
    assert results[0][2] == (logits_of(hs, ws, bs).argmax(-1)[mask] == labels[mask]).sum()


def test_num_items_in_batch_gives_exact_gradient_accumulation():
    """Two halves normalised by the global count sum to the loss of the whole batch."""
    hs, ws, bs, ht, wt, bt, labels = make_inputs(B=4)
    settings = LossSettings(divergence="reverse_kl", temperature=2.0, kd_weight=0.5)
    whole, _ = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, settings)
    total = int((labels != -100).sum())
    parts = [chunked_distillation_loss(hs[i:i + 2], (ws, bs), ht[i:i + 2], (wt, bt), labels[i:i + 2], settings,
                                       num_items_in_batch=total)[0].loss for i in (0, 2)]
    torch.testing.assert_close(parts[0] + parts[1], whole.loss)
    torch.testing.assert_close(torch.autograd.grad(parts[0] + parts[1], ws)[0], torch.autograd.grad(whole.loss, ws)[0])


def test_all_masked_batch_gives_zero_not_nan():
    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    labels[:] = -100
    for divergence in DIVERGENCES:
        out, correct = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, LossSettings(divergence=divergence))
        ref = distillation_loss(logits_of(hs, ws, bs), logits_of(ht, wt, bt), labels, divergence=divergence)
        assert out.loss.item() == 0.0 and ref.loss.item() == 0.0 and correct.item() == 0
        grad = torch.autograd.grad(out.loss, hs)[0]
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_equals_trl_generalized_jsd(beta):
    from trl.experimental.gkd import GKDTrainer

    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    z_s, z_t = logits_of(hs, ws, bs), logits_of(ht, wt, bt)
    trl_loss = GKDTrainer.generalized_jsd_loss(z_s, z_t, labels=labels, beta=beta)
    ours = distillation_loss(z_s, z_t, labels, divergence="jsd", jsd_beta=beta, kd_weight=1.0)
    torch.testing.assert_close(ours.loss, trl_loss, rtol=1e-5, atol=1e-6)


def test_temperature_squared_is_a_setting():
    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    z_s, z_t = logits_of(hs, ws, bs), logits_of(ht, wt, bt)
    scaled = distillation_loss(z_s, z_t, labels, temperature=3.0, temperature_squared=True)
    unscaled = distillation_loss(z_s, z_t, labels, temperature=3.0, temperature_squared=False)
    torch.testing.assert_close(scaled.kd_loss, 9.0 * unscaled.kd_loss)


def position_keyed_noise(shape, seed):
    """The noise of `kd_trainers.losses.noise`, rebuilt independently: row (b, t) from its own seeded generator."""
    B, T, V = shape
    noise = torch.empty(B, T, V)
    for b in range(B):
        for t in range(T):
            noise[b, t] = torch.randn(V, generator=torch.Generator().manual_seed(mix_seed(seed, b, t)))
    return noise


def test_teacher_noise_is_keyed_to_positions_not_chunks_or_masks():
    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    z_s, z_t = logits_of(hs, ws, bs).detach(), logits_of(ht, wt, bt)
    settings = LossSettings(divergence="forward_kl", temperature=2.0, noise_std=2.0)

    def run(seed, chunk, labels=labels):
        return chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, settings, chunk_size=chunk,
                                         noise_seed=seed)[0].loss

    assert run(1, 10) == run(1, 10)
    assert run(1, 10) != run(2, 10)
    clean = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, LossSettings(temperature=2.0))[0].loss
    assert run(1, 10) != clean
    # Any chunk size draws the same noise at the same token (a run resumed with another loss_chunk_size).
    for chunk in (1, 7, 1000):
        torch.testing.assert_close(run(1, chunk), run(1, 10), rtol=1e-6, atol=1e-7)
    # Rebuilt independently, position by position, for two different masks: masking other tokens changes nothing.
    noisy = z_t + 2.0 * position_keyed_noise(z_t.shape, 1)
    other_labels = labels.clone()
    other_labels[0, -5:] = -100
    other_labels[1, 20:30] = -100
    for these in (labels, other_labels):
        mask = these.reshape(-1) != -100
        expected, _, _ = naive_loss(z_s.reshape(-1, z_s.size(-1))[mask], noisy.reshape(-1, z_t.size(-1))[mask],
                                    these.reshape(-1)[mask], divergence="forward_kl", temperature=2.0)
        torch.testing.assert_close(run(1, 10, these).double(), expected, rtol=1e-5, atol=1e-6)
    # The reference draws the same noise from the same seed.
    ref = distillation_loss(z_s, z_t, labels, temperature=2.0, noise_std=2.0, noise_seed=1)
    torch.testing.assert_close(ref.loss, distillation_loss(z_s, noisy, labels, temperature=2.0).loss)
    torch.testing.assert_close(ref.loss, run(1, 10), rtol=1e-5, atol=1e-6)


def test_accumulated_batch_without_label_tokens_gives_zero_not_nan():
    """num_items_in_batch=0 (no label token in the whole accumulated batch): loss 0 and zero gradients, as SFTTrainer."""
    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    masked = torch.full_like(labels, -100)
    out, _ = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), masked, LossSettings(kd_weight=0.5),
                                       num_items_in_batch=0)
    (grad,) = torch.autograd.grad(out.loss, hs)
    assert out.loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    ref = distillation_loss(logits_of(hs, ws, bs), logits_of(ht, wt, bt), masked, num_items_in_batch=0)
    assert ref.loss.item() == 0.0


def test_beta_and_alpha_are_checked_only_where_a_divergence_reads_them():
    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    z_s, z_t = logits_of(hs, ws, bs), logits_of(ht, wt, bt)
    plain = distillation_loss(z_s, z_t, labels, divergence="forward_kl")
    torch.testing.assert_close(distillation_loss(z_s, z_t, labels, divergence="forward_kl", jsd_beta=0.0).loss,
                               plain.loss)
    torch.testing.assert_close(distillation_loss(z_s, z_t, labels, divergence="forward_kl", skew_alpha=1.0).loss,
                               plain.loss)
    with pytest.raises(ValueError, match=r"jsd_beta must be in \(0, 1\)"):
        distillation_loss(z_s, z_t, labels, divergence="jsd", jsd_beta=0.0)
    with pytest.raises(ValueError, match=r"skew_alpha must be in \[0, 1\)"):
        distillation_loss(z_s, z_t, labels, divergence="skew_reverse_kl", skew_alpha=1.0)


def test_a_new_divergence_is_one_function_and_its_own_setting():
    """A divergence registered with a setting of its own (here a power divergence, Σ p_T·(p_T/p_S)^γ − 1 scaled) gets
    that setting by name in both the reference and the chunked engine, is checked by its registration, and no
    divergence is handed a setting it does not declare."""
    from kd_trainers.losses import register_divergence

    def power(p_s, p_t, gamma):  # independent: from probabilities
        return ((p_t * (p_t / p_s) ** gamma).sum(-1) - 1.0) / (gamma * (gamma + 1.0))

    @register_divergence("test_power", checks={"gamma": (lambda g: g > 0, "> 0")})
    def test_power(student_log_probs, teacher_log_probs, *, gamma):
        log_ratio = teacher_log_probs - student_log_probs
        return ((teacher_log_probs + gamma * log_ratio).exp().sum(-1) - 1.0) / (gamma * (gamma + 1.0))

    try:
        hs, ws, bs, ht, wt, bt, labels = make_inputs()
        z_s, z_t = logits_of(hs, ws, bs), logits_of(ht, wt, bt)
        mask = labels.reshape(-1) != -100
        p_s = torch.softmax(z_s.reshape(-1, z_s.size(-1)).float() / 2.0, -1)
        p_t = torch.softmax(z_t.reshape(-1, z_t.size(-1)).float() / 2.0, -1)
        expected = 4.0 * power(p_s, p_t, 0.5)[mask].sum() / mask.sum()
        ref = distillation_loss(z_s, z_t, labels, divergence="test_power", temperature=2.0, gamma=0.5)
        torch.testing.assert_close(ref.kd_loss, expected)
        settings = LossSettings(divergence="test_power", temperature=2.0, other_divergence_settings=(("gamma", 0.5),))
        out, _ = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, settings, chunk_size=7)
        torch.testing.assert_close(out.kd_loss, expected)
        with pytest.raises(ValueError, match=r"gamma must be > 0, got -1.0"):
            LossSettings(divergence="test_power", other_divergence_settings=(("gamma", -1.0),))
        with pytest.raises(ValueError, match=r"'test_power' needs the setting\(s\) gamma"):
            LossSettings(divergence="test_power")
        assert LossSettings(divergence="forward_kl").divergence_params() == {}
        assert LossSettings(divergence="jsd", jsd_beta=0.2).divergence_params() == {"jsd_beta": 0.2}
    finally:
        DIVERGENCES.pop("test_power")


def test_vocab_size_slices_padded_heads():
    """Heads with padding rows (Qwen2.5 0.5B vs 7B) are distilled over the shared vocabulary only."""
    hs, ws, bs, ht, wt, bt, labels = make_inputs(V=100, bias=False)
    padded_teacher = torch.cat([wt, torch.randn(28, wt.size(1))])
    out, _ = chunked_distillation_loss(hs, (ws, None), ht, (padded_teacher, None), labels, LossSettings())
    expected, _, _ = naive_loss(hs @ ws.T, ht @ wt.T, labels, divergence="forward_kl")
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"vocab_size=101 exceeds an output head \(100 student rows, 128 teacher rows\)"):
        chunked_distillation_loss(hs, (ws, None), ht, (padded_teacher, None), labels, LossSettings(), vocab_size=101)


def test_logit_softcapping_and_scale_match_naive():
    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    transform = LogitTransform(scale=0.5, softcap=3.0)
    settings = LossSettings(divergence="forward_kl", kd_weight=0.6, temperature=2.0)
    out, _ = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, settings, student_transform=transform,
                                       teacher_transform=transform, chunk_size=8)

    def capped(z):
        return 3.0 * torch.tanh(0.5 * z / 3.0)

    expected, _, _ = naive_loss(capped(logits_of(hs, ws, bs)), capped(logits_of(ht, wt, bt)), labels,
                                divergence="forward_kl", kd_weight=0.6, temperature=2.0)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(out.loss, hs, retain_graph=True)[0].double(), torch.autograd.grad(expected, hs)[0].double(),
                               rtol=1e-4, atol=1e-6)


def test_frozen_student_head_gets_no_weight_gradient():
    hs, ws, bs, ht, wt, bt, labels = make_inputs(bias=False)
    frozen = ws.detach()
    out, _ = chunked_distillation_loss(hs, (frozen, None), ht, (wt, None), labels, LossSettings())
    (grad,) = torch.autograd.grad(out.loss, hs)
    expected, _, _ = naive_loss(hs @ frozen.T, ht @ wt.T, labels, divergence="forward_kl")
    torch.testing.assert_close(grad.double(), torch.autograd.grad(expected, hs)[0].double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"divergence": "kl"}, "Unknown divergence 'kl'. Choose one of: forward_kl, jsd, reverse_kl, skew_forward_kl, "
                           "skew_reverse_kl, tvd."),
    ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0."),
    ({"temperature": math.inf}, "temperature must be a finite number > 0, got inf."),
    ({"divergence": "jsd", "jsd_beta": 1.0}, "jsd_beta must be in (0, 1) (0 and 1 make the JSD vanish), got 1.0."),
    ({"divergence": "skew_forward_kl", "skew_alpha": 1.0},
     "skew_alpha must be in [0, 1) (1 makes the skewed KL vanish), got 1.0."),
    ({"noise_std": -1.0}, "noise_std must be a finite number >= 0, got -1.0."),
    ({"kd_weight": 1.5}, "kd_weight must be in [0, 1], got 1.5."),
])
def test_bad_settings_fail_with_exact_messages(kwargs, message):
    with pytest.raises(ValueError) as error:
        LossSettings(**kwargs)
    assert str(error.value) == message


def test_mismatched_logit_shapes_fail_clearly():
    with pytest.raises(ValueError, match=r"student_logits \(2, 5\) and teacher_logits \(2, 6\) must have the same shape"):
        distillation_loss(torch.zeros(2, 5), torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))


CLOSED_FORM_CASES = [
    # (temperature, kd_weight, teacher_temperature, student transform, gate)
    (1.0, 1.0, 1.0, LogitTransform(), False),
    (2.0, 0.4, 1.0, LogitTransform(), False),
    (1.0, 0.7, 2.0, LogitTransform(scale=0.5), True),
    (3.0, 1.0, 1.0, LogitTransform(scale=1.3, softcap=4.0), False),
    (0.5, 0.2, 1.0, LogitTransform(softcap=2.5), True),
]


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("case", range(len(CLOSED_FORM_CASES)))
@pytest.mark.parametrize("sharpness", [1.0, 25.0])  # 25: near one-hot rows, log-probabilities far below -100
def test_every_divergence_has_a_closed_form_equal_to_autograd(divergence, case, sharpness):
    """Each divergence's in-place closed-form chunk gradient (with CE mixing, T, the teacher temperature, the KD gate
    and the student's logit scale or softcap) equals autograd's on the same chunk, computed in float64."""
    from kd_trainers.losses.chunk_terms import autograd_value_and_grad, closed_form_value_and_grad
    from kd_trainers.losses.settings import working_buffers

    temperature, weight, teacher_temperature, transform, gated = CLOSED_FORM_CASES[case]
    settings = LossSettings(divergence=divergence, temperature=temperature, kd_weight=weight, jsd_beta=0.3,
                            skew_alpha=0.2, teacher_temperature=teacher_temperature)
    g = torch.Generator().manual_seed(case)
    n, vocab = 9, 301
    raw = torch.randn(n, vocab, generator=g) * sharpness
    teacher = transform(torch.randn(n, vocab, generator=g) * sharpness)
    labels = torch.randint(0, vocab, (n,), generator=g)
    gate = (torch.rand(n, generator=g) > 0.4).float() if gated else None
    buffers = working_buffers(settings, transform)
    work = [torch.empty(n, vocab) for _ in range(buffers - 2)]
    ce, kd, grad, factor = closed_form_value_and_grad(raw.clone(), teacher.clone(), labels, settings, transform, work,
                                                      gate)
    grad = grad * factor
    want_ce, want_kd, want_grad = autograd_value_and_grad(raw.double(), teacher.double(), labels, settings, transform,
                                                          None if gate is None else gate.double())
    # fp32 against float64: log-probabilities of size ~sharpness carry rounding of ~1e-7 of that size
    torch.testing.assert_close(ce.double(), want_ce, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kd.double(), want_kd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6 * sharpness)
    assert torch.isfinite(grad).all()


def test_autograd_path_still_serves_a_divergence_without_a_closed_form():
    """A registered divergence without `closed_form` goes through autograd, chunk by chunk, and matches the naive loss
    (a copy of forward KL under another name)."""
    from kd_trainers.losses import register_divergence
    from kd_trainers.losses.settings import working_buffers
    from kd_trainers.losses.divergences import AUTOGRAD_BUFFERS

    @register_divergence("test_plain_kl")
    def test_plain_kl(student_log_probs, teacher_log_probs):
        return (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)

    try:
        hs, ws, bs, ht, wt, bt, labels = make_inputs()
        settings = LossSettings(divergence="test_plain_kl", temperature=2.0, kd_weight=0.4)
        assert working_buffers(settings) == 3 + AUTOGRAD_BUFFERS
        out, _ = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, settings, chunk_size=6)
        expected, ce, kd = naive_loss(logits_of(hs, ws, bs), logits_of(ht, wt, bt), labels, divergence="forward_kl",
                                      temperature=2.0, kd_weight=0.4)
        assert_matches_naive(out, expected, ce, kd, [hs, ws, bs])
    finally:
        DIVERGENCES.pop("test_plain_kl")


# ---------------------------------------------------------------------------------------------------------------------
# Chunks sized by a memory budget, and the memory a chunk really uses


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_values_and_gradients_do_not_depend_on_chunk_size_or_budget(divergence):
    """Every divergence's loss and gradients equal the naive reference whether the chunks are set by a token count
    (1, 7, all) or by a memory budget (one token, a few, all of them)."""
    from kd_trainers.losses.settings import chunk_rows, working_buffers

    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    settings = LossSettings(divergence=divergence, temperature=2.0, kd_weight=0.6, jsd_beta=0.3, skew_alpha=0.2)
    expected, ce, kd = naive_loss(logits_of(hs, ws, bs), logits_of(ht, wt, bt), labels, divergence=divergence,
                                  temperature=2.0, beta=0.3, alpha=0.2, kd_weight=0.6)
    row_bytes = working_buffers(settings) * ws.size(0) * 4
    budgets_mb = [row_bytes / 2**20, 5 * row_bytes / 2**20, 1000.0]  # 1 token, 5 tokens, every token
    assert [chunk_rows(ws.size(0), working_buffers(settings), b) for b in budgets_mb[:2]] == [1, 5]
    for sizing in [{"chunk_size": 1}, {"chunk_size": 7}, {"chunk_size": 10**6},
                   *({"memory_budget_mb": budget} for budget in budgets_mb)]:
        out, _ = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, settings, **sizing)
        torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(out.loss, [hs, ws, bs])
        for got, want in zip(grads, torch.autograd.grad(expected, [hs, ws, bs], retain_graph=True)):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)


class _LargeAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Watches the tensors of at least `threshold` elements that operations create: `count` of fresh ones (outputs
    whose storage is none of the operation's inputs': an `out=` or in-place result is not fresh, a view shares its
    base's storage) and `peak`, the most of them alive at once (storages are tracked by weak reference, so one saved
    for the backward counts as alive)."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold, self.count, self.peak, self.alive = threshold, 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        known = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        for out in torch.utils._pytree.tree_leaves(result):
            if isinstance(out, torch.Tensor) and out.numel() >= self.threshold \
                    and out.untyped_storage().data_ptr() not in known:
                self.count += 1
                self.alive[out.untyped_storage().data_ptr()] = weakref.ref(out.untyped_storage())
        self.alive = {key: ref for key, ref in self.alive.items() if ref() is not None}
        self.peak = max(self.peak, len(self.alive))
        return result


MEMORY_CASES = [(d, t, w, transform) for d in sorted(DIVERGENCES)
                for t, w, transform in ((1.0, 1.0, LogitTransform()), (2.0, 0.5, LogitTransform(softcap=5.0)))]


@pytest.mark.parametrize("divergence,temperature,kd_weight,transform", MEMORY_CASES)
def test_a_chunk_works_in_its_budgeted_buffers_whatever_the_divergence(divergence, temperature, kd_weight, transform):
    """The engine creates exactly `working_buffers` vocabulary-sized tensors for the whole loss, forward and backward
    (every chunk reuses them), and they fit the memory budget: the loss's working memory is the budget whatever the
    divergence, the vocabulary or the number of tokens."""
    from kd_trainers.losses.settings import working_buffers

    hs, ws, bs, ht, wt, bt, labels = make_inputs(T=80, Ds=8, Dt=9, V=1000)  # [V, D] below the threshold
    settings = LossSettings(divergence=divergence, temperature=temperature, kd_weight=kd_weight, jsd_beta=0.3,
                            skew_alpha=0.2)
    buffers = working_buffers(settings, transform)
    assert 3 <= buffers <= 5
    budget_mb = 10 * buffers * 1000 * 4 / 2**20  # room for 10 tokens a chunk; the batch has 114 label tokens
    with _LargeAllocations(threshold=10 * 1000) as allocations:
        out, _ = chunked_distillation_loss(hs, (ws, bs), ht, (wt, bt), labels, settings, memory_budget_mb=budget_mb,
                                           student_transform=transform, teacher_transform=transform)
        out.loss.backward()
    assert allocations.count == buffers
    assert torch.isfinite(ws.grad).all() and ws.grad.abs().sum() > 0


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_builtin_autograd_forms_stay_within_the_autograd_buffer_allowance(divergence):
    """`AUTOGRAD_BUFFERS` sizes the chunks of a divergence that has no closed form; the built-in divergences' autograd
    forms (the same functions, through autograd) never hold more vocabulary-sized tensors at once than it allows, so
    it is a true bound for a divergence of their kind."""
    from kd_trainers.losses.chunk_terms import autograd_value_and_grad
    from kd_trainers.losses.divergences import AUTOGRAD_BUFFERS

    settings = LossSettings(divergence=divergence, temperature=2.0, kd_weight=0.5, jsd_beta=0.3, skew_alpha=0.2)
    g = torch.Generator().manual_seed(0)
    raw, teacher = torch.randn(6, 500, generator=g), torch.randn(6, 500, generator=g)
    with _LargeAllocations(threshold=6 * 500) as allocations:
        autograd_value_and_grad(raw, teacher, torch.randint(0, 500, (6,), generator=g), settings, LogitTransform())
    assert 4 <= allocations.peak <= AUTOGRAD_BUFFERS


def test_a_second_backward_is_refused_clearly_and_the_head_gradient_is_handed_over():
    """The gradients built in the forward go to autograd once, as the parameter's .grad itself (no [V, D] copy); a
    replay with retain_graph gets an error saying so, not a silent zero or a stale gradient."""
    hs, ws, bs, ht, wt, bt, labels = make_inputs(bias=False)
    head = torch.nn.Parameter(ws.detach().clone())
    out, _ = chunked_distillation_loss(hs, (head, None), ht, (wt, None), labels, LossSettings())
    handed = out.loss.grad_fn.gradients[1].data_ptr()
    out.loss.backward(retain_graph=True)
    assert head.grad.data_ptr() == handed
    with pytest.raises(RuntimeError, match="already backpropagated.*Compute the loss again"):
        out.loss.backward()


class _MatrixProducts(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        return func(*args, **(kwargs or {}))


def test_no_gradient_is_built_under_no_grad():
    """Evaluation runs the loss under torch.no_grad(): the same values, and only the two projections a chunk (the
    gradient's two products are skipped)."""
    hs, ws, bs, ht, wt, bt, labels = make_inputs(bias=False)
    settings = LossSettings(divergence="jsd", temperature=2.0, kd_weight=0.5)
    with _MatrixProducts() as training:
        out, _ = chunked_distillation_loss(hs, (ws, None), ht, (wt, None), labels, settings, chunk_size=10)
    with torch.no_grad(), _MatrixProducts() as evaluation:
        evaluated, _ = chunked_distillation_loss(hs, (ws, None), ht, (wt, None), labels, settings, chunk_size=10)
    chunks = math.ceil(int((labels != -100).sum()) / 10)
    assert (training.count, evaluation.count) == (4 * chunks, 2 * chunks)
    torch.testing.assert_close(evaluated.loss, out.loss)
    assert evaluated.loss.grad_fn is None


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_an_unreported_ce_is_skipped_and_changes_nothing_else(divergence):
    """At kd_weight = 1 the CE only feeds the log; report_ce=False (DSKD's teacher space) skips it, and one buffer at
    T != 1, and leaves the loss and its gradients as they were."""
    from kd_trainers.losses.chunked import chunked_distillation_terms
    from kd_trainers.losses.settings import working_buffers

    hs, ws, bs, ht, wt, bt, labels = make_inputs()
    settings = LossSettings(divergence=divergence, temperature=2.0, kd_weight=1.0)
    assert working_buffers(settings, report_ce=False) == working_buffers(settings) - 1
    full = chunked_distillation_terms(hs, (ws, bs), ht, (wt, bt), labels, settings, chunk_size=9)
    lean = chunked_distillation_terms(hs, (ws, bs), ht, (wt, bt), labels, settings, chunk_size=9, report_ce=False)
    assert full.ce_loss > 0 and lean.ce_loss == 0
    torch.testing.assert_close(lean.loss, full.loss)
    for got, want in zip(torch.autograd.grad(lean.loss, [hs, ws, bs]), torch.autograd.grad(full.loss, [hs, ws, bs])):
        torch.testing.assert_close(got, want)
