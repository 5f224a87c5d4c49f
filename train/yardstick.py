"""The data yardstick: does a build's training data teach what held-out benchmarks ask? Judged on a model that no
conversion can confuse with the data: all-MiniLM-L6-v2 itself (absolute positions, its own vocabulary, nothing
converted), fine-tuned briefly on the build's pairs.

    python -m train.yardstick [--data data] [--out results/yardstick/<mix>] [--steps 100]

For each benchmark source of the build (hpo, hpoa, icd10cm, wordnet), leave-one-source-out: MiniLM is fine-tuned on a
seeded sample of STEPS x BATCH rows of pairs/train.parquet without that source (its rows, and every row holding one of
its strings: train.finetune.source_texts), then scored on that source's benchmarks, so a source's pairs are never
judged on its own benchmark. The long-document benchmark is left out (MiniLM reads 256 tokens). `--sources none`
adds one run on every source, scored on every benchmark: in distribution, each benchmark's groups (ICD-10-CM
categories, HPO terms, diseases, synsets) still held out of training, so it shows what a source's pairs teach about
its own unseen items (e.g. symptoms of diseases no training profile describes).

The recipe, the same for every build, so that only the data differs:
- batches of BATCH rows with no anchor or positive repeated inside a batch; MultipleNegativesRankingLoss (scale 20)
  over every positive and each row's first hard negative;
- plus the squared distance of the student's normalised anchor and positive embeddings to frozen MiniLM's
  (2 - 2 cos, weight MSE_WEIGHT), so that what the pairs do not teach stays where MiniLM had it;
- AdamW, lr 3e-5, 10% linear warm-up then linear decay, TRAIN_TOKENS tokens, bf16 autocast on a CPU.
Scoring: nDCG@10 of up to QUERIES seeded queries per benchmark over every document (exact cosine, each model at its
own window), for the fine-tuned model, untouched all-MiniLM-L6-v2 and all-mpnet-base-v2 (their scores are cached
under OUT/../baselines.json, keyed by the benchmark files' checksums).

Writes OUT/report.json and OUT/report.md. A finished source is kept in OUT/runs/<source>.json with the checksums
of what it read, so an interrupted yardstick resumes at the next source, and a rebuild that leaves a run's inputs
alone does not run it again.
"""

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from corpus.dataset import BENCHMARK_SOURCES, BENCHMARKS, DataBuild, benchmark_file, benchmarks_of, pairs_file
from corpus.reference import minilm_path, mpnet_path
from corpus.text import normalize
from train.conversion_report import hardware
from train.finetune import free_of_sources, source_texts

STEPS = 80
BATCH = 64
TRAIN_TOKENS = 64
LR = 3e-5
WARMUP = 0.1
SCALE = 20.0
MSE_WEIGHT = 1.0
QUERIES = 1000
NOTHING = "none"  # the run that leaves no source out
BASELINES = {"all-MiniLM-L6-v2": minilm_path, "all-mpnet-base-v2": mpnet_path}


def sample_rows(data: DataBuild, source: str, n: int, seed: int) -> list[dict]:
    """`n` rows of pairs/train.parquet drawn at random (seeded) from those holding no string of `source` (from every
    row when `source` is NOTHING)."""
    table = data.pairs("train", columns=["anchor", "positive", "negatives", "source"]).to_pylist()
    excluded = () if source == NOTHING else (source,)
    held = source_texts(str(data.root), excluded) if excluded else frozenset()
    fields = ("anchor", "positive", "negatives")
    rows = [r for r in table if free_of_sources(r["source"], [r[f] for f in fields], excluded, held)]
    return random.Random(seed).sample(rows, min(n, len(rows)))


def batches(rows: list[dict], size: int) -> list[list[dict]]:
    """Consecutive batches in which no anchor or positive (normalised) occurs twice: a repeated text would be its own
    in-batch negative. A row that clashes waits for the next batch."""
    out, waiting = [], list(rows)
    while waiting:
        batch, seen, later = [], set(), []
        for row in waiting:
            keys = {normalize(row["anchor"]), normalize(row["positive"])}
            if len(batch) < size and not keys & seen:
                batch.append(row)
                seen |= keys
            else:
                later.append(row)
        out.append(batch)
        waiting = later
    return out


def embed(model: SentenceTransformer, texts: list[str]) -> torch.Tensor:
    features = model.tokenize(texts)
    return F.normalize(model(features)["sentence_embedding"], dim=-1)


