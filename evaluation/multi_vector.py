"""MaxSim retrieval of a late-interaction (ColBERT) model on the data build's benchmarks, alone and as the reranker of
a dense model's candidates, with the size of its index and the time it takes.

    python -m evaluation.multi_vector runs/colbert-small/final --dense models/medeir-small --max-queries 200

Each benchmark is read exactly as evaluation.run reads it (`tasks.local_task`: the same seeded sample of queries, the
whole corpus) and scored with mteb's scorer (`metrics.retrieval_scores`), so the figures sit next to the dense
models' in the report; evaluation.run scores multi-vector models given on its --models through this module. Per
benchmark:
    maxsim             every document encoded token by token, each sampled query scored against all of them
    dense              the dense model alone (cosine), the first stage of the next line
    dense_then_maxsim  the dense model's top `depth` documents per query, re-ordered by MaxSim
    fused              the same candidates by cosine + the mean MaxSim over the query's vectors (`fused`)
    fused_shorter      the same by cosine + the mean best token similarity of the shorter side (`mean_maxsim`: the
                       document's when the query has more than SIDE_RATIO times its vectors, else the query's)
    index              the token vectors kept per document (its index: token vectors x dim x 4 bytes in float32) and
                       the wall-clock milliseconds of encoding a document and of scoring a query
With --fusion-check N (and --dense), the weight of the mean MaxSim added to the dense cosine, and which side's mean to
add, are measured instead, on N of the build's validation pairs (no benchmark is read): `fusion_check`.
"""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

from corpus.dataset import BENCHMARKS, DEFAULT_ROOT, DataBuild
from evaluation import metrics, tasks
from train import finetune

Run = dict[str, dict[str, float]]  # query id -> {document id: score}
SEARCH_DEPTH = max(metrics.K_VALUES)  # documents kept per query: every one Recall@100 can count
CHUNK_BATCHES = 64  # maxsim_search encodes and scores this many batches of documents at a time
# the means of best token similarities that mean_maxsim reads, and the fusion check's key for each
FUSED_READINGS = {"fused": "query", "fused_shorter": "shorter", "fused_document": "document", "fused_both": "both"}
# how much longer than the document (in vectors) a query must be for the shorter side to be the document's: chosen on
# the build's validation pairs among SIDE_RATIOS (fusion_check's "fused_shorter_by_ratio"; docs/experiments.md, *Which
# side to read*), never on a benchmark
SIDE_RATIO = 2.0
SIDE_RATIOS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def ranked(scores: torch.Tensor, index: torch.Tensor, query_ids: list[str], document_ids: list[str]) -> Run:
    """A run from each query's best scores and the positions of their documents (rows of `scores` and `index`)."""
    return {
        q: {document_ids[j]: float(v) for v, j in zip(row_scores.tolist(), row_index.tolist(), strict=True)}
        for q, row_scores, row_index in zip(query_ids, scores, index, strict=True)
    }


def index_size(documents: int, vectors: int, dim: int) -> dict:
    """The index of `documents` documents stored as `vectors` float vectors of `dim` values in all: one per document
    for a dense model, one per kept token for a late-interaction one. Bytes a document: vectors per document x dim x
    4 in float32, half that in float16."""
    per_document = vectors / documents
    float32 = per_document * metrics.embedding_bytes(dim, "float32")
    return {
        "documents": documents,
        "dim": dim,
        "vectors": vectors,
        "vectors_per_document": per_document,
        "bytes_per_document": {"float32": float32, "float16": float32 / 2},
    }


@dataclass
class SearchCost:
    """What a MaxSim search of a whole corpus held and took: the token vectors kept of its documents (the index) and
    the wall-clock seconds of encoding queries, encoding documents and scoring."""

    queries: int
    documents: int
    dim: int
    token_vectors: int = 0
    encode_queries_s: float = 0.0
    encode_documents_s: float = 0.0
    score_s: float = 0.0

    def summary(self) -> dict:
        """The index size (index_size) and the times per document and per query, in milliseconds."""
        return {
            **index_size(self.documents, self.token_vectors, self.dim),
            "queries": self.queries,
            "encode_ms_per_document": 1000 * self.encode_documents_s / self.documents,
            "encode_ms_per_query": 1000 * self.encode_queries_s / self.queries,
            "search_ms_per_query": 1000 * self.score_s / self.queries,
        }


