"""Vocabulary transfer by word-aligned distillation, measured on the monitoring benchmarks against texts seen.

    python -m train.vocab_transfer_report RUN [RUN ...] [--data data] [--out results/vocab-transfer]

RUN: the output folder of a `train.pretrain` run with `objective: word_distill`
(train/recipes/pretrain-vocab-transfer-small.yaml). Each of its checkpoints (one every `save_every` steps, all
kept) is written out as a model folder, RUN/texts-<n>, and scored with train.monitor (nDCG@10 on the samples of
results/conversion/report.md). A run may start from another's final model; each chain's untrained start (the
conversion it begins from) and the two references come from train.conversion_report's scores
(runs/conversion/scores.json): minilm-vocab-x0.05, the same architecture and slopes on MiniLM's own vocabulary (the
ceiling of a transfer that keeps MiniLM's body), and all-MiniLM-L6-v2 itself. Scores are kept in
runs/vocab-transfer/scores.json, so a rerun scores only new checkpoints.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from corpus.dataset import DataBuild
from modeling_medeir import MedEIRForMaskedLM
from train.conversion_report import MINILM, hardware
from train.monitor import CORPUS, QUERIES, monitor, monitor_version, score_table
from train.pretrain import save_model

CEILING = "minilm-vocab-x0.05"
CONVERSION_SCORES = Path("runs/conversion/scores.json")
SCORES = Path("runs/vocab-transfer/scores.json")


def checkpoint_models(run: Path) -> list[tuple[int, Path]]:
    """(texts seen, model folder) for every checkpoint of a run, the folder written from the checkpoint if needed."""
    recipe = json.loads((run / "recipe.json").read_text())
    models = []
    for checkpoint in sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[-1])):
        step = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)["step"]  # train.pretrain.Progress
        texts = step * recipe["batch_size"] * recipe["grad_accum"]  # one process
        folder = run / f"texts-{texts}"
        if not (folder / "modules.json").exists():
            model = MedEIRForMaskedLM.from_pretrained(recipe["init"])
            model.model.load_state_dict(load_file(checkpoint / "model.safetensors"))
            save_model(model, AutoTokenizer.from_pretrained(recipe["init"]), folder)
        models.append((texts, folder))
    return models


def conversion_start(init: str) -> str:
    """The conversion variant (train.conversion_report's folder name) a chain of runs starts from."""
    recipe = Path(init).parent / "recipe.json"
    if Path(init).name == "final" and recipe.exists():
        return conversion_start(json.loads(recipe.read_text())["init"])
    return Path(init).name


def texts_before(init: str) -> int:
    """Texts a run's starting point had already been trained on, when it is another run's final model."""
    recipe = Path(init).parent / "recipe.json"
    if Path(init).name != "final" or not recipe.exists():
        return 0
    earlier = json.loads(recipe.read_text())
    return earlier["max_steps"] * earlier["batch_size"] * earlier["grad_accum"] + texts_before(earlier["init"])


def run_seconds(run: Path) -> int:
    """From the recipe's writing (the start) to the final model's (the end), evaluation and saves included."""
    return round((run / "final" / "model.safetensors").stat().st_mtime - (run / "recipe.json").stat().st_mtime)


def report(runs: list[Path], data: str, out: Path, command: str) -> dict:
    version = monitor_version(data)  # the conversion report's scores are kept under the same key
    references = json.loads(CONVERSION_SCORES.read_text())
    if version not in references:
        raise SystemExit(f"no conversion scores on these benchmarks ({version}): run python -m train.conversion_report")
    reference = references[version]
    cache = json.loads(SCORES.read_text()) if SCORES.exists() else {}
    scores = cache.setdefault(version, {})
    rows = []
    for run in runs:
        recipe = json.loads((run / "recipe.json").read_text())
        for texts, folder in checkpoint_models(run):
            if str(folder) not in scores:
                scores[str(folder)] = monitor(str(folder), data)
                SCORES.parent.mkdir(parents=True, exist_ok=True)
                SCORES.write_text(json.dumps(cache, indent=2) + "\n")
            print(folder, scores[str(folder)], flush=True)
            keys = ("init", "lr", "new_rows_only", "seq_len", "distill_texts")
            rows.append({"run": str(run), "texts": texts, "model": str(folder), "scores": scores[str(folder)]})
            rows[-1] |= {k: recipe[k] for k in keys} | {"run_seconds": run_seconds(run)}
            rows[-1]["distill_words"] = recipe.get("distill_words", 0)  # recipes before one-word texts lack it
            rows[-1]["texts_before"] = texts_before(recipe["init"])
            rows[-1]["start"] = conversion_start(recipe["init"])
    for row in rows:
        row["gap_to_ceiling"] = {b: round(s - reference[CEILING][b], 4) for b, s in row["scores"].items()}
        row["gap_to_minilm"] = {b: round(s - reference[MINILM][b], 4) for b, s in row["scores"].items()}
    result = {
        "command": command,
        "hardware": hardware(),
        "data": data,
        "dataset_version": DataBuild(data).version(),
        "monitor_version": version,
        "sample": {"queries": QUERIES, "other_documents": CORPUS, "metric": "nDCG@10"},
        "references": {
            name: reference[name]
            for name in (MINILM, CEILING, *sorted({row["start"] for row in rows}))
            if name in reference
        },
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(markdown(result))
    return result


def markdown(report: dict) -> str:
    """The table: nDCG@10 per checkpoint, in brackets the gap to the ceiling and to all-MiniLM-L6-v2."""
    refs = report["references"]
    benchmarks = list(refs[MINILM])

    def line(name: str, texts: str, scores: dict) -> str:
        cells = [
            f"{scores[b]:.3f} ({scores[b] - refs[CEILING][b]:+.3f} / {scores[b] - refs[MINILM][b]:+.3f})"
            for b in benchmarks
        ]
        return f"| {name} | {texts} | " + " | ".join(cells) + " |"

    rows, starts = [], set()
    for row in report["rows"]:
        if row["start"] in refs and row["start"] not in starts:  # a chain's untrained start, before its first run
            starts.add(row["start"])
            rows.append(line(f"{row['start']} (start, untrained)", "0", refs[row["start"]]))
        phase = "new rows only" if row["new_rows_only"] else f"all weights, lr {row['lr']:g}"
        if row["distill_words"]:  # one-word texts (train.distill.covering_words), with drawn texts or alone
            drawn = f" + {row['distill_texts']:,} texts" if row["distill_texts"] else ""
            phase += f"; every pass: the pool's words that use a new row, one a text{drawn}"
        texts = f"{row['texts_before']:,} + {row['texts']:,}" if row["texts_before"] else f"{row['texts']:,}"
        rows.append(line(f"{row['model']} ({phase})", texts, row["scores"]))
    rows += [line(f"{CEILING} (ceiling)", "", refs[CEILING]), line(f"{MINILM} (reference)", "", refs[MINILM])]
    runs = sorted({(r["run"], r["run_seconds"]) for r in report["rows"]})
    return "\n".join(
        [
            "# Vocabulary transfer by word-aligned distillation",
            "",
            f"Generated by `{report['command']}` on {report['hardware']} (data build {report['dataset_version']}, "
            f"monitoring benchmarks {report['monitor_version']}).",
            "",
            f"nDCG@10 from `train.monitor` (per benchmark {report['sample']['queries']} queries over their own "
            f"documents plus {report['sample']['other_documents']:,} others, the samples of results/conversion/report.md). "
            f"In brackets: the gap to {CEILING} (MiniLM converted with the same slopes on its own vocabulary) / to "
            f"{MINILM}.",
            "",
            *score_table(["model", "texts seen"], benchmarks, rows),
            "",
            "Training time per run (recipe written to final model saved, evaluation and checkpoints included):",
            "",
            *[f"- `{run}`: {seconds / 60:.1f} min" for run, seconds in runs],
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="train.pretrain output folders (objective: word_distill)")
    parser.add_argument("--data", default="data", help="output of `python -m corpus.build`")
    parser.add_argument("--out", type=Path, default=Path("results/vocab-transfer"), help="report.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    report(args.runs, args.data, args.out, shlex.join(["python", "-m", "train.vocab_transfer_report", *argv]))


if __name__ == "__main__":
    main()
