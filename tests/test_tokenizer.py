"""A saved model folder's tokenizer comes back as it was saved, whatever class transformers picks for the model type."""

import json

from kd_trainers.demo import demo_model
from kd_trainers.recipe.models import resolve_teacher
from kd_trainers.recipe.schema import validate_recipe
from kd_trainers.models.tokenizer import load_tokenizer

TEXT = "Q: What does RAN stand for?\nA: RAN stands for Radio Access Network.<|endoftext|>"


def test_a_qwen2_folder_saved_with_a_wordpiece_tokenizer_loads_that_tokenizer(tmp_path, wordpiece_tokenizer):
    # transformers 5 rebuilds a qwen2 folder's tokenizer as Qwen2's byte-level BPE from the saved vocabulary; the
    # WordPiece teacher of the demo then reads "What does RAN" as 'h', 'a', 't', ... (its capitals and spaces lost).
    folder = tmp_path / "teacher"
    demo_model("qwen2", wordpiece_tokenizer, "teacher", seed=1).save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    loaded = load_tokenizer(str(folder))
    assert loaded(TEXT).input_ids == wordpiece_tokenizer(TEXT).input_ids
    assert loaded.decode(loaded(TEXT).input_ids, skip_special_tokens=True) == \
        wordpiece_tokenizer.decode(wordpiece_tokenizer(TEXT).input_ids, skip_special_tokens=True)
    assert json.loads(loaded.backend_tokenizer.to_str())["model"]["type"] == "WordPiece"
    assert (loaded.eos_token, loaded.pad_token, loaded.chat_template) == (
        wordpiece_tokenizer.eos_token, wordpiece_tokenizer.pad_token, wordpiece_tokenizer.chat_template)

    # A recipe naming that folder as its teacher (DSKD across vocabularies) gets the same tokenizer.
    recipe = validate_recipe({"method": "dskd", "model_name_or_path": "demo:llama/student/bpe",
                              "teacher_model_name_or_path": str(folder), "output_dir": str(tmp_path / "out"),
                              "bf16": False})
    _, teacher_tokenizer = resolve_teacher(recipe)
    assert teacher_tokenizer(TEXT).input_ids == wordpiece_tokenizer(TEXT).input_ids


def test_a_folder_whose_tokenizer_matches_its_model_type_loads_as_usual(tmp_path, bpe_tokenizer):
    folder = tmp_path / "student"
    demo_model("llama", bpe_tokenizer, "student", seed=2).save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    assert load_tokenizer(str(folder))(TEXT).input_ids == bpe_tokenizer(TEXT).input_ids
