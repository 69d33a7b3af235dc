"""The training rows: prompt/completion examples with their response boundary, tokenized as TRL's `SFTTrainer`
tokenizes them (`prompt_completion.py`), and the teacher's completions of prompts, cached and resumable
(`teacher_completions.py`). Imported module by module: nothing is loaded here."""
