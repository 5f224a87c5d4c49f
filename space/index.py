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


# -- the compact precomputed index: the shipped model's index embeddings in a few MB --------------------------------
PRECOMPUTED_DIR = Path(__file__).resolve().parent / "precomputed"
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


class CompactIndex:
    """The index embeddings as sign bits (sentence-transformers' "ubinary" quantization: 1 bit a dimension).

    65,914 x 384 dimensions are 3.2 MB, so the file can ship with the repository and the demo's first search needs no
    embedding of the index. A search ranks by Hamming distance, rescores the best candidates with the float query
    against their bits, and the Engine then embeds the few survivors exactly (their shown scores are true cosines).
    The file carries the model and index fingerprints it was made for; any other pair is a miss.
    """

    def __init__(self, bits: np.ndarray, dimension: int, model_key: str, index_key: str):
        self.bits, self.dimension, self.model_key, self.index_key = bits, dimension, model_key, index_key

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, model_key: str, index_key: str) -> "CompactIndex":
        from sentence_transformers.util.quantization import quantize_embeddings

        bits = quantize_embeddings(np.asarray(embeddings, dtype=np.float32), precision="ubinary")
        return cls(bits, embeddings.shape[1], model_key, index_key)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        keys = np.array([self.model_key, self.index_key])
        np.savez_compressed(tmp, bits=self.bits, dimension=np.array(self.dimension), keys=keys)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> "CompactIndex":
        with np.load(path) as data:
            model_key, index_key = (str(k) for k in data["keys"])
            return cls(data["bits"], int(data["dimension"]), model_key, index_key)

    @classmethod
    def find(cls, folder: Path, model_key: str, index_key: str) -> "CompactIndex | None":
        """The file in `folder` made for exactly this model and index, or None (then the index is embedded)."""
        for path in sorted(Path(folder).glob("*.npz")) if Path(folder).is_dir() else []:
            with np.load(path) as data:
                if "keys" in data and [str(k) for k in data["keys"]] == [model_key, index_key]:
                    return cls.load(path)
        return None

    def signs(self, rows: np.ndarray, dims: int | None = None) -> np.ndarray:
        """(len(rows), dims) of +1 / -1: the sign of each stored dimension."""
        unpacked = np.unpackbits(self.bits[rows], axis=1, count=self.dimension)[:, :dims]
        return unpacked.astype(np.float32) * 2 - 1

    def candidates(
        self, query: np.ndarray, keep: np.ndarray | None, hamming_k: int, rescore_k: int, dims: int | None = None
    ) -> np.ndarray:
        """Rows of the `rescore_k` best entries: Hamming top `hamming_k`, then reranked by float query . signs.

        `dims` compares only the first dimensions (Matryoshka truncation); `keep` is a boolean row mask (a source).
        """
        dims = dims or self.dimension
        query = np.asarray(query, dtype=np.float32)[:dims]
        width = (dims + 7) // 8
        query_bits = np.packbits(query > 0, axis=-1)[:width]
        stored = self.bits[:, :width]
        if dims % 8:  # ignore the padding bits of the last byte
            mask = np.uint8((0xFF << (8 - dims % 8)) & 0xFF)
            stored = np.concatenate([stored[:, :-1], stored[:, -1:] & mask], axis=1)
        distance = POPCOUNT[np.bitwise_xor(stored, query_bits)].sum(axis=1, dtype=np.int32)
        if keep is not None:
            distance = np.where(keep, distance, np.iinfo(np.int32).max)
        pool = min(hamming_k, int(keep.sum()) if keep is not None else len(distance))
        if pool == 0:
            return np.array([], dtype=int)
        rows = np.argpartition(distance, pool - 1)[:pool]
        scores = self.signs(rows, dims) @ query
        return rows[np.argsort(-scores, kind="stable")[:rescore_k]]


# -- `python -m space.index --precompute`: write the compact index of a model, and measure it -------------------------
def benchmark_queries(data_dir: Path, per_source: int, seed: int = 0) -> list[str]:
    """Real queries of the two benchmarks the index is made from (the data build's queries.parquet), a seeded sample."""
    queries = []
    rng = np.random.default_rng(seed)
    for name in SOURCES:
        path = Path(data_dir) / "benchmarks" / name / "queries.parquet"
        if path.is_file():
            texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
            queries += [texts[i] for i in sorted(rng.choice(len(texts), min(per_source, len(texts)), replace=False))]
    return queries


def measure(engine, queries: list[str], k: int = 10) -> dict:
    """recall@k of the compact search (bits + exact rescoring) against exact float search, per query."""
    import time

    if engine.compact is None:
        raise ValueError("no compact index matches this model and index: run --precompute first")
    floats = engine.index_embeddings()
    query_embeddings = np.asarray(engine.encoder(queries), dtype=np.float32)
    recalls, seconds = [], []
    compact_engine = engine.without_float_index()
    for query in query_embeddings:
        exact = set(np.argsort(-(floats @ query), kind="stable")[:k].tolist())
        start = time.perf_counter()
        rows, _ = compact_engine.rank(query, k)
        seconds.append(time.perf_counter() - start)
        recalls.append(len(exact & set(rows.tolist())) / k)
    return {
        f"recall@{k}": round(float(np.mean(recalls)), 4),
        f"queries with recall@{k} < 1": int(sum(r < 1 for r in recalls)),
        "queries": len(queries),
        "rank seconds (median, after encoding the query)": round(float(np.median(seconds)), 4),
    }


def main(argv: list[str] | None = None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(
        description="Write the compact (1 bit a dimension) index embeddings of a model for the demo, keyed to the "
        "model's weights and the index; with --measure, recall@10 against float search and the first-search latency."
    )
    parser.add_argument("--precompute", action="store_true", help="embed the index and write the compact file")
    parser.add_argument("--model", default="models/medeir-small", help="model folder or Hub id")
    parser.add_argument("--index", type=Path, default=None, help="index parquet (default: the demo's)")
    parser.add_argument("--out", type=Path, default=PRECOMPUTED_DIR, help="folder of compact files (the demo's)")
    parser.add_argument("--cache", type=Path, default=None, help="float embedding cache (default: the demo's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--measure", type=int, default=0, metavar="N", help="measure on N queries per benchmark")
    parser.add_argument("--data", type=Path, default=Path("data"), help="data build with the benchmark queries")
    args = parser.parse_args(argv)
    from space.app import create_engine

    def report(fraction: float, desc: str) -> None:
        print(f"[{fraction:4.0%}] {desc}", file=sys.stderr, flush=True)

    if args.precompute:
        engine = create_engine(args.model, args.index, args.cache, args.device)
        compact = CompactIndex.from_embeddings(engine.index_embeddings(report), engine.model_key, engine.index_key)
        path = compact.save(args.out / f"{Path(args.model).name}.npz")
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) for model {engine.model_key[:16]}, index "
              f"{engine.index_key[:16]}: {len(engine.texts):,} entries x {compact.dimension} dimensions")  # fmt: skip
    if args.measure:
        start = time.perf_counter()  # a fresh engine, as `make demo` starts one, and its first search
        engine = create_engine(args.model, args.index, args.cache, args.device, args.out).without_float_index()
        loaded = time.perf_counter()
        engine.search("always thirsty and peeing a lot", 10)
        first = time.perf_counter() - loaded
        print(json.dumps({"start-up seconds": round(loaded - start, 2), "first search seconds": round(first, 3)}))
        engine = create_engine(args.model, args.index, args.cache, args.device, args.out)
        print(json.dumps(measure(engine, benchmark_queries(args.data, args.measure))))


if __name__ == "__main__":
    main()
