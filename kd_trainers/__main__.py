"""`python -m kd_trainers RECIPE [key=value ...]`, also under `accelerate launch [flags] -m kd_trainers ...`."""

import sys

from .cli import main
from .runtime.distributed import exit_launched_worker

status = main()
exit_launched_worker(status)  # a launched worker ends here (see kd_trainers.distributed); one process goes on
sys.exit(status)