def finetune(rows: list[dict], steps: int, seed: int) -> SentenceTransformer:
    """all-MiniLM-L6-v2 after `steps` batches of the yardstick's recipe on `rows`."""
    torch.manual_seed(seed)
    student = SentenceTransformer(str(minilm_path()), device="cpu")
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    for model in (student, teacher):
        model.max_seq_length = TRAIN_TOKENS
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)
    warmup = max(1, round(WARMUP * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    losses = []
    progress = tqdm(batches(rows, BATCH)[:steps], desc="yardstick steps", unit="step")
    for batch in progress:
        anchors = [r["anchor"] for r in batch]
        positives = [r["positive"] for r in batch]
        negatives = [r["negatives"][0] for r in batch if r["negatives"]]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = embed(student, anchors)
            d = embed(student, positives + negatives)
            with torch.no_grad():
                target = embed(teacher, anchors + positives)
        scores = SCALE * a.float() @ d.float().T
        ranking = F.cross_entropy(scores, torch.arange(len(batch)))
        kept = torch.cat([a, d[: len(batch)]]).float()
        mse = (kept - target.float()).pow(2).sum(-1).mean()
        loss = ranking + MSE_WEIGHT * mse
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    student.eval()
    return student


def ndcg_at_10(model, benchmark, max_queries: int, seed: int, batch_size: int = 128) -> float:
    """nDCG@10 of a seeded sample of the benchmark's queries over all of its documents (binary relevance)."""
    ids = sorted(benchmark.qrels)
    ids = sorted(random.Random(seed).sample(ids, min(max_queries, len(ids))))
    doc_ids = list(benchmark.corpus)
    kwargs = {"batch_size": batch_size, "normalize_embeddings": True, "convert_to_tensor": True}
    docs = model.encode([benchmark.corpus[d] for d in doc_ids], show_progress_bar=True, **kwargs)
    queries = model.encode([benchmark.queries[q] for q in ids], **kwargs)
    top = torch.topk(queries @ docs.T, k=10, dim=1).indices.tolist()
    discounts = 1.0 / np.log2(np.arange(2, 12))
    total = 0.0
    for q, ranked in zip(ids, top, strict=True):
        relevant = benchmark.qrels[q]
        gains = np.array([1.0 if doc_ids[i] in relevant else 0.0 for i in ranked])
        ideal = discounts[: min(10, len(relevant))].sum()
        total += float((gains * discounts).sum() / ideal)
    return total / len(ids)


def checksums(data: DataBuild, name: str) -> str:
    """The benchmark's three files, by the checksums the build's manifest records."""
    outputs = data.manifest().get("outputs", {})
    parts = ("corpus", "queries", "qrels")
    return "/".join(outputs.get(benchmark_file(name, part), {}).get("sha256", "?")[:12] for part in parts)


def inputs_of(data: DataBuild, source: str) -> dict:
    """What one leave-one-source-out run reads: the training pairs and the source's benchmarks (by checksum). A run
    whose inputs are unchanged is not run again, whatever else the build changed."""
    pairs = data.manifest().get("outputs", {}).get(pairs_file("train"), {}).get("sha256", "?")
    return {"pairs": pairs[:12], **{n: checksums(data, n) for n in scored_benchmarks(data, source)}}


def baseline_scores(
    data: DataBuild, names: list[str], cache: Path, max_queries: int, seed: int, labels: list[str]
) -> dict:
    """Untouched baselines (BASELINES) on each benchmark, computed once per benchmark version."""
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    out: dict[str, dict[str, float]] = {}
    for label in labels:
        path = BASELINES[label]
        model = None
        for name in names:
            key = f"{label}|{name}|{checksums(data, name)}|{max_queries}|{seed}"
            if key not in stored:
                model = model or SentenceTransformer(str(path()), device="cpu")
                stored[key] = round(ndcg_at_10(model, data.benchmark(name), max_queries, seed), 4)
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
            out.setdefault(label, {})[name] = stored[key]
    return out


def scored_benchmarks(data: DataBuild, source: str) -> list[str]:
    """The source's benchmarks in the build (every source's for NOTHING), the long-document one left out."""
    names = [n for s in BENCHMARK_SOURCES for n in benchmarks_of(s)] if source == NOTHING else benchmarks_of(source)
    return [n for n in names if not BENCHMARKS[n].long_documents and data.has_benchmark(n)]


def run_source(data: DataBuild, source: str, args: argparse.Namespace) -> dict:
    """One leave-one-source-out run: sample, fine-tune, score on the source's benchmarks."""
    t0 = time.time()
    rows = sample_rows(data, source, args.steps * BATCH, args.seed)
    model = finetune(rows, args.steps, args.seed)
    trained = time.time() - t0
    scores = {
        n: round(ndcg_at_10(model, data.benchmark(n), args.queries, args.seed), 4)
        for n in scored_benchmarks(data, source)
    }
    mix: dict[str, int] = {}
    for r in rows:
        mix[r["source"]] = mix.get(r["source"], 0) + 1
    return {
        "left_out": source,
        "rows": len(rows),
        "sample_sources": dict(sorted(mix.items())),
        "scores": scores,
        "train_seconds": round(trained),
        "total_seconds": round(time.time() - t0),
        "hardware": hardware(),
    }


def markdown(report: dict) -> str:
    base = report["baselines"]
    lines = [
        f"# Data yardstick: {report['data']} (mix {report['mix']}, dataset {report['dataset_version']})",
        "",
        f"all-MiniLM-L6-v2 fine-tuned for {report['steps']} steps of {BATCH} pairs ({TRAIN_TOKENS} tokens) sampled "
        "from the build's pairs/train.parquet without the column's source (leave-one-source-out); nDCG@10 on up to "
        f'{report["queries"]} seeded queries per benchmark over every document; rows left out "{NOTHING}" come '
        "from one run on every source, scored on each benchmark's held-out groups (in distribution). "
        f"Command: `{report['command']}`. "
        f"Hardware of the runs: {report['hardware']}; {report['seconds']} s of runs in all.",
        "",
        "| benchmark | left out | " + " | ".join(base) + " | MiniLM + this build's pairs | vs MiniLM |",
        "|---|---|" + "---|" * len(base) + "---|---|",
    ]
    for source, run in report["runs"].items():
        for name, score in run["scores"].items():
            measured = " | ".join(f"{scores[name]:.4f}" for scores in base.values())
            gain = f"{score - base['all-MiniLM-L6-v2'][name]:+.4f}" if "all-MiniLM-L6-v2" in base else "-"
            lines.append(f"| {BENCHMARKS[name].label} | {source} | {measured} | {score:.4f} | {gain} |")
    lines += ["", "Rows sampled per source (each run):", ""]
    for source, run in report["runs"].items():
        parts = ", ".join(f"{k} {v:,}" for k, v in run["sample_sources"].items())
        without = "every source" if source == NOTHING else f"without {source}"
        lines.append(f"- {without}: {parts} ({run['train_seconds']} s training)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data"), help="output of `python -m corpus.build`")
    parser.add_argument(
        "--out",
        type=Path,
        help="report folder (default: results/yardstick/<the build's mix>, or <mix>-seed<N> for --seed N; a folder's "
        "runs are one seed's)",
    )
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--queries", type=int, default=QUERIES, help="queries per benchmark (seeded sample)")
    parser.add_argument(
        "--sources",
        nargs="+",
        choices=[*BENCHMARK_SOURCES, NOTHING],
        help=f"sources left out, one run each (default: every benchmark source); {NOTHING}: one run on every source",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baselines", nargs="+", choices=list(BASELINES), default=list(BASELINES))
    args = parser.parse_args(argv)
    data = DataBuild(args.data)
    manifest = data.manifest()
    mix = manifest.get("mix", {}).get("name", "unrecorded")
    out = args.out or Path("results/yardstick") / (mix if args.seed == 0 else f"{mix}-seed{args.seed}")
    sources = [s for s in args.sources or BENCHMARK_SOURCES if scored_benchmarks(data, s)]
    runs = {}
    for source in sources:
        path = out / "runs" / f"{source}.json"
        settings = {"steps": args.steps, "queries": args.queries, "seed": args.seed, "inputs": inputs_of(data, source)}
        if path.exists() and all(json.loads(path.read_text()).get(k) == v for k, v in settings.items()):
            runs[source] = json.loads(path.read_text())
            continue
        runs[source] = {**settings, **run_source(data, source, args)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(runs[source], indent=2) + "\n")
        print(source, runs[source]["scores"], flush=True)
    names = [n for run in runs.values() for n in run["scores"]]
    baselines = baseline_scores(data, names, out.parent / "baselines.json", args.queries, args.seed, args.baselines)
    report = {
        "data": str(args.data),
        "mix": mix,
        "dataset_version": data.version(),
        "steps": args.steps,
        "queries": args.queries,
        "seed": args.seed,
        "command": " ".join(["python -m train.yardstick", *(argv if argv is not None else sys.argv[1:])]),
        # each run's own machine (a run reused from an earlier invocation keeps where it ran)
        "hardware": ", ".join(sorted({run.get("hardware", "unrecorded") for run in runs.values()})),
        "seconds": sum(run["total_seconds"] for run in runs.values()),  # of the runs, whenever each ran
        "baselines": baselines,
        "runs": runs,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
