"""The untrained MiniLM conversion against the ALiBi slope scale, on the monitoring benchmarks.

    python -m train.conversion_report [--data data] [--runs runs/conversion] [--out results/conversion]

Converts all-MiniLM-L6-v2 onto the ALiBi architecture (train.initialize minilm, --fold-positions 32 --cls-position)
once per variant into RUNS/<variant>/: MiniLM's own vocabulary at slope scales 1, 0.25, 0.1, 0.05, 0.02 and 0, and the
MedEIR tokenizer at 1 and 0.05. Scores each, and all-MiniLM-L6-v2 itself, with train.monitor (nDCG@10, 200 queries
over their own documents plus 5,000 others per benchmark); no model has been trained on any of it. Writes
OUT/report.json, report.md (variant x benchmark, gap to MiniLM) and report.png (nDCG@10 against the slope scale).
A variant already converted is not converted again, and its scores on the same data build are kept in
RUNS/scores.json, so an interrupted run resumes where it stopped.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from corpus.dataset import DataBuild
from corpus.reference import minilm_path
from tokenizer.train import build as build_tokenizer
from train.initialize import DEFAULT_TOKENIZER, MINILM_TOKENIZER, convert_minilm, load_tokenizer, save
from train.monitor import CORPUS, QUERIES, monitor, monitor_version, score_table

FOLD_POSITIONS = 32
MINILM = "all-MiniLM-L6-v2"
# the BERT-superset tokenizer (bert-base-uncased's 30,522 tokens at their ids plus 22,021 learned ones), written by
# `python -m tokenizer.train --recipe bert_superset --out runs/tokenizer-superset` (built here when missing)
SUPERSET = "superset"
SUPERSET_RECIPE = "bert_superset"
SUPERSET_TOKENIZER = Path("runs/tokenizer-superset")


@dataclass(frozen=True)
class Variant:
    tokenizer: str  # MINILM_TOKENIZER, "medeir" (the default tokenizer folder) or SUPERSET
    scale: float

    @property
    def name(self) -> str:
        return f"{self.tokenizer}-vocab-x{self.scale:g}"

    @property
    def tokenizer_path(self) -> str:
        """What train.initialize's --tokenizer reads for this variant."""
        paths = {MINILM_TOKENIZER: MINILM_TOKENIZER, SUPERSET: str(SUPERSET_TOKENIZER)}
        return paths.get(self.tokenizer, str(DEFAULT_TOKENIZER))

    def command(self, runs: Path) -> str:
        """The train.initialize command that makes the same folder."""
        vocabulary = [] if self.tokenizer == "medeir" else ["--tokenizer", self.tokenizer_path]
        slopes = ["--alibi-slope-scale", f"{self.scale:g}", "--fold-positions", str(FOLD_POSITIONS), "--cls-position"]
        return shlex.join(
            ["python", "-m", "train.initialize", "minilm", *vocabulary, *slopes, "--out", str(runs / self.name)]
        )


VARIANTS = [Variant(MINILM_TOKENIZER, s) for s in (1, 0.25, 0.1, 0.05, 0.02, 0)] + [
    Variant("medeir", s) for s in (1, 0.05)
]
VARIANTS.append(Variant(SUPERSET, 0.05))


