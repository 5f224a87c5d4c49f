"""mteb retrieval tasks over the local benchmark files (docs/data-contract.md), and the official MTEB tasks.

The local tasks are ordinary `AbsTaskRetrieval` subclasses whose `load_data` reads `data/benchmarks/<name>/*.parquet`
instead of the Hub, so mteb does the encoding, search and scoring exactly as for its own tasks.
"""

import json
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from datasets import Dataset
from mteb import TaskMetadata
from mteb.abstasks import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

from evaluation.metrics import K_VALUES


@dataclass(frozen=True)
class BenchmarkInfo:
    """One held-out benchmark: its mteb task, the registry source it is built from (the unit of leave-one-source-out)
    and whether its queries are running prose or terms (short phrases)."""

    task: str
    label: str
    source: str
    queries: str  # "prose" | "terms"
    description: str
    control: bool = False  # general-English control: a medical model must not lose it


# The registry: every benchmark the report knows, in report order. `corpus.build` writes their folders.
BENCHMARKS: dict[str, BenchmarkInfo] = {
    "hpo_layperson": BenchmarkInfo(
        "HPOLaypersonRetrieval",
        "HPO layperson",
        "hpo",
        "terms",
        "HPO layperson synonym (e.g. 'Short stature') -> the 'name. definition' of its phenotype term; "
        "queries from held-out HPO terms, documents: every HPO term.",
    ),
    "hpo_definition": BenchmarkInfo(
        "HPODefinitionRetrieval",
        "HPO definition (prose)",
        "hpo",
        "prose",
        "Running prose -> term: queries are the definitions of held-out HPO terms, the source's own full sentences of "
        "at least 12 words, never rewritten; documents: the names of every HPO term.",
    ),
    "icd10cm_inclusion": BenchmarkInfo(
        "ICD10CMInclusionRetrieval",
        "ICD-10-CM inclusion",
        "icd10cm",
        "terms",
        "ICD-10-CM inclusion term -> the title of the code it is listed under; queries from held-out "
        "3-character categories, documents: every code title.",
    ),
    "wordnet_gloss": BenchmarkInfo(
        "WordNetGlossRetrieval",
        "WordNet gloss (general)",
        "wordnet",
        "terms",
        "General-English control: monosemous WordNet lemma -> its gloss; documents: the glosses of all held-out "
        "general-English synsets.",
        control=True,
    ),
    "icd10cm_longdoc": BenchmarkInfo(
        "ICD10CMLongDocRetrieval",
        "ICD-10-CM long-doc",
        "icd10cm",
        "terms",
        "Long documents: each held-out ICD-10-CM 3-character category written out with all its codes and "
        "inclusion terms as one document; a query (a code title or inclusion term naming only that category) "
        "first appears beyond the document's first 512 tokens.",
    ),
}
SOURCES = tuple(dict.fromkeys(b.source for b in BENCHMARKS.values()))  # hpo, icd10cm, wordnet


def benchmarks_of(source: str) -> list[str]:
    """The benchmarks built from one registry source: what a model trained without that source is scored on."""
    return [name for name, info in BENCHMARKS.items() if info.source == source]


OFFICIAL_TASKS = ("ArguAna", "NFCorpus", "SciFact", "TRECCOVID", "MedicalQARetrieval")


def dataset_version(data_dir: Path) -> str:
    """The data build's version (manifest), recorded as the task's dataset revision."""
    manifest = Path(data_dir) / "manifest.json"
    return json.loads(manifest.read_text()).get("dataset_version", "local") if manifest.exists() else "local"


class LocalRetrievalTask(AbsTaskRetrieval):
    """A benchmark folder as an mteb retrieval task; `max_queries` keeps a seeded sample of the queries.

    mteb reads `metadata` from the class (it drops instance attributes on unload), so `local_task` makes one
    subclass per benchmark folder.
    """

    benchmark: str
    folder: Path
    k_values = K_VALUES

    def __init__(self, max_queries: int | None = None, seed: int = 0) -> None:
        self.max_queries = max_queries
        super().__init__(seed=seed)

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        if self.data_loaded:
            return
        corpus = pq.read_table(self.folder / "corpus.parquet", columns=["id", "text"])
        queries = pq.read_table(self.folder / "queries.parquet", columns=["id", "text"])
        relevant: dict[str, dict[str, int]] = {}
        for row in pq.read_table(self.folder / "qrels.parquet").to_pylist():
            relevant.setdefault(row["query_id"], {})[row["doc_id"]] = int(row["score"])
        ids = queries.column("id").to_pylist()
        if self.max_queries is not None and self.max_queries < len(ids):
            keep = set(random.Random(self.seed).sample(sorted(ids), self.max_queries))
            queries = queries.filter([i in keep for i in ids])
            relevant = {q: docs for q, docs in relevant.items() if q in keep}
        self.dataset = {
            "default": {
                "test": RetrievalSplitData(
                    corpus=Dataset(corpus), queries=Dataset(queries), relevant_docs=relevant, top_ranked=None
                )
            }
        }
        self.data_loaded = True


def local_task(benchmark: str, data_dir: Path, max_queries: int | None = None, seed: int = 0) -> LocalRetrievalTask:
    """The mteb task of one benchmark folder of the data build."""
    info = BENCHMARKS[benchmark]
    folder = Path(data_dir) / "benchmarks" / benchmark
    if not (folder / "qrels.parquet").exists():
        raise FileNotFoundError(f"no benchmark files in {folder}: run `python -m corpus.build`")
    metadata = TaskMetadata(
        name=info.task,
        description=info.description,
        dataset={"path": str(folder), "revision": dataset_version(data_dir)},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        domains=["Encyclopaedic"] if info.control else ["Medical"],
        license="not specified",
        annotations_creators="derived",
        sample_creation="found",
    )
    cls = type(info.task, (LocalRetrievalTask,), {"metadata": metadata, "benchmark": benchmark, "folder": folder})
    return cls(max_queries, seed)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the official MTEB tasks cannot be loaded here, or None when huggingface.co answers within `timeout` s."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return f"no Hub access ({var}=1)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
    except OSError as err:
        return f"no Hub access ({endpoint}:443 unreachable: {err.__class__.__name__})"
    return None


def official_tasks(names: tuple[str, ...] = OFFICIAL_TASKS) -> list:
    """mteb's own task objects (their data is downloaded from the Hub on first use)."""
    import mteb

    return list(mteb.get_tasks(tasks=list(names)))
