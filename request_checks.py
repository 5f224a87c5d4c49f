"""What the Endpoint handler and the Space demo check in every request, in the one file both ship.

hub.publish copies this file beside handler.py into the model repository and beside app.py into the Space, so the
two refuse the same inputs under the same rules:

- limits are environment variables a deployer sets: unset or blank is the default; anything else must be a positive
  integer (`100_000` reads as 100000), or `read_limits` raises ValueError naming the variable, which stops the replica
  or the demo at start-up;
- a text must have something the tokenizer keeps (`has_visible_text`) and be valid Unicode (`lone_surrogate`);
- token counts come from `TokenCounter`, which is safe from any request thread.
"""

import copy
import os
import threading
import unicodedata
from collections.abc import Mapping

MAX_CHARS = 100_000  # characters per text, refused before tokenizing (8,192 tokens of medical prose are ~35,000)

# The Endpoint handler's limits: environment variable -> default. Checked before any tokenizing, cheapest first, so
# an oversized request is refused in milliseconds and bounded memory.
HANDLER_LIMITS: dict[str, int | None] = {
    "MEDEIR_MAX_BATCH": 64,  # texts per request
    "MEDEIR_MAX_CHARS": MAX_CHARS,
    "MEDEIR_MAX_TOTAL_CHARS": 1_000_000,  # characters per request
    "MEDEIR_MAX_TOTAL_TOKENS": 131_072,  # tokens per request, prompts included
    "MEDEIR_MAX_BATCH_TOKENS": 16_384,  # padded tokens per forward pass: bounds peak memory, not what is accepted
    # token vectors per multi-vector response (two 8,192-token documents): bounds the response, ~2.1M numbers at 128
    # dimensions, whatever the token limits allow
    "MEDEIR_MAX_TOTAL_VECTORS": 16_384,
}
# The demo's limits. None: no fixed default, the demo chooses at start-up.
DEMO_LIMITS: dict[str, int | None] = {
    "MEDEIR_MAX_CHARS": MAX_CHARS,
    "MEDEIR_BATCH_SIZE": None,  # encoding batch size; unset: 256 on a GPU, 32 on a CPU
}


def read_limits(limits: Mapping[str, int | None], environ: Mapping[str, str] = os.environ) -> dict[str, int | None]:
    """The value of every limit in `limits` (name -> default): unset or blank gives the default; a value that is not
    a positive integer raises ValueError naming the variable, so a bad setting fails before anything loads."""
    values = {}
    for name, default in limits.items():
        raw = (environ.get(name) or "").strip()
        if not raw:
            values[name] = default
            continue
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            value = 0
        if value < 1:
            usual = f"{default:,}" if default is not None else "chosen at start-up"
            raise ValueError(f"{name}={raw!r} is not a positive integer (default {usual}); fix the setting.")
        values[name] = value
    return values


def has_visible_text(text: str) -> bool:
    """True if `text` has a letter, digit, punctuation mark or symbol: whitespace, control and formatting characters
    (NUL, zero-width spaces, BOMs) and lone combining marks are dropped by the tokenizer's normaliser."""
    return any(unicodedata.category(char)[0] in "LNPS" for char in text)


def lone_surrogate(text: str) -> int | None:
    """Position of the first lone UTF-16 surrogate (which no tokenizer can encode), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


class TokenCounter:
    """Tokens the model reads per text ([CLS] and [SEP] included, never truncated unless `max_length` is given); safe
    from any thread.

    Counts come from a private copy of the fast tokenizer that never pads (and truncates only at `max_length`, as the
    model's tokenizer does when it encodes with that limit). The model's own tokenizer is reconfigured (padding,
    truncation) by every encode call: counting with it from several request threads at once flipped its state under a
    concurrent encode. A slow (Python) tokenizer has no such copy and is called under a lock.
    """

    def __init__(self, tokenizer, fast=None, max_length: int | None = None):
        """`tokenizer`: the model's; `fast`: the `tokenizers` object to copy, if not the tokenizer's own backend;
        `max_length`: cut every text to this many tokens (special tokens included) on the tokenizer's truncation side."""
        fast = fast if fast is not None else getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer = tokenizer
        self._max_length = max_length
        self._fast = copy.deepcopy(fast) if fast is not None else None
        if self._fast is not None:
            self._fast.no_padding()
            if max_length is None:
                self._fast.no_truncation()
            else:
                self._fast.enable_truncation(max_length, direction=getattr(tokenizer, "truncation_side", "right"))
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.ids(texts)]

    def ids(self, texts: list[str]) -> list[list[int]]:
        """The token ids the model reads per text, special tokens included."""
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=True)]
        cut = {"truncation": True, "max_length": self._max_length} if self._max_length else {"truncation": False}
        with self._lock:
            encoded = self._tokenizer(texts, add_special_tokens=True, padding=False, verbose=False, **cut)
        return [list(ids) for ids in encoded["input_ids"]]