def maxsim_search(
    model: MultiVectorEncoder,
    queries: dict[str, str],
    corpus: dict[str, str],
    depth: int = SEARCH_DEPTH,
    batch_size: int = 32,
    chunk: int | None = None,
) -> tuple[Run, SearchCost]:
    """Each query's `depth` best documents of the whole corpus by MaxSim, and what the search took. Documents are
    encoded and scored `chunk` at a time (CHUNK_BATCHES batches by default), keeping only the running best, so memory
    holds one chunk's token vectors; every token vector kept is counted."""
    query_ids, document_ids = list(queries), list(corpus)
    chunk = chunk or CHUNK_BATCHES * batch_size
    cost = SearchCost(len(query_ids), len(document_ids), model.get_embedding_dimension())
    start = time.perf_counter()
    query_vectors = model.encode_query([queries[q] for q in query_ids], batch_size=batch_size)
    cost.encode_queries_s = time.perf_counter() - start
    best_scores = torch.empty(len(query_ids), 0)
    best_index = torch.empty(len(query_ids), 0, dtype=torch.long)
    for start in range(0, len(document_ids), chunk):
        ids = document_ids[start : start + chunk]
        tick = time.perf_counter()
        vectors = model.encode_document([corpus[d] for d in ids], batch_size=batch_size)
        encoded = time.perf_counter()
        scores = model.similarity(query_vectors, vectors).cpu()
        scores = torch.cat([best_scores, scores], dim=1)
        index = torch.cat([best_index, torch.arange(start, start + len(ids)).expand(len(query_ids), -1)], dim=1)
        best_scores, position = scores.topk(min(depth, scores.shape[1]), dim=1)
        best_index = index.gather(1, position)
        cost.encode_documents_s += encoded - tick
        cost.score_s += time.perf_counter() - encoded
        cost.token_vectors += sum(len(v) for v in vectors)
    return ranked(best_scores, best_index, query_ids, document_ids), cost


def cosine_search(
    query_embeddings, document_embeddings, query_ids: list[str], document_ids: list[str], depth: int
) -> Run:
    """Each query's `depth` best documents by cosine similarity of a dense model's embeddings (rows in the order of
    the ids), freshly encoded or read from a cache."""
    q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(query_embeddings), dtype=torch.float32), dim=-1)
    d = torch.nn.functional.normalize(torch.as_tensor(np.asarray(document_embeddings), dtype=torch.float32), dim=-1)
    scores = q @ d.T
    return ranked(*scores.topk(min(depth, scores.shape[1]), dim=1), query_ids, document_ids)


def dense_search(
    dense: SentenceTransformer,
    queries: dict[str, str],
    corpus: dict[str, str],
    depth: int = SEARCH_DEPTH,
    batch_size: int = 32,
) -> Run:
    """Each query's `depth` best documents by the dense model's cosine similarity (its own query / document
    prompts)."""
    query_ids, document_ids = list(queries), list(corpus)
    q = dense.encode_query([queries[i] for i in query_ids], batch_size=batch_size)
    d = dense.encode_document([corpus[i] for i in document_ids], batch_size=batch_size)
    return cosine_search(q, d, query_ids, document_ids, depth)


