"""The Inference Endpoints handler: request shapes, embeddings equal to sentence-transformers', similarity, and a
clear ValueError (the toolkit's HTTP 400 {"error": ...}) for every rule a request can break."""

import json
import shutil
import time

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from hub.handler import LIMITS, EndpointHandler
from tests.concurrency import answers_from_threads

LONG = "word " * 9000  # 9,002 tokens with [CLS] and [SEP]
PROMPT = "search query: find the matching code for this text "


@pytest.fixture(scope="module")
def handler(tiny_model_dir) -> EndpointHandler:
    return EndpointHandler(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompted(tiny_model_dir, tmp_path_factory) -> EndpointHandler:
    """A handler on the tiny model whose config_sentence_transformers.json gives it a "query" prompt."""
    folder = tmp_path_factory.mktemp("with-prompt") / "model"
    shutil.copytree(tiny_model_dir, folder)
    settings = json.loads((folder / "config_sentence_transformers.json").read_text())
    settings["prompts"] = {"query": PROMPT}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings))
    return EndpointHandler(str(folder))


def test_one_string_gives_one_embedding_equal_to_sentence_transformers(handler):
    result = handler({"inputs": "Acute myocardial infarction"})
    assert set(result) == {"embeddings", "tokens", "dimension", "precision"} and result["precision"] == "float32"
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
        ({"inputs": ["fever", "\x00\x00"]}, r"inputs\[1\] is empty: it has no letters"),
        ({"inputs": "\u200b\ufeff"}, r"inputs\[0\] is empty"),
        ({"inputs": "\x07\x1b\u0301 \u2060"}, r"inputs\[0\] is empty"),
        ({"inputs": ["fever", "bad \ud800 text"]}, r"inputs\[1\] has a lone UTF-16 surrogate at character 4"),
        ({"inputs": "x" * 100_001}, r"inputs\[0\] is 100,001 characters long; the limit is 100,000 characters"),
        ({"inputs": "fever", "parameters": {"truncate_dim": 0}}, '"truncate_dim" must be between 1 and 48'),
        ({"inputs": "fever", "parameters": {"truncate_dim": 49}}, '"truncate_dim" must be between 1 and 48'),
        ({"inputs": "fever", "parameters": {"truncate_dim": 8.0}}, '"truncate_dim" must be int, not float'),
        ({"inputs": "fever", "parameters": {"precision": "int4"}}, '"precision" must be one of float32, int8'),
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


def test_a_prompt_the_model_knows_is_used(prompted):
    with_prompt = np.asarray(prompted({"inputs": "fever", "parameters": {"prompt_name": "query"}})["embeddings"])
    plain = np.asarray(prompted({"inputs": "fever"})["embeddings"])
    # the model's embedding of the prompt followed by the text, as sentence-transformers prepends it
    np.testing.assert_allclose(
        with_prompt, prompted.model.encode([PROMPT + "fever"], normalize_embeddings=True), atol=1e-6
    )
    np.testing.assert_allclose(plain, prompted.model.encode(["fever"], normalize_embeddings=True), atol=1e-6)
    assert np.abs(with_prompt - plain).max() > 1e-3  # the prompt changed the embedding


def test_truncate_embeds_the_first_tokens_of_an_over_long_input(handler):
    result = handler({"inputs": [LONG], "parameters": {"truncate": True}})
    assert result["tokens"] == [8192] and len(result["embeddings"][0]) == 48


