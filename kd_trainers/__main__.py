"""`python -m kd_trainers RECIPE [key=value ...]`, also under `accelerate launch [flags] -m kd_trainers ...`."""

from .cli.train import run_as_main

run_as_main()
