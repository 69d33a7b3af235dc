"""What a recipe needs from this machine, checked before anything heavy loads: the models, adapters and dataset it
names exist, the optional packages it uses are installed, publishing has a token and a repository id, and its output
folder can take the run. Every problem is a `RecipeError` naming the field, the value and the fix.

`pending` names folders that will exist by the time the recipe runs (a study's prepare steps): references into them
are not checked yet.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from huggingface_hub import get_token, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..demo.models import ARCHITECTURES, SIZES
from ..demo.tokenizers import TOKENIZER_KINDS
from ..errors import TeacherServerError
from ..evaluation.harness import check_harness
from ..teacher_cache.cache import INFO as CACHE_INFO
from ..teacher_cache.cache import TeacherCache
from .data import LOCAL_FORMATS
from .errors import NotAvailableYet, RecipeError
from .models import DEMO_PREFIX, served_model_name
from .output import check_output_dir
from .schema import Recipe


# report_to integration -> the module it imports
REPORTERS = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet_ml",
             "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio", "swanlab": "swanlab",
             "neptune": "neptune", "codecarbon": "codecarbon", "azure_ml": "azureml"}
EVALUATION_MODULES = ("pandas", "nltk", "sacrebleu", "rouge_score")


def _path_shaped(value: str) -> bool:
    """A local path rather than a Hub id: absolute, relative with ./ ../ ~, or with more than one `/`."""
    return (os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1 or value.endswith("/")
            or (os.sep != "/" and os.sep in value))


def _check_demo(field: str, value: str, where: str) -> None:
    parts = value[len(DEMO_PREFIX):].split("/")
    if len(parts) != 3 or parts[0] not in ARCHITECTURES or parts[1] not in SIZES or parts[2] not in TOKENIZER_KINDS:
        raise RecipeError(f"{where}: {field}: {value!r} is not a demo model: demo:ARCH/SIZE/TOKENIZER with ARCH in "
                          f"{sorted(ARCHITECTURES)}, SIZE in {sorted(SIZES)}, TOKENIZER in {list(TOKENIZER_KINDS)}.")


def check_model_reference(field: str, value: str | None, where: str, adapter: bool = False,
                          pending: tuple[str, ...] = ()) -> None:
    """A model, tokenizer or adapter reference: a demo spec, an existing folder with a config, or a Hub id."""
    if value is None:
        return
    if value.startswith(DEMO_PREFIX) and not adapter:
        return _check_demo(field, value, where)
    path = os.path.expanduser(value)
    if any(os.path.abspath(path).startswith(os.path.abspath(folder)) for folder in pending):
        return
    if os.path.exists(path):
        needed = ("adapter_config.json",) if adapter else ("config.json", "adapter_config.json", "tokenizer_config.json")
        if os.path.isfile(path) or not any(os.path.isfile(os.path.join(path, name)) for name in needed):
            raise RecipeError(f"{where}: {field}: {value!r} exists but is not a model folder (no "
                              f"{' or '.join(needed)} in it); name the folder a run saved.")
        return
    if _path_shaped(value):
        raise NotAvailableYet(f"{where}: {field}: {value!r} does not exist (no such folder); check the path, or run "
                              "the recipe that produces it first.")

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise RecipeError(f"{where}: {field}: {value!r} is neither an existing folder nor a Hub id "
                          "(organisation/name).") from None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        files = ("adapter_config.json",) if adapter else ("config.json", "adapter_config.json", "tokenizer_config.json")
        if not any(isinstance(try_to_load_from_cache(value, name), str) for name in files):
            raise NotAvailableYet(f"{where}: {field}: {value!r} is not a local folder, and not in the Hub cache while "
                                  "HF_HUB_OFFLINE is set; download it first or give a local path.")


def check_dataset_reference(options: dict, where: str, pending: tuple[str, ...] = ()) -> None:
    name = options["dataset_name"]
    if name == "demo":
        return
    path = os.path.expanduser(name)
    if any(os.path.abspath(path).startswith(os.path.abspath(folder)) for folder in pending) or os.path.exists(path):
        return
    if _path_shaped(name) or os.path.splitext(name)[1].lower() in LOCAL_FORMATS:
        raise NotAvailableYet(f"{where}: dataset_name: {name!r} does not exist (no such file or folder); check the "
                              "path.")


def _require(module: str, why: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RecipeError(f"{why} needs the {module!r} package, which is not installed: pip install '{extra}'.")


def check_dependencies(recipe: Recipe) -> None:
    """The optional packages the recipe uses are installed, with the command that installs them."""
    where, config = recipe.path, recipe.config
    block = recipe.options["accelerate"] or {}
    if str(block.get("config", "")).startswith("zero") or getattr(config, "deepspeed", None):
        name = f"accelerate.config: {block['config']!r}" if block.get("config") else "deepspeed"
        _require("deepspeed", f"{where}: {name} (DeepSpeed)", "kd-trainers[deepspeed]")
    for reporter in config.report_to or []:
        if reporter in REPORTERS:
            _require(REPORTERS[reporter], f"{where}: report_to: {reporter!r}", REPORTERS[reporter])
    if recipe.options["evaluation"] or recipe.options["agreement"]:
        key = "evaluation" if recipe.options["evaluation"] else "agreement"
        for module in EVALUATION_MODULES:
            _require(module, f"{where}: {key}", "kd-trainers[eval]")


def check_publishing(recipe: Recipe) -> None:
    """`push_to_hub: true` has a token (the recipe's, HF_TOKEN or `hf auth login`) and a valid repository id."""
    config = recipe.config
    if not config.push_to_hub:
        return

    repo_id = config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir))
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise RecipeError(f"{recipe.path}: hub_model_id: {repo_id!r} is not a Hub repository id ({error}); set "
                          "hub_model_id: organisation/name.") from None
    if not (config.hub_token or get_token()):
        raise RecipeError(f"{recipe.path}: push_to_hub: true needs a Hub token: set HF_TOKEN in the environment or "
                          "run `hf auth login` (a token in the recipe is redacted from everything saved).")


