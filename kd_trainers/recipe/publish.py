"""Publishing a distilled student to the Hub: a complete local folder first, then one upload.

The folder `<output_dir>/publish/` holds the student (its LoRA adapter merged when asked), the tokenizer and a model
card recording the teacher, the method, every KD setting, the datasets and the evaluation results when there are any.
It is built in `publish.tmp/` and renamed when complete, and the card is parsed back with huggingface_hub before any
upload. An upload that fails leaves the folder as it is and raises `PublishError`, which says how to upload it later.
"""

from __future__ import annotations

import os
import shutil

from huggingface_hub import HfApi, ModelCard

PUBLISH_DIR = "publish"


class PublishError(RuntimeError):
    """The upload failed; the local folder is complete."""


def _evaluation_section(trainer) -> str:
    latest = {}
    for log in trainer.state.log_history:
        latest.update({key: value for key, value in log.items() if key.startswith("eval_")})
    if not latest:
        return ""
    rows = "\n".join(f"| `{key}` | {value:.4g} |" for key, value in sorted(latest.items())
                     if isinstance(value, (int, float)))
    return f"\n## Evaluation results\n\nAt step {trainer.state.global_step}.\n\n| metric | value |\n|---|---|\n{rows}\n"


def build_publish_folder(trainer, merge_lora: bool = False, dataset_name: str | None = None) -> str:
    """Writes the complete folder to upload and returns its path (main process only)."""
    output_dir = trainer.args.output_dir
    final, staging = os.path.join(output_dir, PUBLISH_DIR), os.path.join(output_dir, PUBLISH_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with trainer.published_model() as model:
        if merge_lora and hasattr(model, "merge_and_unload"):
            # Merges in place: publishing is the run's last step, after the adapter itself was saved.
            model.merge_and_unload().save_pretrained(staging)
        else:
            model.save_pretrained(staging)
    trainer.processing_class.save_pretrained(staging)
    trainer.create_model_card(model_name=trainer.hub_model_id.split("/")[-1] if getattr(trainer, "hub_model_id", None)
                              else os.path.basename(os.path.abspath(output_dir)), dataset_name=dataset_name)
    card_path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(card_path)
    card.text += _evaluation_section(trainer)
    card.save(os.path.join(staging, "README.md"))
    ModelCard.load(os.path.join(staging, "README.md"), ignore_metadata_errors=False)  # parses, or raises
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def upload(folder: str, repo_id: str, token: str | None = None) -> str:
    """Creates the repository if needed and uploads `folder`; returns the repository URL."""
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload distilled student")
    except Exception as error:  # network, authentication, permissions: all mean "not uploaded"
        raise PublishError(
            f"Uploading to the Hub repository {repo_id!r} failed ({type(error).__name__}: {error}). The complete "
            f"folder is at {folder}; upload it later with `hf upload {repo_id} {folder}`."
        ) from None
    return f"https://huggingface.co/{repo_id}"
