"""`python -m kd_trainers RECIPE [key=value ...]`, also under `accelerate launch [flags] -m kd_trainers ...`."""

import sys

from .cli import main

sys.exit(main())
