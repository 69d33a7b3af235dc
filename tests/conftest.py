import logging

import datasets
import pytest
from transformers.utils import logging as hf_logging

from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
datasets.disable_progress_bars()
logging.getLogger("datasets").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return demo_tokenizer("bpe")


@pytest.fixture(scope="session")
def wordpiece_tokenizer():
    return demo_tokenizer("wordpiece")


@pytest.fixture(scope="session")
def demo_data():
    return load_demo_dataset("prompt_completion")


@pytest.fixture
def teacher(bpe_tokenizer):
    return demo_model("llama", bpe_tokenizer, "teacher", seed=1)


@pytest.fixture
def student(bpe_tokenizer):
    return demo_model("llama", bpe_tokenizer, "student", seed=2)
