"""The dataset of a recipe: a Hub id, a local file or folder, or the built-in demo, mapped to SFT columns.

`columns` renames (`{new: existing}`) and `prompt_template` builds a `prompt` column from others, so that a QA set with
`question`, `context` and `answer` columns needs no code:

    dataset_name: data/telecom_qa.jsonl
    prompt_template: "Context: {context}\\nQuestion: {question}\\nAnswer:"
    columns: {completion: answer}
"""

from __future__ import annotations

import csv
import os
import string

from datasets import Dataset, DatasetDict, Features, ReadInstruction, Value, concatenate_datasets, load_dataset
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.exceptions import DatasetGenerationError

from ..demo import load_demo_dataset


LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _blank(path: str) -> bool:
    """Whether a file holds nothing but whitespace (read in chunks: a large file stops at its first character)."""
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


def _load(name: str, config: str | None):
    """The dataset `name` names, with `datasets`' errors about its files said in one line."""
    try:
        return _load_files(name, config)
    except DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__ or error
        detail = " ".join(str(cause).split())[:300]
        hint = " Every file (every split) must have the same columns: add the missing column to each, or drop it." \
            if "column names don't match" in str(cause) or "CastError" in type(cause).__name__ else ""
        raise ValueError(f"dataset_name: {name!r} cannot be read ({type(cause).__name__}: {detail}).{hint}") from None


def _load_files(name: str, config: str | None):
    if name == "demo":
        return load_demo_dataset(config or "prompt_completion")
    extension = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if extension not in LOCAL_FORMATS:
            raise ValueError(f"dataset_name: {name!r} is a {extension or 'extension-less'} file; use one of "
                             f"{sorted(LOCAL_FORMATS)}, a folder, a Hub id, or 'demo'.")
        if os.path.getsize(name) == 0:
            raise ValueError(f"dataset_name: {name!r} is an empty file.")
        if _blank(name):
            raise ValueError(f"dataset_name: {name!r} holds only blank lines: no rows to train on.")
        if extension == ".csv":
            # Every column as text: pandas would read an answer column of numbers (" 42") as integers.
            with open(name, newline="") as handle:
                header = next(csv.reader(handle), [])
            return load_dataset("csv", data_files=name, keep_default_na=False,
                                features=Features({column: Value("string") for column in header}))
        return load_dataset(LOCAL_FORMATS[extension], data_files=name)
    if os.path.isdir(name):
        return _load_folder(name, config)
    if extension in LOCAL_FORMATS:
        raise ValueError(f"dataset_name: {name!r} does not exist (a local {extension} file was expected).")
    return load_dataset(name, config)


def _load_folder(name: str, config: str | None):
    """A data folder, split by split when its splits have different columns: the natural layout of prompts alone
    for training beside a labelled test split (`datasets` reads a folder as one table and refuses that)."""
    try:
        return load_dataset(name, config)
    except DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__
        if config is not None or "column names don't match" not in str(cause):
            raise
    files = DataFilesDict.from_patterns(get_data_patterns(name), base_path=name)
    return DatasetDict({str(split): load_dataset(name, data_files={str(split): list(paths)}, split=str(split))
                        for split, paths in files.items()})


def _map_columns(dataset: Dataset, columns: dict | None, prompt_template: str | None, split: str) -> Dataset:
    available = dataset.column_names
    if prompt_template:
        needed = [name for _, name, _, _ in string.Formatter().parse(prompt_template) if name]
        missing = [name for name in needed if name not in available]
        if missing:
            raise ValueError(f"prompt_template uses column(s) {missing} that the {split} split does not have; it "
                             f"has {available}.")
        dataset = dataset.map(lambda row: {"prompt": prompt_template.format(**{k: row[k] for k in needed})})
    for new, old in (columns or {}).items():
        if old not in dataset.column_names:
            raise ValueError(f"columns: {new}: {old!r} is not a column of the {split} split; it has "
                             f"{dataset.column_names}.")
        if new in dataset.column_names and new != old:
            dataset = dataset.remove_columns(new)
        dataset = dataset.rename_column(old, new)
    return dataset


def _text_problems(values: list) -> tuple[list[int], list[int]]:
    """`(rows that are null or not text, rows that are empty or blank)`, as row indices."""
    missing = [i for i, value in enumerate(values) if not isinstance(value, (str, list))]
    empty = [i for i, value in enumerate(values) if isinstance(value, str) and not value.strip()]
    return missing, empty


def check_rows(dataset: Dataset, where: str) -> None:
    """Refuses rows that cannot train (a null prompt, completion or text) and a split whose completions are all
    empty; warns, with the count, when some completions are empty (they carry no label token beyond EOS)."""
    for column in ("prompt", "completion", "text", "messages"):
        if column not in dataset.column_names:
            continue
        missing, empty = _text_problems(dataset[column])
        if missing:
            raise ValueError(f"{where}: column {column!r} is null (or not text) in {len(missing)} of {len(dataset)} "
                             f"rows (first: row {missing[0]}); fill or drop them.")
        if column in ("completion", "text") and empty:
            if len(empty) == len(dataset):
                raise ValueError(f"{where}: every {column!r} is empty ({len(dataset)} rows): there is nothing to "
                                 "learn; check the column mapping (columns: {completion: ANSWER_COLUMN}).")
            print(f"WARNING: {where}: {len(empty)} of {len(dataset)} rows have an empty {column!r} (first: row "
                  f"{empty[0]}); they teach only the end of the sequence.", flush=True)


