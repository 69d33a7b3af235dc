"""LLM-judge metrics in the RAGAS spirit, from a local transformers model or any OpenAI-compatible endpoint.

Each metric is one prompt of this package's own (`JUDGE_PROMPTS`, saved with the scores) asking the judge for a
1-to-5 rating on its last line as `Score: N`; the rating is mapped to [0, 1] as (N − 1) / 4. A reply without a
parsable score gives NaN (counted in `attrs["unparsed"]`), never a guess. The judge's identity (model, endpoint,
generation settings) is recorded with the scores.

- `answer_correctness`: does the answer state the same facts as the reference answer to the question?
- `answer_similarity`: how close in meaning are the answer and the reference?
- `faithfulness`: is everything the answer claims supported by the context? (needs contexts)
- `answer_relevancy`: does the answer address the question?
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import pandas as pd
from huggingface_hub import InferenceClient
from transformers import AutoModelForCausalLM

from ..models.generation import generate_predictions
from ..models.tokenizer import load_tokenizer
from .settings import DEFAULT_JUDGE_METRICS


_SCALE = ("Rate it from 1 (worst) to 5 (best). Think briefly if you need to, then end your reply with a last line of "
          "the form `Score: N`.")
JUDGE_PROMPTS: dict[str, str] = {
    "answer_correctness": ("You grade answers to questions.\nQuestion: {question}\nReference answer: {reference}\n"
                           "Answer to grade: {prediction}\nDoes the answer state the same facts as the reference "
                           "answer, with nothing false? " + _SCALE),
    "answer_similarity": ("You compare two texts.\nReference: {reference}\nCandidate: {prediction}\nHow close in "
                          "meaning is the candidate to the reference? " + _SCALE),
    "faithfulness": ("You check answers against their source.\nContext: {context}\nQuestion: {question}\nAnswer: "
                     "{prediction}\nIs every claim of the answer supported by the context? " + _SCALE),
    "answer_relevancy": ("You check whether answers address their question.\nQuestion: {question}\nAnswer: "
                         "{prediction}\nDoes the answer address the question directly and completely? " + _SCALE),
}
_SCORE = re.compile(r"score\s*[:=]\s*([1-5])(?:\s*/\s*5)?\b", re.IGNORECASE)


def parse_score(reply: str) -> float:
    """The last `Score: N` (1..5) of a reply mapped to [0, 1]; NaN when there is none."""
    found = _SCORE.findall(reply or "")
    return (int(found[-1]) - 1) / 4 if found else math.nan


@dataclass
class LocalJudge:
    """A transformers causal LM as the judge (greedy decoding, its chat template when it has one)."""

    model: object
    tokenizer: object
    max_new_tokens: int = 64
    name: str = ""

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "LocalJudge":
        return cls(AutoModelForCausalLM.from_pretrained(name_or_path), load_tokenizer(name_or_path),
                   name=name_or_path, **kwargs)

    @property
    def identity(self) -> dict:
        return {"kind": "local", "model": self.name or type(self.model).__name__,
                "max_new_tokens": self.max_new_tokens, "decoding": "greedy"}

    def __call__(self, prompts: list[str]) -> list[str]:
        if getattr(self.tokenizer, "chat_template", None):  # a user turn, formatted by generation's one formatter
            prompts = [[{"role": "user", "content": p}] for p in prompts]
        return generate_predictions(self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens)


@dataclass
class OpenAIJudge:
    """Any OpenAI-compatible chat endpoint as the judge (vLLM, TGI, Ollama, ...): POST `{base_url}/chat/completions`
    with temperature 0."""

    base_url: str
    model: str
    api_key: str | None = None
    max_tokens: int = 256
    timeout: float = 120.0
    headers: dict = field(default_factory=dict)

    @property
    def identity(self) -> dict:
        return {"kind": "openai-compatible", "base_url": self.base_url, "model": self.model,
                "max_tokens": self.max_tokens, "temperature": 0.0}

    def _ask(self, prompt: str) -> str:
        # huggingface_hub's client speaks the OpenAI chat-completions protocol (vLLM, TGI, Ollama, OpenAI itself).

        client = InferenceClient(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout,
                                 headers=self.headers or None)
        reply = client.chat_completion(messages=[{"role": "user", "content": prompt}], model=self.model,
                                       temperature=0.0, max_tokens=self.max_tokens)
        try:
            return reply.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise ValueError(f"The judge endpoint {self.base_url} answered without choices[0].message.content: "
                             f"{str(reply)[:300]}") from None

    def __call__(self, prompts: list[str]) -> list[str]:
        return [self._ask(prompt) for prompt in prompts]




def make_judge(model: str | None = None, url: str | None = None, endpoint_model: str | None = None,
               api_key: str | None = None):
    """A local transformers judge (`model`: path or Hub id), else an OpenAI-compatible one (`url`, `endpoint_model`)."""
    if model:
        return LocalJudge.from_pretrained(model)
    return OpenAIJudge(base_url=url, model=endpoint_model, api_key=api_key)


def save_judge_record(judged: pd.DataFrame, path: str) -> None:
    """The judge's identity, the prompts and the unparsed counts of a `judge_scores` frame, as JSON."""
    with open(path, "w") as handle:
        json.dump({key: judged.attrs[key] for key in ("judge", "prompts", "unparsed")}, handle, indent=2)


def judge_scores(judge, predictions: list[str], references: list[str] | None = None,
                 questions: list[str] | None = None, contexts: list[str] | None = None,
                 metrics: list[str] = DEFAULT_JUDGE_METRICS) -> pd.DataFrame:
    """One row per example, a `judge_<metric>` column per metric in [0, 1] (NaN when unparsable), and the judge's raw
    replies in `judge_<metric>_reply`. `attrs`: `judge` (identity), `prompts` (the templates), `unparsed` (counts)."""
    available = {"question": questions, "reference": references, "context": contexts}
    needs = {"answer_correctness": ("question", "reference"), "answer_similarity": ("reference",),
             "faithfulness": ("context", "question"), "answer_relevancy": ("question",)}
    frame = pd.DataFrame({"example_id": range(len(predictions))})
    unparsed = {}
    for metric in metrics:
        if metric not in JUDGE_PROMPTS:
            raise ValueError(f"Unknown judge metric {metric!r}; use one of {sorted(JUDGE_PROMPTS)}.")
        missing = [name for name in needs[metric] if available[name] is None]
        if missing:
            raise ValueError(f"Judge metric {metric!r} needs {missing} (pass them, one per prediction).")
        prompts = [JUDGE_PROMPTS[metric].format(prediction=prediction, **{
            name: available[name][i] for name in needs[metric]}) for i, prediction in enumerate(predictions)]
        replies = judge(prompts)
        frame[f"judge_{metric}"] = [parse_score(reply) for reply in replies]
        frame[f"judge_{metric}_reply"] = replies
        unparsed[metric] = int(frame[f"judge_{metric}"].isna().sum())
    frame.attrs.update(judge=judge.identity, prompts={m: JUDGE_PROMPTS[m] for m in metrics}, unparsed=unparsed)
    return frame
