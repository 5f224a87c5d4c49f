"""Publishing without a network: the assembled model repository and Space, their fresh-process offline checks, the
dry run, and the upload calls (against a stand-in HfApi)."""

import shutil
from pathlib import Path
from unittest import mock

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hub import publish
from hub.publish import (
    MARKER,
    PublishError,
    assemble_model,
    assemble_space,
    check_model,
    check_space,
    listing,
    space_readme,
    upload,
)

from .conftest import REPO
from .test_space import write_data_dir

MODEL_FILES = {
    "README.md",
    "config.json",
    "model.safetensors",
    "configuration_medeir.py",
    "modeling_medeir.py",
    "tokenizer.json",
    "tokenizer_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "handler.py",
    "request_checks.py",
    "onnx_encoder.py",
    "requirements.txt",
}
MODEL_ID, COLBERT_ID = "someone/medeir-test", "someone/medeir-colbert-test"
CARD = "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\n---\n# MedEIR tiny (test)\n"


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("card") / "model_card.md"
    path.write_text(CARD)
    return path


@pytest.fixture(scope="module")
def hub_model(tiny_model_dir, card, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("publish") / "hub-model"
    assemble_model(tiny_model_dir, out, card)
    return out


@pytest.fixture(scope="module")
def hub_space(tmp_path_factory) -> Path:
    """The Space published with a late-interaction model beside the dense one."""
    data = write_data_dir(tmp_path_factory.mktemp("data"), icd=40, hpo=20, diseases=10)
    out = tmp_path_factory.mktemp("publish") / "hub-space"
    assemble_space(MODEL_ID, out, data_dir=data, colbert_repo_id=COLBERT_ID)
    return out


@pytest.fixture(scope="module")
def colbert_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A late-interaction (MultiVectorEncoder) folder on the tiny model, packaged as train.export ships one."""
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

    from train.export import package

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-colbert") / "colbert"
    MultiVectorEncoder(str(tiny_model_dir), trust_remote_code=True).save(str(path))
    package(path)
    return path


def front_matter(readme: str) -> dict:
    return yaml.safe_load(readme.split("---\n")[1])


# -- the model repository -------------------------------------------------------------------------------------------
def test_model_folder_holds_exactly_what_the_hub_repository_needs(hub_model, card):
    assert {name for name, _ in listing(hub_model)} == MODEL_FILES
    assert (hub_model / MARKER).is_file()  # made here, never uploaded
    assert (hub_model / "README.md").read_text() == CARD
    for copied, source in [
        ("handler.py", "hub/handler.py"),
        ("request_checks.py", "request_checks.py"),
        ("onnx_encoder.py", "onnx_encoder.py"),
        ("requirements.txt", "hub/requirements.txt"),
        ("modeling_medeir.py", "modeling_medeir.py"),
        ("configuration_medeir.py", "configuration_medeir.py"),
    ]:
        assert (hub_model / copied).read_bytes() == (REPO / source).read_bytes(), copied
    assert not (hub_model / "2_Normalize").exists()  # the Hub keeps no empty folder


def test_sentence_transformers_files_are_written_when_the_model_has_none(tiny_model_dir, card, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns("modules.json", "*_Pooling", "*Normalize"))
    assemble_model(bare, tmp_path / "out", card)
    assert {name for name, _ in listing(tmp_path / "out")} == MODEL_FILES
    assert '"max_seq_length": 8192' in (tmp_path / "out" / "sentence_bert_config.json").read_text()


def test_fresh_offline_process_loads_it_three_ways_with_the_source_embeddings(tiny_model_dir, hub_model):
    report = check_model(tiny_model_dir, hub_model)
    assert report["model_class"] == "MedEIRModel" and report["dimension"] == 48 and report["max_seq_length"] == 8192
    assert set(report["gaps"]) == {"automodel_mean_pooling", "sentence_transformers", "handler"}
    assert max(report["gaps"].values()) <= 1e-5


def test_a_late_interaction_folder_ships_its_modules_and_the_handler_serves_its_token_vectors(
    tiny_model_dir, card, tmp_path
):
    """A MultiVectorEncoder folder (projection, scoring mask, lengths): the repository carries its module files and
    no pooling, and the fresh offline process finds the source's token vectors through MultiVectorEncoder and the
    handler's "multi_vector" output, as queries and as documents."""
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

    torch.manual_seed(0)
    source = tmp_path / "late"
    MultiVectorEncoder(str(tiny_model_dir), trust_remote_code=True).save(str(source))
    out = tmp_path / "hub-late"
    files = {path for path, _ in assemble_model(source, out, card)}
    assert {"modules.json", "sentence_bert_config.json", "1_Dense/model.safetensors", "handler.py"} <= files, files
    assert not any(path.startswith(("1_Pooling", "onnx/")) for path in files), files
    report = check_model(source, out)
    assert set(report["gaps"]) == {"query", "document", "handler_query", "handler_document"}
    assert max(report["gaps"].values()) <= 1e-5, report


def test_check_fails_when_the_weights_are_not_the_source_weights(tiny_model_dir, hub_model, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(hub_model, changed)
    weights = load_file(changed / "model.safetensors")
    name = next(k for k in weights if "word_embeddings" in k)
    weights[name] = weights[name] + 0.5 * torch.randn_like(weights[name])
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PublishError, match="embeddings differ"):
        check_model(tiny_model_dir, changed)


def test_assembly_refuses_what_it_cannot_publish(tiny_model_dir, card, tmp_path):
    with pytest.raises(PublishError, match=r"No model card: looked for .*missing\.md.*--card PATH"):
        assemble_model(tiny_model_dir, tmp_path / "a", tmp_path / "missing.md")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(PublishError, match=r"no \.safetensors weights"):
        assemble_model(no_weights, tmp_path / "b", card)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PublishError, match=r"was not made by hub\.publish"):
        assemble_model(tiny_model_dir, tmp_path / "mine", card)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# -- the command line: dry run, no token, upload ---------------------------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch):
    """Any HfApi use fails the test; the slow fresh-process check (tested above) is stubbed."""
    monkeypatch.setattr("huggingface_hub.HfApi", mock.Mock(side_effect=AssertionError("the Hub was contacted")))
    monkeypatch.setattr(publish, "check_model", lambda source, folder: {"gaps": {"all": 0.0}})
    monkeypatch.delenv("HF_TOKEN", raising=False)


