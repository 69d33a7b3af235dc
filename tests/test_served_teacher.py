"""A teacher behind a server: kd-serve-teacher's answers against the model's own distribution, the client's checks of
an answer, a trainer that trains from the server as from the resident teacher, and the faults (a server slow, down,
restarted, answering garbage or short) retried without ever training on a bad target, or stopping the run with a
checkpoint that resumes to the uninterrupted result. Every server listens on 127.0.0.1, on a free port, and is
stopped by its test."""

import json
import os
import threading
import time

import pytest
import torch

from kd_trainers import KDConfig, KDTrainer
from kd_trainers.runtime.errors import TeacherServerError
from kd_trainers.losses.sparse import top_k_targets
from kd_trainers.served_teacher import InvalidAnswer, TeacherClient, completion_request, parse_completion
from kd_trainers.served_teacher.server import LoopbackServer, PromptScorer


NAME = "demo:llama/teacher/bpe"


@pytest.fixture
def scorer(teacher, bpe_tokenizer):
    return PromptScorer(teacher, bpe_tokenizer, NAME, max_logprobs=len(bpe_tokenizer))


@pytest.fixture
def train_rows(demo_data):
    return demo_data["train"].select(range(40))


def served_args(tmp_path, url, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), bf16=False, max_steps=4, per_device_train_batch_size=8,
                  learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                  max_length=64, kd_temperature=2.0, kd_weight=0.5, seed=0, teacher_url=url, teacher_server_k=8,
                  teacher_server_batch_size=4, teacher_server_timeout=2.0, teacher_server_max_wait=20.0,
                  teacher_server_approximate_temperature=True)  # T = 2 with a server: the approximation, by name
    values.update(overrides)
    return KDConfig(**values)


def test_a_served_teacher_away_from_temperature_one_is_refused_unless_the_approximation_is_asked_for(
        tmp_path, scorer, student, bpe_tokenizer, train_rows):
    """A server answers temperature-1 log-probabilities only: at T = 2 its tempered tail is unknown, so the run is
    refused before the server is asked anything, naming the setting that accepts the approximation; at T = 1, with
    the approximation asked for, or with the whole vocabulary asked for (no tail), it runs."""
    url = "http://127.0.0.1:9/v1"  # the discard port: nothing answers, so a refusal must come before any request
    with pytest.raises(ValueError, match=r"kd_temperature=2\.0 with teacher_url=.*"
                                         r"teacher_server_approximate_temperature=true"):
        KDTrainer(model=student, args=served_args(tmp_path, url, teacher_server_approximate_temperature=False),
                  train_dataset=train_rows, processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer)
    with LoopbackServer(scorer) as server:
        for overrides in ({"kd_temperature": 1.0}, {}, {"teacher_server_k": len(bpe_tokenizer)}):
            settings = {"teacher_server_approximate_temperature": False, **overrides} if overrides else {}
            trainer = KDTrainer(model=student, args=served_args(tmp_path, server.url, **settings),
                                train_dataset=train_rows, processing_class=bpe_tokenizer,
                                teacher_processing_class=bpe_tokenizer)
            assert trainer.teacher_client is not None


def test_server_answers_the_models_own_top_k_and_the_client_reads_it(scorer, teacher, bpe_tokenizer):
    """Each position j ≥ 1 lists the K most probable tokens after tokens 0..j-1 and the prompt token with its rank;
    the client's targets equal the exact top-k of the teacher's logits at every position."""
    sequences = [list(range(5, 31)), list(range(200, 209))]
    with LoopbackServer(scorer) as server:
        answer = json.loads(json.dumps(scorer.completions(completion_request(NAME, sequences, 5))[1]))
        client = TeacherClient(server.url, 5, len(bpe_tokenizer))
        assert client.served_model()["id"] == NAME
        served = client.top_k(sequences)
    for ids, choice, targets in zip(sequences, answer["choices"], served):
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([ids])).logits[0, :-1, : len(bpe_tokenizer)]
        log_probs = torch.log_softmax(logits.float(), -1)
        exact = top_k_targets(logits, 5)
        assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(ids)
        for j in range(1, len(ids)):
            entry = choice["prompt_logprobs"][j]
            token = ids[j]
            assert entry[str(token)]["rank"] == int((log_probs[j - 1] > log_probs[j - 1, token]).sum()) + 1
            assert abs(entry[str(token)]["logprob"] - log_probs[j - 1, token].item()) < 1e-6
            assert [int(key) for key, value in entry.items() if value["rank"] <= 5] == exact.ids[j - 1].tolist()
        assert torch.equal(targets.ids, exact.ids)
        torch.testing.assert_close(targets.log_probs, exact.log_probs, rtol=0, atol=1e-6)
        torch.testing.assert_close(targets.tail_log_mass, exact.tail_log_mass, rtol=0, atol=1e-5)


