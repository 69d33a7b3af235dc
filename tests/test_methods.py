"""Methods register themselves from their own folders; a recipe finds any registered method by name."""

import os
import subprocess
import sys

import pytest

from kd_trainers import methods
from kd_trainers.recipe import RecipeError, load_recipe


def test_every_method_folder_registers_itself():
    found = methods.available_methods()
    assert set(found) == {"sft", "kd", "dskd", "seqkd", "gkd", "uld", "gold", "mined"}
    assert [name for name, method in found.items() if not method.needs_teacher] == ["sft"]
    from kd_trainers.kd import KDTrainer

    assert found["kd"].trainer_class is KDTrainer


def test_a_new_method_is_usable_by_recipes_without_touching_anything_central(tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    methods.register_method("plain_sft", config="kd_trainers.sft.trainer:SFTConfig",
                            trainer="kd_trainers.sft.trainer:SFTTrainer", needs_teacher=False)
    path = tmp_path / "recipe.yaml"
    path.write_text("method: plain_sft\nmodel_name_or_path: demo:llama/student/bpe\nbf16: false\nreport_to: none\n")
    recipe = load_recipe(str(path))
    assert recipe.trainer_class.__name__ == "SFTTrainer" and not recipe.needs_teacher
    path.write_text("method: plain_sf\nmodel_name_or_path: demo:llama/student/bpe\n")
    with pytest.raises(RecipeError, match="method: 'plain_sf' is not a method.*Did you mean 'plain_sft'"):
        load_recipe(str(path))
    with pytest.raises(ValueError, match="registered twice"):
        methods.register_method("plain_sft", config="x:Y", trainer="x:Z")


def test_listing_the_methods_imports_no_trainer():
    code = ("import sys; from kd_trainers.methods import available_methods; available_methods(); "
            "print(sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.slow
def test_a_test_skipped_for_a_missing_module_fails(tmp_path):
    """The conftest hook: a broken install is never a green run."""
    tests = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "conftest.py").write_text(open(os.path.join(tests, "conftest.py")).read())
    (tmp_path / "test_x.py").write_text("import pytest\n\ndef test_x():\n    pytest.importorskip('no_such_module_x')\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                             str(tmp_path), "-c", os.devnull, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout
    assert "1 failed" in result.stdout and "missing dependency" in result.stdout
