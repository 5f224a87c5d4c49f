"""A late-interaction (multi-vector) model in evaluation.run, with tiny models on small benchmark subsets: the folder is
recognised, scored by MaxSim exactly as evaluation.multi_vector scores it, reranks the dense model's candidates, its
index is the token vectors it keeps, and what does not apply to it is reported as skipped."""

from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

from corpus.dataset import BENCHMARKS, DataBuild
from evaluation import metrics, models, multi_vector, run, tasks
from tests.data_fixtures import REPO
from tests.test_evaluation import write_subset

# mteb's embedding cache announces every new cache folder
pytestmark = [
    pytest.mark.filterwarnings("ignore:Dimension file not found"),
    pytest.mark.filterwarnings("ignore:No existing files found"),
]

MAX_QUERIES, SEED, DEPTH, BATCH = 4, 1, 5, 64  # a sample of the subsets' 6 queries; 5 of ~20 documents reranked


@pytest.fixture(scope="module")
def small_data(request, tmp_path_factory) -> Path:
    """6 queries and their documents plus 16 others of every benchmark (of data/ when built here, else of the shared
    ICD-10-CM + HPO build)."""
    real = REPO / "data"
    if not all(DataBuild(real).has_benchmark(b) for b in BENCHMARKS):
        real = request.getfixturevalue("icd_hpo_data")
    return write_subset(real, tmp_path_factory.mktemp("small_data"))


@pytest.fixture(scope="module")
def late_dir(tiny_medeir_init, tmp_path_factory) -> Path:
    """The tiny init saved as a MultiVectorEncoder (a seeded 128-dim token projection, queries cut at 32 tokens), laid
    out as train.colbert's final folder."""
    torch.manual_seed(0)
    model = MultiVectorEncoder(str(tiny_medeir_init), trust_remote_code=True)
    model[0].query_length = 32
    path = tmp_path_factory.mktemp("late")
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def late(late_dir) -> MultiVectorEncoder:
    return MultiVectorEncoder(str(late_dir), trust_remote_code=True)


@pytest.fixture(scope="module")
def mv_report(tiny_medeir_init, late_dir, small_data, tmp_path_factory) -> tuple[dict, Path]:
    """`python -m evaluation.run` on the tiny init as a dense MedEIR and as a multi-vector one (also as the model
    trained without HPO), on every benchmark and the pairs, with compression and throughput asked for."""
    out, cache = tmp_path_factory.mktemp("report"), tmp_path_factory.mktemp("cache")
    benchmarks = [b for b in BENCHMARKS if DataBuild(small_data).has_benchmark(b)]
    argv = ["--models", f"Dense={tiny_medeir_init}", f"Late={late_dir}", "--no-init", "--loso", f"hpo={late_dir}"]
    argv += ["--data", str(small_data), "--out", str(out), "--cache", str(cache), "--benchmarks", *benchmarks, "pairs"]
    argv += ["--max-queries", str(MAX_QUERIES), "--seed", str(SEED), "--batch-size", str(BATCH)]
    argv += ["--long-batch-size", "4", "--rerank-depth", str(DEPTH), "--truncate-dims", "16"]
    argv += ["--speed-lengths", "16", "--speed-batch-tokens", "64", "--speed-repeats", "1"]
    return run.main(argv), out


def test_a_multi_vector_folder_is_recognised_and_a_dense_one_is_not(late_dir, tiny_medeir_init, tmp_path):
    dense_dir = tmp_path / "dense"
    SentenceTransformer(str(tiny_medeir_init), trust_remote_code=True).save(str(dense_dir))
    assert models.resolve(str(late_dir), tmp_path).backend == models.MULTI_VECTOR
    assert models.resolve(f"ColBERT={late_dir}", tmp_path).backend == models.MULTI_VECTOR
    for folder in (dense_dir, tiny_medeir_init):  # a saved SentenceTransformer, and a bare transformers folder
        assert models.resolve(str(folder), tmp_path).backend == "torch"
    assert isinstance(models.load(models.resolve(str(late_dir), tmp_path), "cpu"), MultiVectorEncoder)
    assert isinstance(models.load(models.resolve(str(dense_dir), tmp_path), "cpu"), SentenceTransformer)


