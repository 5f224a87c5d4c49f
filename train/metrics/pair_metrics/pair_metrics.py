"""Pair similarity metrics as a local `evaluate` module: `evaluate.load("train/metrics/pair_metrics")`.

Inputs are one predicted similarity per text pair (`predictions`, e.g. cosine) and the pair's label (`references`,
1.0 related, 0.0 unrelated). Two published ways of scoring such pairs, side by side:

- Pearson (and Spearman) correlation between predicted similarity and label, as BiomedBERT-small's evaluation reports
  it (with 0/1 labels Pearson is the point-biserial correlation: it rewards a model whose related pairs score above its
  unrelated ones, relative to the spread of its scores);
- separation score, as the cardiology LoRA study reports it: mean similarity of related pairs minus mean similarity of
  unrelated pairs (an absolute gap in cosine units; 0 means the model cannot tell them apart).

Self-contained (numpy, scipy) so it loads offline from this folder and could be pushed to the Hub unchanged.
"""

import datasets
import evaluate
import numpy as np
from scipy import stats

_CITATION = """\
@article{young2025lora_cardiology,
  title={Comparative Analysis of LoRA-Adapted Embedding Models for Clinical Cardiology Text Representation},
  author={Young, Richard J. and Matthews, Alice M.},
  year={2025}
}
"""

_KWARGS = """
Args:
    predictions (list of float): predicted similarity of each pair.
    references (list of float): 1.0 for a related pair, 0.0 for an unrelated one.
Returns:
    pearson, spearman: correlation between similarity and label;
    separation: mean similarity of related pairs - mean similarity of unrelated pairs;
    related_mean, unrelated_mean, related_std, unrelated_std; related, unrelated: pair counts.
"""


class PairMetrics(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions: list[float], references: list[float]) -> dict[str, float]:
        sim, label = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
        if not np.isin(label, (0.0, 1.0)).all():
            raise ValueError("references must be 0.0 (unrelated) or 1.0 (related)")
        related, unrelated = sim[label == 1.0], sim[label == 0.0]
        if len(related) == 0 or len(unrelated) == 0:
            raise ValueError("need at least one related and one unrelated pair")
        return {
            "pearson": float(stats.pearsonr(sim, label).statistic),
            "spearman": float(stats.spearmanr(sim, label).statistic),
            "separation": float(related.mean() - unrelated.mean()),
            "related_mean": float(related.mean()),
            "unrelated_mean": float(unrelated.mean()),
            "related_std": float(related.std()),
            "unrelated_std": float(unrelated.std()),
            "related": len(related),
            "unrelated": len(unrelated),
        }
