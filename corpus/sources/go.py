"""Gene Ontology (GO.sqlite in Debian's r-bioc-go.db): term names, definitions, synonyms and is_a parents.

Pairs: synonym -> name and name -> definition, with is_a siblings as hard negatives. The group is the GO id.
"""

import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from corpus.fetch import Package
from corpus.records import Pair, SourceData, Text
from corpus.text import clean, join_sentences, normalize

PACKAGE = Package(
    registry="debian",
    name="r-bioc-go.db",
    version="3.16.0-1",
    files=("usr/lib/R/site-library/GO.db/extdata/GO.sqlite",),
    licence_file="usr/share/doc/r-bioc-go.db/copyright",
)
DATA_LICENCE = "GO data: CC BY 4.0 (Gene Ontology Consortium); GO.db package: Artistic-2.0"


@dataclass
class GoTerm:
    id: str
    name: str
    ontology: str  # BP, MF, CC
    definition: str
    synonyms: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)


@dataclass
class Go:
    version: str
    terms: dict[str, GoTerm]


def parse(path: Path) -> Go:
    """Read terms, text synonyms (rows that are merely obsolete GO ids are dropped) and is_a parents."""
    con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        meta = dict(con.execute("SELECT name, value FROM metadata").fetchall())
        by_row: dict[int, GoTerm] = {}
        for row, go_id, name, ontology, definition in con.execute(
            "SELECT _id, go_id, term, ontology, definition FROM go_term ORDER BY go_id"
        ):
            if ontology in ("BP", "MF", "CC"):  # skips the 'all' root row
                by_row[row] = GoTerm(go_id, clean(name), ontology, clean(definition or ""))
        for row, synonym in con.execute(
            "SELECT _id, synonym FROM go_synonym WHERE like_go_id = 0 ORDER BY _id, synonym"
        ):
            if row in by_row:
                by_row[row].synonyms.append(clean(synonym))
        for table in ("go_bp_parents", "go_mf_parents", "go_cc_parents"):
            for row, parent in con.execute(
                f"SELECT _id, _parent_id FROM {table} WHERE relationship_type = 'isa' ORDER BY _id, _parent_id"
            ):
                if row in by_row and parent in by_row:
                    by_row[row].parents.append(by_row[parent].id)
    finally:
        con.close()
    terms = {t.id: t for t in sorted(by_row.values(), key=lambda t: t.id)}
    return Go(meta.get("GOSOURCEDATE", ""), terms)


def group_of(go_id: str) -> str:
    return f"go:{go_id}"


def extract(go: Go) -> SourceData:
    """Corpus texts (one per term) and the two GO pair kinds."""
    data = SourceData(records=len(go.terms), licence_note=DATA_LICENCE)
    kids: dict[str, list[str]] = {}
    for term in go.terms.values():
        for p in term.parents:
            kids.setdefault(p, []).append(term.id)
    for gid, term in go.terms.items():
        group = group_of(gid)
        synonyms = [s for s in dict.fromkeys(term.synonyms) if normalize(s) != normalize(term.name)]
        data.texts.append(Text(join_sentences(term.name, "; ".join(synonyms), term.definition), group, "medical"))
        rng = random.Random(f"go:{gid}")
        sibs = sorted({s for p in term.parents for s in kids.get(p, []) if s != gid})
        sibs = rng.sample(sibs, min(10, len(sibs)))
        name_negs = tuple((go.terms[s].name, group_of(s)) for s in sibs)
        for syn in synonyms:
            data.pairs.append(Pair(syn, term.name, "go_synonym_name", group, "medical", False, name_negs))
        if term.definition:
            def_negs = tuple((go.terms[s].definition, group_of(s)) for s in sibs if go.terms[s].definition)
            data.pairs.append(Pair(term.name, term.definition, "go_name_definition", group, "medical", False, def_negs))
    return data
