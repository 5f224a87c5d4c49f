"""The Endpoint handler on a late-interaction (ColBERT) folder: token vectors equal to MultiVectorEncoder's, vector
counts known before encoding and bounded per request, and a clear ValueError for every request the folder cannot
answer (and for multi-vector requests to a dense folder)."""

import string
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

from hub.handler import EndpointHandler
from tests.concurrency import answers_from_threads
from train import colbert
from train.colbert import ColbertRecipe

TEXTS = [
    "Cholera due to Vibrio cholerae 01, biovar cholerae",
    "fever",
    "Abnormality of the cardiovascular system (heart, vessels).",
    "always thirsty and peeing a lot",
]
MULTI = {"output": "multi_vector"}


@pytest.fixture(scope="module")
def colbert_dir(tiny_medeir_init, tmp_path_factory) -> Path:
    """train.colbert's untrained model on the tiny init (32-dim token vectors, 32-token queries, 8,192-token
    documents, punctuation skiplisted in documents), saved as its final folder is."""
    path = tmp_path_factory.mktemp("tiny-colbert") / "final"
    recipe = ColbertRecipe(init=str(tiny_medeir_init), projection_dim=32, query_length=32)
    colbert.load_model(recipe).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def served(colbert_dir) -> EndpointHandler:
    return EndpointHandler(str(colbert_dir))


@pytest.fixture(scope="module")
def reference(colbert_dir) -> MultiVectorEncoder:
    """The folder loaded on its own, as evaluation.multi_vector loads it."""
    return MultiVectorEncoder(str(colbert_dir), trust_remote_code=True)


@pytest.fixture(scope="module")
def handler_dense(tiny_model_dir) -> EndpointHandler:
    return EndpointHandler(str(tiny_model_dir))


def vectors(result: dict) -> list[np.ndarray]:
    return [np.asarray(v, dtype=np.float32) for v in result["multi_vectors"]]


@pytest.mark.parametrize("side", ["document", "query"])
def test_token_vectors_equal_multi_vector_encoders_alone_and_in_a_padded_batch(served, reference, side):
    result = served({"inputs": TEXTS, "parameters": {**MULTI, "input_type": side, "batch_size": len(TEXTS)}})
    assert set(result) == {"multi_vectors", "tokens", "dimension", "input_type"}
    assert result["dimension"] == 32 and result["input_type"] == side
    encode = reference.encode_query if side == "query" else reference.encode_document
    got = vectors(result)
    for mine, theirs in zip(got, encode(TEXTS, convert_to_numpy=True), strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(mine, axis=1), 1, atol=1e-5)
    for text, in_batch in zip(TEXTS, got, strict=True):  # a batch padded to its longest text changes nothing
        alone = served({"inputs": text, "parameters": {**MULTI, "input_type": side}})
        np.testing.assert_allclose(vectors(alone)[0], in_batch, atol=1e-5)


def test_vector_counts_are_the_models_tokens_less_skiplisted_document_punctuation(served, reference):
    tokenizer = reference.tokenizer
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    punctuation = {tokenizer.convert_tokens_to_ids(p) for p in string.punctuation if p in tokenizer.get_vocab()}
    documents = served({"inputs": TEXTS, "parameters": MULTI})  # input_type "document" by default
    queries = served({"inputs": TEXTS, "parameters": {**MULTI, "input_type": "query"}})
    assert documents["input_type"] == "document"
    assert documents["tokens"] == queries["tokens"] == [len(i) for i in ids]
    assert [len(v) for v in queries["multi_vectors"]] == [len(i) for i in ids]  # queries: every token
    expected = [sum(t not in punctuation for t in i) for i in ids]
    assert [len(v) for v in documents["multi_vectors"]] == expected and expected[0] < len(ids[0])
    # queries are cut at the model's 32-token query length: refused as over-long unless truncating
    long_query = "chronic obstructive pulmonary disease " * 10
    with pytest.raises(ValueError, match=r"inputs\[0\] is \d+ tokens long; the limit is 32 tokens per query"):
        served({"inputs": long_query, "parameters": {**MULTI, "input_type": "query"}})
    cut = served({"inputs": long_query, "parameters": {**MULTI, "input_type": "query", "truncate": True}})
    assert cut["tokens"] == [32] and len(cut["multi_vectors"][0]) == 32
    np.testing.assert_allclose(vectors(cut)[0], reference.encode_query(long_query, convert_to_numpy=True), atol=1e-5)
    document = served({"inputs": long_query, "parameters": MULTI})  # documents: the whole 8,192-token context
    assert document["tokens"] == [len(tokenizer(long_query)["input_ids"])] and document["tokens"][0] > 32
    # a document cut at 8,192 tokens: [CLS], 4,095 x "fever ,", [SEP]; the cut-off commas are not counted either
    cut = served({"inputs": "fever, " * 5000, "parameters": {**MULTI, "truncate": True}})
    assert cut["tokens"] == [8192] and len(cut["multi_vectors"][0]) == 8192 - 4095


