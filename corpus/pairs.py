"""Training pair rows (hard-negative selection) and the related / unrelated test pairs.

A negative is kept only if it comes from the anchor's own split and is not, after normalisation, the anchor, the
positive, or any positive the same anchor has anywhere in the data (in any kind): never a true positive as a negative.
"""

import random
import re
from collections.abc import Iterable

from corpus.records import Pair
from corpus.split import split_of
from corpus.text import normalize

MAX_NEGATIVES = 3
TEST_RELATED_PER_KIND = 300
TEST_CARDIOLOGY_PER_KIND = 100


def positives_by_anchor(pairs: Iterable[Pair]) -> dict[str, set[str]]:
    """Normalised anchor -> every normalised positive it is paired with."""
    out: dict[str, set[str]] = {}
    for p in pairs:
        out.setdefault(normalize(p.anchor), set()).add(normalize(p.positive))
    return out


def choose_negatives(pair: Pair, split: str, positives: set[str], banned: set[str]) -> list[str]:
    """Up to MAX_NEGATIVES candidates, in the order the source ranked them, that are safe to use."""
    out, seen = [], {normalize(pair.anchor), normalize(pair.positive)} | positives
    for text, group in pair.negatives:
        key = normalize(text)
        if key in seen or key in banned or split_of(group) != split:
            continue
        seen.add(key)
        out.append(text)
        if len(out) == MAX_NEGATIVES:
            break
    return out


def row(pair: Pair, negatives: list[str]) -> dict:
    """A row of data/pairs/*.parquet."""
    return {
        "anchor": pair.anchor,
        "positive": pair.positive,
        "negatives": negatives,
        "kind": pair.kind,
        "source": pair.group.split(":", 1)[0],
        "domain": pair.domain,
        "group": pair.group,
        "cardiology": pair.cardiology,
    }


def test_rows(test_pairs: list[Pair], positives: dict[str, set[str]], seed: int = 0) -> list[dict]:
    """Related pairs sampled per kind from test groups (cardiology topped up), each matched by an unrelated pair: the
    same anchor with the positive of another test group of the same kind."""
    by_kind: dict[str, list[Pair]] = {}
    for p in test_pairs:
        by_kind.setdefault(p.kind, []).append(p)
    rows = []
    for kind in sorted(by_kind):
        pool = by_kind[kind]
        rng = random.Random(f"pairs_test:{seed}:{kind}")
        chosen = rng.sample(pool, min(TEST_RELATED_PER_KIND, len(pool)))
        cardio = [p for p in pool if p.cardiology and p not in chosen]
        need = max(0, TEST_CARDIOLOGY_PER_KIND - sum(p.cardiology for p in chosen))
        chosen += rng.sample(cardio, min(need, len(cardio)))
        for p in chosen:
            rows.append(_test_row(p.anchor, p.positive, 1.0, p))
            for _ in range(20):
                other = pool[rng.randrange(len(pool))]
                key = normalize(other.positive)
                related = positives.get(normalize(p.anchor), set()) | {normalize(p.anchor)}
                if other.group != p.group and key not in related:
                    rows.append(_test_row(p.anchor, other.positive, 0.0, p))
                    break
    return rows


def _test_row(text1: str, text2: str, label: float, pair: Pair) -> dict:
    return {
        "text1": text1,
        "text2": text2,
        "label": label,
        "kind": pair.kind,
        "domain": pair.domain,
        "cardiology": pair.cardiology,
    }


# --- cleaning: rows that teach nothing or teach the wrong thing ---------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "or",
        "and",
        "to",
        "in",
        "with",
        "by",
        "for",
        "is",
        "as",
        "on",
        "at",
        "that",
        "which",
        "be",
        "from",
        "its",
        "it",
    ]
)
DEFINITION_KINDS = ("hpo_term_definition", "go_name_definition", "wordnet_lemma_gloss", "gcide_headword_definition")
OBSOLETE_MARK = "[Obs.]"  # GCIDE's mark of an obsolete sense


# a definition kind written the other way round: the definition as the query, the name it defines as the positive
REVERSED_KINDS = {
    "hpo_term_definition": "hpo_definition_term",
    "go_name_definition": "go_definition_name",
    "wordnet_lemma_gloss": "wordnet_gloss_lemma",
    "gcide_headword_definition": "gcide_definition_headword",
}


def reversed_definitions(all_pairs: Iterable[Pair], kinds: Iterable[str]) -> list[Pair]:
    """The pairs of these definition kinds written the other way round (REVERSED_KINDS): definition -> the name it
    defines, the form of a search in running prose for a term. One pair per definition (the first name, as the source
    lists them: WordNet's head lemma); hard negatives are the names of the groups the forward pair's negative
    definitions come from (its siblings), in the same order."""
    kinds = set(kinds)
    unknown = kinds - set(REVERSED_KINDS)
    if unknown:
        raise ValueError(f"not a definition kind: {sorted(unknown)}; known: {sorted(REVERSED_KINDS)}")
    forward = [p for p in all_pairs if p.kind in kinds]
    name_of: dict[tuple[str, str], str] = {}
    for p in forward:
        name_of.setdefault((p.kind, p.group), p.anchor)
    out, seen = [], set()
    for p in forward:
        key = (p.kind, normalize(p.positive))
        if key in seen:
            continue
        seen.add(key)
        negatives = tuple((name_of[(p.kind, g)], g) for _, g in p.negatives if (p.kind, g) in name_of)
        out.append(Pair(p.positive, p.anchor, REVERSED_KINDS[p.kind], p.group, p.domain, p.cardiology, negatives))
    return out


def content_words(text: str) -> frozenset[str]:
    """Lower-cased words and numbers without function words ("Abnormality of the liver" -> abnormality, liver)."""
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in _STOP)


def defect(pair: Pair) -> str | None:
    """Why a pair is dropped, or None to keep it:
    - `empty`: the anchor or the positive has no letter;
    - `repeats_anchor`: the positive has the anchor's content words and no other (punctuation, case, hyphens, order
      or function words apart: "[acyl-carrier protein] ..." -> "[acyl-carrier-protein] ...");
    - `restates_name`: a definition whose content words all occur in the name it defines;
    - `obsolete`: a definition of a sense its dictionary marks obsolete."""
    if not any(c.isalpha() for c in pair.anchor) or not any(c.isalpha() for c in pair.positive):
        return "empty"
    anchor, positive = content_words(pair.anchor), content_words(pair.positive)
    if anchor == positive:
        return "repeats_anchor"
    if pair.kind in DEFINITION_KINDS:
        if positive <= anchor:
            return "restates_name"
        if OBSOLETE_MARK in pair.positive:
            return "obsolete"
    return None
