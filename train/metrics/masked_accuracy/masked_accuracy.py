"""Masked-token accuracy as a local `evaluate` metric (Hub-hosted metrics cannot be loaded offline).

    metric = evaluate.load("train/metrics/masked_accuracy")
    metric.add_batch(predictions=logits.argmax(-1).flatten(), references=labels.flatten())
    metric.compute()  # {"accuracy": ..., "count": ...}

References equal to -100 (positions that were not masked) are ignored.
"""

import datasets
import evaluate
import numpy as np


class MaskedAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Share of masked positions whose most likely token is the original one.",
            citation="",
            inputs_description="predictions: predicted token ids; references: original ids, -100 where not masked.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, ignore_index: int = -100) -> dict:
        predictions, references = np.asarray(predictions), np.asarray(references)
        keep = references != ignore_index
        count = int(keep.sum())
        accuracy = float((predictions[keep] == references[keep]).mean()) if count else float("nan")
        return {"accuracy": accuracy, "count": count}
