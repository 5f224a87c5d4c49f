"""The Space's late-interaction (MedEIR-ColBERT) rerank and token view on tiny models: the rerank is the dense model's
candidates sorted by their exact float32 cosine plus the late-interaction model's token match (whatever precision the
search used, ties in dense order): the mean best similarity of the query's tokens, or of the entry's when the query has
more than twice its vectors. The token
table is the model's scored token vectors with its tokenizer's tokens, the query's best matches add up to MaxSim and
the side read average to the token match shown, a demo without the model says so and offers no rerank, and bad
input is refused as the search refuses it."""

import re
import string
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

from evaluation import multi_vector
from space import app
from space import engine as engine_module
from space.engine import RERANK_CANDIDATES, InputError, ModelUnavailable, load_colbert, load_model
from space.index import build_index, write_index
from train import colbert
from train.colbert import ColbertRecipe

from .test_space import LONG, make_engine, write_data_dir

QUERY = "fever, cough (dry)."
DOCUMENT = "Cholera due to Vibrio cholerae 01, biovar cholerae"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return build_index(write_data_dir(tmp_path_factory.mktemp("data"), icd=80, hpo=40, diseases=20))


def save_tiny_colbert(init: Path, path: Path) -> Path:
    """train.colbert's untrained model on the tiny init (32-dim token vectors, 32-token queries, punctuation
    skiplisted in documents), saved as its final folder is."""
    colbert.load_model(ColbertRecipe(init=str(init), projection_dim=32, query_length=32)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def colbert_dir(tiny_medeir_init, tmp_path_factory):
    return save_tiny_colbert(tiny_medeir_init, tmp_path_factory.mktemp("tiny-colbert") / "final")


@pytest.fixture(scope="module")
def reference(colbert_dir) -> MultiVectorEncoder:
    """The folder loaded on its own, as evaluation.multi_vector loads it."""
    return MultiVectorEncoder(str(colbert_dir), trust_remote_code=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, colbert_dir, index, tmp_path_factory):
    return make_engine(
        load_model(str(tiny_model_dir), "cpu"),
        index,
        tmp_path_factory.mktemp("cache"),
        colbert=load_colbert(str(colbert_dir), "cpu"),
        colbert_name="tiny-colbert",
    )


@pytest.fixture(scope="module")
def dense_only(engine, index, tmp_path_factory):
    return make_engine(engine.model, index, tmp_path_factory.mktemp("cache"))


def maxsim(model: MultiVectorEncoder, query: str, documents: list[str]) -> np.ndarray:
    """The model's own scores: similarity of encode_query and encode_document."""
    return model.similarity(model.encode_query([query]), model.encode_document(documents))[0].numpy()


def cosine_and_token_match(engine, reference: MultiVectorEncoder, query: str, candidates: list):
    """Recomputed here for each candidate hit: its cosine with the query from the dense embeddings (the index's
    float32 embedding of the entry, every dimension, and the query's from the dense model), and its token match from
    the late-interaction model's token vectors: each query vector's best dot product with one of the entry's, averaged
    over the query's vectors, or, when the query has more than twice the entry's vectors, each entry vector's best dot
    product with one of the query's, averaged over the entry's."""
    embedding = engine.model.encode([query], convert_to_numpy=True, normalize_embeddings=True)[0]
    cosines = np.stack([engine.main.index.embeddings[h.row] for h in candidates]) @ embedding
    query_vectors = reference.encode_query([query])[0].numpy()
    documents = [d.numpy() for d in reference.encode_document([h.text for h in candidates])]
    means = np.array(
        [(query_vectors @ d.T).max(axis=1 if len(query_vectors) <= 2 * len(d) else 0).mean() for d in documents],
        dtype=np.float32,
    )
    return cosines, means


def check_fused_order(hits, dense, cosines, means, top_k):
    """The hits are the dense candidates sorted by cosine + token match (ties in dense order), each with both parts,
    their sum as its score, and its dense rank."""
    order = np.argsort(-(cosines + means), kind="stable")[:top_k]
    assert [h.row for h in hits] == [dense[i].row for i in order]
    assert [h.dense_rank for h in hits] == [dense[i].rank for i in order]
    assert [h.rank for h in hits] == list(range(1, len(order) + 1))
    np.testing.assert_allclose([h.cosine for h in hits], cosines[order], atol=1e-5)
    np.testing.assert_allclose([h.token_match for h in hits], means[order], atol=1e-5)
    np.testing.assert_allclose([h.score for h in hits], (cosines + means)[order], atol=2e-5)
    return order


# -- the rerank -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("top_k", "depth"), [(10, RERANK_CANDIDATES), (60, 60)])
def test_the_rerank_sorts_the_dense_candidates_by_cosine_plus_token_match(engine, reference, top_k, depth):
    query = engine.texts[3]
    hits, candidates = engine.rerank(query, top_k)
    dense, _, _ = engine.search(query, depth)
    assert candidates == depth == len(dense)
    cosines, means = cosine_and_token_match(engine, reference, query, dense)
    order = check_fused_order(hits, dense, cosines, means, top_k)
    np.testing.assert_allclose(cosines, [h.score for h in dense], atol=1e-5)  # float32: the search's own scores
    maxsims = maxsim(reference, query, [hit.text for hit in dense])
    query_vectors = len(reference.encode_query([query])[0])
    query_side = np.array([query_vectors <= 2 * len(d) for d in reference.encode_document([h.text for h in dense])])
    assert query_side.any()  # where the query side is read, the token match is MaxSim / the query's vectors
    np.testing.assert_allclose(means[query_side], maxsims[query_side] / query_vectors, rtol=1e-5, atol=1e-6)
    assert any(h.rank != h.dense_rank for h in hits)  # an untrained model reorders
    assert order.tolist() != np.argsort(-maxsims, kind="stable")[:top_k].tolist()  # not by MaxSim alone


def test_a_query_longer_than_an_entry_is_read_from_the_entrys_side(engine, reference):
    """A query written as a sentence of several entries: against an entry with under half its token vectors, the
    token match averages each entry token's best match in the query, not each query token's best match in the
    entry; the ratio is the one the evaluation chose (the Space keeps its own copy: it ships alone)."""
    assert engine_module.SIDE_RATIO == multi_vector.SIDE_RATIO == 2.0
    query = " ".join(engine.texts[3:7])
    hits, _ = engine.rerank(query, RERANK_CANDIDATES)
    dense, _, _ = engine.search(query, RERANK_CANDIDATES)
    cosines, means = cosine_and_token_match(engine, reference, query, dense)
    check_fused_order(hits, dense, cosines, means, RERANK_CANDIDATES)
    query_vectors = reference.encode_query([query])[0].numpy()
    documents = [d.numpy() for d in reference.encode_document([h.text for h in dense])]
    shorter = [i for i, d in enumerate(documents) if len(query_vectors) > 2 * len(d)]
    assert shorter  # entries read from their own side
    for i in shorter:
        table = query_vectors @ documents[i].T
        assert means[i] == pytest.approx(table.max(axis=0).mean(), abs=1e-5)
        assert abs(means[i] - table.max(axis=1).mean()) > 1e-4  # not the query side's mean
        matches = engine.token_matches(query, dense[i].text)
        assert matches.side == "document" and len(matches.side_best) == len(documents[i])
        assert matches.mean == pytest.approx(means[i], abs=1e-5)


@pytest.mark.parametrize(("precision", "half"), [("binary", False), ("float32", True), ("binary", True)])
def test_the_rerank_adds_the_float_cosine_whatever_the_search_precision(engine, reference, precision, half):
    """The candidates are the search's (binary or truncated, each on its own score scale), but the cosine added to
    the token match is the exact float32 one over every dimension."""
    query, dims = engine.texts[3], engine.dimension // 2 if half else None
    hits, candidates = engine.rerank(query, 10, precision=precision, truncate_dim=dims)
    dense, _, _ = engine.search(query, RERANK_CANDIDATES, precision=precision, truncate_dim=dims)
    assert candidates == len(dense) == RERANK_CANDIDATES
    cosines, means = cosine_and_token_match(engine, reference, query, dense)
    order = check_fused_order(hits, dense, cosines, means, 10)
    assert max(abs(dense[i].score - cosines[i]) for i in order) > 1e-2  # the search's scores are not the cosines


def test_ties_keep_the_dense_order(engine, monkeypatch):
    """With every cosine 0 and token matches 2, 1, 0 in turn down the dense ranks, the rerank groups them by score
    and keeps the dense order within each group."""
    index, colbert_model = engine.main.index, engine.colbert
    monkeypatch.setattr(index, "embeddings", np.zeros_like(index.embeddings))  # the search keeps its own views

    def token_match(query, documents):
        return (2 - np.arange(len(documents)) % 3).astype(np.float32)

    monkeypatch.setattr(colbert_model, "token_match", token_match)
    hits, candidates = engine.rerank("fever", RERANK_CANDIDATES)
    by_score = [[rank for rank in range(1, candidates + 1) if (rank - 1) % 3 == group] for group in range(3)]
    assert [h.dense_rank for h in hits] == [rank for group in by_score for rank in group]
    assert [h.score for h in hits] == [2.0] * len(by_score[0]) + [1.0] * len(by_score[1]) + [0.0] * len(by_score[2])


def test_a_model_that_scores_mean_maxsim_reranks_the_same(engine, monkeypatch):
    """The token match is read from the token vectors, whatever score the model was trained with; only its own
    score, MaxSim, is then the mean."""
    before, _ = engine.rerank("always thirsty and peeing a lot", 10)
    matches = engine.token_matches("fever", DOCUMENT)
    monkeypatch.setattr(engine.colbert.model, "similarity_fn_name", "meanmaxsim")
    after, _ = engine.rerank("always thirsty and peeing a lot", 10)
    assert [h.row for h in after] == [h.row for h in before]
    np.testing.assert_allclose([h.token_match for h in after], [h.token_match for h in before], rtol=1e-5)
    mean_matches = engine.token_matches("fever", DOCUMENT)
    assert matches.side == mean_matches.side == "query"
    assert mean_matches.mean == pytest.approx(matches.mean, rel=1e-5)
    assert mean_matches.score == pytest.approx(matches.score / len(matches.query_tokens), rel=1e-5)


def test_the_rerank_keeps_the_searchs_source_filter(engine):
    hits, candidates = engine.rerank("abnormality of the heart", 5, source="HPO")
    assert candidates == 40 and {h.source for h in hits} == {"HPO"}  # the 40 HPO rows are all the candidates


# -- the token view -------------------------------------------------------------------------------------------------
def test_the_token_table_is_the_models_scored_tokens_in_order(engine, reference):
    """Rows: every query token ([CLS] and [SEP] too: they are scored); columns: the document's tokens less the
    skiplisted punctuation; each cell the cosine of the two token vectors the model returns."""
    matches = engine.token_matches(QUERY, DOCUMENT)
    query_vectors = reference.encode_query(QUERY).numpy()
    document_vectors = reference.encode_document(DOCUMENT).numpy()
    assert matches.similarities.shape == (len(query_vectors), len(document_vectors))
    np.testing.assert_allclose(matches.similarities, query_vectors @ document_vectors.T, atol=1e-5)
    tokenizer = reference.tokenizer
    assert matches.query_tokens == ["[CLS]", *tokenizer.tokenize(QUERY), "[SEP]"]
    kept = [t for t in tokenizer.tokenize(DOCUMENT) if t not in string.punctuation]
    assert "," in tokenizer.tokenize(DOCUMENT) and matches.document_tokens == ["[CLS]", *kept, "[SEP]"]
    assert matches.query_is_text.tolist() == [False, *[True] * (len(matches.query_tokens) - 2), False]
    assert matches.document_is_text.tolist() == [False, *[True] * len(kept), False]


@pytest.mark.parametrize("long_query", [False, True])
def test_the_query_best_matches_add_up_to_maxsim_and_the_shorter_sides_average_to_the_token_match(engine, long_query):
    query = " ".join(engine.texts[3:7]) if long_query else "always thirsty and peeing a lot"
    hits, _ = engine.rerank(query, 5)
    for hit in hits:
        matches = engine.token_matches(query, engine.entry_text(hit.row))
        sims = matches.similarities
        np.testing.assert_allclose(matches.contributions, sims.max(axis=1), atol=1e-6)
        assert sims[np.arange(len(matches.best)), matches.best].tolist() == pytest.approx(
            matches.contributions.tolist()
        )
        assert matches.contributions.sum() == pytest.approx(matches.score, rel=1e-6)
        rows, columns = sims.shape
        assert matches.side == ("query" if rows <= 2 * columns else "document")
        axis = 1 if matches.side == "query" else 0
        np.testing.assert_array_equal(matches.side_best, sims.argmax(axis=axis))
        assert matches.mean == pytest.approx(sims.max(axis=axis).mean(), rel=1e-6)
        assert matches.mean == pytest.approx(hit.token_match, rel=1e-4, abs=1e-5)
        assert hit.score == pytest.approx(hit.cosine + hit.token_match, abs=1e-6)
        html = app.token_table_html(matches)
        assert len(re.findall(r"class='(?:dark )?best'", html)) == len(app.outlined(matches))
        best = sims.max(axis=axis)
        assert sorted(sims[i, j] for i, j in app.outlined(matches)) == pytest.approx(sorted(best))
    if long_query:
        assert {engine.token_matches(query, engine.entry_text(h.row)).side for h in hits} >= {"document"}


def test_prompts_and_query_expansion_are_marked_as_added_by_the_model(engine, index, colbert_dir, tmp_path):
    """A model with text prompts that pads queries with [MASK] to 32 tokens: 32 query rows, of which only the query's
    own tokens are text, and the best matches still add up to the model's own score."""
    model = MultiVectorEncoder(str(colbert_dir), trust_remote_code=True)
    model[0].query_expansion = {"strategy": "fixed", "attend": True, "length": 32}
    model.prompts = {"query": "search query: ", "document": "search document: "}
    model.save_pretrained(str(tmp_path / "expanded"))
    expanded = make_engine(
        engine.model, index, tmp_path / "cache", load=False,
        colbert=load_colbert(str(tmp_path / "expanded"), "cpu"), colbert_name="expanded",
    )  # fmt: skip
    matches = expanded.token_matches(QUERY, DOCUMENT)
    reloaded = MultiVectorEncoder(str(tmp_path / "expanded"), trust_remote_code=True)
    tokenizer = reloaded.tokenizer
    own = tokenizer.tokenize(QUERY)
    prompt = tokenizer.tokenize("search query: ")
    assert matches.query_tokens[: 2 + len(prompt) + len(own)] == ["[CLS]", *prompt, *own, "[SEP]"]
    assert len(matches.query_tokens) == 32 and set(matches.query_tokens[2 + len(prompt) + len(own) :]) == {"[MASK]"}
    assert [t for t, is_text in zip(matches.query_tokens, matches.query_is_text, strict=True) if is_text] == own
    document_prompt = [t for t in tokenizer.tokenize("search document: ") if t not in string.punctuation]
    assert document_prompt == ["search", "document"]  # the colon is skiplisted in documents
    assert matches.document_tokens[: 1 + len(document_prompt)] == ["[CLS]", *document_prompt]
    assert not matches.document_is_text[: 1 + len(document_prompt)].any()
    assert matches.document_is_text[1 + len(document_prompt) : -1].all() and not matches.document_is_text[-1]
    assert matches.score == pytest.approx(float(maxsim(reloaded, QUERY, [DOCUMENT])[0]), rel=1e-5)


# -- the page -------------------------------------------------------------------------------------------------------
def elem_ids(demo: gr.Blocks) -> set[str]:
    return {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}


def test_the_page_reranks_then_shows_the_top_results_token_matches(engine):
    page = app.Page(engine)
    frame, choice, query, status = page.rerank("fever", 5, "All", "float32", None, True)
    assert list(frame.columns) == ["Rank", "Score", "Cosine", "Token match", "Dense rank", "Code", "Source", "Text"]
    assert len(frame) == 5 and query == "fever"
    assert f"top {RERANK_CANDIDATES} results reordered by cosine + MedEIR-ColBERT token match" in status
    hits, _ = engine.rerank("fever", 5)
    assert frame.values.tolist() == [
        [h.rank, f"{h.score:.3f}", f"{h.cosine:.3f}", f"{h.token_match:.3f}", app.moved(h), h.code, h.source, h.text]
        for h in hits
    ]
    parts = frame[["Score", "Cosine", "Token match"]].astype(float)
    np.testing.assert_allclose(parts["Score"], parts["Cosine"] + parts["Token match"], atol=1.5e-3)
    assert parts["Score"].is_monotonic_decreasing
    rows = [value for _, value in choice["choices"]]
    assert choice["value"] == rows[0] and len(rows) == 5
    html, listing, message = page.token_view(query, choice["value"])
    matches = engine.token_matches("fever", engine.entry_text(rows[0]))
    assert matches.side == "query"  # a one-word query is read from its own side
    assert html.count("<tr>") == len(matches.query_tokens) + 1  # the header and one row per query token
    assert len(re.findall(r"class='(?:dark )?best'", html)) == len(matches.query_tokens)  # one best match a row
    lines = listing.splitlines()
    assert lines[0] == "Each query token's best match in the result:" and message == ""
    assert lines[1] == f"[CLS] (added by the model) -> {matches.document_tokens[matches.best[0]]} " + (
        f"({matches.contributions[0]:.3f})"
    )
    assert lines[-2] == f"MaxSim (each query token's best match, summed; the model's own score): {matches.score:.3f}"
    assert lines[-1] == f"Mean over the {len(matches.query_tokens)} query tokens (token match): {matches.mean:.3f}"
    assert lines[-1].endswith(frame.iloc[0]["Token match"])
    assert f"{matches.mean:.3f}, is the token match the rerank adds to the cosine" in html
    # a query longer than the result: each of the result's tokens and its best match in the query
    long_query = " ".join(engine.texts[3:7])
    entry = min(engine.texts[:40], key=len)
    matches = engine.token_matches(long_query, entry)
    assert matches.side == "document"
    html, listing = app.token_table_html(matches), app.token_list_text(matches)
    lines = listing.splitlines()
    assert lines[0] == "Each result token's best match in the query:"
    assert len(lines) == len(matches.document_tokens) + 3
    assert lines[1] == f"[CLS] (added by the model) -> {matches.query_tokens[matches.side_best[0]]} " + (
        f"({matches.similarities[matches.side_best[0], 0]:.3f})"
    )
    assert lines[-1] == f"Mean over the {len(matches.document_tokens)} result tokens (token match): {matches.mean:.3f}"
    assert len(re.findall(r"class='(?:dark )?best'", html)) == len(matches.document_tokens)  # one a column
    assert "Outlined: each result token's best match (the result has under half the query's tokens)" in html
    # unticked: nothing is reranked and nothing is shown
    frame, choice, query, status = page.rerank("fever", 5, "All", "float32", None, False)
    assert frame.empty and choice["choices"] == [] and query is None and status == app.RERANK_HINT
    assert page.token_view(None, None) == ("", "", "")
    demo = app.build_demo(engine, examples={})
    assert {"search-rerank", "rerank-results", "token-heatmap", "token-list"} <= elem_ids(demo)
    assert "rerank-absent" not in elem_ids(demo)
    (checkbox,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "search-rerank"]
    assert checkbox.label == "Rerank with MedEIR-ColBERT (cosine + token match)"
    assert checkbox.label in app.RERANK_HINT and "reranks by cosine + token match" in checkbox.info


def test_the_token_table_escapes_tokens_and_says_when_it_is_cut(engine):
    matches = engine.token_matches("<b>fever</b>", "fever " * 300)
    html = app.token_table_html(matches, max_columns=50)
    assert "<b>" not in html and "&lt;" in html
    assert f"the first 50 of the document's {matches.similarities.shape[1]:,} token vectors" in html


def test_the_rerank_encodes_through_the_one_gpu_function(engine, monkeypatch):
    calls = []

    class FakeSpaces:  # records the sides the GPU function is asked for
        @staticmethod
        def GPU(duration):
            def decorate(fn):
                def wrapped(*args, **kwargs):
                    calls.append(kwargs.get("side"))
                    return fn(*args, **kwargs)

                return wrapped

            return decorate

    monkeypatch.setattr(app, "spaces", FakeSpaces)
    before, _ = engine.rerank("fever", 5)
    try:
        app.use_gpu(engine)
        after, _ = engine.rerank("fever", 5)
    finally:
        engine.colbert.encoder = engine.colbert.encode_local
        for indexed in engine.models:
            indexed.encoder = indexed.encode_local
    assert calls == [None, "query", "document"] and after == before


# -- no late-interaction model --------------------------------------------------------------------------------------
def test_without_a_late_interaction_model_there_is_no_rerank_and_the_page_says_so(dense_only):
    assert dense_only.colbert is None
    status = dense_only.colbert_status()
    assert status.startswith("No late-interaction (MedEIR-ColBERT) model is loaded") and "--colbert" in status
    with pytest.raises(InputError, match="No late-interaction"):
        dense_only.rerank("fever", 5)
    with pytest.raises(InputError, match="No late-interaction"):
        dense_only.token_matches("fever", "fever")
    demo = app.build_demo(dense_only, examples={})
    ids = elem_ids(demo)
    assert "rerank-absent" in ids and not {"search-rerank", "rerank-results", "token-heatmap"} & ids
    (line,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "rerank-absent"]
    assert line.value == status


def test_a_late_interaction_model_that_cannot_load_leaves_the_dense_demo_running(tiny_model_dir, index, tmp_path):
    with pytest.raises(ModelUnavailable, match=r"is not a late-interaction model: .* model_type 'MultiVectorEncoder'"):
        load_colbert(str(tiny_model_dir), "cpu")  # MultiVectorEncoder would add an untrained projection
    with pytest.raises(ModelUnavailable, match="No late-interaction model folder at models/no-such-colbert"):
        load_colbert("models/no-such-colbert", "cpu")
    made = engine_module.create_engine(
        str(tiny_model_dir), write_index(index, tmp_path / "i.parquet"), tmp_path / "cache", "cpu",
        baseline=None, colbert=str(tiny_model_dir),
    )  # fmt: skip
    assert made.colbert is None and "is not a late-interaction model" in made.colbert_status()
    made.load_indexes()
    assert made.search(made.texts[0], 3)[0][0].row == 0


def test_default_colbert_comes_from_the_environment_then_the_repository(monkeypatch):
    monkeypatch.setenv("MEDEIR_COLBERT_MODEL", "org/medeir-colbert")
    assert engine_module.default_colbert() == "org/medeir-colbert"
    monkeypatch.setenv("MEDEIR_COLBERT_MODEL", "none")
    assert engine_module.default_colbert() is None
    monkeypatch.delenv("MEDEIR_COLBERT_MODEL")
    built = (engine_module.REPO / engine_module.DEFAULT_COLBERT).is_dir()
    assert (engine_module.default_colbert() is not None) == built


def test_default_colbert_of_the_published_space_is_the_second_model_in_its_front_matter(tmp_path, monkeypatch):
    """`hub.publish space --colbert-repo-id` lists the late-interaction model after the dense one; the environment
    still overrides it."""
    for name in ("MEDEIR_MODEL", "MEDEIR_COLBERT_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(engine_module, "REPO", None)  # the published Space: README.md beside app.py at ROOT
    monkeypatch.setattr(engine_module, "ROOT", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("---\nsdk: gradio\nmodels:\n  - org/medeir\n---\n# Demo\n")
    assert engine_module.default_model() == "org/medeir" and engine_module.default_colbert() is None
    readme.write_text("---\nsdk: gradio\nmodels:\n  - org/medeir\n  - org/medeir-colbert\n---\n# Demo\n")
    assert engine_module.default_model() == "org/medeir"
    assert engine_module.default_colbert() == "org/medeir-colbert"
    monkeypatch.setenv("MEDEIR_COLBERT_MODEL", "org/other-colbert")
    assert engine_module.default_colbert() == "org/other-colbert"
    monkeypatch.setenv("MEDEIR_COLBERT_MODEL", "none")
    assert engine_module.default_colbert() is None


def test_check_flag_reranks_and_shows_token_matches(tiny_model_dir, colbert_dir, index, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDEIR_BASELINE", "none")
    app.main(["--model", str(tiny_model_dir), "--colbert", str(colbert_dir),
              "--index", str(write_index(index, tmp_path / "i.parquet")), "--cache", str(tmp_path / "cache"),
              "--check"])  # fmt: skip
    captured = capsys.readouterr()
    assert "CHECK OK: Model" in captured.out
    assert f"Late-interaction model {colbert_dir} (32-dimensional token vectors" in captured.err


# -- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["", "  \n\t ", None, 42, "x" * 100_001, "\u200b\ufeff", "fever \udc80", LONG], ids=repr
)
def test_bad_input_is_refused_as_the_search_refuses_it(engine, text):
    with pytest.raises(InputError) as refused:
        engine.search(text)
    message = str(refused.value)
    as_document = message.replace("The query", "The document")
    for check, expected in (
        (lambda: engine.rerank(text), message),
        (lambda: engine.token_matches(text, DOCUMENT), message),
        (lambda: engine.token_matches("fever", text), as_document),
    ):
        with pytest.raises(InputError) as err:
            check()
        assert str(err.value) == expected
    with pytest.warns(UserWarning):
        frame, _, query, status = app.Page(engine).rerank(text, 5, "All", "float32", None, True)
    assert frame.empty and query is None and "⚠️" in status


@pytest.mark.parametrize("top_k", [0, 1.5, 101, float("nan"), "10", True])
def test_a_bad_result_count_is_refused_as_the_search_refuses_it(engine, top_k):
    with pytest.raises(InputError) as refused:
        engine.search("fever", top_k)
    with pytest.raises(InputError) as err:
        engine.rerank("fever", top_k)
    assert str(err.value) == str(refused.value)


@pytest.mark.parametrize("row", [-1, 10**6, 1.5, "3", True, None])
def test_a_result_that_is_not_in_the_index_is_refused(engine, row):
    with pytest.raises(InputError, match=r"[Pp]ick one of the results"):
        engine.entry_text(row)
    if row is not None:
        with pytest.warns(UserWarning):
            assert "⚠️" in app.Page(engine).token_view("fever", row)[2]


def test_token_matches_of_a_text_and_itself_find_each_token(engine):
    """Every query token of a text finds the same token among its own document tokens best (the vectors are unit
    length, so a token's cosine with itself, 1, is the highest): a check that rows and columns are aligned."""
    text = "chronic obstructive pulmonary disease"
    matches = engine.token_matches(text, text)
    text_rows = [i for i, is_text in enumerate(matches.query_is_text) if is_text]
    assert [matches.document_tokens[matches.best[i]] for i in text_rows] == [matches.query_tokens[i] for i in text_rows]
    assert torch.allclose(torch.tensor(matches.contributions[text_rows]), torch.ones(len(text_rows)), atol=1e-4)
