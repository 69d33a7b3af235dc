"""The READMEs run as written: every fenced block of `README.md` and `benchmarks/README.md`, in order, in a fresh copy
of the repository, as a user pastes them into one terminal (`readme_blocks.py` says how each kind of block runs).

Long runs are shrunk by `KD_TRAINERS_SMOKE=1` (`kd_trainers/smoke.py`: two steps a run, four evaluated examples, one
seed a study, each benchmark's smallest cell), which the test sets; the text is never edited. Blocks that need what
this machine has not (a GPU, vLLM, the Hub) carry a tag next to their fence, and the list of them is asserted here, so
that no block is left out silently; the recipes they name are validated.
"""

from __future__ import annotations

import doctest
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest

from readme_blocks import Block, Terminal, python_script, read_blocks


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "benchmarks", "README.md")]
REAL_CACHE = os.environ.get("KD_TRAINERS_REAL_MODELS") or os.path.join(
    os.path.expanduser("~"), ".cache", "kd_trainers", "real_models")

# Every block the test does not run, with its tag: a new one must be added here, with the tag in the README.
NOT_RUN = [
    ("README.md", "setup", "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e \".[dev]\" && python -m pytest -q"),
    ("README.md", "vllm", "vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000 --max-logprobs 20 --max-model-len 4096 --dtype bfloat16"),
    ("benchmarks/README.md", "gpu", "python benchmarks/bench_on_policy.py --gpu-realistic  # GPU, bf16: Qwen2.5-0.5B student / 1.5B teacher configs"),
    ("benchmarks/README.md", "gpu", "python benchmarks/bench_kd_step.py --gpu-realistic   # GPU, bf16: Qwen2.5-0.5B student / 1.5B teacher, seq 2048"),
    ("benchmarks/README.md", "gpu", "python benchmarks/bench_kd_step.py --gpu-realistic --methods sft kd kd_cache --name kd_cache_step_gpu_bf16"),
    ("benchmarks/README.md", "gpu", "python benchmarks/bench_kd_step.py --gpu-realistic    # floor, KD, TRL GKD; bf16, seq 2048, vocab 151,936"),
    ("benchmarks/README.md", "gpu", "python benchmarks/bench_kd_step.py --gpu-realistic --methods floor kd kd_eager gkd --name kd_step_compiled_gpu_bf16_qwen0.5b_1.5b"),
]
DOCUMENTED_API = ["kd_trainers.kd.trainer", "kd_trainers.kd.config", "kd_trainers.dskd.trainer",
                  "kd_trainers.gkd.trainer", "kd_trainers.losses.chunked", "kd_trainers.losses.reference"]


def all_blocks() -> list[Block]:
    return [block for path in READMES for block in read_blocks(path)]


def _relative(block: Block) -> str:
    return os.path.relpath(block.path, ROOT)


def not_run(block: Block) -> str | None:
    """Why the test does not run `block` (its tag), or None when it does. A `setup` block runs its last command, unless
    that is the test suite (CI itself)."""
    if block.language in ("text", "diff"):
        return None
    if not block.runs:
        return " ".join(block.tags)
    if block.tags == ["setup"] and block.text.strip().endswith("&& python -m pytest -q"):
        return "setup"
    return None


def test_every_block_is_run_or_tagged_with_its_reason():
    blocks = all_blocks()  # a fence without a language, or an unknown tag, is an error already
    assert [(_relative(b), not_run(b), b.text.strip().splitlines()[0]) for b in blocks if not_run(b)] == NOT_RUN
    assert sum(not not_run(b) and b.language in ("bash", "python", "yaml") for b in blocks) >= 25


def test_the_setup_commands_are_ci_and_the_quickstart():
    setup = [b.text.strip() for b in all_blocks() if "setup" in b.tags]
    assert len(setup) == 2
    quickstart, tests = setup
    with open(os.path.join(ROOT, ".ci", "run")) as handle:
        assert tests in handle.read().splitlines()  # CI runs the README's test command verbatim
    assert quickstart.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && ")
    assert quickstart.endswith("&& kd-quickstart")