def test_an_oversized_request_is_refused_before_encoding_naming_the_limit(colbert_dir, monkeypatch):
    monkeypatch.setenv("MEDEIR_MAX_TOTAL_VECTORS", "14")
    small = EndpointHandler(str(colbert_dir))
    counts = [len(v) for v in small({"inputs": TEXTS[:2], "parameters": MULTI})["multi_vectors"]]
    assert counts == [11, 3]  # 14 vectors (12 tokens less a comma, then 3): exactly the limit is accepted

    def no_encoding(*args, **kwargs):
        raise AssertionError("the request was encoded before its size was checked")

    monkeypatch.setattr(small.model, "encode_document", no_encoding)
    monkeypatch.setattr(small.model, "encode_query", no_encoding)
    with pytest.raises(ValueError, match=r"would return 17 token vectors; the limit is 14 .*MEDEIR_MAX_TOTAL_VECTORS"):
        small({"inputs": [*TEXTS[:2], "a"], "parameters": MULTI})
    with pytest.raises(ValueError, match=r"would return 15 token vectors; the limit is 14"):
        small({"inputs": TEXTS[:2], "parameters": {**MULTI, "input_type": "query"}})  # queries keep the comma
    monkeypatch.setattr(small, "max_total_tokens", 10)  # the dense requests' limits apply as well
    with pytest.raises(ValueError, match="15 tokens in all; the limit is 10"):
        small({"inputs": TEXTS[:2], "parameters": MULTI})


def test_a_dense_folder_refuses_multi_vector_requests_and_answers_dense_ones_as_before(handler_dense):
    with pytest.raises(ValueError, match=r'"multi_vector" needs a late-interaction .* serves a dense'):
        handler_dense({"inputs": "fever", "parameters": MULTI})
    with pytest.raises(ValueError, match='"input_type" applies to "output": "multi_vector" only'):
        handler_dense({"inputs": "fever", "parameters": {"input_type": "query"}})
    dense = handler_dense({"inputs": "fever", "parameters": {"output": "dense"}})
    assert dense == handler_dense({"inputs": "fever"}) and "embeddings" in dense


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"inputs": "fever"}, r"serves a late-interaction \(MultiVectorEncoder\) model.*\"output\": \"multi_vector\""),
        ({"inputs": {"source_sentence": "a", "sentences": ["b"]}}, "serves a late-interaction"),
        ({"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": MULTI}, "sentence-similarity"),
        ({"inputs": "fever", "parameters": {"output": "sparse"}}, '"output" must be one of dense, multi_vector'),
        ({"inputs": "fever", "parameters": {**MULTI, "input_type": "passage"}}, '"input_type" must be one of'),
        ({"inputs": "fever", "parameters": {**MULTI, "input_type": 1}}, '"input_type" must be str, not int'),
        ({"inputs": "fever", "parameters": {**MULTI, "similarity": True}}, '"similarity" applies to "output": "dense"'),
        ({"inputs": "fever", "parameters": {**MULTI, "precision": "int8"}}, 'float32 token vectors only, not "int8"'),
        ({"inputs": "fever", "parameters": {**MULTI, "truncate_dim": 33}}, '"truncate_dim" must be between 1 and 32'),
        ({"inputs": ["fever", "  "], "parameters": MULTI}, r"inputs\[1\] is empty"),
        ({"inputs": "x" * 100_001, "parameters": MULTI}, r"inputs\[0\] is 100,001 characters long"),
        ({"inputs": "word " * 9000, "parameters": MULTI}, r"9,002 tokens long; the limit is 8,192 tokens per document"),
    ],
)
def test_a_request_the_multi_vector_folder_cannot_answer_is_a_clear_value_error(served, request_body, message):
    with pytest.raises(ValueError, match=message):
        served(request_body)


