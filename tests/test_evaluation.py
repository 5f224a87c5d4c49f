"""The evaluation suite: metrics against hand-worked cases, the mteb task wiring, the report on a tiny model, the
offline skip of the official MTEB tasks, model-index generation and the throughput helper."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from evaluation import metrics, tasks
from tests.data_fixtures import REPO

# mteb's embedding cache announces every new cache folder
pytestmark = [
    pytest.mark.filterwarnings("ignore:Dimension file not found"),
    pytest.mark.filterwarnings("ignore:No existing files found"),
]

# --- metrics, worked by hand ---------------------------------------------------------------------------------------


def test_retrieval_metrics_on_three_hand_worked_queries():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d1": 1, "d3": 1}}
    run = {
        "q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7},  # hit at rank 1
        "q2": {**{f"f{i}": 0.99 - i / 100 for i in range(10)}, "d2": 0.5},  # hit at rank 11: outside every @10
        "q3": {"d2": 0.9, "d1": 0.8, "d4": 0.7, "d3": 0.6},  # two relevant, at ranks 2 and 4
    }
    # q3: DCG = 1/log2(3) + 1/log2(5) = 1.06161, ideal = 1 + 1/log2(3) = 1.63093 -> nDCG 0.65092
    scores = metrics.retrieval_scores(qrels, run)
    assert scores["ndcg_at_10"] == pytest.approx((1 + 0 + 0.65092) / 3, abs=1e-5)
    assert scores["mrr_at_10"] == pytest.approx((1 + 0 + 1 / 2) / 3, abs=1e-5)
    assert scores["recall_at_1"] == pytest.approx((1 + 0 + 0) / 3, abs=1e-5)
    assert scores["recall_at_10"] == pytest.approx((1 + 0 + 1) / 3, abs=1e-5)
    assert scores["recall_at_100"] == pytest.approx(1.0)


def test_pair_metrics_pearson_and_separation_by_hand():
    # related 0.9, 0.7 (mean 0.8); unrelated 0.2, 0.4 (mean 0.3): separation 0.5.
    # Pearson: deviations x (.35, .15, -.35, -.15), y (.5, .5, -.5, -.5): 0.5 / sqrt(0.29 * 1) = 0.928477
    scores = metrics.pair_scores([0.9, 0.7, 0.2, 0.4], [1.0, 1.0, 0.0, 0.0])
    assert scores["separation"] == pytest.approx(0.5)
    assert scores["related_mean"] == pytest.approx(0.8) and scores["unrelated_mean"] == pytest.approx(0.3)
    assert scores["pearson"] == pytest.approx(0.5 / np.sqrt(0.29))
    assert scores["spearman"] == pytest.approx(4 / np.sqrt(20))  # ranks (4, 3, 1, 2) vs tied labels
    assert (scores["related"], scores["unrelated"]) == (2, 2)
    # a model that ranks unrelated pairs higher gets a negative separation and correlation
    flipped = metrics.pair_scores([0.2, 0.4, 0.9, 0.7], [1.0, 1.0, 0.0, 0.0])
    assert flipped["separation"] == pytest.approx(-0.5) and flipped["pearson"] < 0
    with pytest.raises(ValueError):
        metrics.pair_scores([0.1, 0.2], [1.0, 2.0])


# --- small benchmark subsets from the real data --------------------------------------------------------------------


def write_subset(src: Path, dst: Path, queries: int = 6, docs: int = 16, pairs: int = 12, seed: int = 0) -> Path:
    """A few queries of every benchmark in `src`, their relevant documents plus fillers, and a few pairs per label."""
    rng = random.Random(seed)
    for folder in sorted((src / "benchmarks").iterdir()):
        if not folder.is_dir():
            continue
        corpus = pq.read_table(folder / "corpus.parquet").to_pylist()
        query_rows = pq.read_table(folder / "queries.parquet").to_pylist()
        qrels = pq.read_table(folder / "qrels.parquet").to_pylist()
        keep_q = {r["id"] for r in rng.sample(query_rows, min(queries, len(query_rows)))}
        keep_d = {r["doc_id"] for r in qrels if r["query_id"] in keep_q}
        keep_d |= {r["id"] for r in rng.sample(corpus, min(docs, len(corpus)))}
        out = dst / "benchmarks" / folder.name
        out.mkdir(parents=True)
        for name, rows in (
            ("corpus", [r for r in corpus if r["id"] in keep_d]),
            ("queries", [r for r in query_rows if r["id"] in keep_q]),
            ("qrels", [r for r in qrels if r["query_id"] in keep_q]),
        ):
            pq.write_table(pa.Table.from_pylist(rows), out / f"{name}.parquet")
    rows = pq.read_table(src / "benchmarks" / "pairs_test.parquet").to_pylist()
    chosen = [r for label in (1.0, 0.0) for r in rng.sample([r for r in rows if r["label"] == label], pairs)]
    chosen += [r for r in rows if r["cardiology"]][:4]
    pq.write_table(pa.Table.from_pylist(chosen), dst / "benchmarks" / "pairs_test.parquet")
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


@pytest.fixture(scope="session")
def small_data(request, tmp_path_factory) -> Path:
    """Subsets of data/ when the data build has run here, else of the shared ICD-10-CM + HPO build (no WordNet)."""
    real = REPO / "data"
    if not all((real / "benchmarks" / b / "qrels.parquet").exists() for b in tasks.BENCHMARKS):
        real = request.getfixturevalue("icd_hpo_data")
    return write_subset(real, tmp_path_factory.mktemp("small_data"))


# --- the mteb custom tasks ------------------------------------------------------------------------------------------


class RankSecondEncoder:
    """A stand-in model for mteb: every query scores one decoy document 1.0 and its relevant documents 0.5, all
    others 0, so each relevant document ranks exactly second (third, ... when there are several)."""

    mteb_model_meta = None

    def __init__(self, task) -> None:
        data = task.dataset["default"]["test"]
        docs = sorted(data["corpus"]["id"])
        one_hot = dict(zip(docs, np.eye(len(docs)), strict=True))
        self.vectors = {t: one_hot[i] for i, t in zip(data["corpus"]["id"], data["corpus"]["text"], strict=True)}
        for qid, text in zip(data["queries"]["id"], data["queries"]["text"], strict=True):
            relevant = data["relevant_docs"][qid]
            decoy = next(d for d in docs if d not in relevant)
            self.vectors[text] = one_hot[decoy] + 0.5 * sum(one_hot[d] for d in relevant)

    def encode(self, inputs, **kwargs) -> np.ndarray:
        return np.stack([self.vectors[text] for batch in inputs for text in batch["text"]])

    def similarity(self, a, b):
        return torch.as_tensor(np.asarray(a) @ np.asarray(b).T)

    def similarity_pairwise(self, a, b):
        return torch.as_tensor((np.asarray(a) * np.asarray(b)).sum(-1))


def test_local_task_runs_through_mteb_with_hand_worked_scores(small_data):
    import mteb

    task = tasks.local_task("hpo_layperson", small_data)
    task.load_data()
    data = task.dataset["default"]["test"]
    assert data["corpus"].num_rows == pq.read_table(small_data / "benchmarks/hpo_layperson/corpus.parquet").num_rows
    qrels = pq.read_table(small_data / "benchmarks/hpo_layperson/qrels.parquet").to_pylist()
    assert data["relevant_docs"] == {r["query_id"]: {r["doc_id"]: 1} for r in qrels}  # one answer per HPO query
    assert sorted(data["queries"]["id"]) == sorted(data["relevant_docs"])
    result = mteb.evaluate(RankSecondEncoder(task), task, cache=None, show_progress_bar=False)
    scores = metrics.select_retrieval(result.task_results[0].scores["test"][0])
    # every relevant document at rank 2: nDCG@10 = 1/log2(3), MRR@10 = 1/2, R@1 = 0, R@10 = R@100 = 1
    assert scores == pytest.approx(
        {"ndcg_at_10": 1 / np.log2(3), "mrr_at_10": 0.5, "recall_at_1": 0.0, "recall_at_10": 1.0, "recall_at_100": 1.0},
        abs=1e-5,
    )


def test_max_queries_is_a_seeded_sample_with_matching_qrels(small_data):
    def sample(seed):
        task = tasks.local_task("icd10cm_inclusion", small_data, max_queries=3, seed=seed)
        task.load_data()
        data = task.dataset["default"]["test"]
        return set(data["queries"]["id"]), set(data["relevant_docs"])

    queries, qrels = sample(0)
    assert len(queries) == 3 and qrels == queries
    assert sample(0) == (queries, qrels)
    assert len({frozenset(sample(s)[0]) for s in range(6)}) > 1  # another seed, another sample


def test_missing_benchmark_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"corpus\.build"):
        tasks.local_task("hpo_layperson", tmp_path)


def test_hub_detection_is_quick_and_offline_aware(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tasks.hub_unreachable() == "no Hub access (HF_HUB_OFFLINE=1)"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def refuse(address, timeout):
        calls.append((address, timeout))
        raise TimeoutError

    monkeypatch.setattr(tasks.socket, "create_connection", refuse)
    assert tasks.hub_unreachable(timeout=0.5).startswith("no Hub access (huggingface.co:443 unreachable")
    assert calls == [(("huggingface.co", 443), 0.5)]

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(tasks.socket, "create_connection", lambda address, timeout: Connection())
    assert tasks.hub_unreachable() is None


def test_model_specs_resolve_to_folders(tmp_path, minilm_path):
    from evaluation import models

    assert models.resolve("minilm", tmp_path) == ("all-MiniLM-L6-v2", minilm_path)
    assert models.resolve(str(minilm_path), tmp_path) == ("model", minilm_path)
    assert models.resolve(f"MiniLM fp32={minilm_path}", tmp_path) == ("MiniLM fp32", minilm_path)
    with pytest.raises(FileNotFoundError, match="medeir-random"):
        models.resolve(str(tmp_path / "no-such-model"), tmp_path)


# --- the whole command on a tiny model, the report, model-index ---------------------------------------------------


@pytest.fixture(scope="session")
def tiny_report(tiny_model_dir, small_data, tmp_path_factory) -> tuple[dict, Path, Path]:
    """`python -m evaluation.run` on the tiny MedEIR and all-MiniLM-L6-v2, offline, on the small subsets."""
    from evaluation import run

    out, cache = tmp_path_factory.mktemp("report"), tmp_path_factory.mktemp("cache")
    benchmarks = [b for b in tasks.BENCHMARKS if (small_data / "benchmarks" / b).exists()]
    argv = ["--models", str(tiny_model_dir), "minilm", "--data", str(small_data), "--out", str(out)]
    argv += ["--cache", str(cache), "--benchmarks", *benchmarks, "pairs", "--long-batch-size", "16"]
    argv += ["--speed-lengths", "16", "512", "--speed-batch-tokens", "512", "--speed-repeats", "1"]
    return run.main(argv), out, cache


def test_report_has_every_section_side_by_side(tiny_report, tiny_model_dir):
    report, out, _ = tiny_report
    tiny, minilm = report["models"]
    assert (tiny["max_seq_length"], minilm["max_seq_length"]) == (8192, 256)
    for model in (tiny, minilm):
        assert set(model["retrieval"]) == set(report["benchmarks"]) and "icd10cm_longdoc" in model["retrieval"]
        for scores in model["retrieval"].values():
            assert set(metrics.RETRIEVAL_METRICS) <= set(scores)
            assert all(0.0 <= scores[k] <= 1.0 for k in metrics.RETRIEVAL_METRICS)
            assert scores["recall_at_100"] == 1.0  # every subset corpus is smaller than 100 documents
        assert {"all", "medical", "cardiology"} <= set(model["pairs"])
        assert sum(model["pairs"]["histogram"]["related"]) == model["pairs"]["all"]["related"]
        assert model["official"] == {t: {"skipped": "no Hub access (HF_HUB_OFFLINE=1)"} for t in tasks.OFFICIAL_TASKS}
    # all-MiniLM-L6-v2 ranks real text far better than a random tiny model
    assert minilm["pairs"]["all"]["separation"] > tiny["pairs"]["all"]["separation"] + 0.2
    # long documents: every answer lies beyond token 512, so inside MedEIR's window and outside MiniLM's
    longdoc = (tiny["longdoc"], minilm["longdoc"])
    queries = longdoc[0]["answer_start_token"]["count"]
    assert queries > 0 and min(longdoc[1]["answer_starts"]) > 256
    assert (longdoc[0]["answers_inside_window"], longdoc[1]["answers_inside_window"]) == (queries, 0)
    assert longdoc[1]["document_tokens"]["over_window"] == longdoc[1]["document_tokens"]["count"]
    # throughput: measured up to each model's window, skipped above it
    assert [("tokens_per_s" in r) for r in tiny["throughput"]["rows"]] == [True, True]
    assert [("tokens_per_s" in r) for r in minilm["throughput"]["rows"]] == [True, False]

    md = (out / "report.md").read_text()
    assert md.count("skipped: no Hub access (HF_HUB_OFFLINE=1)") == 2 * len(tasks.OFFICIAL_TASKS)
    assert "Published figures (not measured here)" in md and f"| {tiny_model_dir.name} | " in md
    assert json.loads((out / "report.json").read_text())["models"][1]["name"] == "all-MiniLM-L6-v2"
    for plot in ("retrieval", "pair_similarity", "longdoc_lengths", "throughput"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_scores_from_the_embedding_cache(tiny_report, tiny_model_dir, small_data, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from evaluation import models, run

    report, _, cache = tiny_report

    def no_encoding(*args, **kwargs):
        raise AssertionError("a re-run must not encode again")

    monkeypatch.setattr(SentenceTransformer, "encode", no_encoding)
    argv = ["--models", str(tiny_model_dir), "--data", str(small_data), "--out", str(tmp_path), "--cache", str(cache)]
    again = run.main(
        [*argv, "--benchmarks", *report["benchmarks"], "pairs", "--long-batch-size", "16", "--speed-lengths"]
    )
    assert again["models"][0]["retrieval"].keys() == report["models"][0]["retrieval"].keys()
    for bench, scores in again["models"][0]["retrieval"].items():
        assert {k: scores[k] for k in metrics.RETRIEVAL_METRICS} == {
            k: report["models"][0]["retrieval"][bench][k] for k in metrics.RETRIEVAL_METRICS
        }
    assert again["models"][0]["pairs"]["all"] == report["models"][0]["pairs"]["all"]

    copy = shutil.copytree(tiny_model_dir, tmp_path / "tiny-copy")
    assert models.fingerprint(copy) == models.fingerprint(tiny_model_dir)
    config = json.loads((copy / "sentence_bert_config.json").read_text())
    (copy / "sentence_bert_config.json").write_text(json.dumps({**config, "max_seq_length": 128}))
    assert models.fingerprint(copy) != models.fingerprint(tiny_model_dir)  # a new window is a new cache key


def test_model_index_from_the_report(tiny_report):
    from huggingface_hub.repocard_data import model_index_to_eval_results

    report, out, _ = tiny_report
    minilm = report["models"][1]
    card = yaml.safe_load((out / "model-index" / "all-minilm-l6-v2.yaml").read_text())
    name, results = model_index_to_eval_results(card["model-index"])
    assert name == "all-MiniLM-L6-v2"
    got = {(r.dataset_type, r.dataset_config, r.metric_type): r.metric_value for r in results}
    for bench, scores in minilm["retrieval"].items():
        for metric in metrics.RETRIEVAL_METRICS:
            assert got[(f"medeir/{bench}", "default", metric)] == pytest.approx(scores[metric], abs=1e-5)
    assert got[("medeir/pairs_test", "all", "separation")] == pytest.approx(
        minilm["pairs"]["all"]["separation"], abs=1e-5
    )
    assert all(r.dataset_revision == report["data"]["dataset_version"] for r in results)
    assert not any(r.dataset_type.startswith("mteb/") for r in results)  # the skipped official tasks add nothing


def test_model_index_takes_official_results_from_mteb(tmp_path):
    import mteb
    from mteb.results import TaskResult

    from evaluation.model_index import model_index

    scores = {"ndcg_at_10": 0.6451, "mrr_at_10": 0.6, "recall_at_1": 0.5, "recall_at_10": 0.8, "recall_at_100": 0.9}
    task = mteb.get_task("SciFact")
    result = TaskResult.from_task_results(task, {"test": {"default": {**scores, "main_score": 0.6451}}}, 1.0)
    (tmp_path / "mteb" / "m").mkdir(parents=True)
    result.to_disk(tmp_path / "mteb" / "m" / "SciFact.json")
    report = {"data": {"dataset_version": "v"}, "benchmarks": {}}
    model = {"name": "m", "retrieval": {}, "official": {"SciFact": scores, "NFCorpus": {"skipped": "offline"}}}
    (entry,) = model_index(report, model, tmp_path)["model-index"][0]["results"]
    assert entry["dataset"]["type"] == task.metadata.dataset["path"]
    assert entry["metrics"] == [{"type": "ndcg_at_10", "value": 0.6451, "name": "ndcg_at_10"}]


def test_encode_throughput_of_a_loaded_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    from evaluation.speed import encode_throughput

    model = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, device="cpu")
    model.max_seq_length = 64
    rows = encode_throughput(model, [16, 64, 65], batch_tokens=128, repeats=1)
    assert [r["seq_len"] for r in rows] == [16, 64, 65]
    assert [r.get("batch") for r in rows] == [8, 2, None]
    assert all(
        r["tokens_per_s"] > 0 and r["texts_per_s"] * r["seq_len"] == pytest.approx(r["tokens_per_s"]) for r in rows[:2]
    )
    assert rows[2] == {"seq_len": 65, "skipped": "above max_seq_length 64"}
