"""What the local `evaluate` modules share: their inputs are two lists of strings of the same length."""

import datasets
import evaluate


def text_pair_info(description: str, inputs: str = "predictions: list[str]; references: list[str]"):
    return evaluate.MetricInfo(description=description, citation="", inputs_description=inputs,
                               features=datasets.Features({"predictions": datasets.Value("string"),
                                                           "references": datasets.Value("string")}))
