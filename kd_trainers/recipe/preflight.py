"""What a recipe needs from this machine, checked before anything heavy loads: the models, adapters and dataset it
names exist, the optional packages it uses are installed, publishing has a token and a repository id, and its output
folder can take the run. Every problem is a `RecipeError` naming the field, the value and the fix.

`pending` names folders that will exist by the time the recipe runs (a study's prepare steps): references into them
are not checked yet.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from huggingface_hub import get_token, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..demo.models import ARCHITECTURES, SIZES
from ..demo.tokenizers import TOKENIZER_KINDS
from ..evaluation.harness import check_harness
from ..teachers.cached import MEMBER_NOT_WRITTEN, NO_WRITER_IN_RECIPE, check_cache_before_loading
from ..teachers.needs import stand_in_tokenization
from ..teachers.served import check_server_before_loading
from .data import LOCAL_FORMATS, load_recipe_datasets
from .errors import NotAvailableYet, RecipeError
from .models import DEMO_PREFIX, resolve_tokenizer
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


def check_teacher_cache(recipe: Recipe, repair: bool = False) -> None:
    """The recipe's teacher cache, checked by its kind before anything loads (`teachers.cached.
    check_cache_before_loading`): complete (a recipe without a teacher needs one: nothing could write it), written
    with the recipe's cache settings, for its tokenizer and its data's rows, every block as written. `repair`
    (`kd-train cache-teacher`): a damaged cache is left for the pass, which rewrites only what is damaged."""
    config = recipe.config
    path = getattr(config, "teacher_cache", None)
    if path is None:
        return
    if stand_in_tokenization(config) == "teacher" and config.teacher_model_name_or_path is None and \
            getattr(config, "teacher_tokenizer_name_or_path", None) is None:
        raise RecipeError(f"{recipe.path}: teacher_cache: {path!r} holds the teacher at its own tokenization, and "
                          "neither teacher_model_name_or_path nor teacher_tokenizer_name_or_path names the teacher's "
                          "tokenizer, which tokenizes each example a second time. Set teacher_tokenizer_name_or_path.")
    _cache_before_loading(recipe, path, "teacher_cache", writer_named=config.teacher_model_name_or_path is not None,
                          no_writer=NO_WRITER_IN_RECIPE, repair=repair,
                          settings={"mode": config.teacher_cache_mode, "k": config.teacher_cache_k,
                                    "temperature": config.kd_temperature,
                                    "tokenization": stand_in_tokenization(config)})


def _cache_before_loading(recipe: Recipe, path: str, field: str, **checks) -> None:
    """`check_cache_before_loading` with what the recipe knows: the student's tokenizer and, for data on this machine,
    its rows; a problem is the recipe's error."""
    def rows() -> dict:
        dataset = recipe.options["dataset_name"]
        if not (dataset == "demo" or os.path.exists(dataset)):
            return {}  # known once loaded: the trainer checks them then
        train, evaluation = load_recipe_datasets(recipe.options)
        return {"train": len(train), "eval": None if evaluation is None else len(evaluation)}

    try:
        check_cache_before_loading(path, field, tokenizer=_student_tokenizer(recipe), rows=rows,
                                   student_name=recipe.options["tokenizer_name_or_path"]
                                   or recipe.options["model_name_or_path"], **checks)
    except ValueError as error:
        raise RecipeError(f"{recipe.path}: {error}") from None


# A demo spec's tokenizer is trained when it is built (about a second): built once per process for the checks (a study
# checks every cell, a recipe may check a cache and servers), and only read by them.
_DEMO_TOKENIZERS: dict = {}


def _student_tokenizer(recipe: Recipe):
    """The student's tokenizer as the trainer will hold it (SFTTrainer's `eos_token` and pad token set), or None when
    it does not load here yet (a model not downloaded: noted elsewhere) or when the trainer will change it further
    (`chat_template_path` may add tokens): the trainer checks it then."""
    options, config = recipe.options, recipe.config
    if getattr(config, "chat_template_path", None) is not None:
        return None
    name = options["tokenizer_name_or_path"] or options["model_name_or_path"]
    key = (name, getattr(config, "eos_token", None), getattr(config, "pad_token", None))
    if key in _DEMO_TOKENIZERS:
        return _DEMO_TOKENIZERS[key]
    try:
        tokenizer = resolve_tokenizer(name)
    except (OSError, ValueError):
        return None
    eos, pad = key[1:]
    if eos is not None and eos in tokenizer.get_vocab():
        tokenizer.eos_token = eos
    pad = pad or tokenizer.pad_token or tokenizer.eos_token
    if pad is not None and pad in tokenizer.get_vocab():
        tokenizer.pad_token = pad
    if name.startswith(DEMO_PREFIX):
        _DEMO_TOKENIZERS[key] = tokenizer
    return tokenizer


def check_teacher_server(recipe: Recipe) -> None:
    """A recipe's `teacher_url` answers as the run will ask it, before anything loads (`check_server_answers`)."""
    url = getattr(recipe.config, "teacher_url", None)
    if url is not None and recipe.needs_teacher:
        check_server_answers(recipe, "teacher_url", url, recipe.config.teacher_model_name_or_path)


def check_server_answers(recipe: Recipe, field: str, url: str, tokenizer_name: str | None = None) -> None:
    """The server at `url` (a recipe's `field`) checked by its kind before anything loads (`teachers.served.
    check_server_before_loading`), with the recipe's student tokenizer and settings; a problem is the recipe's
    error."""
    try:
        check_server_before_loading(url, field, recipe.config, _student_tokenizer(recipe),
                                    recipe.options["model_name_or_path"], tokenizer_name,
                                    load_tokenizer=resolve_tokenizer)
    except ValueError as error:
        raise RecipeError(f"{recipe.path}: {error}") from None


def check_teachers(recipe: Recipe, pending: tuple[str, ...] = ()) -> None:
    """Each teacher of a `teachers:` block: a model and its adapter exist, a cache is complete, a server answers."""
    for index, entry in enumerate(recipe.options.get("teachers") or []):
        where = f"teachers[{index}]"
        if isinstance(entry.get("tokenizer"), str):
            check_model_reference(f"{where}.tokenizer", entry["tokenizer"], recipe.path, pending=pending)
        if entry.get("model") is not None:
            check_model_reference(f"{where}.model", entry["model"], recipe.path, pending=pending)
            check_model_reference(f"{where}.adapter", entry.get("adapter"), recipe.path, adapter=True,
                                  pending=pending)
        elif entry.get("cache") is not None:  # read as it was written: its own settings
            _cache_before_loading(recipe, entry["cache"], f"{where}.cache", writer_named=False,
                                  no_writer=MEMBER_NOT_WRITTEN)
        else:
            check_server_answers(recipe, f"{where}.url", entry["url"], entry.get("tokenizer"))


def preflight(recipe: Recipe, pending: tuple[str, ...] = (), output: bool = True,
              notes: list[str] | None = None, repair: bool = False) -> None:
    """Every check above; `output=False` leaves the output folder unchecked (`kd-train validate`); `repair` leaves a
    damaged teacher cache to `kd-train cache-teacher`, which rewrites what is damaged. With a `notes`
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
    check_teacher_cache(recipe, repair)
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
