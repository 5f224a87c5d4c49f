"""mteb retrieval tasks over the local benchmark files (docs/data-contract.md), and the official MTEB tasks.

The local tasks are ordinary `AbsTaskRetrieval` subclasses whose `load_data` reads a benchmark of the data build
(`corpus.dataset`, whose registry names them) instead of the Hub, so mteb does the encoding, search and scoring exactly
as for its own tasks.
"""

import random
import socket
from pathlib import Path
from urllib.parse import urlparse

from datasets import Dataset
from mteb import TaskMetadata
from mteb.abstasks import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

from corpus.dataset import BENCHMARKS, DataBuild
from evaluation.metrics import K_VALUES

OFFICIAL_TASKS = ("ArguAna", "NFCorpus", "SciFact", "TRECCOVID", "MedicalQARetrieval")


class LocalRetrievalTask(AbsTaskRetrieval):
    """A benchmark folder as an mteb retrieval task; `max_queries` keeps a seeded sample of the queries.

    mteb reads `metadata` from the class (it drops instance attributes on unload), so `local_task` makes one
    subclass per benchmark folder.
    """

    benchmark: str
    data: DataBuild
    k_values = K_VALUES

    def __init__(self, max_queries: int | None = None, seed: int = 0) -> None:
        self.max_queries = max_queries
        super().__init__(seed=seed)

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        if self.data_loaded:
            return
        benchmark = self.data.benchmark(self.benchmark)
        queries, relevant = benchmark.queries, benchmark.qrels
        if self.max_queries is not None and self.max_queries < len(queries):
            keep = set(random.Random(self.seed).sample(sorted(queries), self.max_queries))
            queries = {q: text for q, text in queries.items() if q in keep}
            relevant = {q: docs for q, docs in relevant.items() if q in keep}
        self.dataset = {
            "default": {
                "test": RetrievalSplitData(
                    corpus=_id_text(benchmark.corpus),
                    queries=_id_text(queries),
                    relevant_docs=relevant,
                    top_ranked=None,
                )
            }
        }
        self.data_loaded = True


def _id_text(texts: dict[str, str]) -> Dataset:
    return Dataset.from_dict({"id": list(texts), "text": list(texts.values())})


def local_task(benchmark: str, data_dir: Path, max_queries: int | None = None, seed: int = 0) -> LocalRetrievalTask:
    """The mteb task of one benchmark folder of the data build."""
    info, data = BENCHMARKS[benchmark], DataBuild(data_dir)
    folder = data.benchmark_dir(benchmark)
    if not data.has_benchmark(benchmark):
        raise FileNotFoundError(f"no benchmark files in {folder}: run `python -m corpus.build`")
    metadata = TaskMetadata(
        name=info.task,
        description=info.description,
        dataset={"path": str(folder), "revision": data.version()},
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
    cls = type(info.task, (LocalRetrievalTask,), {"metadata": metadata, "benchmark": benchmark, "data": data})
    return cls(max_queries, seed)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the official MTEB tasks cannot be loaded here, or None when huggingface.co answers within `timeout` s."""
    import datasets.config
    from huggingface_hub import constants

    # the flag mteb's dataset loading acts on: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE, as datasets read them
    if datasets.config.HF_HUB_OFFLINE:
        return "no Hub access (HF_HUB_OFFLINE=1)"
    endpoint = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
    except OSError as err:
        return f"no Hub access ({endpoint}:443 unreachable: {err.__class__.__name__})"
    return None


def official_tasks(names: tuple[str, ...] = OFFICIAL_TASKS) -> list:
    """mteb's own task objects (their data is downloaded from the Hub on first use)."""
    import mteb

    return list(mteb.get_tasks(tasks=list(names)))
