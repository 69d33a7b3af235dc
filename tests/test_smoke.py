"""`KD_TRAINERS_SMOKE=1`: every command runs with its steps, examples and seeds capped, says so, and a smoke run's
folder is never taken by a real run for its own."""

import http.server
import json
import os
import threading

import pytest

from kd_trainers.cli import serve as serve_cli, train as cli
from kd_trainers.runtime import smoke
from kd_trainers.runtime.files import is_done, write_done
from kd_trainers.recipe import load_recipe
from kd_trainers.runtime.smoke import SMOKE_ENV, capped_limit, capped_seeds, capped_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KD = os.path.join(ROOT, "recipes", "vanilla_kd.yaml")
FAST = ["per_device_train_batch_size=4", "max_length=64", "dataset_test_split=null", "logging_steps=1"]


def test_the_caps_apply_only_under_the_variable(monkeypatch, capsys):
    monkeypatch.delenv(SMOKE_ENV, raising=False)
    assert (capped_steps(300), capped_steps(-1), capped_limit(None), capped_seeds([0, 1, 2])) == (300, -1, None,
                                                                                                 [0, 1, 2])
    monkeypatch.setenv(SMOKE_ENV, "1")
    monkeypatch.setattr(smoke, "_announced", False)  # said once a process: not yet in this one
    assert (capped_steps(300), capped_steps(-1), capped_steps(1)) == (2, 2, 1)
    assert (capped_limit(None), capped_limit(100), capped_limit(3)) == (4, 4, 3)
    assert capped_seeds([5, 6, 7]) == [5]
    assert capsys.readouterr().err.count("its numbers are not results") == 1
    monkeypatch.setenv(SMOKE_ENV, "yes")  # a typo never runs a whole experiment believed to be a smoke run
    with pytest.raises(ValueError, match="KD_TRAINERS_SMOKE='yes': set it to 1"):
        capped_steps(300)


def test_a_recipe_resolves_the_capped_steps_and_evaluation(monkeypatch, tmp_path):
    monkeypatch.setenv(SMOKE_ENV, "1")
    recipe = load_recipe(KD, [f"output_dir={tmp_path}", "evaluation={metrics: [ngram], limit: 50}"])
    assert recipe.config.max_steps == 2 and recipe.options["evaluation"]["limit"] == 4
    monkeypatch.setenv(SMOKE_ENV, "0")
    recipe = load_recipe(KD, [f"output_dir={tmp_path}", "evaluation={metrics: [ngram], limit: 50}"])
    assert recipe.config.max_steps == 200 and recipe.options["evaluation"]["limit"] == 50


def test_a_smoke_done_marker_is_done_for_smoke_runs_only(monkeypatch, tmp_path):
    monkeypatch.setenv(SMOKE_ENV, "1")
    write_done(str(tmp_path), {"global_step": 2})
    assert json.loads((tmp_path / "done.json").read_text())["smoke"] is True and is_done(str(tmp_path))
    monkeypatch.delenv(SMOKE_ENV)
    assert not is_done(str(tmp_path))
    write_done(str(tmp_path), {"global_step": 200})
    assert "smoke" not in json.loads((tmp_path / "done.json").read_text()) and is_done(str(tmp_path))


@pytest.mark.slow  # two short runs
def test_a_real_run_refuses_a_smoke_runs_folder_and_the_python_api_is_capped(monkeypatch, tmp_path, capsys):
    output = tmp_path / "run"
    monkeypatch.setenv(SMOKE_ENV, "1")
    assert cli.main([KD, *FAST, f"output_dir={output}"]) == 0
    assert json.loads((output / "done.json").read_text()) == {"global_step": 2, "max_steps": 2, "smoke": True}
    monkeypatch.delenv(SMOKE_ENV)
    capsys.readouterr()
    assert cli.main([KD, *FAST, f"output_dir={output}"]) == 2  # not "a finished run, left alone"
    assert "holds a run made with other settings (max_steps: 2 -> 200)" in capsys.readouterr().err

    from kd_trainers import KDConfig, KDTrainer
    from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset

    monkeypatch.setenv(SMOKE_ENV, "1")
    tokenizer = demo_tokenizer("bpe")
    trainer = KDTrainer(model=demo_model("llama", tokenizer, "student"),
                        teacher_model=demo_model("llama", tokenizer, "teacher"), processing_class=tokenizer,
                        args=KDConfig(output_dir=str(tmp_path / "api"), max_steps=50, per_device_train_batch_size=4,
                                      report_to=[], save_strategy="no", bf16=False),
                        train_dataset=load_demo_dataset()["train"].select(range(16)))
    assert trainer.train().global_step == 2


class _Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.end_headers()
        self.wfile.write(b'{"data": []}')

    def log_message(self, *args):
        pass


def test_serve_cli_waits_for_a_server_and_says_when_none_answers(capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        assert serve_cli.main(["--wait", url, "--wait-timeout", "5"]) == 0
        assert f"{url} answers" in capsys.readouterr().out
    finally:
        server.shutdown()
        server.server_close()
    assert serve_cli.main(["--wait", url, "--wait-timeout", "0.3"]) == 1
    assert f"--wait: {url} did not answer GET /models within 0.3 s" in capsys.readouterr().err


def test_a_smoke_run_has_the_teacher_answer_the_prompts_two_steps_read(monkeypatch, tmp_path, bpe_tokenizer, teacher,
                                                                      student, demo_data):
    from kd_trainers import SeqKDConfig, SeqKDTrainer

    monkeypatch.setenv(SMOKE_ENV, "1")
    prompts = demo_data["train"].select(range(50)).remove_columns("completion")
    args = SeqKDConfig(output_dir=str(tmp_path / "out"), bf16=False, max_steps=5, report_to=[], save_strategy="no",
                       seqkd_max_new_tokens=4, seqkd_cache_dir=str(tmp_path / "cache"))
    trainer = SeqKDTrainer(student, args, train_dataset=prompts, processing_class=bpe_tokenizer,
                           teacher_model=teacher, teacher_processing_class=bpe_tokenizer)
    assert len(trainer.train_dataset) == smoke.PROMPTS == 32
    monkeypatch.setenv(SMOKE_ENV, "0")
    assert smoke.capped_prompts(50) == 50
