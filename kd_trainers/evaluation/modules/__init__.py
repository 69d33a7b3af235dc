"""Local `evaluate` modules, loaded by path with `evaluate.load` (see `kd_trainers.evaluation.score.load_module`)."""
