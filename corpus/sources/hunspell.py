"""The hunspell-en-med medical word list (Debian). Not training text: it is the word list on which the tokenizer's
fragmentation is measured, so the build writes it to the word list file (corpus.dataset.WORD_LIST) and nowhere else."""

from dataclasses import dataclass
from pathlib import Path

from corpus.fetch import Package
from corpus.records import SourceData

PACKAGE = Package(
    registry="debian",
    name="hunspell-en-med",
    version="0.0.20140410-4",
    files=("usr/share/hunspell/en_med_glut.dic",),
    licence_file="usr/share/doc/hunspell-en-med/copyright",
)
DATA_LICENCE = "OpenMedSpel / MTH-Med-Spel-Chek word list: GPL-3+"


@dataclass
class WordList:
    words: list[str]


def parse(path: Path) -> WordList:
    """Words of a hunspell .dic: skip the count line and the indented header, drop `/FLAGS` affix classes."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    words = []
    for line in lines[1:]:
        if not line.strip() or line[0].isspace():
            continue
        word = line.split("/", 1)[0].strip()
        if any(c.isalpha() for c in word):
            words.append(word)
    return WordList(list(dict.fromkeys(words)))


def extract(wordlist: WordList) -> SourceData:
    """No corpus text and no pairs: the words."""
    return SourceData(records=len(wordlist.words), licence_note=DATA_LICENCE, words=wordlist.words)
