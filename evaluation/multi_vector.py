"""MaxSim retrieval of a late-interaction (ColBERT) model on the data build's benchmarks, alone and as the reranker of
a dense model's candidates.

    python -m evaluation.multi_vector runs/colbert-small/final --dense models/medeir-small --max-queries 200

Each benchmark is read exactly as evaluation.run reads it (`tasks.local_task`: the same seeded sample of queries, the
whole corpus) and scored with mteb's scorer (`metrics.retrieval_scores`), so the figures sit next to the dense
models' in the report. Per benchmark:
    maxsim             every document encoded token by token, each sampled query scored against all of them
    dense              the dense model alone (cosine), the first stage of the next line
    dense_then_maxsim  the dense model's top `depth` documents per query, re-ordered by MaxSim
"""

import argparse
import json
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

from corpus.dataset import BENCHMARKS, DEFAULT_ROOT, DataBuild
from evaluation import metrics, tasks

Run = dict[str, dict[str, float]]  # query id -> {document id: score}


def ranked(scores: torch.Tensor, index: torch.Tensor, query_ids: list[str], document_ids: list[str]) -> Run:
    """A run from each query's best scores and the positions of their documents (rows of `scores` and `index`)."""
    return {
        q: {document_ids[j]: float(v) for v, j in zip(row_scores.tolist(), row_index.tolist(), strict=True)}
        for q, row_scores, row_index in zip(query_ids, scores, index, strict=True)
    }


def maxsim_search(
    model: MultiVectorEncoder,
    queries: dict[str, str],
    corpus: dict[str, str],
    depth: int = 100,
    batch_size: int = 32,
    chunk: int = 2048,
) -> Run:
    """Each query's `depth` best documents of the whole corpus by MaxSim. Documents are encoded and scored `chunk` at
    a time, keeping only the running best, so memory holds one chunk's token vectors."""
    query_ids, document_ids = list(queries), list(corpus)
    query_vectors = model.encode_query([queries[q] for q in query_ids], batch_size=batch_size)
    best_scores = torch.empty(len(query_ids), 0)
    best_index = torch.empty(len(query_ids), 0, dtype=torch.long)
    for start in range(0, len(document_ids), chunk):
        ids = document_ids[start : start + chunk]
        vectors = model.encode_document([corpus[d] for d in ids], batch_size=batch_size)
        scores = model.similarity(query_vectors, vectors).cpu()
        scores = torch.cat([best_scores, scores], dim=1)
        index = torch.cat([best_index, torch.arange(start, start + len(ids)).expand(len(query_ids), -1)], dim=1)
        best_scores, position = scores.topk(min(depth, scores.shape[1]), dim=1)
        best_index = index.gather(1, position)
    return ranked(best_scores, best_index, query_ids, document_ids)


def dense_search(
    dense: SentenceTransformer, queries: dict[str, str], corpus: dict[str, str], depth: int = 100, batch_size: int = 32
) -> Run:
    """Each query's `depth` best documents by the dense model's cosine similarity (its own query / document
    prompts)."""
    query_ids, document_ids = list(queries), list(corpus)
    encode = dict(batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    q = dense.encode_query([queries[i] for i in query_ids], **encode)
    d = dense.encode_document([corpus[i] for i in document_ids], **encode)
    scores = (q @ d.T).cpu()
    return ranked(*scores.topk(min(depth, scores.shape[1]), dim=1), query_ids, document_ids)


def maxsim_rerank(
    model: MultiVectorEncoder, queries: dict[str, str], corpus: dict[str, str], candidates: Run, batch_size: int = 32
) -> Run:
    """The candidates of every query re-ordered by MaxSim; each candidate document is encoded once."""
    query_ids = [q for q in queries if candidates.get(q)]
    document_ids = list(dict.fromkeys(d for q in query_ids for d in candidates[q]))
    position = {d: i for i, d in enumerate(document_ids)}
    documents = model.encode_document([corpus[d] for d in document_ids], batch_size=batch_size)
    query_vectors = model.encode_query([queries[q] for q in query_ids], batch_size=batch_size)
    run: Run = {}
    for q, vectors in zip(query_ids, query_vectors, strict=True):
        ids = list(candidates[q])
        scores = model.similarity([vectors], [documents[position[d]] for d in ids])[0].tolist()
        run[q] = dict(zip(ids, scores, strict=True))
    return run


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
    `benchmarks` is None) over a seeded sample of `max_queries` queries; with `dense`, also the dense model alone and
    its top `depth` reranked by MaxSim."""
    data = DataBuild(data_dir)
    names = benchmarks or [name for name in BENCHMARKS if data.has_benchmark(name)]
    out = {}
    for name in names:
        task = tasks.local_task(name, data.root, max_queries, seed)
        task.load_data()
        split = task.dataset["default"]["test"]
        queries = dict(zip(split["queries"]["id"], split["queries"]["text"], strict=True))
        corpus = dict(zip(split["corpus"]["id"], split["corpus"]["text"], strict=True))
        qrels = split["relevant_docs"]
        size = long_batch_size if BENCHMARKS[name].long_documents else batch_size
        entry = {
            "queries": len(queries),
            "documents": len(corpus),
            "maxsim": metrics.retrieval_scores(qrels, maxsim_search(model, queries, corpus, depth, size, 64 * size)),
        }
        if dense is not None:
            first_stage = dense_search(dense, queries, corpus, depth, size)
            entry["dense"] = metrics.retrieval_scores(qrels, first_stage)
            reranked = maxsim_rerank(model, queries, corpus, first_stage, size)
            entry["dense_then_maxsim"] = metrics.retrieval_scores(qrels, reranked)
        out[name] = entry
        line = ", ".join(f"{k} {v['ndcg_at_10']:.4f}" for k, v in entry.items() if isinstance(v, dict))
        print(f"  {name}: nDCG@10 {line}")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a MultiVectorEncoder folder (train.colbert's <output_dir>/final)")
    parser.add_argument("--dense", help="a SentenceTransformer folder whose top --depth documents MaxSim reranks")
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_ROOT))
    parser.add_argument("--benchmarks", nargs="*", choices=list(BENCHMARKS), help="default: every one the build has")
    parser.add_argument("--max-queries", type=int, default=200, help="a seeded sample (evaluation.run's); 0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--long-batch-size", type=int, default=4, help="for benchmarks of long documents")
    parser.add_argument("--out", type=Path, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    model = MultiVectorEncoder(args.model, trust_remote_code=True)
    dense = SentenceTransformer(args.dense, trust_remote_code=True) if args.dense else None
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
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(scores, indent=2) + "\n")
    print(json.dumps(scores, indent=2))
    return scores


if __name__ == "__main__":
    main()
