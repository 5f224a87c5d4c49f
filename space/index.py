"""The Space's search index (ICD-10-CM codes, HPO terms, diseases), its embeddings on disk, and search over them.

The index is made from three outputs of the data build (docs/data-contract.md): every ICD-10-CM code title, every
HPO term ("name. definition") and every disease name of HPO's disease annotations. It is written as one parquet file:
into the Space folder at publish time, into a local cache for the local demo. Embedding ~78k texts takes minutes on a
CPU, so a model's embeddings are precomputed (`python -m space.precompute`, shipped in precomputed/) or computed once
per (model weights, index) pair and kept on disk under a key hashed from both. `SearchIndex` ranks them: exact cosine,
and int8 and sign-bit views made from the same float embeddings.
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
SOURCES = {"icd10cm_inclusion": "ICD-10-CM", "hpo_layperson": "HPO", "hpoa_symptoms": "Disease"}
INDEX_SCHEMA = pa.schema([("code", pa.string()), ("source", pa.string()), ("text", pa.string())])
BUILD_SOURCES = "icd10cm,hpo,hpoa"  # the `--only` subset of `python -m corpus.build` that writes these benchmarks

Progress = Callable[[float, str], None]


def corpus_files(data_dir: Path) -> list[Path]:
    """The benchmark corpus files the index is made from, in index order."""
    return [Path(data_dir) / "benchmarks" / name / "corpus.parquet" for name in SOURCES]


def build_index(data_dir: Path) -> pa.Table:
    """One table (code, source, text) from the data build's ICD-10-CM, HPO and disease benchmark corpora."""
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
    """Run the data build for the index's sources into `data_dir` unless every corpus file is already there.

    The local demo calls this with a folder of its own (build/space-data), never the shared `data/`: a partial
    build there would look like the full corpus to the tokenizer and training jobs.
    """
    if all(p.is_file() for p in corpus_files(data_dir)):
        return data_dir
    command = [sys.executable, "-m", "corpus.build", "--only", BUILD_SOURCES, "--out", str(data_dir)]
    print(f"building the Space index data: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=repo, check=True)
    return data_dir


def index_from_build(repo: Path, out: Path) -> Path:
    """Write the index made from the repository's data build to `out`: from data/ when it holds every corpus, else
    from the index's sources alone built once into build/space-data (never into the shared data/: see ensure_data)."""
    data = Path(repo) / "data"
    if not all(p.is_file() for p in corpus_files(data)):
        data = ensure_data(Path(repo) / "build" / "space-data", repo)
    return write_index(build_index(data), out)


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


# -- precomputed index embeddings: a model's float16 embeddings of the index, shipped with the Space ------------------
PRECOMPUTED_DIR = Path(__file__).resolve().parent / "precomputed"


def save_precomputed(path: Path, embeddings: np.ndarray, model_key: str, index_key: str) -> Path:
    """Write a model's index embeddings (float16) with the model and index fingerprints they were made for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, embeddings=np.asarray(embeddings, dtype=np.float16), keys=np.array([model_key, index_key]))
    os.replace(tmp, path)
    return path


def find_precomputed(folder: Path | None, model_key: str, index_key: str) -> np.ndarray | None:
    """The float32 embeddings of the file in `folder` made for exactly this model and index, or None."""
    for path in sorted(Path(folder).glob("*.npz")) if folder is not None and Path(folder).is_dir() else []:
        with np.load(path) as data:
            if "keys" in data and "embeddings" in data and [str(k) for k in data["keys"]] == [model_key, index_key]:
                return data["embeddings"].astype(np.float32)
    return None


# -- search: exact cosine, int8 and sign bits, all from the same embeddings --------------------------------------------
PRECISIONS = ("float32", "int8", "binary")
SCORE_SCALES = {
    "float32": "cosine similarity",
    "int8": "cosine of the int8-quantised embeddings",
    "binary": "sign agreement, 1 - 2 x Hamming distance / dimensions",
}
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def best_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the `k` highest scores, best first, ties broken by position: the first k of a longer list are
    always the shorter list, so a result never depends on how many were asked for."""
    k = min(k, len(scores))
    if k == 0:
        return np.array([], dtype=np.int64)
    threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
    candidates = np.flatnonzero(scores >= threshold)
    return candidates[np.lexsort((candidates, -scores[candidates]))][:k]


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1)


