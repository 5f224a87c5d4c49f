"""A saved MedEIR folder is a Hub model package: it loads offline, in a fresh process, every way users load it."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from modeling_medeir import MedEIRForMaskedLM, MedEIRModel

from .conftest import REPO

TEXTS = ["Fever and cough for three days.", "Myocardial infarction", "x"]


def run_fresh(code: str, cwd) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter that cannot see this checkout (only the saved folder)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_saved_folder_has_code_auto_map_and_sentence_transformers_files(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"modeling_medeir.py", "configuration_medeir.py", "model.safetensors", "modules.json"} <= names
    assert {"sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling", "2_Normalize"} <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "medeir"
    assert set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForMaskedLM",
        "AutoModelForSequenceClassification",
    }
    modules = json.loads((tiny_model_dir / "modules.json").read_text())
    assert [m["type"] for m in modules] == [
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Pooling",
        "sentence_transformers.models.Normalize",
    ]
    assert json.loads((tiny_model_dir / "sentence_bert_config.json").read_text())["max_seq_length"] == 8192
    st_config = json.loads((tiny_model_dir / "config_sentence_transformers.json").read_text())
    assert st_config["similarity_fn_name"] == "cosine"
    assert "trust_remote_code" not in (tiny_model_dir / "config.json").read_text()


def test_fresh_process_loads_every_auto_class_and_sentence_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    model = MedEIRForMaskedLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = model(**batch).logits
        hidden = model.model(**batch).last_hidden_state
    torch.save({"batch": dict(batch), "logits": expected, "hidden": hidden}, tmp_path / "expected.pt")

    result = run_fresh(
        f"""
        import torch
        from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM,
                                  AutoModelForSequenceClassification)
        from sentence_transformers import SentenceTransformer
        path = {str(tiny_model_dir)!r}
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        assert type(config).__name__ == "MedEIRConfig", type(config)
        mlm = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        clf = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True, num_labels=3)
        assert type(base).__name__ == "MedEIRModel" and "transformers_modules" in type(base).__module__
        with torch.no_grad():
            torch.testing.assert_close(mlm(**ref["batch"]).logits, ref["logits"])
            torch.testing.assert_close(base(**ref["batch"]).last_hidden_state, ref["hidden"])
            assert clf(**ref["batch"]).logits.shape == (3, 3)
        st = SentenceTransformer(path, trust_remote_code=True)
        assert st.max_seq_length == 8192, st.max_seq_length
        emb = st.encode({TEXTS!r}, convert_to_tensor=True)
        assert emb.shape == (3, config.hidden_size)
        print("LOADED", type(st[0].auto_model).__name__)
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED MedEIRModel" in result.stdout