# -- concurrency, limits before tokenizing, prompts, start-up checks ----------------------------------------
def test_threads_sharing_one_handler_get_exactly_the_serial_results(handler):
    """Requests of different lengths and truncation from 8 threads at once: every answer equals the serial one."""
    requests = []  # 100 requests: enough that the old shared-tokenizer counting failed every time (3 to 6 of them)
    for i in range(96):
        texts = [f"patient {i} with fever and cough " * (1 + (i * 7 + j) % 40) for j in range(8)]
        requests.append({"inputs": texts, "parameters": {"truncate": i % 2 == 0, "batch_size": 4}})
    requests += [{"inputs": ["word " * 300] * 4, "parameters": {"truncate": True}}] * 4  # 302 tokens, under the limit
    serial = [handler(r) for r in requests]
    results = answers_from_threads(handler, requests, workers=8)
    for i, expected in enumerate(serial):
        got = results[i]
        assert not isinstance(got, Exception), f"request {i} failed under concurrency: {got!r}"
        assert got["tokens"] == expected["tokens"], i
        np.testing.assert_allclose(got["embeddings"], expected["embeddings"], atol=1e-5)


def test_an_oversized_request_is_refused_before_tokenizing_in_well_under_a_second(handler, monkeypatch):
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the request was tokenized before its size was checked")

    monkeypatch.setattr(handler, "count_tokens", no_tokenizing)
    monkeypatch.setattr(handler.model, "encode", no_tokenizing)
    for request, message in [
        ({"inputs": "x" * 30_000_000}, "30,000,000 characters long"),
        ({"inputs": ["fever"] * 65}, "65 texts; the limit is 64"),
        ({"inputs": ["word " * 19_000] * 11}, "1,045,000 characters in all; the limit is 1,000,000"),
        ({"inputs": {"source_sentence": "a", "sentences": ["x" * 200_000]}}, r"sentences\[0\] is 200,000 characters"),
    ]:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=message):
            handler(request)
        assert time.perf_counter() - start < 0.5


def test_truncate_cuts_an_input_over_the_character_limit_before_tokenizing(handler):
    result = handler({"inputs": "word " * 30_000, "parameters": {"truncate": True}})  # 150,000 characters
    assert result["tokens"] == [8192]


