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
from ..errors import TeacherServerError
from ..served_teacher import TeacherClient
from ..served_teacher.client import ServerRefused, public_url, refusal_hint
from ..teachers.loading import check_same_vocabulary
from ..evaluation.harness import check_harness
from ..teacher_cache.cache import tokenizer_fingerprint
from ..teacher_cache.integrity import CacheProblem, check_whole
from ..teachers.cached import MEMBER_NOT_WRITTEN, NO_WRITER_IN_RECIPE, complete_cache_info
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
    """The recipe's teacher cache, whole, before anything loads: its info file against the schema, written with the
    recipe's cache settings, for its tokenizer and its data's rows, every block as written (checksums). A recipe
    without a teacher needs a complete one (nothing could write it). `repair` (`kd-train cache-teacher`): a damaged
    cache is left for the pass, which rewrites only what is damaged."""
    config = recipe.config
    path = getattr(config, "teacher_cache", None)
    if path is None:
        return
    writer = config.teacher_model_name_or_path is not None
    try:
        info = complete_cache_info(path, f"teacher_cache: {path!r}", None if writer else NO_WRITER_IN_RECIPE)
    except CacheProblem as error:
        if repair and writer:
            return
        raise RecipeError(f"{recipe.path}: {error}") from None
    except ValueError as error:
        raise RecipeError(f"{recipe.path}: {error}") from None
    if info is None:  # the named teacher writes it first
        return
    stored = info["components"]["settings"]
    wanted = {"mode": config.teacher_cache_mode, "k": config.teacher_cache_k}
    differ = [f"teacher_cache_{key}: {wanted[key]!r} where the cache has {stored[key]!r}" for key in wanted
              if stored.get(key) != wanted[key]]
    temperatures = stored["temperatures"]
    if config.teacher_cache_mode == "top_k" and float(config.kd_temperature) not in temperatures:
        differ.append(f"kd_temperature: {config.kd_temperature!r} where the cache stores the tail at "
                      f"temperatures {temperatures}")
    if differ:
        raise RecipeError(f"{recipe.path}: teacher_cache: {path!r} was written with other settings ("
                          f"{'; '.join(differ)}); point teacher_cache at a new folder or match its settings.")
    check_cache_fits(recipe, "teacher_cache", path, info, repair)


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


def check_cache_fits(recipe: Recipe, field: str, path: str, info: dict, repair: bool = False) -> None:
    """A complete cache (`info`) was written for the recipe's tokenizer and its data's number of rows, and every block
    is whole (`repair`: left to the pass that rewrites damaged blocks)."""
    tokenizer = _student_tokenizer(recipe)
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != info["components"]["tokenizer"]:
        raise RecipeError(f"{recipe.path}: {field}: {path!r} was written for another tokenizer than the student's "
                          f"({recipe.options['tokenizer_name_or_path'] or recipe.options['model_name_or_path']}); "
                          "point it at a cache written for this student, or a new folder.")
    dataset = recipe.options["dataset_name"]
    if dataset == "demo" or os.path.exists(dataset):
        try:
            train, evaluation = load_recipe_datasets(recipe.options)
        except ValueError as error:
            raise RecipeError(f"{recipe.path}: {error}") from None
        for split, rows in (("train", len(train)), ("eval", None if evaluation is None else len(evaluation))):
            stored = info["splits"].get(split, {}).get("rows")
            if rows is not None and stored != rows:
                raise RecipeError(f"{recipe.path}: {field}: {path!r} holds {stored} rows of the {split} split, and "
                                  f"the recipe's data has {rows}: it was written for other data. Point {field} at a "
                                  "new folder (or one written for this data).")
    if not repair:
        try:
            check_whole(path, info)
        except CacheProblem as error:
            where = "" if field == "teacher_cache" else f"{field}: "  # the problem names teacher_cache=PATH itself
            raise RecipeError(f"{recipe.path}: {where}{error}") from None


def check_teacher_server(recipe: Recipe) -> None:
    """A recipe's `teacher_url` answers as the run will ask it, before anything loads (`check_server_answers`)."""
    url = getattr(recipe.config, "teacher_url", None)
    if url is not None and recipe.needs_teacher:
        check_server_answers(recipe, "teacher_url", url, recipe.config.teacher_model_name_or_path)


