"""Evaluate embedding models side by side: one JSON + Markdown report with plots.

    python -m evaluation.run --models minilm medeir-random --out evaluation/results/<name>
    python -m evaluation.run --models models/medeir-small minilm --out evaluation/results/<name>
    python -m evaluation.run --models minilm --max-queries 200 --benchmarks hpo_layperson pairs --out /tmp/quick

Per model (each at its own max_seq_length, with its own "query" / "document" prompts if it defines them):
  - retrieval on the held-out benchmarks of the data build, as mteb custom tasks (nDCG@10, MRR@10, Recall@1/10/100);
  - the official MTEB tasks (ArguAna, NFCorpus, SciFact, TRECCOVID, MedicalQARetrieval) when the Hub is reachable,
    otherwise each is reported as skipped;
  - pair similarity on data/benchmarks/pairs_test.parquet: Pearson correlation with the label and separation score;
  - the long-document benchmark's length distribution in the model's own tokens, and how many answers fall inside
    its window;
  - encoding throughput (evaluation.speed.encode_throughput).
Embeddings are cached under --cache, keyed by a hash of the model's files, so a re-run only scores.
"""

import argparse
import hashlib
import json
import os
import platform
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from evaluation import metrics, models, tasks
from evaluation.report import slug
from evaluation.speed import encode_throughput

PAIRS = "pairs"
LONGDOC = "icd10cm_longdoc"
HISTOGRAM_BINS = np.linspace(-1.0, 1.0, 81)  # cosine similarity, 0.025 wide
SPEED_METHOD = (
    "evaluation.speed.encode_throughput: the loaded SentenceTransformer (encoder, pooling, normalize) on random token "
    "ids (tokenization excluded), ~{batch_tokens} tokens per forward, one warm-up forward, mean of {repeats} timed "
    "forwards, float32"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help=f"folders or aliases ({', '.join(models.ALIASES)})")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--data", type=Path, default=Path("data"), help="output of `python -m corpus.build`")
    parser.add_argument(
        "--benchmarks", nargs="+", default=[*tasks.BENCHMARKS, PAIRS], choices=[*tasks.BENCHMARKS, PAIRS]
    )
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
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "medeir-eval", help="embedding cache")
    return parser.parse_args(argv)


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


def evaluate_retrieval(model, model_dir: Path, task_list: list, args: argparse.Namespace) -> dict:
    """Each local benchmark through mteb.evaluate, with mteb's embedding cache keyed by the model's file hash."""
    import mteb
    from mteb.models import SentenceTransformerEncoderWrapper
    from mteb.models.cache_wrappers import CachedEmbeddingWrapper

    cached = CachedEmbeddingWrapper(SentenceTransformerEncoderWrapper(model), model_dir / "mteb")
    out = {}
    for task in task_list:
        batch = args.long_batch_size if task.benchmark == LONGDOC else args.batch_size
        start = time.perf_counter()
        task.load_data()  # loaded here, mteb keeps it for the next model
        result = mteb.evaluate(
            cached, task, cache=None, encode_kwargs={"batch_size": batch, "show_progress_bar": True}
        ).task_results[0]
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


def evaluate_official(model, unreachable: str | None, out_dir: Path) -> dict:
    """Official MTEB tasks when the Hub is reachable; their TaskResults are kept for mteb's model-card tooling."""
    if unreachable:
        return {name: {"skipped": unreachable} for name in tasks.OFFICIAL_TASKS}
    import mteb
    from mteb.models import SentenceTransformerEncoderWrapper

    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for task in tasks.official_tasks():
        name = task.metadata.name
        try:
            result = mteb.evaluate(SentenceTransformerEncoderWrapper(model), task, cache=None).task_results[0]
        except Exception as err:  # a download that fails mid-way: say so, keep the rest of the report
            results[name] = {"skipped": f"failed: {err.__class__.__name__}: {err}"[:200]}
            continue
        result.to_disk(out_dir / f"{name}.json")
        results[name] = {**metrics.select_retrieval(result.scores["test"][0]), "seconds": result.evaluation_time}
    return results


def encode_cached(encode, texts: list[str], cache_file: Path, batch_size: int) -> np.ndarray:
    """`encode(texts)` once per (model, text list, role): the pair embeddings, stored next to mteb's cache."""
    if cache_file.exists():
        return np.load(cache_file)
    emb = encode(texts, batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache_file, emb)
    return emb


