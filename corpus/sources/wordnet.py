"""Princeton WordNet 3.0 (Debian's wordnet-base): synsets, lemmas, glosses, hypernym/hyponym pointers.

Pairs: lemma -> gloss definition, with co-hyponyms (other hyponyms of the same hypernym) as hard negatives. The group
is the synset. Noun synsets under disease, symptom, drug, body part or medical procedure are tagged medical; the
rest are the general-English text that the tokenizer must not get worse on.
"""

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from corpus.fetch import Package
from corpus.records import Pair, SourceData, Text
from corpus.text import clean, join_sentences, normalize

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
PACKAGE = Package(
    registry="debian",
    name="wordnet-base",
    version="1:3.0-37",
    files=(*(f"usr/share/wordnet/data.{f}" for f in POS_FILES.values()), "usr/share/wordnet/index.noun"),
    licence_file="usr/share/doc/wordnet-base/copyright",
)
DATA_LICENCE = "WordNet 3.0 licence (Princeton University)"
MEDICAL_ROOTS = ("disease", "symptom", "drug", "body_part", "medical_procedure")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass
class Synset:
    id: str  # pos letter + 8-digit offset, e.g. n00001740
    lemmas: list[str]
    definition: str
    examples: list[str]
    gloss: str  # the whole gloss line: definition; "example"; ...
    hypernyms: list[str] = field(default_factory=list)
    hyponyms: list[str] = field(default_factory=list)


@dataclass
class WordNet:
    synsets: dict[str, Synset]
    medical: set[str]


def _split_gloss(gloss: str) -> tuple[str, list[str]]:
    """`definition; "example one"; "example two"` -> (definition, examples)."""
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = re.split(r';\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
    return clean(definition), [clean(e) for e in examples]


def parse_data_line(line: str, pos: str) -> Synset:
    """One line of data.noun/verb/adj/adv (wndb(5) format)."""
    head, _, gloss = line.partition(" | ")
    f = head.split()
    offset, w_cnt = f[0], int(f[3], 16)
    lemmas = [_ADJ_MARKER.sub("", f[4 + 2 * i]).replace("_", " ") for i in range(w_cnt)]
    i = 4 + 2 * w_cnt
    p_cnt = int(f[i])
    hypernyms, hyponyms = [], []
    for j in range(p_cnt):
        symbol, target, tpos = f[i + 1 + 4 * j], f[i + 2 + 4 * j], f[i + 3 + 4 * j]
        tid = ("a" if tpos == "s" else tpos) + target
        if symbol in ("@", "@i"):
            hypernyms.append(tid)
        elif symbol in ("~", "~i"):
            hyponyms.append(tid)
    definition, examples = _split_gloss(gloss)
    return Synset(pos + offset, lemmas, definition, examples, clean(gloss), hypernyms, hyponyms)


def parse(paths: list[Path]) -> WordNet:
    """Read the four data files and tag medical noun synsets (hyponym closure of MEDICAL_ROOTS' first senses)."""
    by_name = {p.name: p for p in paths}
    synsets: dict[str, Synset] = {}
    for pos, name in POS_FILES.items():
        for line in by_name[f"data.{name}"].read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("  "):
                s = parse_data_line(line, pos)
                synsets[s.id] = s
    roots = []
    for line in by_name["index.noun"].read_text(encoding="utf-8").splitlines():
        f = line.split()
        if f and f[0] in MEDICAL_ROOTS:
            roots.append("n" + f[-int(f[2])])  # first sense: the first of the synset_cnt offsets
    medical, stack = set(roots), list(roots)
    while stack:
        for h in synsets[stack.pop()].hyponyms:
            if h not in medical:
                medical.add(h)
                stack.append(h)
    return WordNet(synsets, medical)


def group_of(synset_id: str) -> str:
    return f"wordnet:{synset_id}"


def lemma_index(wn: WordNet) -> dict[str, set[str]]:
    """Normalised lemma -> the synsets it names (a lemma in one synset only is monosemous)."""
    out: dict[str, set[str]] = {}
    for sid, s in wn.synsets.items():
        for lemma in s.lemmas:
            out.setdefault(normalize(lemma), set()).add(sid)
    return out


def extract(wn: WordNet) -> SourceData:
    """Corpus texts (one per synset: lemmas, gloss with examples) and lemma -> definition pairs."""
    data = SourceData(records=len(wn.synsets), licence_note=DATA_LICENCE)
    for sid, s in wn.synsets.items():
        group, domain = group_of(sid), "medical" if sid in wn.medical else "general"
        data.texts.append(Text(join_sentences(", ".join(s.lemmas), s.gloss), group, domain))
        if not s.definition:
            continue
        rng = random.Random(f"wordnet:{sid}")
        co = sorted({c for h in s.hypernyms for c in wn.synsets[h].hyponyms if c != sid})
        negs = tuple((wn.synsets[c].definition, group_of(c)) for c in rng.sample(co, min(10, len(co))))
        for lemma in dict.fromkeys(s.lemmas):
            data.pairs.append(Pair(lemma, s.definition, "wordnet_lemma_gloss", group, domain, False, negs))
    return data