def maxsim_scores(
    model: MultiVectorEncoder,
    queries: dict[str, str],
    corpus: dict[str, str],
    candidates: Run,
    batch_size: int = 32,
    ratios: tuple[float, ...] = (),
) -> tuple[Run, dict[str, Run]]:
    """The model's own score (MaxSim, or MeanMaxSim if it was trained so) of every query against each of its
    candidates (each candidate document encoded once), and every mean of mean_maxsim, on the cosine's scale, that a
    fused rerank adds to the dense cosine (and, for each of `ratios`, the shorter side at that ratio as
    "shorter@<ratio>"); all from one similarity table per pair."""
    query_ids = [q for q in queries if candidates.get(q)]
    document_ids = list(dict.fromkeys(d for q in query_ids for d in candidates[q]))
    position = {d: i for i, d in enumerate(document_ids)}
    documents = model.encode_document([corpus[d] for d in document_ids], batch_size=batch_size)
    query_vectors = model.encode_query([queries[q] for q in query_ids], batch_size=batch_size)
    summed = model.similarity_fn_name != "meanmaxsim"  # MaxSim is the query-side mean times the query's vectors
    run: Run = {}
    readings = [*FUSED_READINGS.values(), *(f"shorter@{r:g}" for r in ratios)]
    means: dict[str, Run] = {reading: {} for reading in readings}
    for q, vectors in zip(query_ids, query_vectors, strict=True):
        run[q] = {}
        for reading in means.values():
            reading[q] = {}
        for d in candidates[q]:
            document = documents[position[d]]
            pair = mean_maxsim(vectors, document)
            run[q][d] = pair["query"] * len(vectors) if summed else pair["query"]
            for reading in FUSED_READINGS.values():
                means[reading][q][d] = pair[reading]
            for r in ratios:
                means[f"shorter@{r:g}"][q][d] = shorter_side(pair, len(vectors), len(document), r)
    return run, means


def shorter_side(pair: dict[str, float], query_vectors: int, document_vectors: int, ratio: float = SIDE_RATIO) -> float:
    """Of a pair's query-side and document-side means (mean_maxsim), the document's when the query has more than
    `ratio` times its vectors, else the query's."""
    return pair["document"] if query_vectors > ratio * document_vectors else pair["query"]


def mean_maxsim(query_vectors, document_vectors) -> dict[str, float]:
    """Means of best token similarities of a query and a document (unit token vectors, so cosines):
    - "query": each query vector's best similarity in the document, averaged over the query's vectors (MaxSim / the
      query's vectors, ColBERT's direction);
    - "document": each document vector's best similarity in the query, averaged over the document's vectors;
    - "shorter": the document's side when the query has more than SIDE_RATIO times the document's vectors, else the
      query's (`shorter_side`): a running-sentence query against a term name asks whether each of the name's tokens is
      in the sentence, not each of the sentence's tokens in the name (MaxSim's direction there scores the sentence's
      words that no name holds, and ranks worse than the dense model on the build's definition -> name validation
      pairs, docs/experiments.md);
    - "both": the mean of the query's and the document's."""
    similarities = torch.as_tensor(query_vectors).float() @ torch.as_tensor(document_vectors).float().T
    pair = {
        "query": similarities.max(dim=1).values.mean().item(),
        "document": similarities.max(dim=0).values.mean().item(),
    }
    pair["shorter"] = shorter_side(pair, *similarities.shape)
    pair["both"] = (pair["query"] + pair["document"]) / 2
    return pair


def maxsim_rerank(
    model: MultiVectorEncoder, queries: dict[str, str], corpus: dict[str, str], candidates: Run, batch_size: int = 32
) -> Run:
    """The candidates of every query re-ordered by MaxSim; each candidate document is encoded once."""
    return maxsim_scores(model, queries, corpus, candidates, batch_size)[0]


def fused(candidates: Run, mean: Run, weight: float = 1.0) -> Run:
    """Each candidate's first-stage cosine plus `weight` times a mean best token similarity (mean_maxsim: on the
    cosine's own scale). Equal weights (1.0) are what evaluation.run and the demo use, fixed beforehand and never
    tuned on a benchmark; `fusion_check` measures the weight on the build's validation pairs instead: the
    late-interaction score corrects the dense ranking instead of replacing it."""
    return {q: {d: candidates[q][d] + weight * score for d, score in scores.items()} for q, scores in mean.items()}