def _probe_ids(tokenizer) -> list[int]:
    """Two token ids of the student's vocabulary (a short text's), for a request that must have one scored position."""
    if tokenizer is not None:
        ids = tokenizer("The answer is 42.", add_special_tokens=False)["input_ids"]
        if len(ids) >= 2:
            return ids[:2]
    return [0, 1]


def check_server_answers(recipe: Recipe, field: str, url: str, tokenizer_name: str | None = None) -> None:
    """The server at `url` (a recipe's `field`) answers, at the first try, what the run will ask of it: `GET /models`,
    then a real `prompt_logprobs` request at the run's k for two of the student's tokens, its answer checked as a
    step's would be. The served model's tokenizer (`tokenizer_name`, else the served model's name) must be the
    student's. Each failure is refused with what it means: no server, a wrong path, a k above the server's
    `--max-logprobs`, a server that answers fewer, another vocabulary."""
    config, where = recipe.config, f"{recipe.path}: {field}: {public_url(url)!r}"
    student = _student_tokenizer(recipe)
    if student is not None:  # a temperature a server cannot serve exactly: refused before it is asked anything
        try:
            config.check_served_temperature(f"{field}={public_url(url)!r}", len(student))
        except ValueError as error:
            raise RecipeError(f"{recipe.path}: {error}") from None
    client = TeacherClient(url, config.teacher_server_k, len(student) if student is not None else 2**31,
                           timeout=config.teacher_server_timeout, max_wait=0)
    try:
        served = client.served_model()
    except ServerRefused as error:
        raise RecipeError(f"{where} refused GET /models: HTTP {error.status}: {error.text[:200]} "
                          f"({refusal_hint(error.status, error.text, config.teacher_server_k)}).") from None
    except TeacherServerError as error:
        last = getattr(error, "last", error)
        raise RecipeError(f"{where} does not answer GET /models ({last}). Start the teacher's server first "
                          "(kd-serve-teacher MODEL --port PORT, or vLLM; see the README), then run again.") from None
    served_name = served.get("root") or served["id"]
    if student is not None:
        name = tokenizer_name or served_name
        try:
            teacher_tokenizer = resolve_tokenizer(name)
        except (OSError, ValueError) as error:
            raise RecipeError(f"{where} serves {served_name!r}, whose tokenizer does not load here "
                              f"({' '.join(str(error).split())[:200]}); name the teacher's Hub id or local path (teacher_model_name_"
                              "or_path, or the entry's tokenizer), which gives its tokenizer and is not loaded.") \
                from None
        try:
            check_same_vocabulary(student, teacher_tokenizer, recipe.options["model_name_or_path"],
                                  f"{served_name}, served at {public_url(url)}")
        except ValueError as error:
            raise RecipeError(f"{where}: {error}") from None
    try:
        client.probe(_probe_ids(student))
    except ServerRefused as error:
        raise RecipeError(f"{where} refused a prompt_logprobs request at teacher_server_k={config.teacher_server_k}: "
                          f"HTTP {error.status}: {error.text[:200]} "
                          f"({refusal_hint(error.status, error.text, config.teacher_server_k)}).") from None
    except TeacherServerError as error:
        last = getattr(error, "last", error)
        raise RecipeError(f"{where} gave no usable answer to a prompt_logprobs request at teacher_server_k="
                          f"{config.teacher_server_k} ({last}). A server that answers fewer log-probabilities than "
                          "asked caps them: restart it with --max-logprobs at least teacher_server_k, or lower "
                          "teacher_server_k.") from None


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
        elif entry.get("cache") is not None:
            try:
                info = complete_cache_info(entry["cache"], f"{where}.cache: {entry['cache']!r}", MEMBER_NOT_WRITTEN)
            except CacheProblem as error:
                raise RecipeError(f"{recipe.path}: {where}.cache: {error}") from None
            except ValueError as error:  # not complete: the message names where
                raise RecipeError(f"{recipe.path}: {error}") from None
            check_cache_fits(recipe, f"{where}.cache", entry["cache"], info)
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
