"""The Inference Endpoints handler: request shapes, embeddings equal to sentence-transformers', similarity, and a
clear ValueError (the toolkit's HTTP 400 {"error": ...}) for every rule a request can break."""

import json

import numpy as np
import pytest

from hub.handler import EndpointHandler

LONG = "word " * 9000  # 9,002 tokens with [CLS] and [SEP]


@pytest.fixture(scope="module")
def handler(tiny_model_dir) -> EndpointHandler:
    return EndpointHandler(str(tiny_model_dir))


def test_one_string_gives_one_embedding_equal_to_sentence_transformers(handler):
    result = handler({"inputs": "Acute myocardial infarction"})
    assert set(result) == {"embeddings", "tokens", "dimension"}
    assert result["dimension"] == 48 and len(result["embeddings"]) == 1
    assert result["tokens"] == [len(handler.model.tokenizer("Acute myocardial infarction")["input_ids"])]
    expected = handler.model.encode(["Acute myocardial infarction"], normalize_embeddings=True)
    np.testing.assert_allclose(result["embeddings"], expected, atol=1e-6)
    json.dumps(result)  # what the Endpoint sends back


def test_a_batch_with_its_cosine_similarity_matrix(handler):
    texts = ["heart attack", "Acute myocardial infarction", "heart attack"]
    result = handler({"inputs": texts, "parameters": {"similarity": True, "batch_size": 2}})
    embeddings, similarity = np.asarray(result["embeddings"]), np.asarray(result["similarity"])
    assert embeddings.shape == (3, 48) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(similarity, embeddings @ embeddings.T, atol=1e-6)
    assert similarity[0, 2] == pytest.approx(1.0, abs=1e-5) and similarity[0, 1] < 1 - 1e-4
    assert "similarity" not in handler({"inputs": texts})


def test_the_hub_sentence_similarity_request(handler):
    scores = handler({"inputs": {"source_sentence": "heart attack", "sentences": ["heart attack", "broken wrist"]}})
    assert isinstance(scores, list) and len(scores) == 2
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] < 1 - 1e-4


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ("just a string", 'must be a JSON object with "inputs"'),
        ({"parameters": {}}, 'must be a JSON object with "inputs"'),
        ({"inputs": 42}, '"inputs" must be a string or a list of strings, not int'),
        ({"inputs": None}, '"inputs" must be a string or a list of strings, not NoneType'),
        ({"inputs": []}, '"inputs" is an empty list'),
        ({"inputs": ["fever", 3]}, r"inputs\[1\] must be a string, not int"),
        ({"inputs": ["fever", ["nested"]]}, r"inputs\[1\] must be a string, not list"),
        ({"inputs": ["fever", "  "]}, r"inputs\[1\] is empty"),
        ({"inputs": LONG}, r"inputs\[0\] is 9,002 tokens long; the limit is 8,192 tokens"),
        ({"inputs": "fever", "parameters": {"colour": 1}}, "Unknown parameter.*colour"),
        ({"inputs": "fever", "parameters": []}, '"parameters" must be an object'),
        ({"inputs": "fever", "parameters": {"similarity": "yes"}}, '"similarity" must be bool, not str'),
        ({"inputs": "fever", "parameters": {"batch_size": True}}, '"batch_size" must be int, not bool'),
        ({"inputs": "fever", "parameters": {"batch_size": 0}}, '"batch_size" must be between 1 and 256'),
        ({"inputs": "fever", "parameters": {"prompt_name": "nonsense"}}, 'Unknown prompt_name "nonsense"; known: '),
        ({"inputs": {"sentences": ["a"]}}, "missing: source_sentence"),
        ({"inputs": {"source_sentence": ["a", "b"], "sentences": ["c"]}}, '"source_sentence" must be one string'),
        ({"inputs": {"source_sentence": "a", "sentences": [LONG]}}, r"sentences\[0\] is 9,002 tokens long"),
    ],
)
def test_a_bad_request_is_a_clear_value_error(handler, request_body, message):
    with pytest.raises(ValueError, match=message):
        handler(request_body)


def test_batch_and_total_token_limits(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MEDEIR_MAX_BATCH", "3")
    monkeypatch.setenv("MEDEIR_MAX_TOTAL_TOKENS", "20")
    small = EndpointHandler(str(tiny_model_dir))
    assert len(small({"inputs": ["a", "b", "c"]})["embeddings"]) == 3
    with pytest.raises(ValueError, match='"inputs" has 4 texts; the limit is 3 per request'):
        small({"inputs": ["a", "b", "c", "d"]})
    with pytest.raises(ValueError, match="The request has 4 texts; the limit is 3"):
        small({"inputs": {"source_sentence": "a", "sentences": ["b", "c", "d"]}})
    with pytest.raises(ValueError, match="23 tokens in all; the limit is 20 per request"):
        small({"inputs": ["word " * 10, "word " * 9]})


def test_a_prompt_the_model_knows_is_used(handler):
    name = sorted(handler.model.prompts)[0]  # sentence-transformers 6 gives every model "query" and "document"
    assert len(handler({"inputs": "fever", "parameters": {"prompt_name": name}})["embeddings"]) == 1


def test_truncate_embeds_the_first_tokens_of_an_over_long_input(handler):
    result = handler({"inputs": [LONG], "parameters": {"truncate": True}})
    assert result["tokens"] == [8192] and len(result["embeddings"][0]) == 48