def test_a_refused_request_is_not_retried_and_says_how_to_fix_it(scorer, bpe_tokenizer):
    """HTTP 400 (prompt_logprobs above the server's --max-logprobs) stops at once, naming the URL and the flag."""
    scorer.max_logprobs = 4
    with LoopbackServer(scorer) as server:
        client = TeacherClient(server.url, 8, len(bpe_tokenizer), max_wait=30.0)
        start = time.monotonic()
        with pytest.raises(TeacherServerError, match=r"refused.*HTTP 400.*greater than max allowed: 4.*"
                                                     r"--max-logprobs 8") as error:
            client.top_k([[5, 6, 7]])
        assert time.monotonic() - start < 5 and server.url in str(error.value)


def _answer(ids_list, k=2, vocab=50):
    """A valid answer for `ids_list`: at each position the tokens 40.. (top-k) and the prompt token."""
    choices = []
    for index, ids in enumerate(ids_list):
        positions = [None]
        for token in ids[1:]:
            entry = {str(40 + i): {"logprob": -1.0 - i, "rank": i + 1} for i in range(k)}
            entry.setdefault(str(token), {"logprob": -5.0, "rank": 9})
            positions.append(entry)
        choices.append({"index": index, "text": "", "prompt_logprobs": positions, "prompt_token_ids": ids})
    return {"choices": choices}


@pytest.mark.parametrize("damage, message", [
    (lambda a: a["choices"].pop(), "1 choices for 2 prompts"),
    (lambda a: a["choices"][1]["prompt_logprobs"].pop(), "prompt 1: 3 positions for a prompt of 4 tokens"),
    (lambda a: a["choices"][0]["prompt_logprobs"][2].pop("7"), "position 2: the prompt token 7 is missing"),
    (lambda a: a["choices"][0]["prompt_logprobs"][1].pop("41"), "position 1: 2 of the top 3 tokens"),
    (lambda a: a["choices"][0]["prompt_logprobs"][1]["40"].update(logprob=float("nan")), "log-probability nan"),
    (lambda a: a["choices"][0]["prompt_logprobs"][1].update({"60": {"logprob": -9.0}}), "token id 60 is outside"),
    (lambda a: a["choices"][0]["prompt_logprobs"][1]["40"].update(logprob=-0.01), r"sum to 1\.\d+ > 1"),
    (lambda a: a["choices"][1].update(prompt_token_ids=[1, 2, 3, 4]), "read other token ids"),
    (lambda a: a.pop("choices"), "no `choices`"),
])
def test_answers_that_a_step_must_not_use_are_rejected(damage, message):
    sequences = [[1, 6, 7], [2, 8, 9, 10]]
    answer = _answer(sequences, k=3)
    targets = parse_completion(answer, sequences, 3, 50)  # the undamaged answer is read
    assert [t.ids.shape for t in targets] == [(2, 3), (3, 3)] and targets[0].ids[0].tolist() == [40, 41, 42]
    torch.testing.assert_close(torch.logaddexp(torch.logsumexp(targets[1].log_probs, -1), targets[1].tail_log_mass),
                               torch.zeros(3))
    damage(answer)
    with pytest.raises(InvalidAnswer, match=message):
        parse_completion(answer, sequences, 3, 50)


