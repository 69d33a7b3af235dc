"""What `pip install kd-trainers` gives: the built wheel, installed into a fresh environment outside the clone, lists,
copies and runs its shipped recipes by name."""

import glob
import json
import os
import site
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # builds and installs the wheel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_wheel_installed_outside_the_clone_lists_copies_and_runs_shipped_recipes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), ROOT], check=True, capture_output=True)
    wheel = glob.glob(str(tmp_path / "dist" / "kd_trainers-*.whl"))[0]
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = str(env / "bin" / "python")
    env_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    # The dependencies (torch, transformers, ...) come from this environment; kd_trainers only from the wheel (a
    # path in a .pth file is added as it is: the editable install's own hook there is not run).
    with open(os.path.join(env_site, "dependencies.pth"), "w") as handle:
        handle.write("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args):
        return subprocess.run([str(env / "bin" / args[0]), *args[1:]], cwd=work, capture_output=True, text=True)

    where = subprocess.run([python, "-c", "import kd_trainers; print(kd_trainers.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(env_site), where  # the installed package, not the checkout

    listed = run("kd-train", "list")
    assert listed.returncode == 0, listed.stderr
    for name in ("vanilla_kd", "dskd", "telecom_qa/dskd_cma_mistral7b_tinyllama", "studies/methods"):
        assert f"  {name} " in listed.stdout, name
    assert run("kd-train", "--version").stdout.strip().startswith("kd-trainers ")

    copied = run("kd-train", "cp", "vanilla_kd", "my.yaml")
    assert copied.returncode == 0, copied.stderr
    assert (work / "my.yaml").read_text() == open(os.path.join(ROOT, "recipes", "vanilla_kd.yaml")).read()

    trained = run("kd-train", "vanilla_kd", "max_steps=2", "per_device_train_batch_size=4", "max_length=64",
                  "dataset_test_split=null", "output_dir=run")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((work / "run" / "done.json").read_text())["global_step"] == 2
    assert (work / "run" / "model.safetensors").exists()