def test_dry_run_lists_the_files_and_contacts_nothing(no_hub, tiny_model_dir, card, tmp_path, capsys):
    out = tmp_path / "hub-model"
    publish.main(["model", "--model", str(tiny_model_dir), "--card", str(card), "--out", str(out),
                  "--repo-id", "someone/medeir-tiny", "--dry-run"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert "dry run: would create model repository someone/medeir-tiny" in stdout
    assert f"upload the {len(MODEL_FILES)} files above" in stdout
    assert all(name in stdout for name in MODEL_FILES) and MARKER not in stdout


def test_upload_without_a_token_is_refused(no_hub, tiny_model_dir, card, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        publish.main(["model", "--model", str(tiny_model_dir), "--card", str(card), "--out", str(tmp_path / "o"),
                      "--repo-id", "someone/medeir-tiny"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "needs a token: pass --token or set HF_TOKEN" in capsys.readouterr().err


def test_upload_creates_the_repository_and_uploads_the_folder(hub_model, hub_space):
    api = mock.Mock()
    api.create_repo.return_value = "https://huggingface.co/someone/medeir-tiny"
    assert upload(hub_model, "someone/medeir-tiny", "hf_token", api=api) == "https://huggingface.co/someone/medeir-tiny"
    api.create_repo.assert_called_once_with("someone/medeir-tiny", repo_type="model", private=False, exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["folder_path"] == str(hub_model) and kwargs["repo_type"] == "model"
    assert kwargs["ignore_patterns"] == [MARKER]

    api = mock.Mock()
    upload(hub_space, "someone/medeir-demo", "hf_token", repo_type="space", api=api)
    api.create_repo.assert_called_once_with(
        "someone/medeir-demo", repo_type="space", private=False, exist_ok=True, space_sdk="gradio"
    )
    assert api.upload_folder.call_args.kwargs["repo_type"] == "space"


def test_command_line_upload_uses_the_token(tiny_model_dir, card, tmp_path, monkeypatch):
    hf_api = mock.Mock()
    monkeypatch.setattr("huggingface_hub.HfApi", hf_api)
    monkeypatch.setattr(publish, "check_model", lambda source, folder: {"gaps": {"all": 0.0}})
    publish.main(["model", "--model", str(tiny_model_dir), "--card", str(card), "--out", str(tmp_path / "o"),
                  "--repo-id", "someone/medeir-tiny", "--token", "hf_secret", "--private"])  # fmt: skip
    hf_api.assert_called_once_with(token="hf_secret")
    hf_api.return_value.create_repo.assert_called_once_with(
        "someone/medeir-tiny", repo_type="model", private=True, exist_ok=True
    )
    hf_api.return_value.upload_folder.assert_called_once()


# -- the Space ------------------------------------------------------------------------------------------------------
def test_space_folder_front_matter_index_and_reference_tokenizer(hub_space):
    import gradio

    names = {name for name, _ in listing(hub_space)}
    precomputed = {f"space/precomputed/{p.name}" for p in (REPO / "space" / "precomputed").glob("*.npz")}
    assert len(precomputed) == 2 and precomputed <= names  # the model's and MiniLM's index embeddings travel along
    assert names - precomputed == {
        "app.py",
        "requirements.txt",
        "request_checks.py",
        "README.md",
        "index.parquet",
        "space/__init__.py",
        "space/engine.py",
        "space/index.py",
        "space/examples.json",
        "bert-base-uncased/special_tokens_map.json",
        "bert-base-uncased/tokenizer.json",
        "bert-base-uncased/tokenizer_config.json",
        "bert-base-uncased/vocab.txt",
    }
    # the one file of request rules, the same as the model repository's handler imports
    assert (hub_space / "request_checks.py").read_bytes() == (REPO / "request_checks.py").read_bytes()
    meta = front_matter((hub_space / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__ and meta["app_file"] == "app.py"
    assert meta["models"] == [MODEL_ID, COLBERT_ID] and meta["suggested_hardware"] == "zero-a10g"
    index = pq.read_table(hub_space / "index.parquet")
    assert index.column_names == ["code", "source", "text"] and index.num_rows == 70


def test_space_front_matter_names_the_late_interaction_model_after_the_dense_one_only_when_given():
    assert front_matter(space_readme(MODEL_ID, "zero-a10g"))["models"] == [MODEL_ID]
    assert front_matter(space_readme(MODEL_ID, "zero-a10g", COLBERT_ID))["models"] == [MODEL_ID, COLBERT_ID]


def test_published_space_runs_offline_on_its_own_files(hub_space, tiny_model_dir, colbert_dir):
    """A fresh process in the Space folder: plain imports, both models from the front matter, --check passes and
    reranks with the local late-interaction folder standing in for the Hub one."""
    line = check_space(hub_space, MODEL_ID, tiny_model_dir, COLBERT_ID, colbert_dir)
    assert line.startswith("CHECK OK") and "index: 70 entries (40 ICD-10-CM, 20 HPO, 10 Disease)" in line
    assert f"Late-interaction model {colbert_dir.resolve()} (" in line


def test_space_command_passes_the_late_interaction_model_to_the_front_matter_and_the_check(
    no_hub, hub_space, tiny_model_dir, colbert_dir, tmp_path, monkeypatch, capsys
):
    checks = []
    monkeypatch.setattr(publish, "check_space", lambda *args: checks.append(args) or "CHECK OK: stubbed")
    out = tmp_path / "space"
    command = ["space", "--model-repo-id", MODEL_ID, "--index", str(hub_space / "index.parquet"), "--out", str(out),
               "--check-model", str(tiny_model_dir)]  # fmt: skip
    publish.main([*command, "--colbert-repo-id", COLBERT_ID, "--check-colbert", str(colbert_dir)])
    assert checks == [(out, MODEL_ID, tiny_model_dir, COLBERT_ID, colbert_dir)]
    assert front_matter((out / "README.md").read_text())["models"] == [MODEL_ID, COLBERT_ID]
    publish.main(command)
    assert checks[1] == (out, MODEL_ID, tiny_model_dir, None, None)
    assert front_matter((out / "README.md").read_text())["models"] == [MODEL_ID]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        publish.main([*command, "--colbert-repo-id", COLBERT_ID, "--check-colbert", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert f"no local late-interaction model at {tmp_path / 'missing'}" in capsys.readouterr().err
    with pytest.raises(PublishError, match="needs its repository id and a local folder"):
        check_space(out, MODEL_ID, tiny_model_dir, COLBERT_ID)


def test_space_hardware_must_be_a_gpu(tmp_path):
    with pytest.raises(PublishError, match="not a GPU flavour"):
        assemble_space("someone/medeir-test", tmp_path / "s", index=tmp_path / "unused", hardware="cpu-basic")


def test_the_card_gets_the_report_results_as_model_index_metadata(tiny_model_dir, card, tmp_path):
    from huggingface_hub import ModelCard

    from evaluation.model_index import model_index

    report_file = REPO / "results" / "evaluation" / "medeir-small" / "report.json"
    report = yaml.safe_load(report_file.read_text())  # JSON is YAML
    out = tmp_path / "with-results"
    assemble_model(tiny_model_dir, out, card, report=report_file, report_model="MedEIR-small")
    published = ModelCard.load(out / "README.md")
    expected = model_index(report, next(m for m in report["models"] if m["name"] == "MedEIR-small"))
    assert published.data.to_dict()["model-index"] == expected["model-index"]
    assert published.data.library_name == "sentence-transformers" and "# MedEIR tiny (test)" in published.text
    with pytest.raises(PublishError, match=r"--report-model 'nope' is not in .*MedEIR-small"):
        assemble_model(tiny_model_dir, tmp_path / "x", card, report=report_file, report_model="nope")
