"""The models as the package reads them: a tokenizer as it was saved (`tokenizer.py`), a model's last hidden states
without its logits (`hidden_states.py`), batched generation with its predictions saved (`generation.py`) and the
small pretrained instruct models that packages on the package index ship as GGUF files (`real_models.py`). Imported
module by module: nothing is loaded here."""