def remote_code_warning(recipe: Recipe) -> str | None:
    """The warning line for a recipe that lets a model repository run its own code on this machine."""
    config = recipe.config
    fields = [name for name in ("model_init_kwargs", "teacher_model_init_kwargs")
              if isinstance(getattr(config, name, None), dict) and getattr(config, name).get("trust_remote_code")]
    if not fields:
        return None
    return (f"WARNING: {recipe.path} sets trust_remote_code in {', '.join(fields)}: the model repository's own Python "
            "code will run on this machine. A recipe is code: run only recipes you trust.")


def check_teacher_cache(recipe: Recipe) -> None:
    """A complete teacher cache must have been written with the recipe's cache settings, and a recipe without a
    teacher needs one (nothing could write it). Its data is checked row by row when the trainer has tokenized it."""
    config = recipe.config
    path = getattr(config, "teacher_cache", None)
    if path is None:
        return
    info = os.path.join(path, CACHE_INFO)
    if os.path.isfile(info):
        with open(info) as handle:
            stored = json.load(handle)["components"]["settings"]
        wanted = {"mode": config.teacher_cache_mode, "k": config.teacher_cache_k}
        differ = [f"teacher_cache_{key}: {wanted[key]!r} where the cache has {stored[key]!r}" for key in wanted
                  if stored.get(key) != wanted[key]]
        temperatures = stored.get("temperatures", [1.0])
        if config.teacher_cache_mode == "top_k" and float(config.kd_temperature) not in temperatures:
            differ.append(f"kd_temperature: {config.kd_temperature!r} where the cache stores the tail at "
                          f"temperatures {temperatures}")
        if differ:
            raise RecipeError(f"{recipe.path}: teacher_cache: {path!r} was written with other settings ("
                              f"{'; '.join(differ)}); point teacher_cache at a new folder or match its settings.")
        return
    if config.teacher_model_name_or_path is None:
        raise RecipeError(f"{recipe.path}: teacher_cache: {path!r} holds no complete teacher cache, and "
                          "teacher_model_name_or_path is null, so nothing can write it. Name the teacher (the cache "
                          "is written first), or run kd-train cache-teacher with it.")