def test_maxsim_scores_are_those_of_evaluation_multi_vector(mv_report, late, small_data):
    report, _ = mv_report
    dense, entry, _, _, _, _ = report["models"]
    assert (dense["role"], entry["role"], entry["backend"]) == ("medeir", "medeir", "multi_vector")
    assert (entry["embedding_dim"], entry["similarity"], entry["query_length"]) == (128, "maxsim", 32)
    assert entry["max_seq_length"] == 8192  # the document length: long documents are read whole
    expected = multi_vector.evaluate(
        late, small_data, list(report["benchmarks"]), MAX_QUERIES, SEED, batch_size=BATCH, long_batch_size=4
    )
    assert set(entry["retrieval"]) == set(report["benchmarks"]) and "icd10cm_longdoc" in entry["retrieval"]
    for bench, scores in entry["retrieval"].items():
        assert scores["queries"] == dense["retrieval"][bench]["queries"] == expected[bench]["queries"] == MAX_QUERIES
        for metric in metrics.RETRIEVAL_METRICS:
            assert scores[metric] == pytest.approx(expected[bench]["maxsim"][metric], abs=1e-6), (bench, metric)
    assert entry["longdoc"]["max_seq_length"] == 8192
    assert entry["longdoc"]["answers_inside_window"] == entry["longdoc"]["answer_start_token"]["count"]


def test_the_reranking_row_is_maxsim_rerank_of_the_dense_top_candidates(mv_report, late, tiny_medeir_init, small_data):
    report, out = mv_report
    rerank = report["models"][2]
    assert rerank["name"] == f"Dense top {DEPTH} reranked by Late"
    assert (rerank["role"], rerank["first_stage"], rerank["reranker"], rerank["depth"]) == (
        "rerank",
        "Dense",
        "Late",
        5,
    )
    dense = SentenceTransformer(str(tiny_medeir_init), trust_remote_code=True)
    changed = 0
    for bench, scores in rerank["retrieval"].items():
        task = tasks.local_task(bench, small_data, MAX_QUERIES, SEED)
        queries, corpus, qrels = multi_vector.task_texts(task)
        candidates = multi_vector.dense_search(dense, queries, corpus, DEPTH, BATCH)
        expected = metrics.retrieval_scores(qrels, multi_vector.maxsim_rerank(late, queries, corpus, candidates, BATCH))
        for metric in metrics.RETRIEVAL_METRICS:
            assert scores[metric] == pytest.approx(expected[metric], abs=1e-6), (bench, metric)
        changed += scores["recall_at_100"] != report["models"][1]["retrieval"][bench]["recall_at_100"]
    assert changed  # the top 5 reranked miss answers that MaxSim over every document (fewer than 100) finds
    md = (out / "report.md").read_text()
    table = md[md.index("### HPO layperson") : md.index("### ", md.index("### HPO layperson") + 4)]
    assert f"| Dense top {DEPTH} reranked by Late | {rerank['retrieval']['hpo_layperson']['ndcg_at_10']:.4f} |" in table
    # the same candidates by the dense cosine plus the mean MaxSim (MaxSim over the query's vectors), weighted equally,
    # and by the cosine plus the mean best token similarity of the query's vectors, or of the document's when the query
    # has more than SIDE_RATIO times its vectors
    fused, shorter = report["models"][3], report["models"][4]
    assert fused["name"] == f"Dense top {DEPTH} reranked by cosine + mean MaxSim of Late"
    assert (fused["role"], fused["rerank_score"], fused["depth"]) == ("rerank", "fused", DEPTH)
    assert shorter["name"] == f"Dense top {DEPTH} reranked by cosine + shorter-side mean MaxSim of Late"
    assert (shorter["role"], shorter["rerank_score"], shorter["depth"]) == ("rerank", "fused_shorter", DEPTH)
    assert shorter["side_ratio"] == multi_vector.SIDE_RATIO
    sides_read = set()
    for bench in fused["retrieval"]:
        task = tasks.local_task(bench, small_data, MAX_QUERIES, SEED)
        queries, corpus, qrels = multi_vector.task_texts(task)
        candidates = multi_vector.dense_search(dense, queries, corpus, DEPTH, BATCH)
        query_vectors = dict(zip(queries, late.encode_query(list(queries.values())), strict=True))
        maxsim = multi_vector.maxsim_rerank(late, queries, corpus, candidates, BATCH)
        documents = {d: late.encode_document([corpus[d]])[0] for d in {d for c in candidates.values() for d in c}}
        by_query, by_shorter = {}, {}
        for q, ranked in candidates.items():
            by_query[q] = {d: cosine + maxsim[q][d] / len(query_vectors[q]) for d, cosine in ranked.items()}
            by_shorter[q] = {}
            for d, cosine in ranked.items():
                table = query_vectors[q] @ documents[d].T  # query tokens x document tokens
                side = 1 if len(query_vectors[q]) <= multi_vector.SIDE_RATIO * len(documents[d]) else 0
                sides_read.add(side)
                by_shorter[q][d] = cosine + float(table.max(dim=side).values.mean())
        for row, expected, tolerance in ((fused, by_query, 1e-6), (shorter, by_shorter, 1e-5)):
            measured = metrics.retrieval_scores(qrels, expected)
            for metric in metrics.RETRIEVAL_METRICS:
                assert row["retrieval"][bench][metric] == pytest.approx(measured[metric], abs=tolerance)
    assert sides_read == {0, 1}  # both sides were read somewhere
    assert "or over the document's when the query has more than 2 times its vectors" in (out / "report.md").read_text()
    # model-index metadata describes models, and a reranking is two of them in sequence
    indexed = {path.stem for path in (out / "model-index").glob("*.yaml")}
    assert {"dense", "late"} <= indexed and not any("reranked" in stem for stem in indexed), indexed


