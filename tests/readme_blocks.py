"""The fenced blocks of a README, and a terminal session that runs them in order as a user pastes them.

A fence's info string is the block's language and, after it, words the runner reads (GitHub shows only the
language): a tag saying why the block is not run here, `name=NAME` for a Python block a later one continues, and
`continues=NAME` for a Python block run after the named one (their code joined into one script).

- `bash` blocks run in one bash session, one after another, as pasted into one terminal: a background job started
  in one block (a server) is there in the next; a failing command fails its block (`set -e -o pipefail`).
- `python` blocks run as scripts (`python block.py`) from that session.
- `yaml` blocks are recipes: `kd-train validate` checks them, from that session.
- `text` and `diff` blocks are not code (formulas, an edit shown as a diff).

Tags (the reason a block is not run by the test):
- `setup`: creates a virtual environment and installs into it: the test runs in the environment its own run of that
  command made (`.ci/run`), so it runs the block's last command only, unless that is the test suite itself.
- `gpu`: needs CUDA. `vllm`: needs vLLM (and a GPU). `hub`: downloads models from the Hugging Face Hub.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field


RUN_LANGUAGES = ("bash", "python", "yaml")
PROSE_LANGUAGES = ("text", "diff")
TAGS = {
    "setup": "installs into a fresh virtual environment (the tier runs in the one .ci/run made)",
    "gpu": "needs a CUDA GPU",
    "vllm": "needs vLLM serving a model on a GPU",
    "hub": "downloads models from the Hugging Face Hub",
}
FENCE = re.compile(r"^```(.*)$")


@dataclass
class Block:
    path: str
    line: int  # the fence's line number, from 1
    language: str
    words: list[str]
    text: str
    tags: list[str] = field(default_factory=list)
    name: str | None = None
    continues: str | None = None

    @property
    def where(self) -> str:
        return f"{os.path.basename(os.path.dirname(self.path)) + '/' if 'benchmarks' in self.path else ''}" \
               f"{os.path.basename(self.path)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and not (set(self.tags) - {"setup"})


def read_blocks(path: str) -> list[Block]:
    """Every fenced block of the Markdown file `path`, in order. A fence without a language, a language the runner
    does not know or an unknown word after it is an error: no block is left out silently."""
    blocks, current, body = [], None, []
    with open(path) as handle:
        for number, line in enumerate(handle.read().splitlines(), start=1):
            match = FENCE.match(line)
            if current is None and match:
                info = match.group(1).split()
                if not info:
                    raise ValueError(f"{path}:{number}: a fence without a language; give one of "
                                     f"{RUN_LANGUAGES + PROSE_LANGUAGES}.")
                current, body = Block(path, number, info[0], info[1:], ""), []
                if current.language not in RUN_LANGUAGES + PROSE_LANGUAGES:
                    raise ValueError(f"{path}:{number}: language {current.language!r} is not one of "
                                     f"{RUN_LANGUAGES + PROSE_LANGUAGES}.")
                for word in current.words:
                    key, _, value = word.partition("=")
                    if key in ("name", "continues") and value:
                        setattr(current, key, value)
                    elif word in TAGS:
                        current.tags.append(word)
                    else:
                        raise ValueError(f"{path}:{number}: unknown word {word!r} after the language; tags are "
                                         f"{sorted(TAGS)}, or name=NAME / continues=NAME.")
            elif current is not None and line.strip() == "```":
                current.text = "\n".join(body) + "\n"
                blocks.append(current)
                current = None
            elif current is not None:
                body.append(line)
    if current is not None:
        raise ValueError(f"{path}:{current.line}: a fence that is never closed.")
    return blocks


def python_script(block: Block, blocks: list[Block]) -> str:
    """The code a Python block runs: its own, after the blocks it continues (a chain of `continues=`)."""
    chain = [block]
    while chain[0].continues:
        earlier = [b for b in blocks if b.name == chain[0].continues and b.line < chain[0].line
                   and b.path == chain[0].path]
        if not earlier:
            raise ValueError(f"{chain[0].where}: continues={chain[0].continues} names no earlier block.")
        chain.insert(0, earlier[-1])
    return "\n".join(b.text for b in chain)


class BlockFailed(AssertionError):
    pass


class Terminal:
    """One bash session in `folder`, its output to `log`; `run(command)` waits for the command's end."""

    def __init__(self, folder: str, env: dict, log: str):
        self.folder, self.log_path = folder, log
        self.log = open(log, "a")
        self.process = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE, stdout=self.log,
                                        stderr=subprocess.STDOUT, cwd=folder, env=env, text=True,
                                        start_new_session=True)
        self.count = 0

    def run(self, command: str, where: str, timeout: float) -> str:
        """Runs `command` (a file to source, or a line) in the session; returns its output. A failure (the
        command's error ends the session under `set -e`, or the timeout) raises `BlockFailed` with the output."""
        self.count += 1
        status = os.path.join(self.folder, ".readme_blocks", f"status-{self.count}")
        start = os.path.getsize(self.log_path)
        self.process.stdin.write(f"echo '>>> {where}'\nset -e -o pipefail\n{command}\nset +e\n"
                                 f"echo 0 > {shlex.quote(status)}\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while not os.path.exists(status):
            if self.process.poll() is not None or time.monotonic() > deadline:
                ended = self.process.poll() is not None
                output = self._output(start)
                raise BlockFailed(f"{where}: {'failed (exit ' + str(self.process.returncode) + ')' if ended else 'timed out'}"
                                  f"; its output:\n{output[-6000:]}")
            time.sleep(0.2)
        return self._output(start)

    def _output(self, start: int) -> str:
        self.log.flush()
        with open(self.log_path) as handle:
            handle.seek(start)
            return handle.read()

    def close(self) -> None:
        """Ends the session and everything it started (a server left in the background)."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, 9)
        except ProcessLookupError:
            pass
        self.log.close()
