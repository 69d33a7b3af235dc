"""`python -m kd_trainers.cli RECIPE [key=value ...]`: `kd-train`, as `python -m kd_trainers`."""

from .train import run_as_main

run_as_main()
