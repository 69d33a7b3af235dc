import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import datasets
import pytest
from transformers.utils import logging as hf_logging

from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
datasets.disable_progress_bars()
logging.getLogger("datasets").setLevel(logging.ERROR)


@pytest.fixture(scope="session", autouse=True)
def package_cache(tmp_path_factory):
    """The package's cache (Seq-KD's generated sets) in a temporary folder, for this process and those it starts."""
    import os

    folder = str(tmp_path_factory.mktemp("kd_trainers_cache"))
    previous = os.environ.get("KD_TRAINERS_CACHE")
    os.environ["KD_TRAINERS_CACHE"] = folder
    yield folder
    if previous is None:
        os.environ.pop("KD_TRAINERS_CACHE", None)
    else:
        os.environ["KD_TRAINERS_CACHE"] = previous


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return demo_tokenizer("bpe")


@pytest.fixture(scope="session")
def wordpiece_tokenizer():
    return demo_tokenizer("wordpiece")


@pytest.fixture(scope="session")
def demo_data():
    return load_demo_dataset("prompt_completion")


@pytest.fixture
def teacher(bpe_tokenizer):
    return demo_model("llama", bpe_tokenizer, "teacher", seed=1)


@pytest.fixture
def student(bpe_tokenizer):
    return demo_model("llama", bpe_tokenizer, "student", seed=2)


@pytest.fixture
def endpoint():
    """A loopback chat-completions server: replies `Score: 4` (or 2 when the answer says 'wrong'); records requests."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            prompt = body["messages"][0]["content"]
            reply = "Looks fine.\nScore: 2" if "wrong" in prompt else "Looks fine.\nScore: 4"
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1", received
    server.shutdown()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test skipped because a module could not be imported fails instead: the dev extra installs every dependency
    the tests need, so a missing one is a broken install, not a reason for a green run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "could not import" in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"skipped for a missing dependency, which the dev extra should install: {report.longrepr}"