FUSION_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def fusion_check(
    model: MultiVectorEncoder,
    dense: SentenceTransformer,
    data_dir: str | Path,
    rows: int = 2000,
    weights: tuple[float, ...] = FUSION_WEIGHTS,
    depth: int = 100,
    seed: int = 0,
    batch_size: int = 32,
    ratios: tuple[float, ...] = SIDE_RATIOS,
) -> dict:
    """nDCG@10 on `rows` of the build's validation pairs (train.finetune.validation_retrieval, as the trainers draw
    their validation: held out of training but from the training sources, unlike the benchmarks' held-out groups, so
    they choose a setting without reading any benchmark) of the dense model, of its top `depth` reranked by MaxSim,
    and of the cosine + `weight` x each mean of mean_maxsim for every weight (0: the dense order): "fused" adds the
    query-side mean, "fused_shorter" the shorter side's, "fused_document" the document side's, "fused_both" the mean
    of the query's and the document's (FUSED_READINGS); "fused_shorter_by_ratio" the shorter side at weight 1 for each
    of `ratios` (SIDE_RATIOS: how much longer than the document a query must be to read the document's side); overall
    and, under "by_kind", for the queries of each pair kind (each query form: a synonym, a symptom list, a definition
    written as the query where the build's mix has reversed definition kinds), every query still searching the whole
    sample's documents."""
    sample = finetune.validation_sample(data_dir, rows, seed)
    queries, corpus, relevant = finetune.as_retrieval(sample)
    kinds = sample["kind"]
    qrels = {q: dict.fromkeys(documents, 1) for q, documents in relevant.items()}
    candidates = dense_search(dense, queries, corpus, depth, batch_size)
    maxsim, means = maxsim_scores(model, queries, corpus, candidates, batch_size, ratios)
    fusion = {key: {w: fused(candidates, means[side], w) for w in weights} for key, side in FUSED_READINGS.items()}
    fusion["fused_shorter_by_ratio"] = {r: fused(candidates, means[f"shorter@{r:g}"]) for r in ratios}

    def scores(ids: set[str]) -> dict:
        def ndcg(run: Run) -> float:
            return metrics.retrieval_scores({q: qrels[q] for q in ids}, {q: run[q] for q in ids if q in run})[
                "ndcg_at_10"
            ]

        return {
            "queries": len(ids),
            "dense": ndcg(candidates),
            "dense_then_maxsim": ndcg(maxsim),
            **{key: {str(w): ndcg(run) for w, run in runs.items()} for key, runs in fusion.items()},
        }

    by_kind: dict[str, set[str]] = {}
    for i, kind in enumerate(kinds):
        by_kind.setdefault(kind, set()).add(f"q{i}")
    return {
        **scores(set(queries)),
        "documents": len(corpus),
        "by_kind": {kind: scores(ids) for kind, ids in sorted(by_kind.items())},
    }


def task_texts(task) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """Queries, documents and qrels of a benchmark task (`tasks.local_task`: its seeded sample of queries, the whole
    corpus), loaded if it is not yet."""
    task.load_data()
    split = task.dataset["default"]["test"]
    queries = dict(zip(split["queries"]["id"], split["queries"]["text"], strict=True))
    corpus = dict(zip(split["corpus"]["id"], split["corpus"]["text"], strict=True))
    return queries, corpus, split["relevant_docs"]


def search_task(model: MultiVectorEncoder, task, batch_size: int = 32) -> tuple[dict[str, float], SearchCost]:
    """MaxSim retrieval on one benchmark task: its scores (metrics.retrieval_scores of the best SEARCH_DEPTH
    documents per query) and what the search held and took."""
    queries, corpus, qrels = task_texts(task)
    run, cost = maxsim_search(model, queries, corpus, SEARCH_DEPTH, batch_size)
    return metrics.retrieval_scores(qrels, run), cost


