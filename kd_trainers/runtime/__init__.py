"""The run's own machinery, below the methods: atomic files and `done.json` (`files.py`), secrets kept off the disk
(`redaction.py`), process-group teardown (`distributed.py`), the `KD_TRAINERS_SMOKE` caps (`smoke.py`), the guards in
every trainer (`guards.py`: non-finite losses, dropped examples, settings that train nothing), atomic checkpoints
(`checkpointing.py`) and progress lines (`progress.py`). Imported module by module: nothing is loaded here."""
