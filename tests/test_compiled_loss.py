"""The compiled chunk of the loss engine (`kd_trainers.losses.compiled`) against the eager engine and an fp64 one.

Two fp32 computations of the same loss in a different order (the eager closed forms; the compiled gradient of the
readable definition) differ by their rounding: at moderate logits (std about 1.5, as below) by at most 6e-6 relative
(values and gradients, measured over every divergence and setting here), at near one-hot rows by up to 1.4e-4, where
either is that far from fp64 (TVD, skew reverse KL at T = 1). So the compiled path is held to 1e-5 of the eager one
at moderate logits, and both to 2e-4 of the engine in fp64 at peaked logits.
Every case compiles (seconds each): the module is in the slow tier but for the checks that run no loss.
"""

import logging

import pytest
import torch

from kd_trainers import KDConfig, KDTrainer
from kd_trainers.demo import demo_model
from kd_trainers.losses import (DIVERGENCES, DenseMember, LogitTransform, LossSettings, MixedTeachers, SparseMember,
                                chunked_distillation_terms, teacher_distillation_terms)
from kd_trainers.losses import compiled
from kd_trainers.losses.sparse import top_k_targets

from test_config_contract import BASE, datasets  # noqa: F401  (a fixture)
from test_losses import make_inputs


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def engine_run(mode, settings, transform=LogitTransform(), dtype=torch.float32, scale=0.5, seed=0, noise=False):
    """Loss, CE and KD terms and the gradients of the student's hidden states and head (logits' std ≈ 3·scale)."""
    hs, ws, bs, ht, wt, bt, labels = make_inputs(seed=seed, V=501, dtype=torch.float64)
    hs, ht = (hs.detach() * scale).to(dtype).requires_grad_(), (ht * scale).to(dtype)
    ws, wt = ws.detach().to(dtype).requires_grad_(), wt.to(dtype)
    out = chunked_distillation_terms(hs, (ws, None), ht, (wt, None), labels, settings, chunk_size=16, compile=mode,
                                     student_transform=transform, noise_seed=7 if noise else None)
    grads = torch.autograd.grad(out.loss, [hs, ws])
    return [out.loss, out.ce_loss, out.kd_loss, *grads]


# Every divergence with every transform of the chunk on (temperature, CE mixing, noise, logit scale, soft-capping);
# plain T = 1 KD is the peaked-logits test's.
CASES = [(d, LossSettings(divergence=d, temperature=2.0, kd_weight=0.5, noise_std=0.3),
          LogitTransform(scale=0.8, softcap=6.0)) for d in sorted(DIVERGENCES)]


@pytest.mark.slow
@pytest.mark.parametrize("divergence,settings,transform", CASES, ids=lambda c: getattr(c, "__name__", None))
def test_compiled_chunk_equals_the_eager_engine_in_fp32(divergence, settings, transform):
    eager = engine_run("off", settings, transform, noise=settings.noise_std > 0)
    fused = engine_run("on", settings, transform, noise=settings.noise_std > 0)
    for name, got, want in zip(("loss", "ce", "kd", "grad hidden", "grad head"), fused, eager):
        assert relative(got, want) < 1e-5, (divergence, name, relative(got, want))


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["jsd", "skew_reverse_kl", "tvd"])
def test_at_peaked_logits_both_fp32_paths_are_as_near_fp64(divergence):
    """Near one-hot rows (logits of std ≈ 9): neither fp32 order is the exact one; each stays within 2e-4 of the
    engine in fp64 (measured: up to 1.4e-4 for either, whichever is nearer changes with the data)."""
    settings = LossSettings(divergence=divergence, temperature=1.0, kd_weight=1.0)
    exact = engine_run("off", settings, dtype=torch.float64, scale=3.0)
    for mode in ("off", "on"):
        result = engine_run(mode, settings, scale=3.0)
        for name, got, want in zip(("loss", "ce", "kd", "grad hidden", "grad head"), result, exact):
            assert relative(got, want) < 2e-4, (mode, name, relative(got, want))


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_bf16_gradients_are_within_one_percent_of_fp32_from_the_same_weights(divergence):
    """bf16 hidden states and head (the model's), against an fp32 computation from those same bf16 values: the
    engine computes the logits in bf16 and works in fp32 from there, so only the products' rounding remains."""
    settings = LossSettings(divergence=divergence, temperature=2.0, kd_weight=0.5)
    hs, ws, _, ht, wt, _, labels = make_inputs(seed=3, V=501, dtype=torch.bfloat16, bias=False)
    hs, ht = (hs.detach() * 0.5).requires_grad_(), ht * 0.5
    reference_inputs = [hs.detach().float().requires_grad_(), ws.detach().float().requires_grad_()]
    reference = chunked_distillation_terms(*reference_inputs[:1], (reference_inputs[1], None), ht.float(),
                                           (wt.float(), None), labels, settings, compile="off")
    want = torch.autograd.grad(reference.loss, reference_inputs)
    for mode in ("off", "on"):
        out = chunked_distillation_terms(hs, (ws, None), ht, (wt, None), labels, settings, compile=mode)
        got = torch.autograd.grad(out.loss, [hs, ws])
        assert got[0].dtype == got[1].dtype == torch.bfloat16
        for g, w in zip(got, want):
            assert relative(g, w) < 1e-2, (mode, relative(g, w))


