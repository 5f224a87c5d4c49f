"""Monitoring-size retrieval: the figures `train.finetune` logs during training, for any list of models.

    python -m train.monitor MODEL [MODEL ...] [--data data] [--out FILE.json]

Each benchmark of the fine-tuning monitor (train.finetune.BENCHMARKS) as a seeded sample of 200 queries searched
over their own documents plus 5,000 others (train.finetune.benchmark_evaluator, seed 0), nDCG@10, each model at
max_seq_length 512. Quick enough to compare training stages and starting points side by side in a few minutes on a
CPU; it is not the held-out benchmark (`python -m evaluation.run` scores every query over every document).
"""

import argparse
import hashlib
import json
from pathlib import Path

from sentence_transformers import SentenceTransformer

from corpus.dataset import BENCHMARK_PARTS, DataBuild
from train.finetune import BENCHMARKS, FinetuneRecipe, benchmark_evaluator

QUERIES = 200
CORPUS = 5000
MAX_SEQ_LENGTH = 512


def monitor_version(data: str = "data") -> str:
    """What the monitor's scores depend on: a digest of the monitored benchmarks' files and the sample sizes. Builds
    that differ only in their training pairs share it, so a score cached under it stays valid across such rebuilds
    (the build's own version changes with every pair)."""
    build = DataBuild(data)
    digest = hashlib.sha256(f"{QUERIES} {CORPUS} {MAX_SEQ_LENGTH}".encode())
    for name in BENCHMARKS:
        if build.has_benchmark(name):
            for part in BENCHMARK_PARTS:
                path = build.benchmark_dir(name) / f"{part}.parquet"
                digest.update(f"{name}/{part} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


def monitor(path: str, data: str = "data") -> dict[str, float]:
    """nDCG@10 of one model on every monitoring benchmark the data build has."""
    recipe = FinetuneRecipe(init=path, data=data, eval_queries=QUERIES, eval_corpus=CORPUS)
    model = SentenceTransformer(path, trust_remote_code=True)
    model.max_seq_length = MAX_SEQ_LENGTH
    scores = {}
    for name in BENCHMARKS:
        evaluator = benchmark_evaluator(recipe, name)
        if evaluator is not None:
            scores[name] = round(evaluator(model)[f"{name}_cosine_ndcg@10"], 4)
    return scores


def score_table(columns: list[str], benchmarks: list[str], rows: list[str]) -> list[str]:
    """A markdown table of monitor scores: `columns` that name each row, one column per benchmark, then `rows`."""
    return ["| " + " | ".join([*columns, *benchmarks]) + " |", "|" + "---|" * (len(columns) + len(benchmarks)), *rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="SentenceTransformer folders (MedEIR folders need no flag)")
    parser.add_argument("--data", default="data", help="output of `python -m corpus.build`")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    results = {}
    for path in args.models:
        results[path] = monitor(path, args.data)
        print(path, results[path], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
