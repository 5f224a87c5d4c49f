"""onnx_encoder (the shipped onnxruntime encoder) and train.onnx_export: the shipped model's ONNX files against torch and sentence-transformers."""

import shutil

import numpy as np
import pytest

from .conftest import REPO

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx_encoder import OnnxEncoder
from train import onnx_export

SHIPPED = REPO / "models" / "medeir-small"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A copy of the shipped folder with its onnx/ files (export without the built-in check: the tests check)."""
    folder = tmp_path_factory.mktemp("onnx") / "medeir-small"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("onnx"))
    onnx_export.export_folder(folder, quantize=True, check=False)
    return folder


@pytest.fixture(scope="module")
def texts():
    """Real texts of very different lengths: ICD-10-CM titles and one long category document (~1,900 tokens)."""
    from corpus.sources import icd10cm

    from .data_fixtures import parsed

    icd = parsed("icd10cm")
    titles = [icd.codes[code].title for code in ("A00.0", "I21.01", "J45.20", "E11.9", "S06.0X0")]
    return [*titles, icd10cm.category_document(icd, "S06")[:9000]]


@pytest.fixture(scope="module")
def reference(texts):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(SHIPPED), trust_remote_code=True, device="cpu").encode(texts)


def test_graph_inputs_outputs_and_dynamic_axes(exported):
    import onnx

    model = onnx.load(str(exported / "onnx" / "model.onnx"), load_external_data=False)
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}
    for tensor in inputs.values():
        assert tensor.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param and not d.dim_value for d in tensor.shape.dim)  # batch and length are dynamic
    (output,) = model.graph.output
    assert output.name == "last_hidden_state" and len(output.type.tensor_type.shape.dim) == 3
    assert (exported / "onnx" / "model_qint8_avx512_vnni.onnx").stat().st_size < 0.4 * (
        exported / "onnx" / "model.onnx"
    ).stat().st_size


def test_fp32_onnx_matches_sentence_transformers(exported, texts, reference):
    encoder = OnnxEncoder(exported)
    embeddings = encoder.encode(texts, batch_size=4)  # two batches, each padded to its own length
    assert embeddings.shape == reference.shape and embeddings.dtype == np.float32
    cosine = (embeddings * reference).sum(-1)
    assert cosine.min() >= 0.9999, cosine
    single = encoder.encode(texts[0])
    assert single.shape == (reference.shape[1],) and float(single @ reference[0]) >= 0.9999


def test_long_texts_run_in_smaller_batches_with_the_same_embeddings(exported, texts, reference):
    """An attention budget that fits one longest text at a time: every forward then holds one long text, yet the
    embeddings (in input order) are those of plain batching."""
    encoder = OnnxEncoder(exported)
    lengths = encoder.token_counts(texts)
    longest = max(lengths)
    encoder.max_attention_elements = encoder.heads * longest**2  # one longest text per forward
    shapes = []
    run = encoder.session.run
    encoder.session.run = lambda names, feeds: shapes.append(feeds["input_ids"].shape) or run(names, feeds)
    embeddings = encoder.encode(texts, batch_size=len(texts))
    assert shapes[0] == (1, longest) and len(shapes) > 1 and sum(b for b, _ in shapes) == len(texts)
    assert all(b * encoder.heads * n * n <= encoder.max_attention_elements or b == 1 for b, n in shapes)
    assert ((embeddings * reference).sum(-1) >= 0.9999).all()


def test_a_text_over_the_attention_budget_runs_alone_without_the_memory_arena(exported, texts, reference):
    encoder = OnnxEncoder(exported)
    lengths = encoder.token_counts(texts)
    longest = int(np.argmax(lengths))
    encoder.max_attention_elements = encoder.heads * lengths[longest] ** 2 - 1  # the longest text alone is over it
    embeddings = encoder.encode(texts, batch_size=len(texts))
    assert encoder._long_session is not None and encoder._long_session is not encoder.session
    assert ((embeddings * reference).sum(-1) >= 0.9999).all()
    assert encoder.session_for(1) is encoder.session


def test_fp32_onnx_hidden_states_match_torch_with_padding(exported, texts):
    """last_hidden_state itself, on a padded batch of a long and a short text: ALiBi and padding are in the graph."""
    import torch

    encoder = OnnxEncoder(exported)
    features = encoder.tokenize([texts[-1][:3000], texts[1]])
    (hidden,) = encoder.session.run(["last_hidden_state"], features)
    model = onnx_export.load_encoder(SHIPPED)
    with torch.no_grad():
        torch_hidden = model(**{k: torch.from_numpy(v) for k, v in features.items()}).last_hidden_state.numpy()
    assert features["attention_mask"][1].sum() < features["attention_mask"].shape[1]  # really padded
    np.testing.assert_allclose(hidden, torch_hidden, atol=2e-4, rtol=0)
    assert not hidden[1][features["attention_mask"][1] == 0].any()  # zeros at padding


def test_int8_onnx_stays_close(exported, texts, reference):
    embeddings = OnnxEncoder(exported, "onnx/model_qint8_avx512_vnni.onnx").encode(texts)
    cosine = (embeddings * reference).sum(-1)
    assert cosine.mean() >= 0.99, cosine


def test_encoder_follows_prompts_like_sentence_transformers(exported, texts):
    import json

    from sentence_transformers import SentenceTransformer

    config = exported / "config_sentence_transformers.json"
    saved = config.read_text()
    config.write_text(json.dumps({**json.loads(saved), "prompts": {"query": "query: "}}))
    try:
        expected = SentenceTransformer(str(exported), trust_remote_code=True, device="cpu").encode(
            texts[:3], prompt_name="query"
        )
        got = OnnxEncoder(exported).encode(texts[:3], prompt_name="query")
    finally:
        config.write_text(saved)
    assert (got * expected).sum(-1).min() >= 0.9999
    with pytest.raises(ValueError, match="Unknown prompt_name"):
        OnnxEncoder(exported).encode(texts[:1], prompt_name="passage")


def test_the_graph_attends_with_the_configs_alibi_slopes(tmp_path):
    """A model with its own slopes (a head of slope 0 among them), loaded through its remote code as train.export
    loads it: the exported graph gives torch's hidden states on a padded batch, not those of the standard slopes."""
    import onnxruntime
    import torch

    from modeling_medeir import MedEIRModel

    from .conftest import tiny_config
    from .test_modeling import SLOPES, padded_batch

    torch.manual_seed(0)
    MedEIRModel(tiny_config(vocab_size=2048, alibi_slopes=SLOPES["non-monotone"])).save_pretrained(tmp_path / "model")
    model = onnx_export.load_encoder(tmp_path / "model")
    assert model.config.alibi_slopes == SLOPES["non-monotone"]
    path = onnx_export.export_onnx(model, tmp_path / "model.onnx")
    ids, mask = padded_batch(lengths=[40, 23, 5], vocab=2048)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(["last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        model.config.alibi_slopes = None
        standard = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, expected, atol=2e-5, rtol=0)
    assert np.abs(hidden - standard).max() > 1e-2
