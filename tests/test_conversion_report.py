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
