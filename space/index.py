"""The Space's search index (ICD-10-CM codes and HPO terms) and the on-disk cache of its embeddings.

The index is made from two outputs of the data build (docs/data-contract.md): every ICD-10-CM code title and every
HPO term ("name. definition"). It is written as one parquet file: into the Space folder at publish time, into a
local cache for the local demo. Embedding ~66k texts takes minutes on a CPU, so the embeddings are computed once per
(model weights, index) pair and kept on disk under a key hashed from both.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# data build benchmark -> label shown in the Space
SOURCES = {"icd10cm_inclusion": "ICD-10-CM", "hpo_layperson": "HPO"}
INDEX_SCHEMA = pa.schema([("code", pa.string()), ("source", pa.string()), ("text", pa.string())])
BUILD_SOURCES = "icd10cm,hpo"  # the `--only` subset of `python -m corpus.build` that writes both benchmarks

Progress = Callable[[float, str], None]


def corpus_files(data_dir: Path) -> list[Path]:
    """The benchmark corpus files the index is made from, in index order."""
    return [Path(data_dir) / "benchmarks" / name / "corpus.parquet" for name in SOURCES]


def build_index(data_dir: Path) -> pa.Table:
    """One table (code, source, text) from the data build's ICD-10-CM and HPO benchmark corpora."""
    tables = []
    for (name, label), path in zip(SOURCES.items(), corpus_files(data_dir), strict=True):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: build it with `python -m corpus.build --only {BUILD_SOURCES} --out {data_dir}`"
            )
        corpus = pq.read_table(path, columns=["id", "text"])
        if corpus.num_rows == 0:
            raise ValueError(f"{path} ({name}) has no rows")
        source = pa.array([label] * corpus.num_rows, pa.string())
        tables.append(pa.table([corpus["id"], source, corpus["text"]], schema=INDEX_SCHEMA))
    return pa.concat_tables(tables)


def write_index(table: pa.Table, path: Path) -> Path:
    """Write the index as parquet (atomically: a Space restarting mid-write never reads half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table.cast(INDEX_SCHEMA), tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def read_index(path: Path) -> pa.Table:
    """Read an index file and check that it has the three columns the Space shows."""
    table = pq.read_table(path)
    missing = {"code", "source", "text"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path} is not a MedEIR Space index: columns {sorted(missing)} are missing")
    if table.num_rows == 0:
        raise ValueError(f"{path} has no rows")
    return table.select(["code", "source", "text"]).cast(INDEX_SCHEMA)


def ensure_data(data_dir: Path, repo: Path) -> Path:
    """Run the data build for ICD-10-CM and HPO into `data_dir` unless both corpus files are already there.

    The local demo calls this with a folder of its own (build/space-data), never the shared `data/`: a partial
    build there would look like the full corpus to the tokenizer and training jobs.
    """
    if all(p.is_file() for p in corpus_files(data_dir)):
        return data_dir
    command = [sys.executable, "-m", "corpus.build", "--only", BUILD_SOURCES, "--out", str(data_dir)]
    print(f"building the Space index data: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=repo, check=True)
    return data_dir


def index_fingerprint(table: pa.Table) -> str:
    """Hash of the index content (codes, sources, texts, in order)."""
    digest = hashlib.sha256()
    for column in ("code", "source", "text"):
        for value in table.column(column).to_pylist():
            digest.update(value.encode())
            digest.update(b"\0")
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """Hash of what decides a SentenceTransformer's embeddings: every weight, the tokenizer, the sequence limit."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    backend = getattr(model.tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the truncation/padding state, which every encode call rewrites
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        digest.update(json.dumps(spec, sort_keys=True).encode())
    else:
        digest.update(str(sorted(model.tokenizer.get_vocab().items())).encode())
    digest.update(str(model.max_seq_length).encode())
    digest.update(repr([type(m).__name__ for m in model]).encode())
    return digest.hexdigest()


class EmbeddingCache:
    """Index embeddings on disk, one float16 .npy per (model, index) key, computed once under a lock."""

    def __init__(self, folder: Path, chunk_size: int = 2048):
        self.folder = Path(folder)
        self.chunk_size = chunk_size
        self._lock = threading.Lock()

    def path(self, model_key: str, index_key: str) -> Path:
        return self.folder / f"embeddings-{model_key[:16]}-{index_key[:16]}.npy"

    def get_or_compute(
        self,
        model_key: str,
        index_key: str,
        texts: Sequence[str],
        encode: Callable[[list[str]], np.ndarray],
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Load the embeddings of `texts` for this key, or encode them chunk by chunk (reporting progress) and save."""
        path = self.path(model_key, index_key)
        with self._lock:
            if path.is_file():
                embeddings = np.load(path)
                if embeddings.shape[0] == len(texts):
                    return embeddings.astype(np.float32)
            chunks = []
            for start in range(0, len(texts), self.chunk_size):
                if progress is not None:
                    progress(start / len(texts), f"Embedding the index once: {start:,} / {len(texts):,} texts")
                chunks.append(np.asarray(encode(list(texts[start : start + self.chunk_size])), dtype=np.float32))
            # float16 on disk; return the same rounded values so scores do not change once the cache exists
            embeddings = np.concatenate(chunks).astype(np.float16)
            if progress is not None:
                progress(1.0, f"Embedded {len(texts):,} texts; cached for the next start")
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, embeddings)
            os.replace(tmp, path)
            return embeddings.astype(np.float32)
