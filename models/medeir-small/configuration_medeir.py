"""MedEIR configuration: a BERT-shaped encoder with ALiBi position biases and no position embeddings.

This file is Hub remote code: it imports only torch and transformers at top level and stays self-contained.
"""

from typing import Literal

# `strict` is huggingface_hub's dataclass validator, re-exported by transformers (BertConfig uses the same one).
from transformers.configuration_utils import PreTrainedConfig, strict

# Every class a saved MedEIR folder loads through with trust_remote_code=True, whichever class saved it.
AUTO_MAP = {
    "AutoConfig": "configuration_medeir.MedEIRConfig",
    "AutoModel": "modeling_medeir.MedEIRModel",
    "AutoModelForMaskedLM": "modeling_medeir.MedEIRForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_medeir.MedEIRForSequenceClassification",
}


@strict
class MedEIRConfig(PreTrainedConfig):
    r"""Configuration of a MedEIR encoder.

    Field names follow BERT so that BERT-family checkpoints (all-MiniLM-L6-v2) map onto MedEIR one to one.
    There are no position embeddings: attention adds the symmetric ALiBi bias `-slope_h * |i - j|`, so
    `max_position_embeddings` is the advertised context (8,192 tokens) and allocates nothing; longer inputs
    run and log a warning.

    feed_forward_type:
        `"mlp"`: BERT/MiniLM's Linear -> GELU -> Linear (so a MiniLM checkpoint converts weight for weight);
        `"glu"`: the gated feed-forward of Jina v2 (`act(gate) * up`, then down), `intermediate_size` wide.

    Example:
    ```python
    >>> from configuration_medeir import MedEIRConfig
    >>> MedEIRConfig.from_json_file("presets/small.json").num_hidden_layers
    6
    ```
    """

    model_type = "medeir"

    vocab_size: int = 52543
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    feed_forward_type: Literal["mlp", "glu"] = "mlp"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.0
    type_vocab_size: int = 2
    pad_token_id: int | None = 0
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Entries already present (a Hub copy rewrites them as "repo--module.Class") take precedence.
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    def validate_medeir(self) -> None:
        """Part of `@strict` validation: shapes every attention kernel needs."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})"
            )
        if self.feed_forward_type not in ("mlp", "glu"):
            raise ValueError(f"feed_forward_type must be 'mlp' or 'glu', got {self.feed_forward_type!r}")
        if self.max_position_embeddings < 1:
            raise ValueError("max_position_embeddings must be positive")


MedEIRConfig.register_for_auto_class()

__all__ = ["MedEIRConfig"]
