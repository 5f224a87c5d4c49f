"""train.conversion_report on a hand-made data build of two tiny benchmarks: real conversions, real monitor scores."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train import conversion_report
from train.conversion_report import MINILM, Variant

TERMS = {
    "heart attack": "myocardial infarction",
    "high blood pressure": "hypertension",
    "sugar diabetes": "diabetes mellitus",
    "shortness of breath": "dyspnea",
    "stuffy nose": "nasal congestion",
    "hair loss": "alopecia",
}
OTHERS = ["fracture of the femur", "iron deficiency anaemia", "a small wooden boat", "the colour of the sky at dusk"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Two monitoring benchmarks of six queries over ten documents each, as corpus.build writes them."""
    root = tmp_path_factory.mktemp("tiny-data")
    documents = {f"d{i}": text for i, text in enumerate([*TERMS.values(), *OTHERS])}
    for name in ("hpo_layperson", "wordnet_gloss"):
        folder = root / "benchmarks" / name
        folder.mkdir(parents=True)
        for part, rows in (
            ("corpus", [{"id": d, "text": t} for d, t in documents.items()]),
            ("queries", [{"id": f"q{i}", "text": q} for i, q in enumerate(TERMS)]),
            ("qrels", [{"query_id": f"q{i}", "doc_id": f"d{i}", "score": 1} for i in range(len(TERMS))]),
        ):
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{part}.parquet")
    return root


def test_report_scores_every_variant_and_converts_each_once(tiny_data, tmp_path, monkeypatch, minilm_path):
    converted, scored = [], []
    convert, monitor = conversion_report.convert, conversion_report.monitor
    monkeypatch.setattr(conversion_report, "convert", lambda v, folder: converted.append(v.name) or convert(v, folder))
    monkeypatch.setattr(conversion_report, "monitor", lambda path, data: scored.append(path) or monitor(path, data))
    runs, out = tmp_path / "runs", tmp_path / "results"
    first = [Variant("minilm", 1), Variant("minilm", 0.05)]
    report = conversion_report.run(first, runs, out, str(tiny_data), "python -m train.conversion_report (test)")

    assert converted == ["minilm-vocab-x1", "minilm-vocab-x0.05"] and len(scored) == 3
    stats = json.loads((runs / "minilm-vocab-x0.05" / "initialization.json").read_text())
    assert (stats["tokenizer"], stats["alibi_slope_scale"], stats["fold_positions"], stats["cls_position"]) == (
        "minilm",
        0.05,
        32,
        True,
    )
    assert set(report["minilm"]) == {"hpo_layperson", "wordnet_gloss"}
    for variant in report["variants"]:
        for name, score in variant["scores"].items():
            assert 0 <= score <= 1 and variant["gap"][name] == pytest.approx(score - report["minilm"][name], abs=1e-4)
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    assert MINILM in md and "| minilm-vocab-x0.05 | minilm | 0.05 |" in md and "5,000 others" in md
    assert "train.initialize minilm --tokenizer minilm --alibi-slope-scale 0.05 --fold-positions 32" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"

    # resumed with one more variant: only the new one is converted and scored
    converted.clear(), scored.clear()
    report = conversion_report.run([*first, Variant("minilm", 0)], runs, out, str(tiny_data), "again")
    assert converted == ["minilm-vocab-x0"] and scored == [str(runs / "minilm-vocab-x0")]
    assert [v["name"] for v in report["variants"]] == ["minilm-vocab-x1", "minilm-vocab-x0.05", "minilm-vocab-x0"]
    assert json.loads((runs / "minilm-vocab-x0" / "config.json").read_text())["alibi_slopes"] == [0.0] * 12


def test_monitor_scores_are_kept_under_the_benchmarks_they_read(tiny_data, tmp_path):
    """The cache key follows the monitored benchmark files, not the rest of the build: new training pairs keep it,
    a changed benchmark changes it."""
    import shutil

    from train.monitor import monitor_version

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    (copy / "pairs").mkdir()
    pq.write_table(pa.Table.from_pylist([{"anchor": "a", "positive": "b"}]), copy / "pairs" / "train.parquet")
    (copy / "manifest.json").write_text(json.dumps({"dataset_version": "another build"}))
    assert monitor_version(str(copy)) == monitor_version(str(tiny_data))
    queries = copy / "benchmarks" / "wordnet_gloss" / "queries.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "q0", "text": "heart attacks"}]), queries)
    assert monitor_version(str(copy)) != monitor_version(str(tiny_data))


def test_a_chain_of_vocabulary_transfer_runs_is_traced_to_its_conversion(tmp_path):
    """A run that starts from another run's final model counts that run's texts and reports the same untrained start."""
    from train.vocab_transfer_report import conversion_start, texts_before

    first, second = tmp_path / "words", tmp_path / "then-texts"
    for run, init, steps in ((first, "runs/conversion/superset-vocab-x0.05", 10), (second, first / "final", 4)):
        run.mkdir()
        recipe = {"init": str(init), "max_steps": steps, "batch_size": 8, "grad_accum": 2}
        (run / "recipe.json").write_text(json.dumps(recipe))
    assert conversion_start(str(second / "final")) == "superset-vocab-x0.05"
    assert texts_before(str(second / "final")) == 4 * 16 + 10 * 16
    assert (conversion_start("runs/conversion/medeir-vocab-x0.05"), texts_before("runs/conversion/x")) == (
        "medeir-vocab-x0.05",
        0,
    )
