"""The request rules the Endpoint handler and the Space demo share: one set of limits read one way, the same
visible-text and Unicode rules, thread-safe token counts."""

import threading

import pytest

import request_checks
from request_checks import (
    DEMO_LIMITS,
    HANDLER_LIMITS,
    TokenCounter,
    has_visible_text,
    lone_surrogate,
    read_limits,
)


def test_the_handler_and_the_demo_apply_the_same_rules():
    from hub import handler
    from space import engine

    for name in ("read_limits", "has_visible_text", "lone_surrogate", "TokenCounter"):
        assert getattr(handler, name) is getattr(request_checks, name) is getattr(engine, name), name
    assert handler.LIMITS is HANDLER_LIMITS and engine.LIMITS is DEMO_LIMITS
    assert HANDLER_LIMITS["MEDEIR_MAX_CHARS"] == DEMO_LIMITS["MEDEIR_MAX_CHARS"] == 100_000


@pytest.mark.parametrize("limits", [HANDLER_LIMITS, DEMO_LIMITS], ids=["handler", "demo"])
def test_unset_or_blank_is_the_default_and_a_positive_integer_is_taken(limits):
    assert read_limits(limits, {}) == limits
    assert read_limits(limits, dict.fromkeys(limits, "  ")) == limits
    assert read_limits(limits, dict.fromkeys(limits, " 1_000 ")) == dict.fromkeys(limits, 1000)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "2.5", "1e3"])
@pytest.mark.parametrize("name", sorted(HANDLER_LIMITS.keys() | DEMO_LIMITS.keys()))
def test_anything_else_is_refused_naming_the_variable(name, value):
    limits = HANDLER_LIMITS if name in HANDLER_LIMITS else DEMO_LIMITS
    with pytest.raises(
        ValueError, match=rf"{name}='{value}' is not a positive integer \(default .+\); fix the setting"
    ):
        read_limits(limits, {name: value})


def test_visible_text_and_lone_surrogates():
    assert has_visible_text("fever") and has_visible_text("?") and has_visible_text("€")
    assert not any(map(has_visible_text, ["", "  \n\t", "\x00\x00", "\u200b\ufeff", "\x07\x1b\u0301 \u2060"]))
    assert lone_surrogate("fever") is None and lone_surrogate("café") is None
    assert lone_surrogate("bad \ud800 text") == 4


def test_token_counts_are_the_tokenizers_untruncated_and_do_not_race(minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.model_max_length = 16
    texts = ["fever", "word " * 40, "acute myocardial infarction"]
    expected = [len(tokenizer(t, add_special_tokens=True, verbose=False)["input_ids"]) for t in texts]
    assert expected[1] == 42
    count = TokenCounter(tokenizer)
    assert count(texts) == expected
    # every encode call reconfigures the model's own tokenizer: the counts must not follow it
    tokenizer.backend_tokenizer.enable_truncation(8)
    tokenizer.backend_tokenizer.enable_padding(length=64)
    assert count(texts) == expected  # a private copy: neither truncated nor padded
    results = [None] * 8

    def run(i: int) -> None:
        results[i] = count(texts)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 8