def select_split(splits: DatasetDict, spec: str, key: str, dataset_name: str) -> Dataset:
    """The rows a split spec names: a split (`train`), or a slice in `datasets`' split syntax (`train[:25%]`,
    `train[100:400]`, `train[:200]+test`), read by `datasets.ReadInstruction` so it means what it means in
    `load_dataset(..., split=...)`."""
    try:
        instruction = ReadInstruction.from_spec(spec)
    except (ValueError, AssertionError):
        raise ValueError(f"{key}: {spec!r} is neither a split name nor a slice like 'train[:25%]' or "
                         "'train[100:400]'.") from None
    try:
        parts = instruction.to_absolute({name: len(data) for name, data in splits.items()})
    except ValueError:  # a split the dataset does not have
        names = [part.split("[")[0].strip() for part in spec.split("+")]
        unknown = next(name for name in names if name not in splits)
        raise ValueError(f"{key}: {unknown!r} is not a split of {dataset_name!r}; it has {list(splits)}.") from None
    empty = [part.splitname for part in parts if len(splits[part.splitname]) == 0]
    if empty:
        raise ValueError(f"{key}: the {empty[0]!r} split of {dataset_name!r} is empty (no rows).")
    if len(parts) == 1 and (parts[0].from_, parts[0].to) == (0, len(splits[parts[0].splitname])):
        return splits[parts[0].splitname]
    return concatenate_datasets([splits[part.splitname].select(range(part.from_, part.to)) for part in parts])


PROMPTS_KEYS = ("dataset_name", "dataset_config", "split", "columns", "prompt_template")


def prompts_source(options: dict) -> dict | None:
    """A recipe's `prompts:` in full: a split of the recipe's dataset (`prompts: train[240:]`), or a mapping of
    `PROMPTS_KEYS`; another dataset does not inherit the recipe's `dataset_config`, `columns` or `prompt_template`."""
    block = options.get("prompts")
    if block is None:
        return None
    block = {"split": block} if isinstance(block, str) else dict(block)
    same = block.get("dataset_name", options["dataset_name"]) == options["dataset_name"]
    inherited = {key: options[key] if same else None for key in ("dataset_config", "columns", "prompt_template")}
    return {"dataset_name": options["dataset_name"], **inherited, "split": "train", **block}


def load_recipe_prompts(options: dict) -> Dataset | None:
    """The rows of a recipe's `prompts:` source (None without one): their prompts are all that is read."""
    source = prompts_source(options)
    if source is None:
        return None
    name = source["dataset_name"]
    loaded = _load(name, source["dataset_config"])
    splits = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    dataset = _map_columns(select_split(splits, source["split"], "prompts.split", name), source["columns"],
                           source["prompt_template"], source["split"])
    column = next((c for c in ("prompt", "messages") if c in dataset.column_names), None)
    if column is None:
        raise ValueError(f"prompts: the {source['split']!r} split of {name!r} has columns {dataset.column_names} and "
                         "no 'prompt' or 'messages'; map one with prompts.columns or prompts.prompt_template.")
    missing, _ = _text_problems(dataset[column])
    if missing:
        raise ValueError(f"prompts: column {column!r} of the {source['split']!r} split of {name!r} is null (or not "
                         f"text) in {len(missing)} of {len(dataset)} rows (first: row {missing[0]}); fill or drop "
                         "them.")
    return dataset


def load_recipe_datasets(options: dict) -> tuple[Dataset, Dataset | None]:
    """`(train, eval or None)` for a recipe's dataset options, with its columns mapped. Clear errors on bad input."""
    loaded = _load(options["dataset_name"], options["dataset_config"])
    splits = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    result = []
    for key in ("dataset_train_split", "dataset_test_split"):
        split = options[key]
        if split is None:
            result.append(None)
            continue
        dataset = _map_columns(select_split(splits, split, key, options["dataset_name"]), options["columns"],
                               options["prompt_template"], split)
        if len(dataset) == 0:
            raise ValueError(f"{key}: the {split!r} split of {options['dataset_name']!r} is empty.")
        check_rows(dataset, f"the {split!r} split of {options['dataset_name']!r}")
        result.append(dataset)
    train = result[0]
    formats = ({"prompt"}, {"messages"}, {"text"})  # a prompt alone: prompt-only rows, for the methods that take them
    if not any(needed <= set(train.column_names) for needed in formats):
        raise ValueError(f"The train split has columns {train.column_names}, but training needs 'prompt' and "
                         "'completion', 'messages', or 'text' (or prompts alone, for seqkd and gkd at lmbda=1). Map "
                         "yours with `columns: {completion: answer}` and `prompt_template: 'Q: {question}\\nA:'`.")
    return train, result[1]
