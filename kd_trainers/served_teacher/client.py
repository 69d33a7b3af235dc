"""The client of a served teacher: top-k targets of token sequences from a vLLM-compatible completions endpoint
(`protocol.py`), in batches, a bounded number of requests in flight, each retried with backoff until a valid answer
or the wait bound; `submit` returns at once, so a trainer asks for the next batch's targets while it computes this one.

A request that the server refuses (HTTP 4xx other than 408 and 429: a prompt_logprobs above vLLM's --max-logprobs, an
unknown model name) is not retried: it would be refused again. Everything else is retried until `max_wait` seconds
have passed since the request was first sent: no connection (down, restarting), no answer within `timeout` (slow),
HTTP 5xx, 408 or 429, and answers the protocol's checks reject (garbage, fewer positions than asked, for another
sequence). Then `TeacherServerError` names the URL, the tries and the last failure.

An API key (vLLM's `--api-key`) is read from the `KD_TRAINERS_TEACHER_API_KEY` environment variable, never from a
config, so that it is not written into a run's files.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import requests

from ..runtime.errors import TeacherServerError
from ..losses.sparse import SparseTargets
from .protocol import InvalidAnswer, completion_request, parse_completion, served_models


API_KEY_VARIABLE = "KD_TRAINERS_TEACHER_API_KEY"
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.25, 8.0


class _Retryable(Exception):
    """An answer worth asking again for (HTTP 5xx, 408, 429); its message is what the server said."""


class ServerRefused(TeacherServerError):
    """An HTTP 4xx answer (other than 408 and 429): asking again would be refused again. `status` and `text` are the
    server's; the message says what the status means for a served teacher."""

    def __init__(self, message: str, status: int, text: str):
        super().__init__(message)
        self.status, self.text = status, text


def refusal_hint(status: int, text: str, k: int) -> str:
    """What an HTTP refusal of a served teacher's request most likely means, and its fix."""
    if status == 404 and "model" in text.lower() and "exist" in text.lower():
        return "the server does not serve that model name: leave the model to the first one it lists"
    if status in (404, 405):
        return ("no such path on this server: the URL is the API's base URL, ending in /v1 "
                "(e.g. http://127.0.0.1:8000/v1)")
    if status in (401, 403):
        return f"the server wants an API key: set {API_KEY_VARIABLE} (vLLM's --api-key)"
    if status == 400 and "logprob" in text.lower():
        return (f"teacher_server_k={k} is more log-probabilities than the server answers: lower teacher_server_k, "
                f"or restart the server with --max-logprobs {k} (vLLM and kd-serve-teacher alike)")
    return "see the server's message"


