"""MedEIRConfig validation: every value that would otherwise fail later (or silently give NaN) is refused at
construction, naming the field."""

import math

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError

from configuration_medeir import MedEIRConfig

from .conftest import tiny_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"num_attention_heads": -6}, "num_attention_heads must be a positive integer"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"intermediate_size": 0}, "intermediate_size must be a positive integer"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"num_attention_heads": 5}, r"hidden_size \(48\) must be a multiple of num_attention_heads \(5\)"),
        ({"hidden_act": "bogus"}, "hidden_act 'bogus' is not an activation transformers knows"),
        ({"layer_norm_eps": -1.0}, "layer_norm_eps must be a small positive number, got -1.0"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be a small positive number"),
        ({"layer_norm_eps": math.nan}, "layer_norm_eps must be a small positive number, got nan"),
        ({"hidden_dropout_prob": 1.0}, r"hidden_dropout_prob must be in \[0, 1\)"),
        ({"attention_probs_dropout_prob": -0.1}, r"attention_probs_dropout_prob must be in \[0, 1\)"),
        ({"classifier_dropout": 2.0}, r"classifier_dropout must be in \[0, 1\)"),
        ({"initializer_range": -0.02}, "initializer_range must be 0 or more"),
        ({"type_vocab_size": -1}, "type_vocab_size must be 0 or more"),
        ({"pad_token_id": 1000}, r"pad_token_id must be a token id in \[0, 1000\), got 1000"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be positive"),
        ({"alibi_slopes": [0.5] * 5}, "alibi_slopes must hold one slope per attention head: 6 values, got 5"),
        ({"alibi_slopes": [0.5] * 7}, "alibi_slopes must hold one slope per attention head: 6 values, got 7"),
        ({"alibi_slopes": [0.5] * 5 + [-0.1]}, r"alibi_slopes must be finite and 0 or more .* got -0.1 for head 5"),
        ({"alibi_slopes": [math.nan] + [0.5] * 5}, r"alibi_slopes must be finite and 0 or more .* got nan for head 0"),
        ({"alibi_slopes": [0.5, math.inf] + [0.5] * 4}, r"alibi_slopes must be finite and 0 or more .* got inf"),
    ],
)
def test_a_bad_config_value_is_a_clear_error(overrides, message):
    # @strict wraps the validator's ValueError; its message carries ours
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_config(**overrides)


def test_every_preset_and_the_shipped_config_are_valid():
    from .conftest import REPO

    for path in [*sorted((REPO / "presets").glob("*.json")), REPO / "models" / "medeir-small" / "config.json"]:
        MedEIRConfig.from_json_file(path).validate()


def test_a_config_without_padding_token_or_token_types_is_valid():
    assert tiny_config(pad_token_id=None, type_vocab_size=0, classifier_dropout=None).pad_token_id is None


def test_alibi_slopes_of_zero_or_more_are_valid_and_saved_exactly(tmp_path):
    """None (the default) is the standard sequence; explicit slopes, 0 included (a head without position bias), come
    back from config.json bit for bit."""
    assert tiny_config().alibi_slopes is None
    slopes = [0.0, 1e-3, 0.7, 1 / 3, 0.015625 * 0.05, 2.0]
    tiny_config(alibi_slopes=slopes).save_pretrained(tmp_path)
    assert MedEIRConfig.from_pretrained(tmp_path).alibi_slopes == slopes
    assert tiny_config(alibi_slopes=[0.0] * 6).alibi_slopes == [0.0] * 6
