"""The metrics training reports, each a local `evaluate` module in a folder here (loaded by path, so offline):
`masked_accuracy` (MLM pretraining) and `pair_metrics` (Pearson and separation score of related / unrelated pairs:
LoRA's before / after, and the pair similarity of evaluation.run, which scores with the same function)."""

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

PAIR_METRIC_MODULE = Path(__file__).resolve().parent / "pair_metrics"


@cache
def pair_metric():
    """The pair-similarity metric (Pearson, Spearman, separation score), loaded from its folder: works offline."""
    import evaluate

    return evaluate.load(str(PAIR_METRIC_MODULE), keep_in_memory=True)


def pair_scores(similarity: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson / Spearman correlation of similarity with the 0/1 label, and the separation score."""
    return pair_metric().compute(predictions=np.asarray(similarity).tolist(), references=np.asarray(labels).tolist())
