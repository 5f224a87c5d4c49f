"""MaxSim evaluation (evaluation.multi_vector) on a slice of a real benchmark with tiny models: search, reranking and
their scores agree with what MaxSim and cosine must give."""

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

from corpus.dataset import DataBuild
from evaluation import multi_vector

BENCHMARK = "hpo_layperson"


@pytest.fixture(scope="module")
def echo_build(icd_hpo_data, tmp_path_factory) -> Path:
    """120 documents of the real HPO benchmark whose 12 queries are copies of 12 of them: each query's one relevant
    document is the identical text."""
    corpus = DataBuild(icd_hpo_data).benchmark(BENCHMARK).corpus
    ids = random.Random(0).sample(sorted(corpus), 120)
    root = tmp_path_factory.mktemp("echo-build")
    folder = DataBuild(root).benchmark_dir(BENCHMARK)
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"id": ids, "text": [corpus[i] for i in ids]}), folder / "corpus.parquet")
    echoed = ids[::10]
    queries = [f"q{n}" for n in range(len(echoed))]
    pq.write_table(pa.table({"id": queries, "text": [corpus[i] for i in echoed]}), folder / "queries.parquet")
    qrels = {"query_id": queries, "doc_id": echoed, "score": [1] * len(echoed)}
    pq.write_table(pa.table(qrels), folder / "qrels.parquet")
    return root


@pytest.fixture(scope="module")
def models(tiny_medeir_init) -> tuple[MultiVectorEncoder, SentenceTransformer]:
    """The tiny init as a MultiVectorEncoder (no skiplist: every token of a text is scored) and as a dense model."""
    torch.manual_seed(0)
    late = MultiVectorEncoder(str(tiny_medeir_init), trust_remote_code=True)
    return late, SentenceTransformer(str(tiny_medeir_init), trust_remote_code=True)


def test_a_query_identical_to_a_document_finds_it_first(echo_build, models):
    """Every query token meets itself in the identical document (score 1 per token, the most MaxSim can give), and
    the identical text has cosine 1: each method, and the rerank, must put that document first."""
    late, dense = models
    scores = multi_vector.evaluate(late, echo_build, [BENCHMARK], max_queries=10, dense=dense, depth=20)
    entry = scores[BENCHMARK]
    assert (entry["queries"], entry["documents"]) == (10, 120)
    assert entry["index"]["documents"] == 120 and entry["index"]["vectors"] > 120  # a vector per token kept
    for method in ("maxsim", "dense", "dense_then_maxsim"):
        assert entry[method]["recall_at_1"] == pytest.approx(1.0), (method, entry[method])
        assert entry[method]["ndcg_at_10"] == pytest.approx(1.0), (method, entry[method])


def test_chunked_search_and_a_rerank_of_everything_equal_one_full_maxsim_pass(echo_build, models):
    late, _ = models
    benchmark = DataBuild(echo_build).benchmark(BENCHMARK)
    queries, corpus = benchmark.queries, benchmark.corpus
    full = late.similarity(late.encode_query(list(queries.values())), late.encode_document(list(corpus.values())))
    chunked, cost = multi_vector.maxsim_search(late, queries, corpus, depth=15, chunk=7)
    assert (cost.queries, cost.documents) == (len(queries), len(corpus))
    assert cost.token_vectors == sum(len(v) for v in late.encode_document(list(corpus.values())))
    everything = {q: dict.fromkeys(corpus, 0.0) for q in queries}
    reranked = multi_vector.maxsim_rerank(late, queries, corpus, everything)
    document_ids = list(corpus)
    for row, q in enumerate(queries):
        best = full[row].topk(15)
        expected = {document_ids[j]: v for v, j in zip(best.values.tolist(), best.indices.tolist(), strict=True)}
        assert list(chunked[q]) == list(expected)
        assert list(chunked[q].values()) == pytest.approx(list(expected.values()), abs=1e-5)
        assert [reranked[q][d] for d in document_ids] == pytest.approx(full[row].tolist(), abs=1e-5)


def test_mean_maxsim_reads_the_shorter_side():
    """Unit vectors by hand: a three-token and a two-token query against a one-token document, and a two-token query
    against a three-token one."""
    assert multi_vector.SIDE_RATIO == 2.0
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    short = torch.tensor([[1.0, 0.0]])  # matches the first query token exactly, the second not at all
    long = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    # query side: each query token's best match, averaged over the 3 query tokens: (1 + 0 + 0.6) / 3
    # shorter side: a query of more than twice the document's vectors is read from the document: its one token's
    # best match in the query (1.0), every token of the name is in the query
    read = multi_vector.mean_maxsim(query, short)
    assert read == pytest.approx({"query": 1.6 / 3, "document": 1.0, "shorter": 1.0, "both": (1.6 / 3 + 1) / 2})
    # twice the document's vectors is not enough: the query's side, unless the ratio asked for is lower
    read = multi_vector.mean_maxsim(query[:2], short)
    assert read == pytest.approx({"query": 0.5, "document": 1.0, "shorter": 0.5, "both": 0.75})
    assert multi_vector.shorter_side(read, 2, 1, ratio=1.0) == 1.0
    # a document with more vectors than the query is read from the query's side; its own side averages 1, 0.8, 0
    read = multi_vector.mean_maxsim(query[:2], long)
    assert read == pytest.approx({"query": 0.9, "document": 0.6, "shorter": 0.9, "both": 0.75})


def test_the_fusion_check_spans_the_dense_order_and_the_maxsim_order(icd_hpo_data, models):
    """On the build's validation pairs: weight 0 leaves the dense order, a weight so large that the cosine cannot
    change a tie-free MaxSim order gives the MaxSim rerank, and every weight is scored."""
    late, dense = models
    check = multi_vector.fusion_check(
        late,
        dense,
        icd_hpo_data,
        rows=60,
        weights=(0.0, 1.0, 1e6),
        depth=20,
        ratios=(0.0, multi_vector.SIDE_RATIO, 1e9),
    )
    assert check["queries"] == 60 and 0 < check["documents"] <= 60
    assert set(check["fused"]) == {"0.0", "1.0", "1000000.0"}
    assert check["fused"]["0.0"] == pytest.approx(check["dense"])
    assert check["fused"]["1000000.0"] == pytest.approx(check["dense_then_maxsim"])
    assert 0 < check["dense"] <= 1 and 0 < check["dense_then_maxsim"] <= 1
    # per query form: the kinds partition the queries, and their query-weighted means are the overall figures
    parts = check["by_kind"].values()
    assert len(check["by_kind"]) > 1 and sum(p["queries"] for p in parts) == 60
    for key in ("dense", "dense_then_maxsim"):
        assert sum(p[key] * p["queries"] for p in parts) / 60 == pytest.approx(check[key], abs=1e-4)  # 5 decimals
    assert all(p["fused"]["0.0"] == pytest.approx(p["dense"]) for p in parts)
    for key in multi_vector.FUSED_READINGS:
        assert set(check[key]) == set(check["fused"]) and check[key]["0.0"] == check["dense"]
    # the ratio sweep: 0 always reads the document, a huge ratio always the query, SIDE_RATIO is fused_shorter
    by_ratio = check["fused_shorter_by_ratio"]
    assert by_ratio == pytest.approx(
        {
            "0.0": check["fused_document"]["1.0"],
            "2.0": check["fused_shorter"]["1.0"],
            "1000000000.0": check["fused"]["1.0"],
        }
    )
