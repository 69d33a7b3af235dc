"""Whether a teacher cache on disk is whole, checked without loading a model: its info file against the schema, and
every block against the checksum written with it.

A block's checksum is `block-NNNNNN/kd_block.json`, written inside the block's temporary folder before the rename that
publishes it (so a block and its checksum appear together): each file's size and sha256, and the block's row and
record counts. `cache_info.json` repeats each block's digest, so a block swapped for another one is caught as well as
a truncated or deleted one.

Every problem is a `CacheProblem`: one line naming the cache, the field or the block, and the fix (`kd-train
cache-teacher` rewrites only the damaged blocks; an info file it cannot trust is rebuilt from the plan and the blocks).
"""

from __future__ import annotations

import hashlib
import json
import math
import os

from .layout import BLOCK_ROWS, FORMAT_VERSION, INFO, PLAN, block_name, cache_key, digest
from .format import id_bytes_for, raw_size


BLOCK_CHECKSUM = "kd_block.json"
READ_CHUNK = 1 << 20


def fix(path: str) -> str:
    """The one fix for a damaged cache."""
    return (f"run `kd-train cache-teacher RECIPE teacher_cache={path}` with the recipe that names its teacher, which "
            "rewrites only what is damaged")


class CacheProblem(ValueError):
    """A teacher cache that is damaged, partial or of another format: the message names what and the fix."""


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _block_files(folder: str) -> dict[str, dict]:
    """`{relative name: {size, sha256}}` of a block folder's data files (its checksum file left out)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != BLOCK_CHECKSUM:
                files[relative] = {"size": os.path.getsize(path), "sha256": file_digest(path)}
    return files


def write_block_checksum(folder: str, rows: int, label_tokens: int, record_bytes: int) -> str:
    """Writes `folder/kd_block.json` (its files' sizes and sha256) and returns the block's digest."""
    entry = {"rows": rows, "label_tokens": label_tokens, "record_bytes": record_bytes, "files": _block_files(folder)}
    with open(os.path.join(folder, BLOCK_CHECKSUM), "w") as handle:
        json.dump(entry, handle, indent=1, sort_keys=True)
    return digest(entry)


def read_block_checksum(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, BLOCK_CHECKSUM)) as handle:
            entry = json.load(handle)
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("files"), dict) else None


def block_problem(folder: str, expected_digest: str | None = None) -> str | None:
    """What is wrong with one block folder, or None: missing, without its checksum, a file missing, of another size
    or other content, or another block than the info file records."""
    if not os.path.isdir(folder):
        return "is missing"
    entry = read_block_checksum(folder)
    if entry is None:
        return f"has no readable {BLOCK_CHECKSUM} (written by an interrupted or older pass)"
    if expected_digest is not None and digest(entry) != expected_digest:
        return f"is not the block {INFO} records (its {BLOCK_CHECKSUM} differs)"
    present = {os.path.relpath(os.path.join(root, name), folder)
               for root, _, names in os.walk(folder) for name in names} - {BLOCK_CHECKSUM}
    for name, expected in sorted(entry["files"].items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"has lost its file {name}"
        size = os.path.getsize(path)
        if size != expected.get("size"):
            return f"has its file {name} at {size} bytes where {expected.get('size')} were written"
        if file_digest(path) != expected.get("sha256"):
            return f"has its file {name} changed since it was written (sha256 differs)"
    extra = sorted(present - set(entry["files"]))
    if extra:
        return f"holds files that were not written with it ({', '.join(extra)})"
    return None


def _field(info: dict, dotted: str, kind, path: str, check=None, expected: str = ""):
    """The value at `dotted` in `info`, of type `kind` and passing `check`, else `CacheProblem` naming the field."""
    where = f"teacher_cache={path!r}"
    value = info
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise CacheProblem(f"{where}: {INFO} has no field {dotted!r}; {fix(path)}.")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or \
            (check is not None and not check(value)):
        raise CacheProblem(f"{where}: {INFO}: {dotted}: {value!r} is not {expected or kind.__name__}; {fix(path)}.")
    return value


def read_info(path: str) -> dict | None:
    """`cache_info.json` of the cache at `path`, parsed and checked against the schema (every field, named when
    wrong), or None when there is none. A cache of another format is refused with the fix that applies to it."""
    file = os.path.join(path, INFO)
    where = f"teacher_cache={path!r}"
    if not os.path.exists(file):
        return None
    try:
        with open(file) as handle:
            info = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CacheProblem(f"{where}: {INFO} cannot be read ({type(error).__name__}: {error}); {fix(path)}.") from None
    if not isinstance(info, dict):
        raise CacheProblem(f"{where}: {INFO} holds {type(info).__name__}, not the cache's description; {fix(path)}.")
    version = info.get("components", {}).get("settings", {}).get("format_version") \
        if isinstance(info.get("components"), dict) and isinstance(info["components"].get("settings"), dict) else None
    if isinstance(version, int) and version != FORMAT_VERSION:
        raise CacheProblem(f"{where} is a cache of format {version}; this kd-trainers reads format {FORMAT_VERSION}. "
                           "Point teacher_cache at a new folder (it is written there first), or delete this one to "
                           "rewrite it.")
    _field(info, "key", str, path)
    _field(info, "complete", bool, path)
    for name in ("teacher", "data", "settings"):
        _field(info, f"components.{name}", dict, path)
    _field(info, "components.tokenizer", str, path)
    mode = _field(info, "components.settings.mode", str, path, lambda v: v in ("top_k", "sampled"),
                  "'top_k' or 'sampled'")
    k = _field(info, "components.settings.k", int, path, lambda v: v > 0, "a positive integer")
    vocab = _field(info, "components.settings.vocab", int, path, lambda v: v >= k, f"an integer ≥ k ({k})")
    _field(info, "components.settings.format_version", int, path, lambda v: v == FORMAT_VERSION,
           f"{FORMAT_VERSION}")
    temperatures = _field(info, "components.settings.temperatures", list, path,
                          lambda v: v and v[0] == 1.0 and all(isinstance(t, (int, float)) and t > 0 for t in v),
                          "a list of positive temperatures starting with 1.0")
    tokenization = info["components"]["settings"].get("tokenization", "student")
    if tokenization not in ("student", "teacher"):
        raise CacheProblem(f"{where}: {INFO}: components.settings.tokenization: {tokenization!r} is not 'student' "
                           f"or 'teacher'; {fix(path)}.")
    labels = tokenization == "teacher"
    if mode == "sampled" and len(temperatures) != 1:
        raise CacheProblem(f"{where}: {INFO}: components.settings.temperatures: {temperatures!r} is not [1.0] "
                           f"(a sampled cache stores one tail); {fix(path)}.")
    if info["key"] != cache_key(info["components"]):
        raise CacheProblem(f"{where}: {INFO}: key: {info['key']!r} is not the digest of its components (the file was "
                           f"edited or damaged); {fix(path)}.")
    id_bytes = _field(info, "id_bytes", int, path, lambda v: v == id_bytes_for(vocab),
                      f"{id_bytes_for(vocab)} (the bytes an id of a {vocab}-token vocabulary takes)")
    splits = _field(info, "splits", dict, path, lambda v: "train" in v, "a mapping with a 'train' split")
    for name in splits:
        field = f"splits.{name}"
        rows = _field(info, f"{field}.rows", int, path, lambda v: v >= 0, "a count")
        _field(info, f"{field}.blocks", int, path, lambda v: v == math.ceil(rows / BLOCK_ROWS),
               f"{math.ceil(rows / BLOCK_ROWS)} (blocks of {BLOCK_ROWS} rows for {rows} rows)")
        tokens = _field(info, f"{field}.label_tokens", int, path, lambda v: v >= 0, "a count")
        _field(info, f"{field}.record_bytes", int, path, lambda v: v >= 0, "a count")
        _field(info, f"{field}.raw_bytes", int, path,
               lambda v: v == raw_size(tokens, k, id_bytes, len(temperatures), labels),
               f"{raw_size(tokens, k, id_bytes, len(temperatures), labels)} (the records' size before compression)")
        _field(info, f"{field}.block_digests", list, path,
               lambda v: len(v) == splits[name]["blocks"] and all(isinstance(d, str) for d in v),
               f"a list of {splits[name]['blocks']} block digests")
    return info


def damaged_blocks(path: str, info: dict) -> list[str]:
    """`"<split> block-NNNNNN <what is wrong>"` for every block of a complete cache that is not as written."""
    found = []
    for split, entry in info["splits"].items():
        for index, expected in enumerate(entry["block_digests"]):
            problem = block_problem(os.path.join(path, split, block_name(index)), expected)
            if problem:
                found.append(f"{split}/{block_name(index)} {problem}")
    return found


# Caches found whole in this process, by their files' sizes and modification times: a study checks its shared cache
# once for every cell, and reads it again only if a file changed.
_FOUND_WHOLE: set = set()


def _stamp(path: str, info: dict) -> tuple:
    files = []
    for split, entry in info["splits"].items():
        for index in range(entry["blocks"]):
            for root, _, names in os.walk(os.path.join(path, split, block_name(index))):
                for name in sorted(names):
                    stat = os.stat(os.path.join(root, name))
                    files.append((root, name, stat.st_size, stat.st_mtime_ns))
    return os.path.abspath(path), json.dumps(info, sort_keys=True), tuple(files)


def check_whole(path: str, info: dict) -> None:
    """`CacheProblem` naming the cache, its damaged blocks and the fix, unless every block is as written."""
    stamp = _stamp(path, info)
    if stamp in _FOUND_WHOLE:
        return
    damaged = damaged_blocks(path, info)
    if damaged:
        shown = "; ".join(damaged[:3]) + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise CacheProblem(f"teacher_cache={path!r}: {shown}. {fix(path)[0].upper()}{fix(path)[1:]}.")
    _FOUND_WHOLE.add(stamp)


def has_partial_pass(path: str) -> bool:
    """Whether `path` holds a pass's plan without a complete info file (an interrupted `cache-teacher`)."""
    return os.path.isfile(os.path.join(path, PLAN))
