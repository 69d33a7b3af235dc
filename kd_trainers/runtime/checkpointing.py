"""Atomic checkpoints: a checkpoint folder appears complete or not at all.

`transformers.Trainer` writes `checkpoint-N/` in place, file after file; a run killed while saving leaves a folder that
`get_last_checkpoint` takes for a checkpoint, and resuming from it fails or, worse, silently loads a mix. Here every
process writes into `<output_dir>/.staging/checkpoint-N/`, and once all of them are done the main process renames it to
`<output_dir>/checkpoint-N` (`os.replace`: atomic on one filesystem) and only then rotates old checkpoints.

`Trainer` also pickles its `TrainingArguments` into every checkpoint and the final folder (`training_args.bin`); here
they are pickled with their secrets (`hub_token`) set to None and the credentials of any URL (`teacher_url`) redacted,
so that no token or password reaches the disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil

from transformers.trainer_utils import rotate_checkpoints

from .redaction import is_secret_key, redact

STAGING_DIR = ".staging"


class AtomicCheckpointMixin:
    """Mix into a `transformers.Trainer` subclass, before the Trainer class: `class T(AtomicCheckpointMixin, SFTTrainer)`."""

    _checkpoint_staging: str | None = None

    @contextlib.contextmanager
    def _arguments_without_secrets(self):
        """`self.args` with every secret field (`hub_token`) None and every URL's credentials redacted (in a string
        field, or one holding a list or dict: several teachers' URLs) while files are written; restored after."""
        hidden, replaced = {}, {}
        for f in dataclasses.fields(self.args):
            value = getattr(self.args, f.name, None)
            if is_secret_key(f.name) and isinstance(value, str):
                hidden[f.name], replaced[f.name] = value, None
            elif isinstance(value, (str, list, tuple, dict)) and redact(value) != value:
                hidden[f.name], replaced[f.name] = value, redact(value)
        for name, value in replaced.items():
            object.__setattr__(self.args, name, value)
        try:
            yield
        finally:
            for name, value in hidden.items():
                object.__setattr__(self.args, name, value)

    @contextlib.contextmanager
    def published_model(self):
        """The trained model as it is published (`kd_trainers.recipe.publish`): the unwrapped model; a method whose model
        holds training-only parts (DSKD's projectors) yields it without them."""
        yield self.accelerator.unwrap_model(self.model)

    def _save(self, output_dir=None, state_dict=None):
        with self._arguments_without_secrets():
            return super()._save(output_dir, state_dict)

    def _get_output_dir(self, trial):
        if self._checkpoint_staging is not None:
            return self._checkpoint_staging
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save and os.path.exists(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            with self._arguments_without_secrets():
                super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()  # every rank's shards are written
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(
                    self.state.best_model_checkpoint))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()
