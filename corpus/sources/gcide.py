"""GCIDE, the Collaborative International Dictionary of English (Debian's dict-gcide, dictd format).

Each entry is a headword line (`Word \\Pro*nun"ci*a`tion\\, n. [etymology]`) followed by numbered senses, quotations
and source tags. Kept: the sense definitions of Webster-derived senses. Dropped: pronunciation, etymology,
quotations, sub-entries, and senses tagged [WordNet ...] (WordNet is its own source here, and its held-out glosses
must not come back through GCIDE). Senses tagged (Med.), (Anat.), (Physiol.), (Pathol.), (Surg.) or (Pharm.) are
tagged medical.
"""

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

from corpus.fetch import Package
from corpus.records import Pair, SourceData, Text
from corpus.text import clean, join_sentences, normalize

PACKAGE = Package(
    registry="debian",
    name="dict-gcide",
    version="0.48.5+nmu2",
    files=("usr/share/dictd/gcide.dict.dz", "usr/share/dictd/gcide.index"),
    licence_file="usr/share/doc/dict-gcide/copyright",
)
DATA_LICENCE = "GCIDE: GPL-2+ (derived from Webster's Revised Unabridged Dictionary, 1913)"
MEDICAL_TAGS = {"Med", "Anat", "Physiol", "Pathol", "Surg", "Pharm"}
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_SOURCE_TAG = re.compile(r"\[(?:[^\[\]]*(?:Webster|WordNet|PJC|Century|RDH|AS\b)[^\[\]]*)\]")
_POS = re.compile(r"^(?:(?:n|v|a|adv|prep|prop|conj|interj|pron|p|pr|imp|i|t|pl|sing|superl|compar|adj|vb)\.[ ,&]*)+")
_DOMAIN = re.compile(r"^\(((?:[A-Z][a-z]*\.?\s*(?:&|and|,)?\s*)+)\)\s*")
_SENSE_NO = re.compile(r"^(?:\d+\.|\([a-z]\))\s*")
_HEAD_FORM = re.compile(r"^[^\\.;]{0,60}\\[^\\]*\\,?\s*")
_ATTRIBUTION = re.compile(r"\s--[A-Z][^\n]*$")


@dataclass
class Sense:
    headword: str
    text: str
    medical: bool


@dataclass
class Gcide:
    entries: int
    senses: list[Sense]


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def _strip_brackets(s: str) -> str:
    """Drop a leading [...] (etymology), balanced, which may span several source lines; short ligature markup such
    as "[AE]olian" is text, not a bracket group."""
    if not s.startswith("[") or re.match(r"^\[[A-Za-z]{1,2}\]", s):
        return s
    depth = 0
    for i, c in enumerate(s):
        depth += (c == "[") - (c == "]")
        if depth == 0:
            return s[i + 1 :]
    return ""


def _domain(s: str) -> tuple[str, set[str]]:
    tags: set[str] = set()
    while m := _DOMAIN.match(s):
        tags |= {t.strip(" .") for t in re.split(r"&|and|,", m.group(1))}
        s = s[m.end() :]
    return s, tags


def _strip_header(s: str) -> str:
    """Remove `Headword \\pron\\, pos. [etym]` (and a parenthesised pronunciation) from an entry's first paragraph."""
    while m := _HEAD_FORM.match(s):  # "Brahmanic \\Brah*man"ic\\, Brahminic \\...\\, a." lists several forms
        s = s[m.end() :]
    for _ in range(6):
        before = s
        s = s.lstrip(" ,;")
        if s.startswith("(") and not _DOMAIN.match(s):
            close = s.find(")")
            s = s[close + 1 :] if close >= 0 else ""
        s = _POS.sub("", s)
        s = _strip_brackets(s.lstrip(" ,;"))
        if s == before:
            break
    return s


def _paragraphs(entry: str) -> list[tuple[str, str]]:
    """(text, source tag) per blank-line-separated paragraph, quotations (deeply indented) left out."""
    out = []
    for para in re.split(r"\n\s*\n", entry):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or len(lines[0]) - len(lines[0].lstrip()) >= 8:
            continue
        text = "\n".join(lines)
        tags = _SOURCE_TAG.findall(text)
        text = _SOURCE_TAG.split(text)[0]  # anything after the source tag belongs to the next index entry
        out.append((text, tags[-1] if tags else ""))
    return out


def parse_entry(entry: str) -> list[Sense]:
    """The Webster-derived sense definitions of one dictd entry."""
    first = entry.split("\n", 1)[0]
    headword = clean(first.split("\\", 1)[0]) if "\\" in first else ""
    if not headword:
        return []
    senses = []
    header_tags: set[str] = set()
    for i, (para, tag) in enumerate(_paragraphs(entry)):
        if "WordNet" in tag and "Webster" not in tag:
            continue
        text = clean(para)
        if i == 0 or text.startswith("\\"):  # a few entries break their header across a blank line
            text = _strip_header(text)
            text, header_tags = _domain(text)
        if text.startswith(("{", "Syn", "Note", "Usage", "--")):
            continue
        text = _SENSE_NO.sub("", text)
        text, tags = _domain(text)  # "(Her.) [F. abaiss['e].] Borne lower ...": domain tag, then etymology
        text, more = _domain(_strip_brackets(text).lstrip())
        tags |= more
        text = _SENSE_NO.sub("", text)
        text = _ATTRIBUTION.sub("", text)
        text = clean(text.replace("{", "").replace("}", "").replace("\ufffd", ""))
        if len(text.split()) < 3 or "?" in text[:3] or not re.search(r"[a-z]", text):
            continue
        senses.append(Sense(headword, text, bool((tags | header_tags) & MEDICAL_TAGS)))
    return senses


def parse(paths: list[Path]) -> Gcide:
    """Read every distinct entry the dictd index points at, in file order."""
    by_name = {p.name: p for p in paths}
    with gzip.open(by_name["gcide.dict.dz"]) as f:  # dictzip is gzip-compatible
        raw = f.read()
    spans = set()
    for line in by_name["gcide.index"].read_text(encoding="utf-8", errors="replace").splitlines():
        f = line.split("\t")
        if len(f) == 3 and not f[0].startswith("00-database"):
            spans.add((_b64(f[1]), _b64(f[2])))
    senses: list[Sense] = []
    for offset, length in sorted(spans):
        senses.extend(parse_entry(raw[offset : offset + length].decode("utf-8", errors="replace")))
    return Gcide(len(spans), senses)


def group_of(headword: str) -> str:
    return f"gcide:{normalize(headword)}"


def extract(gcide: Gcide) -> SourceData:
    """Corpus texts (one per headword: headword and its senses) and headword -> definition pairs (no negatives)."""
    data = SourceData(records=gcide.entries, licence_note=DATA_LICENCE)
    by_head: dict[str, list[Sense]] = {}
    for sense in gcide.senses:
        by_head.setdefault(sense.headword, []).append(sense)
    for head, senses in by_head.items():
        domain = "medical" if any(s.medical for s in senses) else "general"
        texts = list(dict.fromkeys(s.text for s in senses))
        data.texts.append(Text(join_sentences(head, *texts), group_of(head), domain))
        for sense in senses:
            kind_domain = "medical" if sense.medical else "general"
            data.pairs.append(
                Pair(head, sense.text, "gcide_headword_definition", group_of(head), kind_domain, False, ())
            )
    return data
