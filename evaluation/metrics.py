"""The numbers the report shows, computed by the libraries that define them.

Retrieval: mteb's own scorer (pytrec_eval for nDCG / recall, mteb's MRR), the very function its retrieval tasks call, so
a figure here means what it means on the MTEB leaderboard. Pairs: `train.metrics.pair_scores`, the local `evaluate`
module LoRA training reports with too.
"""

from collections.abc import Mapping, Sequence

import numpy as np

K_VALUES = (1, 10, 100)
RETRIEVAL_METRICS = ("ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_10", "recall_at_100")


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

    # the result's fields are make_score_dict's arguments (`map` is spelled `_map` there); per-query scores stay out
    result = calculate_retrieval_scores(run, qrels, list(k_values))._asdict()
    del result["all_scores"]
    result["_map"] = result.pop("map")
    return select_retrieval(make_score_dict(**result, task_scores={}))


# --- embedding size and precision ------------------------------------------------------------------------------------

PRECISIONS = ("float32", "int8", "binary")


def embedding_bytes(dim: int, precision: str) -> float:
    """Storage of one embedding: 4 bytes a value in float32, 1 in int8, 1 bit in binary."""
    return dim * {"float32": 4.0, "int8": 1.0, "binary": 0.125}[precision]


def _truncate(embeddings, dim: int) -> np.ndarray:
    """The first `dim` values (what SentenceTransformer(truncate_dim=dim) returns), re-normalised to unit length."""
    x = np.asarray(embeddings, dtype=np.float32)[:, :dim]
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def int8_ranges(calibration, dim: int) -> np.ndarray:
    """Per-dimension (min, max) of the truncated calibration embeddings: the int8 buckets of quantize_embeddings."""
    x = _truncate(calibration, dim)
    return np.vstack((x.min(axis=0), x.max(axis=0)))


def compress(embeddings, dim: int, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Embeddings truncated to `dim` and quantised by sentence-transformers, as float32 for scoring: int8 values as
    they are (dot product), binary bits as +-1 (so a dot product is dim - 2 x Hamming distance)."""
    from sentence_transformers.util.quantization import quantize_embeddings

    x = _truncate(embeddings, dim)
    if precision == "float32":
        return x
    if precision == "int8":
        if ranges is None:
            raise ValueError("int8 needs ranges calibrated on the documents (int8_ranges)")
        return quantize_embeddings(x, "int8", ranges=ranges).astype(np.float32)
    if precision == "binary":
        bits = np.unpackbits(quantize_embeddings(x, "ubinary"), axis=-1)[:, :dim]
        return bits.astype(np.float32) * 2 - 1
    raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")


def compressed_similarity(dot, dim: int, precision: str):
    """Scores from dot products of compress() outputs: cosine (float32, unit vectors), dot product (int8), minus the
    Hamming distance (binary)."""
    import torch

    dot = torch.as_tensor(np.asarray(dot, dtype=np.float32))
    return (dot - dim) / 2 if precision == "binary" else dot
