"""Metadata is in setup.cfg. This file adds one build step: the repository's top-level `recipes/` (their one source,
what users browse) is copied into the package as `kd_trainers/recipes/`, so that a wheel or sdist install has the
shipped recipes, studies and accelerate configs (`kd-train list`, `kd-train NAME`, `kd-train cp NAME DEST`)."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithRecipes(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's recipes/ directly
            return
        target = os.path.join(self.build_lib, "kd_trainers", "recipes")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree("recipes", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithRecipes})