class SearchIndex:
    """One model's index embeddings in the three precisions the demo compares, all derived from the same float
    embeddings when the index is loaded (never by embedding the index again):

    - float32: the unit embeddings; a search is an exact matrix product, cosine similarity;
    - int8: each dimension quantised to 256 steps over its range in the index (sentence-transformers'
      `quantize_embeddings`), dequantised and renormalised, so its scores are cosines of the int8 vectors;
    - binary: one sign bit a dimension (`ubinary`), scored by sign agreement.

    Matryoshka truncation (the first `dims` dimensions, renormalised; int8 re-calibrated on them) is derived once per
    width and kept. Every method is safe to call from several request threads at once.
    """

    def __init__(self, embeddings: np.ndarray):
        self.embeddings = _unit(np.asarray(embeddings, dtype=np.float32))
        self.size, self.dimension = self.embeddings.shape
        self._views: dict[tuple[str, int], object] = {}
        self._lock = threading.Lock()
        for precision in PRECISIONS:  # the full-width views are ready before the first search
            self._view(precision, self.dimension)

    def _view(self, precision: str, dims: int):
        key = (precision, dims)
        view = self._views.get(key)
        if view is None:
            with self._lock:
                view = self._views.get(key)
                if view is None:
                    view = self._views[key] = self._derive(precision, dims)
        return view

    def _derive(self, precision: str, dims: int):
        from sentence_transformers.util.quantization import quantize_embeddings

        floats = self.embeddings if dims == self.dimension else _unit(self.embeddings[:, :dims])
        if precision == "float32":
            return np.ascontiguousarray(floats)
        if precision == "binary":
            return quantize_embeddings(floats, precision="ubinary")
        ranges = np.stack([floats.min(axis=0), floats.max(axis=0)]).astype(np.float32)
        return ranges, _unit(self._dequantize(quantize_embeddings(floats, "int8", ranges=ranges), ranges))

    @staticmethod
    def _dequantize(ints: np.ndarray, ranges: np.ndarray) -> np.ndarray:
        steps = (ranges[1] - ranges[0]) / 255
        return ranges[0] + (ints.astype(np.float32) + 128.5) * np.where(steps == 0, 1, steps)

    def scores(self, query: np.ndarray, precision: str = "float32", dims: int | None = None) -> np.ndarray:
        """The query's score against every entry, on the precision's own scale (SCORE_SCALES)."""
        from sentence_transformers.util.quantization import quantize_embeddings

        dims = dims or self.dimension
        query = _unit(np.asarray(query, dtype=np.float32)[:dims])
        view = self._view(precision, dims)
        if precision == "float32":
            return view @ query
        if precision == "int8":
            ranges, index = view
            return index @ _unit(self._dequantize(quantize_embeddings(query[None], "int8", ranges=ranges), ranges)[0])
        bits = quantize_embeddings(query[None], precision="ubinary")[0]
        distance = POPCOUNT[np.bitwise_xor(view, bits)].sum(axis=1, dtype=np.int32)
        return (1 - 2 * distance / dims).astype(np.float32)  # padding bits of the last byte are 0 on both sides

    def search(
        self,
        query: np.ndarray,
        k: int,
        keep: np.ndarray | None = None,
        precision: str = "float32",
        dims: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the `k` best entries (only rows where `keep` is True, if given), best first."""
        scores = self.scores(query, precision, dims)
        if keep is not None:
            scores = np.where(keep, scores, -np.inf)
            k = min(k, int(keep.sum()))
        rows = best_rows(scores, k)
        return rows, scores[rows]