def test_truncate_dim_keeps_the_first_dimensions_of_every_token_vector_renormalised(served, reference):
    result = served({"inputs": TEXTS[:2], "parameters": {**MULTI, "truncate_dim": 8, "similarity": False}})
    assert result["dimension"] == 8
    full = reference.encode_document(TEXTS[:2], convert_to_numpy=True)
    for got, want in zip(vectors(result), full, strict=True):
        np.testing.assert_allclose(got, want[:, :8] / np.linalg.norm(want[:, :8], axis=1, keepdims=True), atol=1e-5)


def test_query_expansion_is_counted_and_returned(colbert_dir, tmp_path):
    """A model that pads every query with [MASK] tokens to 32 and scores them: 32 vectors per query, as its own
    encode_query gives them, and counted before encoding."""
    model = MultiVectorEncoder(str(colbert_dir), trust_remote_code=True)
    model[0].query_expansion = {"strategy": "fixed", "attend": True, "length": 32}
    model.save_pretrained(str(tmp_path / "expanded"))
    expanded = EndpointHandler(str(tmp_path / "expanded"))
    result = expanded({"inputs": TEXTS, "parameters": {**MULTI, "input_type": "query"}})
    assert [len(v) for v in result["multi_vectors"]] == [32] * 4 and result["tokens"][1] == 3
    for got, want in zip(vectors(result), model.encode_query(TEXTS, convert_to_numpy=True), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    expanded.max_total_vectors = 127
    with pytest.raises(ValueError, match="would return 128 token vectors; the limit is 127"):
        expanded({"inputs": TEXTS, "parameters": {**MULTI, "input_type": "query"}})


def test_a_folder_whose_vector_counts_cannot_be_known_beforehand_stops_the_replica(colbert_dir, tmp_path, monkeypatch):
    from sentence_transformers.multi_vector_encoder.modules import HierarchicalTokenPooling

    model = MultiVectorEncoder(str(colbert_dir), trust_remote_code=True)
    model.append(HierarchicalTokenPooling(pool_factor=2))  # merges document tokens after the forward pass
    model.save_pretrained(str(tmp_path / "pooled"))
    with pytest.raises(RuntimeError, match="cannot bound its responses"):
        EndpointHandler(str(tmp_path / "pooled"))
    monkeypatch.setenv("MEDEIR_BACKEND", "onnx")
    with pytest.raises(ValueError, match="MEDEIR_BACKEND=onnx serves dense models"):
        EndpointHandler(str(colbert_dir))


def test_threads_sharing_one_handler_get_exactly_the_serial_results(served):
    """Queries (cut at 32 tokens) and documents (not cut) from 6 threads at once: each answer equals the serial one,
    so no request's truncation or padding reaches another's."""
    requests = []
    for i in range(24):
        texts = [f"patient {i} with fever, cough and pain " * (1 + (i * 5 + j) % 9) for j in range(4)]
        side = "query" if i % 2 else "document"
        requests.append({"inputs": texts, "parameters": {**MULTI, "input_type": side, "truncate": True}})
    serial = [served(r) for r in requests]
    results = answers_from_threads(served, requests, workers=6)
    for i, expected in enumerate(serial):
        got = results[i]
        assert not isinstance(got, Exception), f"request {i} failed under concurrency: {got!r}"
        assert got["tokens"] == expected["tokens"], i
        for a, b in zip(vectors(got), vectors(expected), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