def evaluate_pairs(model, model_dir: Path, data_dir: Path, batch_size: int) -> dict:
    """Pearson and separation score on the held-out pairs, overall and per domain / cardiology / kind.

    text1 is encoded as a query and text2 as a document (the pairs run anchor -> positive); the similarity is the
    model's own (cosine for every model here).
    """
    rows = pq.read_table(data_dir / "benchmarks" / "pairs_test.parquet").to_pylist()
    text1, text2 = [r["text1"] for r in rows], [r["text2"] for r in rows]
    key = hashlib.sha256("\x00".join(text1 + text2).encode()).hexdigest()[:16]
    e1 = encode_cached(model.encode_query, text1, model_dir / "pairs" / f"{key}-query.npy", batch_size)
    e2 = encode_cached(model.encode_document, text2, model_dir / "pairs" / f"{key}-document.npy", batch_size)
    sim = model.similarity_pairwise(torch.from_numpy(e1), torch.from_numpy(e2)).float().numpy()
    label = np.array([r["label"] for r in rows])

    groups = {"all": np.ones(len(rows), bool)}
    for domain in sorted({r["domain"] for r in rows}):
        groups[domain] = np.array([r["domain"] == domain for r in rows])
    groups["cardiology"] = np.array([r["cardiology"] for r in rows])
    for kind in sorted({r["kind"] for r in rows}):
        groups[kind] = np.array([r["kind"] == kind for r in rows])
    both = {name: mask for name, mask in groups.items() if len(set(label[mask])) == 2}  # a group needs both labels
    out = {name: metrics.pair_scores(sim[mask], label[mask]) for name, mask in both.items()}
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
    the window when the whole query fits before max_seq_length. Models truncate, so an answer outside it is unseen.
    """
    folder = data_dir / "benchmarks" / LONGDOC
    docs = dict(_pairs(folder / "corpus.parquet"))
    queries = dict(_pairs(folder / "queries.parquet"))
    window = model.max_seq_length

    def count(text: str) -> int:  # tokens without [CLS] / [SEP]; verbose=False: no "longer than max" warning
        return len(model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    lengths = [count(text) + 2 for text in docs.values()]
    starts, inside = [], 0
    for row in pq.read_table(folder / "qrels.parquet").to_pylist():
        doc, query = docs[row["doc_id"]], queries[row["query_id"]]
        start = 1 + count(doc[: max(doc.lower().find(query.lower()), 0)])
        starts.append(start)
        inside += start + count(query) <= window - 1
    return {
        "max_seq_length": window,
        "document_tokens": summarize(lengths, window),
        "answer_start_token": summarize(starts, window),
        "answers_inside_window": inside,
        "lengths": lengths,
        "answer_starts": starts,
    }


def _pairs(path: Path) -> list[tuple[str, str]]:
    table = pq.read_table(path, columns=["id", "text"])
    return list(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))


def throughput(model, args: argparse.Namespace) -> dict:
    if not args.speed_lengths:
        return {"skipped": "--speed-lengths given empty"}
    rows = encode_throughput(model, args.speed_lengths, args.speed_batch_tokens, args.speed_repeats)
    method = SPEED_METHOD.format(batch_tokens=args.speed_batch_tokens, repeats=args.speed_repeats)
    return {"method": method, "rows": rows}


def describe(name: str, spec: str, path: Path, model, fingerprint: str) -> dict:
    return {
        "name": name,
        "spec": spec,
        "path": str(path),
        "fingerprint": fingerprint,
        "parameters": sum(p.numel() for p in model.parameters()),
        "embedding_dim": model.get_embedding_dimension(),
        "max_seq_length": model.max_seq_length,
        "prompts": {k: v for k, v in (model.prompts or {}).items() if v},
        "similarity": str(model.similarity_fn_name),
        "note": models.NOTES.get(spec.rpartition("=")[2], ""),
    }


def evaluate_model(spec: str, task_list: list, unreachable: str | None, args: argparse.Namespace) -> dict:
    """Every section of the report for one model."""
    name, path = models.resolve(spec, args.cache)
    print(f"\n== {name} ({path})")
    model = models.load(path, args.device)
    model.eval()
    fingerprint = models.fingerprint(path)
    model_dir = args.cache / "embeddings" / fingerprint
    entry = describe(name, spec, path, model, fingerprint)
    timings = {}

    start = time.perf_counter()
    entry["retrieval"] = evaluate_retrieval(model, model_dir, task_list, args)
    timings["retrieval"] = time.perf_counter() - start

    start = time.perf_counter()
    entry["official"] = evaluate_official(model, unreachable, args.out / "mteb" / slug(name))
    timings["official"] = time.perf_counter() - start

    if PAIRS in args.benchmarks:
        start = time.perf_counter()
        entry["pairs"] = evaluate_pairs(model, model_dir, args.data, args.batch_size)
        timings["pairs"] = time.perf_counter() - start
        print(
            f"  pairs: Pearson {entry['pairs']['all']['pearson']:.4f}, separation {entry['pairs']['all']['separation']:.4f}"
        )
    if LONGDOC in args.benchmarks:
        entry["longdoc"] = longdoc_lengths(model, args.data)

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
    retrieval = [b for b in args.benchmarks if b in tasks.BENCHMARKS]
    task_list = [tasks.local_task(b, args.data, args.max_queries, args.seed) for b in retrieval]
    unreachable = "not requested (--official skip)" if args.official == "skip" else tasks.hub_unreachable()
    manifest = args.data / "manifest.json"
    report = {
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m evaluation.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": {
            "path": str(args.data),
            "dataset_version": tasks.dataset_version(args.data),
            "manifest_benchmarks": json.loads(manifest.read_text()).get("benchmarks", {}) if manifest.exists() else {},
        },
        "settings": {
            "benchmarks": args.benchmarks,
            "max_queries": args.max_queries,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "long_batch_size": args.long_batch_size,
        },
        "environment": environment(args.device),
        "benchmarks": {
            t.benchmark: {"task": t.metadata.name, "description": t.metadata.description} for t in task_list
        },
        "official_hub": unreachable or "reachable",
        "models": [evaluate_model(spec, task_list, unreachable, args) for spec in args.models],
    }
    report["seconds"] = round(time.perf_counter() - start, 1)

    from evaluation.model_index import write_model_indexes
    from evaluation.report import write_report

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report(report, args.out)
    write_model_indexes(report, args.out)
    print(f"\nreport: {args.out / 'report.md'} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