def test_prompt_tokens_count_towards_the_limit_and_the_reported_tokens(prompted):
    prompt_tokens = len(prompted.model.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    plain = prompted({"inputs": "fever"})["tokens"][0]
    assert prompted({"inputs": "fever", "parameters": {"prompt_name": "query"}})["tokens"] == [plain + prompt_tokens]
    fits = "word " * (8192 - 2)  # exactly the limit without the prompt
    assert prompted({"inputs": fits})["tokens"] == [8192]
    with pytest.raises(ValueError, match=rf"is {8192 + prompt_tokens:,} tokens long with the query prompt"):
        prompted({"inputs": fits, "parameters": {"prompt_name": "query"}})


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5"])
@pytest.mark.parametrize("name", sorted(LIMITS))
def test_a_bad_limit_setting_stops_the_replica_at_start_up(tiny_model_dir, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"{name}='{value}' is not a positive integer"):
        EndpointHandler(str(tiny_model_dir))


def test_the_batch_is_split_so_one_forward_holds_at_most_max_batch_tokens(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MEDEIR_MAX_BATCH_TOKENS", "1000")
    small = EndpointHandler(str(tiny_model_dir))
    seen = []
    forward = small.model.forward
    monkeypatch.setattr(
        small.model,
        "forward",
        lambda features, **kw: seen.append(features["input_ids"].shape) or forward(features, **kw),
    )
    texts = ["word " * 298] * 8  # 300 tokens each: three per forward pass
    result = small({"inputs": texts, "parameters": {"batch_size": 256}})
    assert [s[0] for s in seen] == [3, 3, 2] and max(s[0] * s[1] for s in seen) <= 1000
    np.testing.assert_allclose(result["embeddings"], small({"inputs": texts[:1]})["embeddings"] * 8, atol=1e-5)


def test_nan_weights_stop_the_replica_and_nan_embeddings_are_never_returned(
    tiny_model_dir, tmp_path, handler, monkeypatch
):
    folder = tmp_path / "nan"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "layers.0" in k and k.endswith("weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="weights contain NaN or infinity"):
        EndpointHandler(str(folder))
    monkeypatch.setattr(handler.model, "encode", lambda texts, **kw: np.full((len(texts), 48), np.nan, np.float32))
    with pytest.raises(RuntimeError, match=r"NaN or infinite embeddings \(inputs 0, 1\): a fault of this deployment"):
        handler({"inputs": ["fever", "cough"]})


# -- Matryoshka truncation and quantized embeddings -------------------------------------------------
def test_truncate_dim_keeps_the_first_dimensions_renormalised(handler):
    texts = ["heart attack", "Acute myocardial infarction"]
    full = np.asarray(handler({"inputs": texts})["embeddings"])
    result = handler({"inputs": texts, "parameters": {"truncate_dim": 16, "similarity": True}})
    cut = np.asarray(result["embeddings"])
    assert result["dimension"] == 16 and cut.shape == (2, 16)
    np.testing.assert_allclose(cut, full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(result["similarity"], cut @ cut.T, atol=1e-6)


def test_quantized_embeddings_share_one_scale_across_requests(handler):
    from sentence_transformers.util.quantization import quantize_embeddings

    texts = ["heart attack", "Acute myocardial infarction", "broken wrist"]
    floats = np.asarray(handler({"inputs": texts})["embeddings"], dtype=np.float32)
    one = handler({"inputs": texts, "parameters": {"precision": "int8"}})
    assert one["precision"] == "int8" and np.asarray(one["embeddings"]).dtype.kind == "i"
    alone = handler({"inputs": texts[2], "parameters": {"precision": "int8"}})["embeddings"]
    assert alone == one["embeddings"][2:]  # the same text gets the same int8 values whatever else is in the request
    ints = np.asarray(one["embeddings"])
    assert ints.min() >= -128 and ints.max() <= 127 and ints.shape == (3, 48)
    packed = handler({"inputs": texts, "parameters": {"precision": "ubinary"}})["embeddings"]
    np.testing.assert_array_equal(packed, quantize_embeddings(floats, "ubinary"))
    assert np.asarray(packed).shape == (3, 6)
    eight = handler({"inputs": texts, "parameters": {"precision": "binary", "truncate_dim": 16}})
    assert eight["dimension"] == 16 and np.asarray(eight["embeddings"]).shape == (3, 2)


def test_the_onnx_backend_serves_what_the_torch_backend_serves(tiny_model_dir, tmp_path, monkeypatch):
    """MEDEIR_BACKEND=onnx: the same requests, the same limits and token counts, embeddings equal within fp32 rounding."""
    from train import onnx_export

    folder = tmp_path / "onnx-model"
    shutil.copytree(tiny_model_dir, folder)
    monkeypatch.setenv("MEDEIR_BACKEND", "onnx")
    with pytest.raises(ValueError, match="does not exist: export it first"):
        EndpointHandler(str(folder))
    onnx_export.export_folder(folder, quantize=False, check=False)
    served = EndpointHandler(str(folder))
    assert served.backend == "onnx"
    monkeypatch.setenv("MEDEIR_BACKEND", "torch")
    reference = EndpointHandler(str(folder))
    texts = ["Acute myocardial infarction", "fever", "Chronic obstructive pulmonary disease with exacerbation " * 20]
    body = {"inputs": texts, "parameters": {"similarity": True}}
    got, want = served(body), reference(body)
    assert got["tokens"] == want["tokens"] and got["dimension"] == want["dimension"]
    np.testing.assert_allclose(got["embeddings"], want["embeddings"], atol=1e-4)
    np.testing.assert_allclose(got["similarity"], want["similarity"], atol=1e-4)
    with pytest.raises(ValueError, match="tokens long"):
        served({"inputs": LONG})
    monkeypatch.setenv("MEDEIR_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="MEDEIR_BACKEND='tensorrt' is not one of torch, onnx"):
        EndpointHandler(str(folder))