def evaluate(
    model: MultiVectorEncoder,
    data_dir: str | Path = DEFAULT_ROOT,
    benchmarks: list[str] | None = None,
    max_queries: int | None = 200,
    seed: int = 0,
    dense: SentenceTransformer | None = None,
    depth: int = 100,
    batch_size: int = 32,
    long_batch_size: int = 4,
) -> dict[str, dict]:
    """nDCG@10, MRR@10 and Recall@1/10/100 of MaxSim retrieval on each benchmark of the build (every one it holds when
    `benchmarks` is None) over a seeded sample of `max_queries` queries, with its index size and times; with
    `dense`, also the dense model alone and its top `depth` reranked by MaxSim and by the two fused scores."""
    data = DataBuild(data_dir)
    names = benchmarks or [name for name in BENCHMARKS if data.has_benchmark(name)]
    out = {}
    for name in names:
        task = tasks.local_task(name, data.root, max_queries, seed)
        size = long_batch_size if BENCHMARKS[name].long_documents else batch_size
        scores, cost = search_task(model, task, size)
        entry = {"queries": cost.queries, "documents": cost.documents, "maxsim": scores}
        if dense is not None:
            queries, corpus, qrels = task_texts(task)
            first_stage = dense_search(dense, queries, corpus, depth, size)
            entry["dense"] = metrics.retrieval_scores(qrels, first_stage)
            reranked, means = maxsim_scores(model, queries, corpus, first_stage, size)
            entry["dense_then_maxsim"] = metrics.retrieval_scores(qrels, reranked)
            entry["fused"] = metrics.retrieval_scores(qrels, fused(first_stage, means["query"]))
            entry["fused_shorter"] = metrics.retrieval_scores(qrels, fused(first_stage, means["shorter"]))
            entry["side_ratio"] = SIDE_RATIO
        entry["index"] = cost.summary()
        out[name] = entry
        line = ", ".join(
            f"{k} {v['ndcg_at_10']:.4f}" for k, v in entry.items() if isinstance(v, dict) and "ndcg_at_10" in v
        )
        print(f"  {name}: nDCG@10 {line}; {cost.token_vectors / cost.documents:.1f} token vectors a document")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a MultiVectorEncoder folder (train.colbert's <output_dir>/final)")
    parser.add_argument("--dense", help="a SentenceTransformer folder whose top --depth documents MaxSim reranks")
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_ROOT))
    parser.add_argument("--benchmarks", nargs="*", choices=list(BENCHMARKS), help="default: every one the build has")
    parser.add_argument("--max-queries", type=int, default=200, help="a seeded sample (evaluation.run's); 0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=100, help="dense candidates per query that MaxSim reranks")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--long-batch-size", type=int, default=4, help="for benchmarks of long documents")
    parser.add_argument(
        "--fusion-check",
        type=int,
        metavar="N",
        help="score cosine + w x mean MaxSim on N validation "
        "pairs for each weight of --fusion-weights instead of the benchmarks (needs --dense)",
    )
    parser.add_argument("--fusion-weights", type=float, nargs="+", default=list(FUSION_WEIGHTS))
    parser.add_argument("--out", type=Path, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    if args.fusion_check and not args.dense:
        parser.error("--fusion-check needs --dense: the first stage whose cosine the mean MaxSim is added to")
    model = MultiVectorEncoder(args.model, trust_remote_code=True)
    dense = SentenceTransformer(args.dense, trust_remote_code=True) if args.dense else None
    if args.fusion_check:
        check = fusion_check(
            model, dense, args.data, args.fusion_check, tuple(args.fusion_weights), args.depth, args.seed
        )
        return write_scores(check, args.out)
    scores = evaluate(
        model,
        args.data,
        args.benchmarks,
        args.max_queries or None,
        args.seed,
        dense,
        args.depth,
        args.batch_size,
        args.long_batch_size,
    )
    return write_scores(scores, args.out)


def write_scores(scores: dict, out: Path | None) -> dict:
    """Print the scores as JSON, and write them to `out` when given."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(scores, indent=2) + "\n")
    print(json.dumps(scores, indent=2))
    return scores


if __name__ == "__main__":
    main()