@pytest.mark.slow
def test_served_teacher_trains_as_the_resident_teacher(tmp_path, scorer, teacher, bpe_tokenizer, train_rows):
    """With K = V the served target is the teacher's whole distribution: the same losses and weights as the teacher in
    memory, with or without prefetching."""
    vocab = len(bpe_tokenizer)
    results = []
    with LoopbackServer(scorer) as server:
        for prefetch in (True, False):
            student = _student(bpe_tokenizer)
            args = served_args(tmp_path, server.url, teacher_server_k=vocab, max_steps=2, max_length=32,
                               teacher_server_prefetch=prefetch)
            trainer = KDTrainer(model=student, args=args, train_dataset=train_rows, processing_class=bpe_tokenizer,
                                teacher_processing_class=bpe_tokenizer)
            assert trainer.teacher_model is None and trainer.teacher_client.url == server.url
            trainer.train()
            results.append((student, [h["loss"] for h in trainer.state.log_history if "loss" in h]))
    resident = _student(bpe_tokenizer)
    args = served_args(tmp_path, None, max_steps=2, max_length=32)
    trainer = KDTrainer(model=resident, teacher_model=teacher, args=args, train_dataset=train_rows,
                        processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    initial = _student(bpe_tokenizer)
    for student, served_losses in results:
        torch.testing.assert_close(torch.tensor(served_losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
        for served, reference, start in zip(student.parameters(), resident.parameters(), initial.parameters()):
            # Adam turns float rounding in near-zero gradients into small steps: within 2% of the largest update.
            update = (reference - start).abs().max()
            assert update > 1e-3 and (served - reference).abs().max() < 0.02 * update


class CountingScorer:
    """Answers like `scorer`, a little slowly, counting the requests and the most in flight at once."""

    def __init__(self, scorer, delay=0.05):
        self.scorer, self.delay = scorer, delay
        self.requests, self.in_flight, self.most_in_flight, self.lock = 0, 0, 0, threading.Lock()

    def models(self):
        return self.scorer.models()

    def completions(self, body):
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay)
        try:
            return self.scorer.completions(body)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_served_settings_take_effect(tmp_path, scorer, bpe_tokenizer, train_rows):
    """teacher_server_k, _tail, _batch_size, _concurrency, _timeout, _max_wait and _prefetch each do what they say:
    the batch's loss is the engine's on the served top-k with the tail asked for; a batch of 8 rows is ceil(8 / batch
    size) requests with at most `concurrency` in flight; prefetching leaves the answers pending when the batch is
    built; a request slower than the timeout is asked again."""
    from kd_trainers.losses import LossSettings, sparse_distillation_terms

    counting = CountingScorer(scorer)
    with LoopbackServer(counting) as server:
        losses = {}
        for tail, batch_size, concurrency, prefetch in (("bucket", 3, 1, True), ("spread", 1, 3, False)):
            student = _student(bpe_tokenizer)
            trainer = KDTrainer(model=student, args=served_args(
                tmp_path, server.url, teacher_server_k=6, teacher_server_tail=tail, teacher_server_prefetch=prefetch,
                teacher_server_batch_size=batch_size, teacher_server_concurrency=concurrency,
                teacher_server_timeout=7.0, teacher_server_max_wait=9.0),
                train_dataset=train_rows, processing_class=bpe_tokenizer, teacher_processing_class=bpe_tokenizer)
            client = trainer.teacher_client
            assert (client.k, client.batch_size, client.concurrency, client.timeout, client.max_wait) == \
                (6, batch_size, concurrency, 7.0, 9.0)
            counting.requests = counting.most_in_flight = 0
            collator = trainer.data_collator
            batch = collator([trainer.train_dataset[i] for i in range(8)])
            assert (batch["teacher_targets"]._targets is None) == prefetch  # pending while the step before runs
            targets = batch["teacher_targets"].get()
            assert counting.requests == -(-8 // batch_size) and counting.most_in_flight == concurrency
            labels = batch["labels"][:, 1:]
            assert targets.ids.shape == ((labels != -100).sum().item(), 6)
            loss = trainer.compute_loss(student, trainer._prepare_inputs(batch))
            with torch.no_grad():
                hidden = student.model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
            reference = sparse_distillation_terms(hidden, student.lm_head, targets, labels,
                                                  LossSettings(temperature=2.0, kd_weight=0.5), tail=tail)
            torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)
            losses[tail] = loss.item()
        assert abs(losses["bucket"] - losses["spread"]) > 1e-4

        slow = FaultyScorer(scorer, faults=["slow"], slow_s=1.5)
        with LoopbackServer(slow) as slow_server:
            client = TeacherClient(slow_server.url, 4, len(bpe_tokenizer), timeout=0.5, max_wait=10.0)
            client.top_k([[5, 6, 7, 8]])
            assert slow.requests == 2 and client.requests_sent == 2  # timed out once, then answered


def _student(tokenizer):
    from kd_trainers.demo import demo_model

    return demo_model("llama", tokenizer, "student", seed=2)


class FaultyScorer:
    """A scorer whose answers go wrong on purpose: `faults` is a list consumed one per request ("garbage", "short",
    "shifted", "error", "slow", or None for a good answer); `down_after` answers 503 from that request on."""

    def __init__(self, scorer, faults=(), down_after=None, slow_s=3.0):
        self.scorer, self.faults, self.down_after, self.slow_s = scorer, list(faults), down_after, slow_s
        self.requests, self.lock = 0, threading.Lock()

    def models(self):
        return self.scorer.models()

    def completions(self, body):
        with self.lock:
            self.requests += 1
            fault = self.faults.pop(0) if self.faults else None
            down = self.down_after is not None and self.requests > self.down_after
        if down:
            return 503, {"message": "down for maintenance"}
        if fault == "error":
            return 500, {"message": "internal error"}
        if fault == "slow":
            time.sleep(self.slow_s)
        status, answer = self.scorer.completions(body)
        if fault == "garbage":
            return 200, b"<html>proxy error</html>"
        if fault == "short":
            for choice in answer["choices"]:
                choice["prompt_logprobs"] = choice["prompt_logprobs"][:-1]
        if fault == "shifted":  # the answer of another sequence: each position's map moved by one
            choice = answer["choices"][0]
            choice["prompt_logprobs"] = [None] + choice["prompt_logprobs"][2:] + [choice["prompt_logprobs"][1]]
            choice.pop("prompt_token_ids")
        return status, answer


def _train(tmp_path, url, tokenizer, rows, name, **overrides):
    student = _student(tokenizer)
    trainer = KDTrainer(model=student, args=served_args(tmp_path / name, url, **overrides), train_dataset=rows,
                        processing_class=tokenizer, teacher_processing_class=tokenizer)
    return student, trainer


@pytest.mark.slow
def test_faults_are_retried_and_a_server_that_stays_down_stops_the_run_resumably(tmp_path, scorer, bpe_tokenizer,
                                                                                 train_rows):
    """Garbage, short, shifted, 5xx and slow answers and a restart mid-run are retried: the run ends with exactly the
    weights of a run on a healthy server. A server that stays down stops the run within teacher_server_max_wait, with
    an error naming the URL and a checkpoint of the last completed step, which resumes to the same weights."""
    with LoopbackServer(scorer) as server:
        clean, trainer = _train(tmp_path, server.url, bpe_tokenizer, train_rows, "clean")
        trainer.train()
        reference = [p.detach().clone() for p in clean.parameters()]

    faulty = FaultyScorer(scorer, faults=[None, "garbage", "short", None, "shifted", "error", "slow"])
    servers = [LoopbackServer(faulty).start()]
    url = servers[0].url
    try:
        student, trainer = _train(tmp_path, url, bpe_tokenizer, train_rows, "faulty")

        def restart():  # after its third request the server stops, and comes back a second later on its port
            while faulty.requests < 3:
                time.sleep(0.01)
            servers[0].stop()
            time.sleep(1.0)
            servers.append(LoopbackServer(faulty, port=servers[0].port).start())
        restarter = threading.Thread(target=restart)
        restarter.start()
        trainer.train()
        restarter.join()
        assert not faulty.faults and faulty.requests > 10  # every fault was met, and asked again
        for trained, expected in zip(student.parameters(), reference):
            torch.testing.assert_close(trained, expected, rtol=0, atol=0)

        faulty.requests, faulty.down_after = 0, 2  # step 1's two requests answered, then down
        student, trainer = _train(tmp_path, url, bpe_tokenizer, train_rows, "down", teacher_server_max_wait=2.0,
                                  per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                  teacher_server_batch_size=4)
        output_dir = trainer.args.output_dir
        start = time.monotonic()
        with pytest.raises(TeacherServerError) as error:
            trainer.train()
        assert time.monotonic() - start < 20
        message = str(error.value)
        checkpoint = os.path.join(output_dir, "checkpoint-1")
        assert url in message and "teacher_server_max_wait=2 s" in message and "HTTP 503" in message
        assert "_Retryable" not in message  # the server's words, not an internal class name
        assert f"Training stopped in step 2, which was not trained; {checkpoint} holds the state" in message
        assert os.path.isfile(os.path.join(checkpoint, "trainer_state.json"))
        assert not os.path.exists(os.path.join(output_dir, "checkpoint-2"))

        faulty.down_after = None  # back up: the run resumes from checkpoint-1
        resumed, trainer = _train(tmp_path, url, bpe_tokenizer, train_rows, "down",
                                  per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                  teacher_server_batch_size=4)
        trainer.train(resume_from_checkpoint=True)
        assert trainer.state.global_step == 4
        uninterrupted, trainer = _train(tmp_path, url, bpe_tokenizer, train_rows, "uninterrupted",
                                        per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                        teacher_server_batch_size=4)
        trainer.train()
        for a, b in zip(resumed.parameters(), uninterrupted.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
def test_kd_serve_teacher_and_kd_train_from_the_command_line(tmp_path):
    """`kd-serve-teacher demo:...` in its own process and `kd-train RECIPE teacher_url=...` with no teacher named:
    the run trains from the server, and run_info.json and the model card name it as the teacher."""
    import socket
    import subprocess
    import sys

    import requests

    from kd_trainers.cli import train as cli

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen([sys.executable, "-m", "kd_trainers.cli.serve", NAME, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.2)
        out = tmp_path / "run"
        status = cli.main(["vanilla_kd", f"teacher_url={url}", "teacher_model_name_or_path=null", "kd_temperature=1",
                           "max_steps=2",
                           "save_steps=2", "eval_steps=2", "logging_steps=1", "per_device_train_batch_size=4",
                           f"output_dir={out}"])
        assert status == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    info = json.loads((out / "run_info.json").read_text())
    assert info["teacher_server"] == {"url": url, "model": NAME, "k": 20, "tail": "bucket"}
    assert info["teacher"] == f"served at {url} (model {NAME})"
    card = (out / "README.md").read_text()
    assert f"| `teacher_url` | {url} |" in card and "| `teacher_server_k` | 20 |" in card
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [entry["kd_loss"] > 0 for entry in state["log_history"] if "kd_loss" in entry] == [True, True]


def test_a_served_teacher_of_another_tokenizer_is_refused(scorer, student, bpe_tokenizer, wordpiece_tokenizer,
                                                          train_rows, tmp_path):
    """The student's and the served teacher's tokenizers must map every token to the same id (KDTrainer's check),
    and a served model whose tokenizer cannot be found here is named, with the fix."""
    with LoopbackServer(scorer) as server:
        with pytest.raises(ValueError, match="vocabular"):
            KDTrainer(model=student, args=served_args(tmp_path, server.url), train_dataset=train_rows,
                      processing_class=bpe_tokenizer, teacher_processing_class=wordpiece_tokenizer)
        with pytest.raises(ValueError, match=rf"serves '{NAME}', whose tokenizer does not load here .*pass "
                                             "teacher_processing_class"):
            KDTrainer(model=student, args=served_args(tmp_path, server.url), train_dataset=train_rows,
                      processing_class=bpe_tokenizer)


@pytest.mark.slow
def test_a_password_in_the_teacher_url_reaches_no_file_of_the_run(tmp_path, scorer, capsys):
    """`teacher_url=http://user:PASSWORD@host/v1` (HTTP basic auth) trains, and no file the run writes holds the
    password: not recipe.yaml, run_info.json (command line and settings), training_args.bin, checkpoints or the
    model card; nor does what it prints."""
    from kd_trainers.cli import train as cli

    password = "pw-6fd1a2c9"
    with LoopbackServer(scorer) as server:
        url = server.url.replace("http://", f"http://trainer:{password}@")
        out = tmp_path / "run"
        status = cli.main(["vanilla_kd", f"teacher_url={url}", "teacher_model_name_or_path=null", "kd_temperature=1",
                           "max_steps=2", "save_steps=1", "eval_steps=2", "logging_steps=1",
                           "per_device_train_batch_size=4", f"output_dir={out}"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    files = [os.path.join(root, name) for root, _, names in os.walk(out) for name in names]
    assert any(name.endswith("training_args.bin") for name in files) and len(files) > 10
    holding = [path for path in files if password.encode() in open(path, "rb").read()]
    assert holding == []
    assert password not in captured.out + captured.err
    info = json.loads((out / "run_info.json").read_text())
    assert info["settings"]["teacher_url"] == server.url.replace("http://", "http://<redacted>@")
    from kd_trainers.runtime.redaction import redact_arguments  # the command line run_info.json records

    assert redact_arguments(["kd-train", "r.yaml", f"teacher_url={url}"])[2] == f"teacher_url={info['settings']['teacher_url']}"
    # The redacted record does not refuse the same run again (a finished run is left alone).
    assert cli.main(["vanilla_kd", f"teacher_url={url}", "teacher_model_name_or_path=null", "kd_temperature=1",
                     "max_steps=2", "save_steps=1", "eval_steps=2", "logging_steps=1",
                     "per_device_train_batch_size=4", f"output_dir={out}"]) == 0