def convert(variant: Variant, folder: Path) -> None:
    """What `variant.command()` does, in this process."""
    name = variant.tokenizer_path
    tokenizer = load_tokenizer(name)
    model, stats = convert_minilm(
        tokenizer, fold_positions=FOLD_POSITIONS, cls_position=True, alibi_slope_scale=variant.scale
    )
    stats["tokenizer"] = name
    save(model, tokenizer, folder, stats)


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return f"{names[0] if names else platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run(variants: list[Variant], runs: Path, out: Path, data: str, command: str) -> dict:
    """Convert (where not yet converted) and score every variant and MiniLM; write the report files."""
    runs.mkdir(parents=True, exist_ok=True)
    if any(v.tokenizer == SUPERSET for v in variants) and not (SUPERSET_TOKENIZER / "tokenizer.json").exists():
        build_tokenizer(DataBuild(data), SUPERSET_TOKENIZER, SUPERSET_RECIPE)
    cache_path = runs / "scores.json"  # {monitor version: {model: scores}}
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    scores = cache.setdefault(monitor_version(data), {})
    start = time.time()
    for i, variant in enumerate([None, *variants]):
        name = MINILM if variant is None else variant.name
        folder = minilm_path() if variant is None else runs / variant.name
        tick, done = time.time(), []
        if variant is not None and not (folder / "initialization.json").exists():  # save() writes it last
            convert(variant, folder)
            scores.pop(name, None)  # a folder made again is scored again
            done.append("converted")
        if name not in scores:
            scores[name] = monitor(str(folder), data)
            cache_path.write_text(json.dumps(cache, indent=2) + "\n")
            done.append("scored")
        status = " and ".join(done) or "already done"
        print(f"[{i}/{len(variants)}] {name}: {scores[name]} ({status}, {time.time() - tick:.0f} s)", flush=True)
    report = {
        "command": command,
        "hardware": hardware(),
        "seconds": round(time.time() - start),
        "data": data,
        "dataset_version": DataBuild(data).version(),
        "monitor_version": monitor_version(data),
        "sample": {"queries": QUERIES, "other_documents": CORPUS, "metric": "nDCG@10"},
        "minilm": scores[MINILM],
        "variants": [
            {"name": v.name, "tokenizer": v.tokenizer, "alibi_slope_scale": v.scale, "command": v.command(runs)}
            | {"scores": scores[v.name], "gap": {b: round(s - scores[MINILM][b], 4) for b, s in scores[v.name].items()}}
            for v in variants
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "report.png")
    return report


def markdown(report: dict) -> str:
    benchmarks = list(report["minilm"])
    rows = [f"| {MINILM} (reference) | | | " + " | ".join(f"{report['minilm'][b]:.3f}" for b in benchmarks) + " |"]
    for v in report["variants"]:
        cells = [f"{v['scores'][b]:.3f} ({v['gap'][b]:+.3f})" for b in benchmarks]
        rows.append(f"| {v['name']} | {v['tokenizer']} | {v['alibi_slope_scale']:g} | " + " | ".join(cells) + " |")
    commands = [f"    {v['command']}" for v in report["variants"]]
    return "\n".join(
        [
            "# Untrained MiniLM conversion against the ALiBi slope scale",
            "",
            f"Generated by `{report['command']}` in {report['seconds']} s on {report['hardware']} "
            f"(data build {report['dataset_version']}, monitoring benchmarks {report['monitor_version']}; a resumed "
            "run's time leaves out what an earlier run did).",
            "",
            f"{MINILM} converted onto the ALiBi architecture with `--fold-positions {FOLD_POSITIONS} --cls-position` "
            "and no training: every head's standard ALiBi slope times the scale (0: no position bias), on MiniLM's own "
            "30,522-token vocabulary (`minilm`), the 52,543-token MedEIR tokenizer (`medeir`) or the 52,543-token "
            "BERT-superset tokenizer (`superset`: bert-base-uncased's tokens at their ids plus 22,021 learned ones); "
            f"new tokens start as the mean of their MiniLM pieces. nDCG@10 from `train.monitor`: per benchmark a seeded sample of {QUERIES} queries "
            f"searched over their own documents plus {CORPUS:,} others, max_seq_length 512 (monitor-size, not the "
            "held-out benchmark of `evaluation.run`). In brackets: the gap to all-MiniLM-L6-v2 on the same sample.",
            "",
            *score_table(["model", "vocabulary", "slope scale"], benchmarks, rows),
            "",
            "Each variant's folder is what this `train.initialize` command writes:",
            "",
            *commands,
            "",
        ]
    )


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(report["minilm"])
    scales = sorted({v["alibi_slope_scale"] for v in report["variants"]})
    columns = min(len(benchmarks), 2)
    rows = -(-len(benchmarks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False, sharex=True)
    for ax, benchmark in zip(axes.flat, benchmarks, strict=False):
        for tokenizer, marker in ((MINILM_TOKENIZER, "o-"), ("medeir", "s--"), (SUPERSET, "^:")):
            points = sorted(
                (v["alibi_slope_scale"], v["scores"][benchmark])
                for v in report["variants"]
                if v["tokenizer"] == tokenizer
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker, label=f"converted, {tokenizer} vocabulary")
        ax.axhline(report["minilm"][benchmark], color="black", linestyle="--", linewidth=1, label=MINILM)
        ax.set_xscale("symlog", linthresh=0.01)  # log above 0.01, linear down to 0 (no position bias)
        ax.set_xticks(scales, [f"{s:g}" for s in scales], fontsize=8)
        ax.set_title(benchmark)
        ax.set_xlabel("ALiBi slope scale")
        ax.set_ylabel("nDCG@10")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(benchmarks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Untrained conversion of {MINILM} (monitor-size samples; {report['hardware']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="output of `python -m corpus.build`")
    parser.add_argument("--runs", type=Path, default=Path("runs/conversion"), help="the converted folders")
    parser.add_argument("--out", type=Path, default=Path("results/conversion"), help="report.json, .md and .png")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    run(VARIANTS, args.runs, args.out, args.data, shlex.join(["python", "-m", "train.conversion_report", *argv]))


if __name__ == "__main__":
    main()
