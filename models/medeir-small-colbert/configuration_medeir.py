"""MedEIR configuration: a BERT-shaped encoder with ALiBi position biases and no position embeddings.

Data and validation only: every setting is a declared, validated field. Whether a tokenizer belongs to the model is
checked against these fields here (`check_tokenizer`, `check_vocabulary`); finding the tokenizer files beside the
weights is the loaders' job (`modeling_medeir.check_tokenizer_matches`).

This file is Hub remote code: it imports only torch and transformers at top level and stays self-contained.
"""

import math
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
# The default tolerance of exact windowed ALiBi (`alibi_window_tau`): 2 exp(-20) = 4e-9, below fp32 rounding.
ALIBI_WINDOW_TAU = 20.0


@strict
class MedEIRConfig(PreTrainedConfig):
    r"""Configuration of a MedEIR encoder.

    Field names follow BERT so that BERT-family checkpoints (all-MiniLM-L6-v2) map onto MedEIR one to one.
    There are no position embeddings: attention adds the symmetric ALiBi bias `-slope_h * |i - j|`, so
    `max_position_embeddings` is the advertised context (8,192 tokens) and allocates nothing; longer inputs
    run and log a warning.

    alibi_slopes:
        One slope per attention head, part of the model like its weights (a model trained with some slopes only
        works with those). None (the default, and every model saved before the field existed) means the standard
        geometric sequence of Press et al. (`modeling_medeir.alibi_slopes`). Each slope must be finite and 0 or
        more: 0 gives that head no position bias at all (it attends to every key alike; all zeros leave the model
        no word-order information). Negative slopes, which would favour distant tokens, are refused.

    alibi_window_tau:
        Exact windowed ALiBi on long sequences (`modeling_medeir.alibi_windows`): a head skips the keys proven to
        carry less than exp(-tau) of any query's attention mass in this forward, so the output differs from full
        attention by at most 2 exp(-tau) max|v| (at the default 20, 4e-9 of |v|). A positive number; None attends to
        every key. A run-time setting, not part of the weights: models saved before the field existed get the default.

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
    alibi_slopes: list[float] | None = None
    alibi_window_tau: float | int | None = ALIBI_WINDOW_TAU  # an int (30) is taken as it always was

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Entries already present (a Hub copy rewrites them as "repo--module.Class") take precedence.
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    def validate_medeir(self) -> None:
        """Part of `@strict` validation: every value a module or kernel would otherwise trip over later, named here."""
        from transformers.activations import ACT2FN

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_position_embeddings < 1:
            raise ValueError("max_position_embeddings must be positive")
        if self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be 0 or more, got {self.type_vocab_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})"
            )
        if self.feed_forward_type not in ("mlp", "glu"):
            raise ValueError(f"feed_forward_type must be 'mlp' or 'glu', got {self.feed_forward_type!r}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not an activation transformers knows: {sorted(ACT2FN)}"
            )
        # `not (a < x)` rather than `x <= a`, so that NaN is refused too
        if not (0 < self.layer_norm_eps < 1):
            raise ValueError(f"layer_norm_eps must be a small positive number, got {self.layer_norm_eps}")
        if not (0 <= self.initializer_range < math.inf):
            raise ValueError(f"initializer_range must be 0 or more, got {self.initializer_range}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < 1):
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.pad_token_id is not None and not (0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"pad_token_id must be a token id in [0, {self.vocab_size}), got {self.pad_token_id}")

    def validate_alibi_slopes(self) -> None:
        """Part of `@strict` validation, and checked again by the model whenever the slopes change (a config edited
        on a live model is not re-validated by `@strict`)."""
        slopes = self.alibi_slopes
        if slopes is None:
            return
        if len(slopes) != self.num_attention_heads:
            raise ValueError(
                f"alibi_slopes must hold one slope per attention head: {self.num_attention_heads} values, got "
                f"{len(slopes)}"
            )
        # `not (0 <= x < inf)` rather than `x < 0 or ...`, so that NaN is refused too
        bad = [(head, slope) for head, slope in enumerate(slopes) if not (0 <= slope < math.inf)]
        if bad:
            head, slope = bad[0]
            raise ValueError(
                f"alibi_slopes must be finite and 0 or more (0: no position bias for that head), got {slope} for "
                f"head {head}"
            )

    def validate_alibi_window_tau(self) -> None:
        """Part of `@strict` validation, and checked again by the model at every forward (the setting is meant to be
        changed on a live model, where `@strict` does not re-validate)."""
        tau = self.alibi_window_tau
        if tau is not None and not (0 < tau < math.inf):  # NaN refused too
            raise ValueError(f"alibi_window_tau must be a positive number (None: full attention), got {tau}")

    # -- the tokenizer that goes with this config ---------------------------------------------------------------
    def check_tokenizer(self, tokenizer, where: str = "the tokenizer") -> None:
        """Raise ValueError unless `tokenizer` (a loaded transformers tokenizer) fits this config: its size and [PAD].

        The loaders call it through `modeling_medeir.check_tokenizer_matches`, which also reads tokenizer files.
        """
        pad = tokenizer.pad_token_id if tokenizer.pad_token is not None else None
        self.check_vocabulary(len(tokenizer), pad, tokenizer.pad_token, where)

    def check_vocabulary(self, size: int, pad_id: int | None, pad_token: str | None, where: str) -> None:
        """Raise ValueError unless a vocabulary of `size` tokens whose padding token `pad_token` has id `pad_id` is the
        one this model was trained with; `where` names it in the message."""
        if size != self.vocab_size:
            raise ValueError(
                f"{where} has {size:,} tokens but the model's vocab_size is {self.vocab_size:,}: it is not the "
                "tokenizer this model was trained with (a missing tokenizer.json, or another model's tokenizer), and "
                "its embeddings would be wrong. Load the model's own tokenizer."
            )
        if self.pad_token_id is not None and pad_token is not None and pad_id != self.pad_token_id:
            raise ValueError(
                f"{where}: its padding token {pad_token!r} has id {pad_id} but the model's pad_token_id is "
                f"{self.pad_token_id}: it is not the tokenizer this model was trained with."
            )


MedEIRConfig.register_for_auto_class()

__all__ = ["MedEIRConfig"]