@pytest.mark.slow
def test_sparse_and_mixed_teachers_reach_the_compiled_chunk():
    """A cache's top-k teacher (bucket tail, forward KL: eagerly the sparse closed form; compiled, the filled logits)
    and a mixture of a dense and a sparse teacher: the compiled chunk gives the eager engine's loss and gradients."""
    hs, ws, _, ht, wt, _, labels = make_inputs(seed=5, V=501, bias=False)
    hs = (hs.detach() * 0.5).requires_grad_()
    mask = labels.reshape(-1) != -100
    teacher_logits = (ht * 0.5 @ wt.T).reshape(-1, 501)[mask]
    sparse = SparseMember(top_k_targets(teacher_logits, 20), "bucket")
    dense = DenseMember(ht * 0.5, (wt, None))
    for source in (sparse, MixedTeachers([dense, sparse], torch.tensor([0.3, 0.7]))):
        settings = LossSettings(divergence="forward_kl", temperature=1.0, kd_weight=0.6)
        results = []
        for mode in ("off", "on"):
            out = teacher_distillation_terms(hs, (ws, None), source, labels, settings, chunk_size=16, compile=mode)
            results.append([out.loss, *torch.autograd.grad(out.loss, [hs, ws])])
        for got, want in zip(*reversed(results)):
            assert relative(got, want) < 1e-5, type(source).__name__


@pytest.mark.slow  # three engine passes (2 s): the fast tier is at its two minutes
def test_a_compiler_that_fails_is_said_once_and_the_loss_runs_eagerly(monkeypatch, caplog):
    def broken(*key):
        def fail(*args):
            raise RuntimeError("no C++ compiler\nsecond line")
        return fail

    monkeypatch.setattr(compiled, "_compiled_terms", broken)
    monkeypatch.setattr(compiled, "_failed", set())
    monkeypatch.setattr(compiled, "_said", set())
    settings = LossSettings(divergence="jsd", temperature=2.0, kd_weight=0.5)
    with caplog.at_level(logging.WARNING, logger="kd_trainers.losses.compiled"):
        fused = engine_run("on", settings)
        fused_again = engine_run("on", settings)
    eager = engine_run("off", settings)
    for got, again, want in zip(fused, fused_again, eager):
        assert torch.equal(got, want) and torch.equal(again, want)
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1 and "RuntimeError: no C++ compiler" in said[0] and "loss_compile='off'" in said[0]


def test_auto_compiles_on_cuda_only():
    assert compiled.compile_wanted("auto", torch.device("cuda"))
    assert not compiled.compile_wanted("auto", torch.device("cpu"))
    assert compiled.compile_wanted("on", torch.device("cpu"))
    assert not compiled.compile_wanted("off", torch.device("cuda"))
    with pytest.raises(ValueError, match=r"loss_compile must be one of \['auto', 'on', 'off'\], got 'yes'"):
        compiled.compile_wanted("yes", torch.device("cpu"))


def test_loss_compile_is_checked_when_the_config_is_made(tmp_path):
    with pytest.raises(ValueError, match=r"loss_compile must be one of \['auto', 'on', 'off'\], got 'true'"):
        KDConfig(output_dir=str(tmp_path), loss_compile="true")


@pytest.mark.slow
def test_loss_compile_reaches_the_engine_and_trains(tmp_path, bpe_tokenizer, datasets, monkeypatch):
    """`KDConfig.loss_compile`: 'on' runs every chunk compiled and gives 'off''s loss; 'off' runs none compiled; a
    training step with it on changes the student."""
    calls = []
    original = compiled.compiled_value_and_grad
    monkeypatch.setattr("kd_trainers.losses.fused.compiled_value_and_grad",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    losses = {}
    for mode in ("off", "on"):
        calls.clear()
        args = KDConfig(output_dir=str(tmp_path / mode), **{**BASE, "kd_temperature": 2.0, "kd_weight": 0.5,
                                                            "divergence": "jsd", "loss_compile": mode})
        student = demo_model("llama", bpe_tokenizer, "student", seed=2)
        trainer = KDTrainer(student, args, train_dataset=datasets["prompt_completion"],
                            processing_class=bpe_tokenizer,
                            teacher_model=demo_model("llama", bpe_tokenizer, "teacher", seed=1),
                            teacher_processing_class=bpe_tokenizer)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        losses[mode] = trainer.compute_loss(trainer.model, batch).detach()
        assert (len(calls) > 0) == (mode == "on"), (mode, len(calls))
    assert relative(losses["on"], losses["off"]) < 1e-5
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.args.max_steps = 1
    trainer.train()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