def test_index_bytes_are_the_token_vectors_kept(mv_report, late, small_data):
    report, out = mv_report
    dense, entry, rerank, _, _, _ = report["models"]
    md = (out / "report.md").read_text()
    section = md[md.index("## Index size and search time") :]
    for bench, index in entry["index"].items():
        _, corpus, _ = multi_vector.task_texts(tasks.local_task(bench, small_data, MAX_QUERIES, SEED))
        vectors = sum(len(v) for v in late.encode_document(list(corpus.values()), batch_size=BATCH))
        assert (index["documents"], index["vectors"], index["dim"]) == (len(corpus), vectors, 128)
        assert index["bytes_per_document"]["float32"] == pytest.approx(vectors / len(corpus) * 128 * 4)
        assert index["bytes_per_document"]["float16"] == pytest.approx(vectors / len(corpus) * 128 * 2)
        assert index["encode_ms_per_document"] > 0 and index["search_ms_per_query"] > 0
        assert dense["index"][bench]["bytes_per_document"] == {"float32": 48 * 4, "float16": 48 * 2}
        assert rerank["index"][bench]["search_ms_per_query"] == pytest.approx(
            rerank["index"][bench]["first_stage_ms_per_query"] + rerank["index"][bench]["rerank_ms_per_query"]
        )
        size = index["bytes_per_document"]["float32"]
        assert f"| Late | {len(corpus):,} | {vectors / len(corpus):.1f} | {size:,.0f} |" in section
    assert "| HPO layperson | Dense | " in section and "| 192 | 96 | 0.19 | 0.10 | – | – |" in section


def test_what_does_not_apply_is_reported_as_skipped(mv_report):
    report, out = mv_report
    dense, entry, _, _, _, loso = report["models"]
    assert set(entry["skipped"]) == {"pairs", "compression", "onnx", "official"}
    assert "pairs" not in entry and "compression" not in entry
    assert "pairs" in dense and "compression" in dense and "skipped" not in dense
    assert all(r["skipped"] == run.NOT_FOR_MULTI_VECTOR["official"] for r in entry["official"].values())
    assert [r["seq_len"] for r in entry["throughput"]["rows"]] == [16]  # the encoder is measured like a dense one
    md = (out / "report.md").read_text()
    for part, label in (("pairs", "pair similarity"), ("compression", "embedding size and precision")):
        assert f"- Late, {label}: skipped: {run.NOT_FOR_MULTI_VECTOR[part]}" in md
    # leave one source out: the multi-vector folder scored by MaxSim on that source's benchmarks only
    assert loso["role"] == "loso" and loso["backend"] == "multi_vector" and "skipped" not in loso
    assert set(loso["retrieval"]) == {b for b in report["benchmarks"] if BENCHMARKS[b].source == "hpo"}
    for bench, scores in loso["retrieval"].items():
        assert scores["ndcg_at_10"] == pytest.approx(entry["retrieval"][bench]["ndcg_at_10"], abs=1e-6)


def test_no_reranking_without_a_dense_medeir_model_or_with_depth_zero(
    late_dir, tiny_medeir_init, minilm_path, tmp_path
):
    def first_stage(*argv):
        args = run.parse_args(["--out", "x", "--cache", str(tmp_path), "--no-init", "--models", *argv])
        return run.first_stage_spec(run.model_specs(args), args)

    assert first_stage(str(minilm_path), str(late_dir), str(tiny_medeir_init)) == str(tiny_medeir_init)
    assert first_stage(str(late_dir), str(minilm_path)) is None  # MiniLM is no MedEIR model
    assert first_stage(str(tiny_medeir_init), str(minilm_path)) is None  # nothing to rerank with
    assert first_stage(str(late_dir), str(tiny_medeir_init), "--rerank-depth", "0") is None
