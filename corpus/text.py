"""Text helpers shared by every parser, the holdout check and the benchmarks, so that all of them agree on what
"the same string" means."""

import re

_SPACE = re.compile(r"\s+")
_END = (".", "!", "?", ":", ";")


def clean(text: str) -> str:
    """Collapse runs of whitespace (sources wrap lines) and strip the ends."""
    return _SPACE.sub(" ", text).strip()


def normalize(text: str) -> str:
    """The contract's comparison key: lower-cased, whitespace collapsed."""
    return _SPACE.sub(" ", text.lower()).strip()


def join_sentences(*parts: str) -> str:
    """Join non-empty parts as sentences ("name. definition"), adding a full stop only where one is missing."""
    out: list[str] = []
    for part in parts:
        part = clean(part)
        if not part:
            continue
        if out and not out[-1].endswith(_END):
            out[-1] += "."
        out.append(part)
    return " ".join(out)


def word_count(text: str) -> int:
    """Whitespace words: the unit the manifest and data-sources.md count in."""
    return len(text.split())