def check_teacher_server(recipe: Recipe) -> None:
    """A recipe's `teacher_url` must answer (`GET /models`, one try) before anything loads."""
    url = getattr(recipe.config, "teacher_url", None)
    if url is not None and recipe.needs_teacher:
        check_server_answers(recipe, "teacher_url", url)


def check_server_answers(recipe: Recipe, field: str, url: str) -> None:
    """The server at `url` (a recipe's `field`) answers `GET /models`, at the first try."""
    try:
        served_model_name(recipe.config, url, max_wait=0)
    except TeacherServerError as error:
        last = getattr(error, "last", error)
        raise RecipeError(f"{recipe.path}: {field}: {url!r} does not answer GET /models ({last}). Start the "
                          "teacher's server first (kd-serve-teacher MODEL --port PORT, or vLLM; see the README), "
                          "then run again.") from None


def check_teachers(recipe: Recipe, pending: tuple[str, ...] = ()) -> None:
    """Each teacher of a `teachers:` block: a model and its adapter exist, a cache is complete, a server answers."""
    for index, entry in enumerate(recipe.options.get("teachers") or []):
        where = f"teachers[{index}]"
        if entry.get("model") is not None:
            check_model_reference(f"{where}.model", entry["model"], recipe.path, pending=pending)
            check_model_reference(f"{where}.adapter", entry.get("adapter"), recipe.path, adapter=True,
                                  pending=pending)
        elif entry.get("cache") is not None:
            if TeacherCache.open(entry["cache"]) is None:
                raise RecipeError(f"{recipe.path}: {where}.cache: {entry['cache']!r} holds no complete teacher cache; "
                                  "write it first (kd-train cache-teacher RECIPE teacher_cache=PATH).")
        else:
            check_server_answers(recipe, f"{where}.url", entry["url"])


def preflight(recipe: Recipe, pending: tuple[str, ...] = (), output: bool = True,
              notes: list[str] | None = None) -> None:
    """Every check above; `output=False` leaves the output folder unchecked (`kd-train validate`). With a `notes`
    list, what is well formed but not on this machine yet (`NotAvailableYet`: a model not downloaded, an adapter or
    data an earlier step produces) is noted there instead of refused, and the other checks still run."""
    config, options, where = recipe.config, recipe.options, recipe.path

    def attempt(check, *args, **kwargs) -> None:
        try:
            check(*args, **kwargs)
        except NotAvailableYet as error:
            if notes is None:
                raise
            notes.append(str(error))

    attempt(check_model_reference, "model_name_or_path", options["model_name_or_path"], where, pending=pending)
    attempt(check_model_reference, "tokenizer_name_or_path", options["tokenizer_name_or_path"], where,
            pending=pending)
    attempt(check_model_reference, "model_adapter_name_or_path", options["model_adapter_name_or_path"], where,
            adapter=True, pending=pending)
    if recipe.needs_teacher:
        attempt(check_model_reference, "teacher_model_name_or_path", config.teacher_model_name_or_path, where,
                pending=pending)
        attempt(check_model_reference, "teacher_tokenizer_name_or_path",
                getattr(config, "teacher_tokenizer_name_or_path", None), where, pending=pending)
        attempt(check_model_reference, "teacher_adapter_name_or_path", config.teacher_adapter_name_or_path, where,
                adapter=True, pending=pending)
    check_teacher_cache(recipe)
    check_teacher_server(recipe)
    attempt(check_teachers, recipe, pending)
    judge = (options["evaluation"] or {}).get("judge") or {}
    if "judge" in (options["evaluation"] or {}).get("metrics", []) and judge.get("model"):
        attempt(check_model_reference, "evaluation.judge.model", judge["model"], where, pending=pending)
    attempt(check_dataset_reference, options, where, pending)
    check_dependencies(recipe)
    if (options["evaluation"] or {}).get("lm_eval"):  # the task names, by lm-eval itself, before training
        check_harness(options["evaluation"]["lm_eval"], where, RecipeError)
    check_publishing(recipe)
    if output:
        check_output_dir(recipe)
    warning = remote_code_warning(recipe)
    if warning:
        print(warning, file=sys.stderr, flush=True)
