"""The shapes every source parser hands to the build: corpus texts, contrastive pairs, words, and its totals."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Text:
    """One corpus record. `group` decides its split (an ICD category, an HPO term, a synset...)."""

    text: str
    group: str
    domain: str


@dataclass(frozen=True)
class Pair:
    """One (anchor, positive) pair with hard-negative candidates as (text, group); the build keeps only candidates
    from the anchor's own split that are not a positive of the anchor."""

    anchor: str
    positive: str
    kind: str
    group: str
    domain: str
    cardiology: bool = False
    negatives: tuple[tuple[str, str], ...] = ()


@dataclass
class SourceData:
    """What one source contributes: corpus texts, pairs, a word list, and how many entities it parsed."""

    texts: list[Text] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    records: int = 0
    licence_note: str = ""
    words: list[str] = field(default_factory=list)  # words for the word list (never training text)
