"""DSKD (same vocabulary and cross-model attention) against a naive implementation of the spec written here.

The naive version follows `shared/design/DSKD.md` §10 line by line with full `[B, T, V]` logits in float64 and
autograd, its own softmaxes and KL, and detaches exactly where the spec's routing table says. The package's version
(projections + `dual_space_loss` through the chunked engine) must give the same terms, the same total and the same
gradients, and each module's gradient must come from exactly the terms the routing table names.
"""

import math

import pytest
import torch

from kd_trainers.dskd.cross_model_attention import cross_model_attention, same_vocabulary_projection
from kd_trainers.dskd.projectors import DSKDProjectors
from kd_trainers.losses import LossSettings, dual_space_loss

IGNORE = -100


def kl(p_log, q_log):
    """KL(p ‖ q) per position from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def log_softmax(z):
    return z - torch.log(torch.exp(z - z.max(-1, keepdim=True).values).sum(-1, keepdim=True)) \
        - z.max(-1, keepdim=True).values


def token_nll(z, labels):
    safe = labels.clamp(min=0)
    return -log_softmax(z).gather(-1, safe[..., None])[..., 0]


def naive_dskd(s, t, P, *, tau, alpha, cma, tau_t=1.0, sigma_noise=None):
    """Returns dict of every term (sums) and the total. `s`/`t` hold hidden, head, embeddings, ids, labels, valid."""
    ms, mt = s["labels"] != IGNORE, t["labels"] != IGNORE
    H_s, H_t = s["hidden"].double(), t["hidden"].double()
    W_s, W_t = s["head"].double(), t["head"].double()
    Zs, Zt = H_s @ W_s.T, H_t @ W_t.T
    q_w, q_b = P.query.weight.double(), P.query.bias.double()
    t2s_w, t2s_b = P.t2s.weight.double(), P.t2s.bias.double()
    s2t_w, s2t_b = P.s2t.weight.double(), P.s2t.bias.double()
    if cma:
        def zid(ids, m):
            return torch.where(m, ids, torch.zeros_like(ids))

        E_s, E_t = s["embed"].double().detach(), t["embed"].double().detach()
        es = torch.cat([E_s[zid(s["ids"], ms)], E_s[zid(s["labels"], ms)]], -1)
        et_tgt = E_t[zid(t["labels"], mt)]
        et = torch.cat([E_t[zid(t["ids"], mt)], et_tgt], -1)

        def std(x, valid):  # one scalar over the real positions (the documented choice)
            return x[valid].std()

        q = es @ q_w.T + q_b
        k = et / std(et, t["valid"])
        v_t = (H_t / std(H_t, t["valid"]) + et_tgt / std(et_tgt, t["valid"])) @ t2s_w.T + t2s_b
        v_s = H_s @ s2t_w.T + s2t_b
        score = q @ k.transpose(-1, -2) / math.sqrt(k.size(-1)) - 1e5 * (1 - (ms[:, :, None] & mt[:, None, :]).double())
        Zt2s = (torch.softmax(score, -1) @ v_t) @ W_s.detach().T
        Zs2t = (torch.softmax(score.transpose(-1, -2), -1) @ v_s) @ W_t.detach().T
        gate = ms & (Zt2s.argmax(-1) == s["labels"])
    else:
        Zt2s = (H_t @ t2s_w.T + t2s_b) @ W_s.detach().T
        Zs2t = (H_s @ s2t_w.T + s2t_b) @ W_t.T
        gate = ms
    ce = (token_nll(Zs, s["labels"]) * ms).sum()
    t2s_ce = (token_nll(Zt2s, s["labels"]) * ms).sum()
    t2s_kd = (kl(log_softmax(Zt2s.detach() / (tau * tau_t)), log_softmax(Zs / tau)) * gate).sum()
    s2t_kd = (kl(log_softmax(Zt / tau), log_softmax(Zs2t / tau)) * mt).sum()
    n = ms.sum()
    total = ((1 - alpha) * ce + alpha * (t2s_ce + t2s_kd + s2t_kd)) / n
    return {"ce": ce / n, "t2s_ce": t2s_ce / n, "t2s_kd": t2s_kd / n, "s2t_kd": s2t_kd / n, "total": total,
            "t2s_correct": ((Zt2s.argmax(-1) == s["labels"]) & ms).sum(),
            "s2t_correct": ((Zs2t.argmax(-1) == t["labels"]) & mt).sum()}


def make_side(g, B, T, D, V, prompt, lengths):
    """Hidden states, head, embeddings, ids, labels (prompt and padding masked), real-position mask."""
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for row, length in enumerate(lengths):
        valid[row, :length] = True
        labels[row, :prompt] = IGNORE
        labels[row, length:] = IGNORE
    return {"hidden": torch.randn(B, T, D, generator=g).requires_grad_(True),
            "head": (torch.randn(V, D, generator=g) * 0.3).requires_grad_(True),
            "embed": torch.randn(V, D, generator=g) * 0.5, "ids": ids, "labels": labels, "valid": valid}


def make_case(cma, seed=0):
    g = torch.Generator().manual_seed(seed)
    Ds, Dt = 12, 20
    s = make_side(g, 3, 11, Ds, 37, prompt=3, lengths=[11, 9, 6])
    if cma:
        t = make_side(g, 3, 14, Dt, 53, prompt=4, lengths=[14, 10, 8])
    else:  # same tokenization: the teacher reads the student's sequence
        t = make_side(g, 3, 11, Dt, 37, prompt=3, lengths=[11, 9, 6])
        t.update(ids=s["ids"], labels=s["labels"], valid=s["valid"])
    torch.manual_seed(seed)
    projectors = DSKDProjectors(Ds, Dt)
    return s, t, projectors


def open_gate(s, P):
    """Make the t2s prediction token 5 everywhere (a large t2s bias along student head row 5) and give a few response
    positions the label 5, so that the CMA gate is open there and shut elsewhere."""
    with torch.no_grad():
        direction = torch.ones(P.t2s.bias.numel()) / P.t2s.bias.numel() ** 0.5
        P.t2s.bias.copy_(6 * direction)
        s["head"][5] += 6 * direction
    s["labels"][0, 3:7] = 5
    s["labels"][2, 4] = 5


def package_dskd(s, t, P, *, tau, alpha, cma, tau_t=1.0, chunk_size=4):
    if cma:
        t2s_hidden, s2t_hidden = cross_model_attention(
            P, s["hidden"], torch.nn.Embedding.from_pretrained(s["embed"]), s["ids"], s["labels"], s["valid"],
            t["hidden"], torch.nn.Embedding.from_pretrained(t["embed"]), t["ids"], t["labels"], t["valid"])
    else:
        t2s_hidden, s2t_hidden = same_vocabulary_projection(P, s["hidden"], t["hidden"])
    settings = LossSettings(temperature=tau, kd_weight=alpha, temperature_squared=False, teacher_temperature=tau_t)
    return dual_space_loss(s["hidden"], (s["head"], None), t2s_hidden, s["labels"], t["hidden"], (t["head"], None),
                           s2t_hidden, t["labels"], settings, gate_t2s_kd=cma, chunk_size=chunk_size)


def grads(loss, params):
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)]


@pytest.mark.parametrize("cma", [False, True])
@pytest.mark.parametrize("tau,alpha,tau_t", [(2.0, 0.5, 1.0), (1.0, 0.3, 1.0), (2.0, 0.5, 1.5)])
def test_every_term_and_the_total_match_the_naive_spec(cma, tau, alpha, tau_t):
    s, t, P = make_case(cma)
    if cma:  # open the gate on some positions, so t2s_KD is not trivially zero
        open_gate(s, P)
    out = package_dskd(s, t, P, tau=tau, alpha=alpha, cma=cma, tau_t=tau_t)
    ref = naive_dskd(s, t, P, tau=tau, alpha=alpha, cma=cma, tau_t=tau_t)
    for name, got in (("ce", out.ce_loss), ("t2s_ce", out.t2s_ce_loss), ("t2s_kd", out.t2s_kd_loss),
                      ("s2t_kd", out.s2t_kd_loss), ("total", out.loss)):
        torch.testing.assert_close(got.double(), ref[name].detach(), rtol=1e-4, atol=1e-6, msg=name)
    assert int(out.t2s_num_correct) == int(ref["t2s_correct"])
    assert int(out.s2t_num_correct) == int(ref["s2t_correct"])
    if cma:
        assert 0 < int(ref["t2s_correct"]) < int((s["labels"] != IGNORE).sum()), "the gate should be partly open"
        assert out.t2s_kd_loss > 0


@pytest.mark.parametrize("cma", [False, True])
def test_gradients_reach_exactly_the_modules_of_the_routing_table(cma):
    """Each module's gradient from the package's total equals the naive gradient of only the terms that train it."""
    tau, alpha = 2.0, 0.5
    s, t, P = make_case(cma, seed=1)
    if cma:
        open_gate(s, P)
    out = package_dskd(s, t, P, tau=tau, alpha=alpha, cma=cma)
    ref = naive_dskd(s, t, P, tau=tau, alpha=alpha, cma=cma)
    student = [s["hidden"], s["head"]]
    groups = {
        # parameters: the terms (per the spec's routing table) that train them
        "student": (student, (1 - alpha) * ref["ce"] + alpha * (ref["t2s_kd"] + ref["s2t_kd"])),
        "t2s": (list(P.t2s.parameters()), alpha * ref["t2s_ce"]),
        "s2t": (list(P.s2t.parameters()), alpha * ref["s2t_kd"]),
    }
    if cma:
        groups["query"] = (list(P.query.parameters()), alpha * (ref["t2s_ce"] + ref["s2t_kd"]))
    # Nothing reaches the teacher: its hidden states and head, nor (same vocabulary) the unused query.
    untouched = [t["hidden"], t["head"]] + ([] if cma else list(P.query.parameters()))
    # One backward of the package's loss (its gradients are handed over once), split by group.
    everything = [p for params, _ in groups.values() for p in params] + untouched
    got_all = iter(grads(out.loss, everything))
    for name, (params, terms) in groups.items():
        for got, want in zip([next(got_all) for _ in params], grads(terms, params)):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6, msg=name)
    for got in got_all:
        assert torch.count_nonzero(got) == 0


def test_no_cma_gate_without_attention_and_gate_closes_kd():
    """Same vocabulary has no gate; under CMA a fully closed gate zeroes t2s_KD but not the other terms."""
    s, t, P = make_case(True, seed=2)
    with torch.no_grad():  # t2s projects to zero: the t2s logits are the head's bias-free zeros, argmax 0
        P.t2s.weight.zero_()
        P.t2s.bias.zero_()
    s["labels"][s["labels"] == 0] = 1  # so no target is 0 and the gate is closed everywhere
    out = package_dskd(s, t, P, tau=2.0, alpha=0.5, cma=True)
    assert out.t2s_kd_loss.item() == 0.0 and int(out.t2s_num_correct) == 0
    assert out.t2s_ce_loss.item() > 0 and out.s2t_kd_loss.item() > 0


def test_bf16_stays_finite_and_close_to_fp32():
    s, t, P = make_case(True, seed=3)
    full = package_dskd(s, t, P, tau=2.0, alpha=0.5, cma=True)
    s16 = {k: (v.detach().bfloat16().requires_grad_(v.requires_grad) if torch.is_floating_point(v) else v)
           for k, v in s.items()}
    t16 = {k: (v.detach().bfloat16() if torch.is_floating_point(v) else v) for k, v in t.items()}
    half = package_dskd(s16, t16, P.to(torch.bfloat16), tau=2.0, alpha=0.5, cma=True)
    assert all(math.isfinite(x.item()) for x in half[:5])
    torch.testing.assert_close(half.loss.float(), full.loss.float(), rtol=5e-2, atol=5e-2)
    (grad,) = torch.autograd.grad(half.loss, s16["hidden"])
    assert torch.isfinite(grad.float()).all() and grad.abs().sum() > 0