@pytest.mark.slow  # kd-train validate for each recipe a tagged block names
def test_the_recipes_tagged_blocks_name_still_validate(tmp_path):
    named = []
    for block in all_blocks():
        if block.runs or block.language != "bash":
            continue
        for line in block.text.splitlines():
            words = shlex.split(line, comments=True)
            named += [word for word in words if re.match(r"^recipes/.*\.ya?ml$", word)]
    assert named, "no tagged block names a recipe: nothing would be checked"
    for recipe in named:
        done = subprocess.run([sys.executable, "-m", "kd_trainers", "validate", os.path.join(ROOT, recipe),
                               f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True)
        assert done.returncode == 0, f"{recipe}: {done.stderr}"


@pytest.mark.slow  # the trainers' examples train (a few seconds each): kept out of the fast subset
@pytest.mark.parametrize("module", DOCUMENTED_API)
def test_the_docstring_examples_of_the_public_api_run(module):
    importlib.import_module("deepspeed")  # its one notice at import ("Setting accelerator to CPU") is not an example's
    results = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0, f"{module} has no example in its docstrings"
    assert results.failed == 0


def _fresh_copy(folder: str) -> None:
    """The repository's files (tracked, and new ones git does not ignore) copied into `folder`: a fresh clone of the
    working tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            target = os.path.join(folder, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(source, target)


def _overlay_environment(folder: str) -> str:
    """A virtual environment in `folder` that sees every package of the tests' own (a `.pth` file adding its
    site-packages) and installs into itself: a block's `pip install` cannot change the environment the tests run
    in. Returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", folder], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = os.path.join(folder, "lib", version, "site-packages")
    with open(os.path.join(site, "_tests_environment.pth"), "w") as handle:
        handle.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return os.path.join(folder, "bin")


@pytest.mark.slow  # every README block, in order (a few minutes with KD_TRAINERS_SMOKE=1)
def test_the_readmes_run_as_written(tmp_path):
    clone, cache = tmp_path / "clone", tmp_path / "cache"
    clone.mkdir()
    cache.mkdir()
    _fresh_copy(str(clone))
    os.makedirs(REAL_CACHE, exist_ok=True)  # on a new machine this tier builds them first, for the real tier too
    os.symlink(REAL_CACHE, cache / "real_models")  # the pretrained models the real tier built, not built again
    environment = _overlay_environment(str(tmp_path / "venv"))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KD_TRAINERS_", "PYTEST_"))}
    env.update(KD_TRAINERS_SMOKE="1", KD_TRAINERS_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PATH=f"{environment}:{os.path.dirname(sys.executable)}:{env.get('PATH', '')}",
               VIRTUAL_ENV=str(tmp_path / "venv"))
    scripts = clone / ".readme_blocks"
    scripts.mkdir()
    blocks = all_blocks()
    terminal = Terminal(str(clone), env, str(tmp_path / "terminal.log"))
    timings = []
    try:
        for index, block in enumerate(blocks):
            if not_run(block) or block.language in ("text", "diff"):
                continue
            where = f"{block.where} ({block.language})"
            started = time.monotonic()
            if block.language == "bash":
                text = block.text
                if block.tags == ["setup"]:  # its last command: the environment is the one .ci/run made
                    text = text.strip().split("&&")[-1].strip() + "\n"
                path = scripts / f"block-{index}.sh"
                path.write_text(text)
                terminal.run(f"source {shlex.quote(str(path))}", where, timeout=900)
            elif block.language == "python":
                path = scripts / f"block-{index}.py"
                path.write_text(python_script(block, blocks))
                terminal.run(f"python {shlex.quote(str(path))}", where, timeout=600)
            else:
                path = scripts / f"block-{index}.yaml"
                path.write_text(block.text)
                terminal.run(f"kd-train validate {shlex.quote(str(path))}", where, timeout=300)
            timings.append(f"{time.monotonic() - started:6.1f} s  {where}")
    finally:
        terminal.close()
        print("Seconds a block:", *timings, sep="\n")  # shown with -s, or on a failure
