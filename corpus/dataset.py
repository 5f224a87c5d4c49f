"""The data/ contract as code (docs/data-contract.md): the path and schema of every file `corpus.build` writes, the
registry of held-out benchmarks, readers for every later stage, and the build's version.

`corpus.build` writes through these paths and schemas; the tokenizer, training and evaluation read through
`DataBuild` and `BENCHMARKS`, so a file that moves or a benchmark that joins changes here and nowhere else.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from corpus.sources import hpo, hpoa, icd10cm, wordnet
from corpus.split import split_of

DEFAULT_ROOT = Path("data")
SPLITS = ("train", "validation")  # of the corpus and pair files; test groups only reach benchmarks/

# --- paths, relative to a build's root -------------------------------------------------------------------------------

MANIFEST = "manifest.json"
BENCHMARKS_DIR = "benchmarks"
PAIRS_TEST = f"{BENCHMARKS_DIR}/pairs_test.parquet"
WORD_LIST = "wordlist.parquet"  # the medical word list the tokenizer's fragmentation is measured on (no training text)
BENCHMARK_PARTS = ("corpus", "queries", "qrels")


def corpus_file(split: str) -> str:
    return f"corpus/{split}.parquet"


def pairs_file(split: str) -> str:
    return f"pairs/{split}.parquet"


def benchmark_file(name: str, part: str) -> str:
    return f"{BENCHMARKS_DIR}/{name}/{part}.parquet"


TRAINING_FILES = (*(corpus_file(s) for s in SPLITS), *(pairs_file(s) for s in SPLITS))  # what the holdout check reads

# --- schemas ----------------------------------------------------------------------------------------------------------

CORPUS_SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("domain", pa.string())])
PAIRS_SCHEMA = pa.schema(
    [
        ("anchor", pa.string()),
        ("positive", pa.string()),
        ("negatives", pa.list_(pa.string())),
        ("kind", pa.string()),
        ("source", pa.string()),
        ("domain", pa.string()),
        ("group", pa.string()),
        ("cardiology", pa.bool_()),
    ]
)
TEXT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])  # a benchmark's corpus and queries
QRELS_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.int64())])
PAIRS_TEST_SCHEMA = pa.schema(
    [
        ("text1", pa.string()),
        ("text2", pa.string()),
        ("label", pa.float64()),
        ("kind", pa.string()),
        ("domain", pa.string()),
        ("cardiology", pa.bool_()),
    ]
)
WORD_LIST_SCHEMA = pa.schema([("word", pa.string()), ("source", pa.string())])

# --- the benchmark registry -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkInfo:
    """One held-out retrieval benchmark: its folder under benchmarks/, its name as an mteb task (and in model-index
    metadata), its label in reports, the registry source it is built from (the unit of leave-one-source-out), whether
    its queries are running prose or terms (short phrases), and the group of a document id (which decides the
    document's split)."""

    name: str
    task: str
    label: str
    source: str
    queries: str  # "prose" | "terms"
    description: str
    document_group: Callable[[str], str]
    control: bool = False  # general-English control: a medical model must not lose it
    long_documents: bool = False  # documents beyond 512 tokens (read in small batches, not sampled while training)


HPO_LAYPERSON = BenchmarkInfo(
    "hpo_layperson",
    "HPOLaypersonRetrieval",
    "HPO layperson",
    "hpo",
    "terms",
    "HPO layperson synonym (e.g. 'Short stature') -> the 'name. definition' of its phenotype term; "
    "queries from held-out HPO terms, documents: every HPO term.",
    hpo.group_of,
)
HPO_DEFINITION = BenchmarkInfo(
    "hpo_definition",
    "HPODefinitionRetrieval",
    "HPO definition (prose)",
    "hpo",
    "prose",
    "Running prose -> term: queries are the definitions of held-out HPO terms, the source's own full sentences of "
    "at least 12 words, never rewritten; documents: the names of every HPO term.",
    hpo.group_of,
)
HPOA_SYMPTOMS = BenchmarkInfo(
    "hpoa_symptoms",
    "HPOSymptomsDiseaseRetrieval",
    "Symptoms -> disease (everyday words)",
    "hpoa",
    "terms",
    "Symptoms in everyday words -> disease: 3-8 phenotypes of a held-out disease, drawn by annotated frequency and "
    "written as HPO layperson synonyms where they exist, comma-joined; documents: the names of every disease in "
    "HPO's phenotype annotations (OMIM, Orphanet, DECIPHER).",
    hpoa.group_of,
)
ICD10CM_INCLUSION = BenchmarkInfo(
    "icd10cm_inclusion",
    "ICD10CMInclusionRetrieval",
    "ICD-10-CM inclusion",
    "icd10cm",
    "terms",
    "ICD-10-CM inclusion term -> the title of the code it is listed under; queries from held-out "
    "3-character categories, documents: every code title.",
    icd10cm.code_group,
)
WORDNET_GLOSS = BenchmarkInfo(
    "wordnet_gloss",
    "WordNetGlossRetrieval",
    "WordNet gloss (general)",
    "wordnet",
    "terms",
    "General-English control: monosemous WordNet lemma -> its gloss; documents: the glosses of all held-out "
    "general-English synsets.",
    wordnet.group_of,
    control=True,
)
ICD10CM_LONGDOC = BenchmarkInfo(
    "icd10cm_longdoc",
    "ICD10CMLongDocRetrieval",
    "ICD-10-CM long-doc",
    "icd10cm",
    "terms",
    "Long documents: each held-out ICD-10-CM 3-character category written out with all its codes and "
    "inclusion terms as one document; a query (a code title or inclusion term naming only that category) "
    "first appears beyond the document's first 512 tokens.",
    icd10cm.code_group,
    long_documents=True,
)
# Every benchmark the build writes and the report knows, in report order.
BENCHMARKS: dict[str, BenchmarkInfo] = {
    b.name: b for b in (HPO_LAYPERSON, HPO_DEFINITION, HPOA_SYMPTOMS, ICD10CM_INCLUSION, WORDNET_GLOSS, ICD10CM_LONGDOC)
}
BENCHMARK_SOURCES = tuple(dict.fromkeys(b.source for b in BENCHMARKS.values()))  # hpo, hpoa, icd10cm, wordnet


def benchmarks_of(source: str) -> list[str]:
    """The benchmarks built from one registry source: what a model trained without that source is scored on."""
    return [name for name, info in BENCHMARKS.items() if info.source == source]


# --- reading a build --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkFiles:
    """A benchmark as read back from its folder: documents and queries by id, relevance by query."""

    info: BenchmarkInfo
    corpus: dict[str, str]  # document id -> text
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {document id: relevance}

    def test_documents(self) -> dict[str, str]:
        """The documents of test groups only (a benchmark's corpus may hold every entity of its source)."""
        return {i: text for i, text in self.corpus.items() if split_of(self.info.document_group(i)) == "test"}


class DataBuild:
    """One output folder of `python -m corpus.build` (default `data/`): where each file is, and readers for them.

    Parquet readers come in the two forms the stages use: a pyarrow table (optionally some columns) and, with the
    `_dataset` suffix, a `datasets.Dataset` (what the sentence-transformers trainer takes).
    """

    def __init__(self, root: str | Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"DataBuild({str(self.root)!r})"

    # paths
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def corpus_path(self, split: str = "train") -> Path:
        return self.root / corpus_file(split)

    def pairs_path(self, split: str = "train") -> Path:
        return self.root / pairs_file(split)

    def benchmark_dir(self, name: str) -> Path:
        return self.root / BENCHMARKS_DIR / name

    @property
    def pairs_test_path(self) -> Path:
        return self.root / PAIRS_TEST

    @property
    def word_list_path(self) -> Path:
        return self.root / WORD_LIST

    # the manifest
    def manifest(self) -> dict:
        """The build's manifest, or {} for a folder without one (hand-made test data)."""
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {}

    def version(self) -> str:
        """The build's version (a digest of every output, from the manifest), or "local" without a manifest."""
        return self.manifest().get("dataset_version", "local")

    # corpus and pairs
    def corpus(self, split: str = "train", columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.corpus_path(split), columns=columns)

    def corpus_dataset(self, split: str = "train") -> datasets.Dataset:
        return _load_dataset(self.corpus_path(split))

    def pairs(self, split: str = "train", columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.pairs_path(split), columns=columns)

    def pairs_dataset(self, split: str = "train") -> datasets.Dataset:
        return _load_dataset(self.pairs_path(split))

    # held-out sets
    def pairs_test(self) -> pa.Table:
        return pq.read_table(self.pairs_test_path)

    def pairs_test_dataset(self) -> datasets.Dataset:
        return _load_dataset(self.pairs_test_path)

    def has_benchmark(self, name: str) -> bool:
        return all((self.benchmark_dir(name) / f"{part}.parquet").exists() for part in BENCHMARK_PARTS)

    def benchmark(self, name: str) -> BenchmarkFiles:
        """A benchmark's three files, rows in file order."""
        folder = self.benchmark_dir(name)
        if not self.has_benchmark(name):
            raise FileNotFoundError(f"no benchmark files in {folder}: run `python -m corpus.build`")
        corpus, queries = (_id_text(folder / f"{part}.parquet") for part in ("corpus", "queries"))
        qrels: dict[str, dict[str, int]] = {}
        for row in pq.read_table(folder / "qrels.parquet").to_pylist():
            qrels.setdefault(row["query_id"], {})[row["doc_id"]] = int(row["score"])
        return BenchmarkFiles(BENCHMARKS[name], corpus, queries, qrels)

    def words(self) -> list[str]:
        """The word list (every source's words, in file order)."""
        return pq.read_table(self.word_list_path, columns=["word"]).column("word").to_pylist()


def _load_dataset(path: Path) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=str(path), split="train")


def _id_text(path: Path) -> dict[str, str]:
    table = pq.read_table(path, columns=["id", "text"])
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