def test_forgetting_trust_remote_code_is_a_clear_error(tiny_model_dir, tmp_path):
    result = run_fresh(
        f"""
        from transformers import AutoModel
        from sentence_transformers import SentenceTransformer
        for load in (AutoModel.from_pretrained, SentenceTransformer):
            try:
                load({str(tiny_model_dir)!r})
            except ValueError as error:
                assert "trust_remote_code=True" in str(error), error
                print("REFUSED")
            else:
                raise SystemExit("loaded without trust_remote_code")
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("REFUSED") == 2


def test_sentence_transformers_encode_is_mean_pooling_of_the_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    st = SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, device="cpu")
    embeddings = st.encode(TEXTS, convert_to_tensor=True, batch_size=2)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = MedEIRModel.from_pretrained(tiny_model_dir).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    manual = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(embeddings, manual, atol=1e-5, rtol=1e-4)


def test_weights_survive_meta_device_loading(tiny_model_dir):
    """from_pretrained builds on the meta device: nothing (e.g. ALiBi slopes) may come back uninitialised."""
    loaded = MedEIRModel.from_pretrained(tiny_model_dir).eval()
    again = MedEIRModel.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, again(input_ids=ids).last_hidden_state)
    assert torch.equal(
        loaded._alibi_slopes(torch.device("cpu")), torch.tensor([0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125])
    )


MEMORY_PROBE = """
import resource, sys, torch
sys.path.insert(0, {repo!r})
from configuration_medeir import MedEIRConfig
from modeling_medeir import MedEIRModel
torch.set_num_threads(2)
config = MedEIRConfig.from_json_file({preset!r})
model = MedEIRModel(config).eval()
ids = torch.randint(1000, 20000, (1, {seq_len}))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    out = model(input_ids=ids).last_hidden_state
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert torch.isfinite(out).all()
print("PEAK_MB", (peak - before) / 1024)
"""


def test_8192_token_forward_of_the_small_preset_stays_in_linear_memory(tmp_path):
    """Peak memory of one 8,192-token forward (sdpa) against a bound derived from the model's shapes.

    Bound, in fp32 bytes for S=8192, d=384, H=12, I=1536: activations kept at once (hidden, qkv, attention
    output, feed-forward) ~ S*(4d + 3d + I)*4 = 138 MB; the ALiBi band H*C*2S*4 with C=128 query chunk = 100 MB;
    one chunk's scores and softmax 3*H*C*S*4 = 151 MB; allocator slack 150 MB: ~540 MB. A full materialised
    (H, S, S) bias alone would take 3.2 GB.
    """
    preset = str(REPO / "presets" / "small.json")
    code = MEMORY_PROBE.format(repo=str(REPO), preset=preset, seq_len=8192)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_mb = float(result.stdout.split("PEAK_MB")[1])
    seq_len, hidden, heads, intermediate, chunk = 8192, 384, 12, 1536, 128
    bound = (
        seq_len * (7 * hidden + intermediate) * 4
        + heads * chunk * 2 * seq_len * 4
        + 3 * heads * chunk * seq_len * 4
        + 150 * 2**20
    ) / 2**20
    assert peak_mb < bound, f"peak {peak_mb:.0f} MB over the derived bound {bound:.0f} MB"


# ---- the shipped model --------------------------------------------------------------------------------------------
SHIPPED = REPO / "models" / "medeir-small"


def test_shipped_model_carries_the_current_remote_code():
    from train.export import SHIPPED_CODE

    assert {"modeling_medeir.py", "configuration_medeir.py", "onnx_encoder.py"} <= set(SHIPPED_CODE)
    for name in SHIPPED_CODE:
        assert (SHIPPED / name).read_text() == (REPO / name).read_text(), f"{name}: rerun python -m train.export"


def test_shipped_model_attends_with_the_standard_slopes():
    """Its config.json predates `alibi_slopes`: the default (None) is the standard sequence, computed as before, so the
    shipped weights give the embeddings they were trained to give."""
    from configuration_medeir import MedEIRConfig
    from modeling_medeir import alibi_slopes

    config = MedEIRConfig.from_pretrained(SHIPPED)
    assert "alibi_slopes" not in json.loads((SHIPPED / "config.json").read_text()) and config.alibi_slopes is None
    model = MedEIRModel(config)
    assert torch.equal(model._alibi_slopes(torch.device("cpu")), torch.tensor(alibi_slopes(12), dtype=torch.float32))


def test_shipped_model_loads_both_ways_in_a_fresh_offline_process(tmp_path):
    code = textwrap.dedent(
        f"""
        import json, torch, torch.nn.functional as F
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel, AutoTokenizer
        path = {str(SHIPPED)!r}
        texts = ["heart attack", "Acute myocardial infarction", "Hypoglycemia"]
        st = SentenceTransformer(path, trust_remote_code=True)
        a = st.encode(texts, convert_to_tensor=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        model = AutoModel.from_pretrained(path, trust_remote_code=True)
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        b = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        print(json.dumps({{
            "max_seq_length": st.max_seq_length, "dtype": str(next(model.parameters()).dtype),
            "diff": float((a - b).abs().max()), "related": float(a[0] @ a[1]), "unrelated": float(a[0] @ a[2]),
        }}))
        """
    )
    result = run_fresh(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["max_seq_length"] == 8192 and out["dtype"] == "torch.float32"
    assert out["diff"] < 1e-5
    assert out["related"] > out["unrelated"] + 0.2, out  # a trained model, not the random or MiniLM-converted start


# -- the tokenizer next to the weights must be the model's own, checked at load --------------------------
def _folder_with(source, tmp_path, tokenizer_from=None, delete=()):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    for name in delete:
        (folder / name).unlink()
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
            if (tokenizer_from / name).is_file():
                shutil.copy(tokenizer_from / name, folder / name)
    return folder


def _every_loader_refuses(folder, message):
    import pytest
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from hub.handler import EndpointHandler

    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(ValueError, match=message):
        SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    with pytest.raises(ValueError, match=message):
        EndpointHandler(str(folder))


def test_a_missing_tokenizer_json_stops_every_loader(tmp_path):
    folder = _folder_with(REPO / "models" / "medeir-small", tmp_path, delete=["tokenizer.json"])
    _every_loader_refuses(folder, r"has tokenizer settings \(tokenizer_config.json\) but no vocabulary")


def test_another_models_tokenizer_stops_every_loader(tmp_path, minilm_path):
    folder = _folder_with(REPO / "models" / "medeir-small", tmp_path, tokenizer_from=minilm_path)
    _every_loader_refuses(folder, r"tokenizer.json has 30,522 tokens but the model's vocab_size is 52,543")


def test_a_tokenizer_object_is_checked_against_the_config(tiny_model_dir):
    import pytest
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir, trust_remote_code=True)
    config.check_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))  # its own: no error
    with pytest.raises(ValueError, match="has 52,543 tokens but the model's vocab_size is 30,522"):
        config.check_tokenizer(AutoTokenizer.from_pretrained(REPO / "tokenizer"))
    own = AutoTokenizer.from_pretrained(tiny_model_dir)
    own.pad_token = "[UNK]"
    with pytest.raises(ValueError, match=r"padding token '\[UNK\]' has id 100 but the model's pad_token_id is 0"):
        config.check_tokenizer(own)


def test_a_checkpoint_without_tokenizer_files_still_loads(tiny_model_dir, tmp_path):
    """Training checkpoints carry no tokenizer: nothing to compare, and AutoModel loads them as before."""
    from transformers import AutoModel

    folder = _folder_with(tiny_model_dir, tmp_path, delete=["tokenizer.json", "tokenizer_config.json"])
    for extra in ("special_tokens_map.json", "vocab.txt"):
        (folder / extra).unlink(missing_ok=True)
    assert AutoModel.from_pretrained(folder, trust_remote_code=True).config.vocab_size == 30522
