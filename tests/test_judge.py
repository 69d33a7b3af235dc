"""LLM-judge metrics through both paths for real: an OpenAI-compatible HTTP server on loopback, and a tiny local
transformers model."""

import json
import math

import pytest

from kd_trainers.evaluation.judge import JUDGE_PROMPTS, LocalJudge, OpenAIJudge, judge_scores, parse_score


def test_parse_score_by_hand():
    assert parse_score("The answer matches.\nScore: 5") == 1.0
    assert parse_score("Score: 2/5") == 0.25
    assert parse_score("score = 3") == 0.5
    assert parse_score("First I thought Score: 1, but on reflection\nScore: 4") == 0.75  # the last one counts
    assert math.isnan(parse_score("I cannot tell."))
    assert math.isnan(parse_score("Score: 9"))


def test_openai_compatible_judge_over_http(endpoint):
    url, received = endpoint
    judge = OpenAIJudge(base_url=url, model="judge-7b", api_key="secret")
    frame = judge_scores(judge, predictions=["The RAN connects devices.", "wrong: it is a cable"],
                         references=["The radio access network links devices to the core."] * 2,
                         questions=["What does the RAN do?"] * 2, contexts=["The RAN links devices."] * 2,
                         metrics=["answer_correctness", "faithfulness"])
    assert list(frame["judge_answer_correctness"]) == [0.75, 0.25]
    assert list(frame["judge_faithfulness"]) == [0.75, 0.25]
    assert frame["judge_answer_correctness_reply"][0].endswith("Score: 4")
    assert len(received) == 4 and received[0]["path"] == "/v1/chat/completions"
    assert received[0]["auth"] == "Bearer secret"
    body = received[0]["body"]
    assert body["model"] == "judge-7b" and body["temperature"] == 0.0
    assert body["messages"][0]["content"] == JUDGE_PROMPTS["answer_correctness"].format(
        question="What does the RAN do?", reference="The radio access network links devices to the core.",
        prediction="The RAN connects devices.")
    assert frame.attrs["judge"] == {"kind": "openai-compatible", "base_url": url, "model": "judge-7b",
                                    "max_tokens": 256, "temperature": 0.0}
    assert set(frame.attrs["prompts"]) == {"answer_correctness", "faithfulness"}
    assert frame.attrs["unparsed"] == {"answer_correctness": 0, "faithfulness": 0}


def test_local_transformers_judge_runs_and_reports_unparsable_replies(bpe_tokenizer):
    from kd_trainers.demo import demo_model

    judge = LocalJudge(demo_model("llama", bpe_tokenizer, "student", seed=2), bpe_tokenizer, max_new_tokens=6,
                       name="demo-student")
    frame = judge_scores(judge, predictions=["It is 42.", "Paris"], questions=["What is 6*7?", "Capital?"],
                         metrics=["answer_relevancy"])
    assert len(frame) == 2 and all(isinstance(r, str) for r in frame["judge_answer_relevancy_reply"])
    scores = frame["judge_answer_relevancy"]
    assert all(math.isnan(s) or 0 <= s <= 1 for s in scores)
    assert frame.attrs["unparsed"]["answer_relevancy"] == int(scores.isna().sum())
    assert frame.attrs["judge"] == {"kind": "local", "model": "demo-student", "max_new_tokens": 6,
                                    "decoding": "greedy"}


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match=r"Judge metric 'faithfulness' needs \['context'\]"):
        judge_scores(lambda prompts: [], predictions=["a"], questions=["q"], metrics=["faithfulness"])
    with pytest.raises(ValueError, match="Unknown judge metric 'fluency'"):
        judge_scores(lambda prompts: [], predictions=["a"], metrics=["fluency"])


def test_kd_eval_with_an_endpoint_judge_saves_identity_and_prompts(tmp_path, endpoint):
    import pandas as pd

    from kd_trainers.cli.evaluate import main

    url, received = endpoint
    code = main(["--model", "demo:llama/student/bpe", "--dataset", "demo", "--split", "test", "--limit", "3",
                 "--max-new-tokens", "4", "--metrics", "rouge_l", "judge", "--judge-url", url,
                 "--judge-endpoint-model", "judge-7b", "--judge-metrics", "answer_correctness",
                 "--output", str(tmp_path)])
    assert code == 0 and len(received) == 3
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores["judge_answer_correctness"]) == [0.75, 0.75, 0.75] and "rouge_l" in scores
    saved = json.loads((tmp_path / "judge.json").read_text())
    assert saved["judge"]["model"] == "judge-7b" and saved["prompts"]["answer_correctness"].startswith("You grade")
    assert json.loads((tmp_path / "summary.json").read_text())["judge_answer_correctness"] == 0.75
    assert main(["--model", "demo:llama/student/bpe", "--metrics", "judge", "--output", str(tmp_path / "x")]) == 2
