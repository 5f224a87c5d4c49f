"""The model card's results metadata (`model-index`), generated from a report.json.

    python -m evaluation.model_index results/evaluation/<name>/report.json [--model NAME]   # prints the YAML

Official MTEB tasks go through mteb's own converter (`TaskResult.get_hf_eval_results`) on the TaskResult files that
evaluation.run kept. That converter finds a task through mteb's registry (`mteb.get_task`), which holds only mteb's own
tasks, so for the local benchmarks and the pair metrics the same `EvalResult` fields are filled here from the report.
huggingface_hub's `ModelCardData` then writes the standard `model-index` block (what `mteb create-meta` used to write).
Values are fractions (0-1), as mteb reports them.
"""

import argparse
import json
import warnings
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCardData

from evaluation.metrics import RETRIEVAL_METRICS
from evaluation.report import BENCHMARK_LABELS, METRIC_LABELS, slug

RETRIEVAL_TASK_TYPE = "text-retrieval"  # mteb's mapping of its "Retrieval" type (TaskMetadata._hf_task_type)
PAIR_METRICS = {"pearson": "Pearson (similarity vs label)", "separation": "Separation score"}


def local_results(report: dict, model: dict) -> list[EvalResult]:
    """EvalResults for the local retrieval benchmarks and the held-out pairs."""
    revision = report["data"]["dataset_version"]
    out = []
    for bench, scores in model.get("retrieval", {}).items():
        task = report["benchmarks"][bench]["task"]
        for metric in RETRIEVAL_METRICS:
            out.append(
                EvalResult(
                    task_type=RETRIEVAL_TASK_TYPE,
                    task_name="Retrieval",
                    dataset_type=f"medeir/{bench}",
                    dataset_name=f"{task} ({BENCHMARK_LABELS.get(bench, bench)}, held out by corpus.build)",
                    dataset_config="default",
                    dataset_split="test",
                    dataset_revision=revision,
                    metric_type=metric,
                    metric_name=METRIC_LABELS[metric],
                    metric_value=round(scores[metric], 5),
                )
            )
    for group in ("all", "cardiology"):
        scores = model.get("pairs", {}).get(group)
        for metric, label in PAIR_METRICS.items() if scores else ():
            out.append(
                EvalResult(
                    task_type="sentence-similarity",
                    task_name="Pair similarity",
                    dataset_type="medeir/pairs_test",
                    dataset_name="MedEIR held-out pairs (related vs unrelated)",
                    dataset_config=group,
                    dataset_split="test",
                    dataset_revision=revision,
                    metric_type=metric,
                    metric_name=label,
                    metric_value=round(scores[metric], 5),
                )
            )
    return out


def official_results(model: dict, mteb_dir: Path) -> list[EvalResult]:
    """mteb's own EvalResults for every official task that ran (skipped tasks have none)."""
    from mteb.results import TaskResult

    out = []
    for task, scores in model.get("official", {}).items():
        path = mteb_dir / f"{task}.json"
        if "skipped" not in scores and path.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                out += TaskResult.from_disk(path).get_hf_eval_results()
    return out


def eval_results(report: dict, model: dict, out_dir: Path | None = None) -> list[EvalResult]:
    """Every EvalResult of one model of the report (local benchmarks, pairs, and official tasks kept in `out_dir`)."""
    results = local_results(report, model)
    if out_dir is not None:
        results += official_results(model, Path(out_dir) / "mteb" / slug(model["name"]))
    return results


def model_index(report: dict, model: dict, out_dir: Path | None = None) -> dict:
    """{"model-index": [...]} for one model of the report."""
    return ModelCardData(model_name=model["name"], eval_results=eval_results(report, model, out_dir)).to_dict()


def write_model_indexes(report: dict, out: Path) -> list[Path]:
    """model-index/<model>.yaml for every model, to read; `hub.publish model --report` writes it into the card. A
    reranking row is two models in sequence, which no card describes: it gets none."""
    folder = Path(out) / "model-index"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for model in report["models"]:
        if model["role"] == "rerank":
            continue
        path = folder / f"{slug(model['name'])}.yaml"
        path.write_text(yaml.safe_dump(model_index(report, model, out), sort_keys=False, allow_unicode=True))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--model", help="model name in the report (default: the first)")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    model = next((m for m in report["models"] if args.model in (None, m["name"])), None)
    if model is None:
        parser.error(f"no model {args.model!r} in {args.report}")
    print(yaml.safe_dump(model_index(report, model, args.report.parent), sort_keys=False, allow_unicode=True), end="")


if __name__ == "__main__":
    main()
