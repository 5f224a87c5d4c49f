"""The numbers the report shows, computed by the libraries that define them.

Retrieval: mteb's own scorer (pytrec_eval for nDCG / recall, mteb's MRR), the very function its retrieval tasks call, so
a figure here means what it means on the MTEB leaderboard. Pairs: the local `evaluate` module in `pair_metrics/`.
"""

from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import numpy as np

K_VALUES = (1, 10, 100)
RETRIEVAL_METRICS = ("ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_10", "recall_at_100")
PAIR_METRIC_MODULE = Path(__file__).resolve().parent / "pair_metrics"


def select_retrieval(scores: Mapping[str, float]) -> dict[str, float]:
    """The reported subset of an mteb retrieval score dict."""
    return {name: float(scores[name]) for name in RETRIEVAL_METRICS}


def retrieval_scores(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    k_values: Sequence[int] = K_VALUES,
) -> dict[str, float]:
    """Mean nDCG@10, MRR@10 and Recall@1/10/100 of a run ({query: {doc: score}}) against qrels ({query: {doc: rel}})."""
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores, make_score_dict

    r = calculate_retrieval_scores(run, qrels, list(k_values))
    scores = make_score_dict(
        ndcg=r.ndcg,
        _map=r.map,
        recall=r.recall,
        precision=r.precision,
        mrr=r.mrr,
        naucs=r.naucs,
        naucs_mrr=r.naucs_mrr,
        hit_rate=r.hit_rate,
        task_scores={},
    )
    return select_retrieval(scores)


@cache
def pair_metric():
    """The pair-similarity metric (Pearson, Spearman, separation score), loaded from this folder: works offline."""
    import evaluate

    return evaluate.load(str(PAIR_METRIC_MODULE), keep_in_memory=True)


def pair_scores(similarity: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson / Spearman correlation of similarity with the 0/1 label, and the separation score."""
    return pair_metric().compute(predictions=np.asarray(similarity).tolist(), references=np.asarray(labels).tolist())
