"""`kd-serve-teacher`'s server: a transformers model behind the subset of vLLM's completions API that a served teacher
uses (`protocol.py`), for CPU users, for tests over loopback, and as the reference the client is tested against.

    GET  /health          200 once the model is loaded
    GET  /v1/models       {"object": "list", "data": [{"id": NAME, "root": NAME, "max_model_len": ...}]}
    POST /v1/completions  `prompt` as token ids (one list or a list of lists), `prompt_logprobs` K, `max_tokens` 0 or
                          1 (the one token is the greedy next token); `temperature`, `top_p`, `n: 1`, `stream: false`
                          and `echo: false` are accepted, any other field is refused (HTTP 422, naming it)

Log-probabilities are the model's `log_softmax` over the tokenizer's vocabulary at temperature 1, in fp32, as vLLM's
raw prompt log-probabilities; each position lists its K most probable tokens and the prompt token (as vLLM does).
One forward runs at a time (a lock); answers are built and serialised outside it. FastAPI and uvicorn are the
`serve` extra, imported only when a server is made.
"""

import json
import socket
import threading
import time
import uuid

import torch

from ..teacher_cache.writer import right_padded


class PromptScorer:
    """The answers of a model: `completions(body) -> (status, JSON-able answer)`.

    Args:
        model: a causal LM (evaluated without gradients).
        tokenizer: its tokenizer; its length is the vocabulary the log-probabilities cover.
        name: the served model's name (`/v1/models`).
        max_logprobs: the largest `prompt_logprobs` accepted (vLLM's `--max-logprobs`).
        batch_size: rows per forward.
    """

    def __init__(self, model, tokenizer, name: str, max_logprobs: int = 128, batch_size: int = 8):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.vocab = len(tokenizer)
        self.max_logprobs, self.batch_size = max_logprobs, batch_size
        self.max_model_len = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()
        self._tokens = tokenizer.convert_ids_to_tokens(list(range(self.vocab)))
        pad = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad is None else pad

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "kd_trainers", "root": self.name,
                                            "max_model_len": self.max_model_len}]}

    @torch.no_grad()
    def _log_probs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence of L tokens, `[L, V]` fp32 next-token log-probabilities at positions 0..L-1."""
        out = []
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start: start + self.batch_size]
            inputs, _ = right_padded([{"input_ids": ids} for ids in batch], self.pad_id, self.device)
            with self._lock:
                logits = self.model(**inputs).logits
            for row, sequence in enumerate(batch):
                out.append(torch.log_softmax(logits[row, : len(sequence), : self.vocab].float(), -1).cpu())
        return out

    def _entry(self, token: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": self._tokens[token]}

    def _prompt_logprobs(self, sequence: list[int], log_probs: torch.Tensor, k: int) -> list:
        positions: list = [None]
        if len(sequence) < 2:
            return positions
        previous = log_probs[:-1]  # position j's distribution is computed at j - 1
        tokens = torch.as_tensor(sequence[1:])
        token_log_probs = previous.gather(-1, tokens[:, None]).squeeze(-1)
        ranks = (previous > token_log_probs[:, None]).sum(-1) + 1
        top, top_ids = previous.topk(k, dim=-1) if k else (previous[:, :0], tokens[:, None][:, :0])
        for j in range(previous.size(0)):
            entry = {str(token): self._entry(token, value, rank + 1)
                     for rank, (token, value) in enumerate(zip(top_ids[j].tolist(), top[j].tolist()))}
            token = int(tokens[j])
            entry.setdefault(str(token), self._entry(token, float(token_log_probs[j]), int(ranks[j])))
            positions.append(entry)
        return positions

    def completions(self, body: dict) -> tuple[int, dict]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(token, int) for token in prompt):
            prompt = [prompt]
        if not (isinstance(prompt, list) and prompt and all(
                isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
                for ids in prompt)):
            return 400, _error("prompt must be token ids: a list of ints or a list of lists of ints (this server "
                               "does not tokenize text)")
        if body.get("model") not in (None, self.name):
            return 404, _error(f"The model `{body['model']}` does not exist; this server serves `{self.name}`.")
        k = body.get("prompt_logprobs") or 0
        if not isinstance(k, int) or not 0 <= k <= min(self.max_logprobs, self.vocab):
            return 400, _error(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                               f"{min(self.max_logprobs, self.vocab)}")
        max_tokens = body.get("max_tokens", 16)
        if max_tokens not in (0, 1):
            return 400, _error("max_tokens must be 0 or 1: this server answers prompt log-probabilities and at most "
                               "the greedy next token")
        for name, allowed in (("n", 1), ("stream", False), ("echo", False)):
            if body.get(name, allowed) != allowed:
                return 400, _error(f"{name} must be {json.dumps(allowed)} on this server")
        bad = [t for ids in prompt for t in ids if not 0 <= t < self.vocab]
        if bad:
            return 400, _error(f"token id {bad[0]} is out of vocabulary (size {self.vocab})")
        log_probs = self._log_probs(prompt)
        choices = []
        for index, (sequence, rows) in enumerate(zip(prompt, log_probs)):
            text = self._tokens[int(rows[-1].argmax())] if max_tokens else ""
            choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": "length",
                            "prompt_token_ids": sequence,
                            "prompt_logprobs": self._prompt_logprobs(sequence, rows, k) if k else None})
        tokens = sum(len(ids) for ids in prompt)
        return 200, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                     "model": self.name, "choices": choices,
                     "usage": {"prompt_tokens": tokens, "completion_tokens": max_tokens * len(prompt),
                               "total_tokens": tokens + max_tokens * len(prompt)}}


def _error(message: str) -> dict:
    return {"object": "error", "message": message, "type": "BadRequestError"}


ACCEPTED_FIELDS = {"model", "prompt", "prompt_logprobs", "max_tokens", "temperature", "top_p", "n", "stream", "echo"}


def create_app(scorer):
    """The FastAPI app of a scorer (anything with `models()` and `completions(body)`, e.g. a test's faulty one)."""
    from fastapi import FastAPI, Request  # lazy: the `serve` extra
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="kd-serve-teacher")

    def answer(status: int, payload: dict | bytes) -> Response:  # bytes: sent as they are (a test's garbage)
        body = payload if isinstance(payload, bytes) else json.dumps(payload)
        return Response(body, status_code=status, media_type="application/json")

    @app.get("/health")
    def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    def models():
        return answer(200, scorer.models())

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return answer(400, _error("the body is not JSON"))
        if not isinstance(body, dict):
            return answer(400, _error("the body must be a JSON object"))
        unknown = sorted(set(body) - ACCEPTED_FIELDS)
        if unknown:
            return answer(422, _error(f"unsupported field(s) {unknown}: this server implements "
                                      f"{sorted(ACCEPTED_FIELDS)}"))
        # The forward and the answer's JSON off the event loop: other requests are read meanwhile.
        return await run_in_threadpool(lambda: answer(*scorer.completions(body)))

    return app


class LoopbackServer:
    """A scorer's app served by uvicorn in a thread of this process, on `host:port` (port 0: a free one):
    `start()`, `url` (`http://host:port/v1`), `stop()`. For tests and benchmarks; `kd-serve-teacher` runs uvicorn in
    the foreground."""

    def __init__(self, scorer, host: str = "127.0.0.1", port: int = 0):
        self.scorer, self.host, self.port = scorer, host, port
        self._server, self._thread = None, None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "LoopbackServer":
        import uvicorn  # lazy: the `serve` extra

        if self.port == 0:
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        config = uvicorn.Config(create_app(self.scorer), host=self.host, port=self.port, log_level="warning",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the teacher server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._server = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
