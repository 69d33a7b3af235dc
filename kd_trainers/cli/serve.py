"""`kd-serve-teacher MODEL [--host HOST] [--port PORT]`: a teacher behind the subset of vLLM's completions API that
`kd-train RECIPE teacher_url=http://HOST:PORT/v1` (and `KDTrainer(teacher_url=...)`) asks for top-k log-probabilities.

MODEL is named as a recipe names models: a local path, a Hub id, or a `demo:ARCH/SIZE/TOKENIZER` spec. It listens on
127.0.0.1 unless told otherwise (it has no authentication: put it behind one before opening it to a network). For a
teacher on a GPU, vLLM serves the same API faster (the README gives the command line).

`kd-serve-teacher --wait URL [--wait-timeout S]` waits until a server (this one started in the background, or vLLM)
answers `GET URL/models`, for scripts that start a server and then train from it.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import socket
import sys
import time
import urllib.error
import urllib.request


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on `host:port` (taken, or a host not of this machine), or None: a bind as
    uvicorn's own (with SO_REUSEADDR), released at once."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        what = "is in use" if error.errno == errno.EADDRINUSE else "cannot be listened on"
        return (f"{host}:{port} {what} ({error.strerror or error}); choose another --port (or --host), or stop what "
                "listens there.")
    return None


def wait_for_server(url: str, timeout: float) -> int:
    """0 once `GET url/models` answers 200 (polled every half second), 1 when `timeout` seconds pass first."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=5) as answer:
                if answer.status == 200:
                    print(f"kd-serve-teacher: {url} answers.", flush=True)
                    return 0
                last = f"HTTP {answer.status}"
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            last = str(getattr(error, "reason", error))
        if time.monotonic() > deadline:
            print(f"kd-serve-teacher: --wait: {url} did not answer GET /models within {timeout:g} s (last: {last}); "
                  "is the server running, and is the URL its /v1 address?", file=sys.stderr)
            return 1
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kd-serve-teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a local path, a Hub id or demo:ARCH/SIZE/TOKENIZER")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--adapter", default=None, help="a PEFT adapter merged into the model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    parser.add_argument("--served-model-name", default=None, help="the name /v1/models lists (default: MODEL)")
    parser.add_argument("--max-logprobs", type=int, default=128,
                        help="the largest prompt_logprobs answered (vLLM's --max-logprobs); default 128")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward; default 8")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--wait", metavar="URL", help="instead of serving: wait until the server at URL answers "
                        "(GET URL/models), at most --wait-timeout seconds; exit 0 then, 1 if not")
    parser.add_argument("--wait-timeout", type=float, default=300.0, help="seconds; default 300")
    options = parser.parse_args(argv)
    if options.wait:  # a mode of its own: no model, no server
        return wait_for_server(options.wait, options.wait_timeout)
    if options.model is None:
        parser.error("the following arguments are required: model")
    for name in ("port", "max_logprobs", "batch_size"):
        value = getattr(options, name)
        if value < (0 if name == "port" else 1) or (name == "port" and value > 65535):
            print(f"kd-serve-teacher: --{name.replace('_', '-')}: {value} is out of range.", file=sys.stderr)
            return 2
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # the `serve` extra, checked before the model loads
        print(f"kd-serve-teacher: {' and '.join(missing)} not installed: pip install 'kd-trainers[serve]'.",
              file=sys.stderr)
        return 2
    problem = port_problem(options.host, options.port)
    if problem:  # before the model loads: a busy port would otherwise show only once it has
        print(f"kd-serve-teacher: --port {options.port}: {problem}", file=sys.stderr)
        return 2
    import torch
    import uvicorn

    from .train import one_line
    from ..runtime.progress import quiet_libraries
    from ..recipe.models import resolve_model
    from ..served_teacher.server import PromptScorer, create_app
    from ..teachers.loading import freeze, load_teacher

    quiet_libraries()
    try:
        resolved, tokenizer = resolve_model(options.model)  # a demo model is built; a name is loaded here
        model = load_teacher(resolved, {"dtype": options.dtype} if isinstance(resolved, str) else None,
                             options.adapter)
        if not isinstance(resolved, str) and options.dtype != "auto":
            model = model.to(getattr(torch, options.dtype))
        model = freeze(model)
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
    except (ValueError, OSError) as error:
        if options.debug:
            raise
        print(f"kd-serve-teacher: {one_line(error)}", file=sys.stderr)
        return 2
    scorer = PromptScorer(model, tokenizer, options.served_model_name or options.model,
                          max_logprobs=options.max_logprobs, batch_size=options.batch_size)
    print(f"Serving {scorer.name} ({len(tokenizer)} tokens, {device}) at http://{options.host}:{options.port}/v1",
          flush=True)
    uvicorn.run(create_app(scorer), host=options.host, port=options.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