def public_url(url: str) -> str:
    """`url` without a user or password in it: what errors, logs and model cards show."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


class TeacherClient:
    """Top-k log-probabilities of token sequences from the server at `url` (`http://HOST:PORT/v1`).

    Args:
        url: the API's base URL, ending in `/v1`.
        k: ids per position.
        vocab: the student's vocabulary size; ids outside it make an answer invalid.
        batch_size: sequences per request.
        concurrency: requests in flight at once.
        timeout: seconds to wait for one answer.
        max_wait: seconds a request may take in all, its retries included, before `TeacherServerError`.
        model: the served model's name; by default the first one the server lists.
    """

    def __init__(self, url: str, k: int, vocab: int, *, batch_size: int = 8, concurrency: int = 4,
                 timeout: float = 60.0, max_wait: float = 120.0, model: str | None = None):
        self.url, self.k, self.vocab = url.rstrip("/"), k, vocab
        self.public_url = public_url(self.url)
        self.batch_size, self.concurrency, self.timeout, self.max_wait = batch_size, concurrency, timeout, max_wait
        self._model = model
        self.wait_seconds = 0.0  # time the caller spent blocked on answers (`PendingTargets.result`)
        self.requests_sent = 0
        self._local = threading.local()
        self._pool: tuple[int, ThreadPoolExecutor] | None = None
        self._closed = threading.Event()  # set by `close`: requests still retrying give up at once

    # ---- plumbing ----------------------------------------------------------------------------------------------

    def __getstate__(self):  # a data loader worker gets a copy without threads or connections
        state = dict(self.__dict__)
        state["_local"], state["_pool"], state["_closed"] = None, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local, self._closed = threading.local(), threading.Event()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            key = os.environ.get(API_KEY_VARIABLE)
            if key:
                session.headers["Authorization"] = f"Bearer {key}"
        return session

    def _executor(self) -> ThreadPoolExecutor:
        # One pool per process: a forked data loader worker must not share its parent's threads.
        if self._pool is None or self._pool[0] != os.getpid():
            self._pool = (os.getpid(), ThreadPoolExecutor(self.concurrency, thread_name_prefix="kd-teacher"))
        return self._pool[1]

    def close(self) -> None:
        """Stops the requests in flight (their retries end at once) and the threads."""
        self._closed.set()
        if self._pool is not None and self._pool[0] == os.getpid():
            self._pool[1].shutdown(wait=False, cancel_futures=True)
        self._pool = None

    # ---- requests ------------------------------------------------------------------------------------------------

    def _with_retries(self, what: str, attempt):
        """`attempt()` until it returns, retrying `_Retryable` and connection failures with backoff within
        `max_wait`."""
        start, tries, delay = time.monotonic(), 0, FIRST_BACKOFF_S
        while True:
            tries += 1
            try:
                return attempt()
            except _Retryable as error:
                last = str(error)[:300]
            except (requests.ConnectionError, requests.Timeout, InvalidAnswer) as error:
                last = f"{type(error).__name__}: {str(error)[:300]}"
            if self._closed.is_set():
                raise TeacherServerError(f"The client of the teacher server at {self.public_url} was closed.")
            if time.monotonic() - start + delay > self.max_wait:
                error = TeacherServerError(
                    f"The teacher server at {self.public_url} gave no valid answer to {what} within "
                    f"teacher_server_max_wait={self.max_wait:g} s ({tries} tries; last: {last}). Check that it runs "
                    "and answers (kd-serve-teacher or vLLM), or raise teacher_server_max_wait / "
                    "teacher_server_timeout.")
                error.last = last
                raise error
            self._closed.wait(delay)
            delay = min(MAX_BACKOFF_S, 2 * delay)

    def _checked(self, response: requests.Response, what: str):
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            text = response.text[:400]
            raise ServerRefused(
                f"The teacher server at {self.public_url} refused {what}: HTTP {response.status_code}: {text} "
                f"({refusal_hint(response.status_code, text, self.k)}).", response.status_code, text)
        try:
            return response.json()
        except ValueError as error:
            raise InvalidAnswer(f"not JSON ({error})") from None

    def served_model(self) -> dict:
        """The served model's entry of `GET /models` (`id`, and vLLM's `root`: the path or Hub id it loaded)."""
        def attempt():
            return served_models(self._checked(self._session().get(f"{self.url}/models", timeout=self.timeout),
                                               "GET /models"))
        models = self._with_retries("GET /models", attempt)
        if self._model is None:
            return models[0]
        for entry in models:
            if entry.get("id") == self._model:
                return entry
        raise TeacherServerError(f"The teacher server at {self.public_url} serves {[m.get('id') for m in models]}, not "
                                 f"{self._model!r}.")

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.served_model()["id"]
        return self._model

    def _request(self, sequences: list[list[int]]) -> list[SparseTargets]:
        body = completion_request(self.model, sequences, self.k)

        def attempt():
            self.requests_sent += 1
            response = self._session().post(f"{self.url}/completions", json=body, timeout=self.timeout)
            return parse_completion(self._checked(response, "a completions request"), sequences, self.k, self.vocab)
        return self._with_retries(f"a request for {len(sequences)} sequences", attempt)

    def probe(self, ids: list[int]) -> SparseTargets:
        """One real request at the client's k for a short sequence, its answer checked as a step's would be: what a
        run asks first, before anything loads (a wrong path, a k above the server's limit, ids outside the student's
        vocabulary)."""
        return self._request([ids])[0]

    def top_k(self, sequences: list[list[int]]) -> list[SparseTargets]:
        """Blocking: per sequence of L tokens, the targets of its positions 1..L-1."""
        return self.submit(sequences).result()

    def submit(self, sequences: list[list[int]]) -> "PendingTargets":
        """The requests for `sequences` (in batches of `batch_size`), sent in the background."""
        self.model  # noqa: B018 (the name is asked once, here, not in every worker thread)
        batches = [sequences[start: start + self.batch_size] for start in range(0, len(sequences), self.batch_size)]
        return PendingTargets(self, [self._executor().submit(self._request, batch) for batch in batches])


class PendingTargets:
    """The answers to one `submit`: `result()` waits for them (timed into the client's `wait_seconds`) and returns
    the targets of every sequence, in order."""

    def __init__(self, client: TeacherClient, futures: list[Future]):
        self.client, self.futures = client, futures

    def done(self) -> bool:
        return all(future.done() for future in self.futures)

    def result(self) -> list[SparseTargets]:
        start = time.perf_counter()
        try:
            return [targets for future in self.futures for targets in future.result()]
        finally:
            self.client.wait_seconds += time.perf_counter() - start
