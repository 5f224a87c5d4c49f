"""Precompute a model's index embeddings for the demo, and measure the demo's search.

    python -m space.precompute --model models/medeir-small          # -> space/precomputed/medeir-small.npz
    python -m space.precompute --model minilm                       # all-MiniLM-L6-v2, the comparison column
    python -m space.precompute --measure 200 [--data data]          # start-up, latency, int8/binary agreement

A precomputed file holds the float16 index embeddings and the fingerprints of the model and index they were made
for; the demo uses it only for exactly that pair (anything else is embedded once at start-up). Re-run after
retraining a model or rebuilding the index. Runs in the repository only (not part of the published Space).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from space.engine import BASELINE_NAME, create_engine, default_baseline
from space.index import PRECISIONS, PRECOMPUTED_DIR, SOURCES, save_precomputed


def report(fraction: float, desc: str) -> None:
    print(f"[{fraction:4.0%}] {desc}", file=sys.stderr, flush=True)


def benchmark_queries(data_dir: Path, per_source: int, seed: int = 0) -> list[str]:
    """Real queries of the two benchmarks the index is made from (the data build's queries.parquet), a seeded sample."""
    queries = []
    rng = np.random.default_rng(seed)
    for name in SOURCES:
        path = Path(data_dir) / "benchmarks" / name / "queries.parquet"
        if path.is_file():
            texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
            queries += [texts[i] for i in sorted(rng.choice(len(texts), min(per_source, len(texts)), replace=False))]
    return queries


def measure(engine, queries: list[str], k: int = 10) -> dict:
    """Search latency per precision (after encoding the query, median over queries, k = 10 and 50), and how much of
    the float32 top k the int8 and binary searches find (recall@k)."""
    index = engine.main.index
    query_embeddings = engine.main.encode(queries)
    result: dict = {"queries": len(queries), "index entries": index.size}
    for precision in PRECISIONS:
        for top in (k, 50):
            seconds = []
            for query in query_embeddings:
                start = time.perf_counter()
                index.search(query, top, precision=precision)
                seconds.append(time.perf_counter() - start)
            result[f"{precision} search ms (median, k={top})"] = round(1000 * float(np.median(seconds)), 2)
    exact = [set(index.search(q, k)[0].tolist()) for q in query_embeddings]
    for precision in PRECISIONS[1:]:
        found = [set(index.search(q, k, precision=precision)[0].tolist()) for q in query_embeddings]
        result[f"{precision} recall@{k} of the float32 top {k}"] = round(
            float(np.mean([len(a & b) / k for a, b in zip(exact, found, strict=True)])), 4
        )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub id; `minilm`: the comparison model")
    parser.add_argument("--index", type=Path, default=None, help="index parquet (default: the demo's)")
    parser.add_argument("--out", type=Path, default=PRECOMPUTED_DIR, help="folder of precomputed files (the demo's)")
    parser.add_argument("--cache", type=Path, default=None, help="float embedding cache (default: the demo's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--measure", type=int, default=0, metavar="N", help="measure on N queries per benchmark")
    parser.add_argument("--data", type=Path, default=Path("data"), help="data build with the benchmark queries")
    args = parser.parse_args(argv)

    if args.measure:
        start = time.perf_counter()  # a fresh engine with the precomputed files, as `make demo` starts one
        engine = create_engine(args.model, args.index, args.cache, args.device, args.out)
        engine.load_indexes(report)
        loaded = time.perf_counter()
        engine.search(benchmark_queries(args.data, 1)[0], 10, baseline=True)
        first = time.perf_counter() - loaded
        figures = {"start-up seconds": round(loaded - start, 2), "first search seconds": round(first, 3)}
        figures["index embeddings"] = engine.status()
        figures.update(measure(engine, benchmark_queries(args.data, args.measure)))
        print(json.dumps(figures, indent=1))
        return

    baseline = args.model in ("minilm", BASELINE_NAME)
    name = default_baseline() if baseline else args.model
    engine = create_engine(name, args.index, args.cache, args.device, precomputed=None, baseline=None)
    engine.load_indexes(report)
    path = args.out / f"{BASELINE_NAME if baseline else Path(engine.model_name).name}.npz"
    save_precomputed(path, engine.main.index.embeddings, engine.main.key, engine.index_key)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) for model {engine.main.key[:16]}, index "
          f"{engine.index_key[:16]}: {len(engine.texts):,} entries x {engine.dimension} dimensions")  # fmt: skip


if __name__ == "__main__":
    main()
