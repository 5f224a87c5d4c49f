"""What the Space does, without the page: load a MedEIR model, check what a visitor typed, search the index, compare
two texts, show how the tokenizers cut a text. Free of Gradio, so tests and the publish check drive it directly.
"""

import math
import os
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from huggingface_hub import is_offline_mode  # what the Hub client acts on (HF_HUB_OFFLINE as read at its import)

from space.index import CompactIndex, EmbeddingCache, Progress, index_fingerprint, model_fingerprint

DEFAULT_MODEL = "models/medeir-small"
# Deployer-set limits (environment variable -> default), checked when the demo starts.
LIMITS = {
    "MEDEIR_MAX_CHARS": 100_000,  # characters per text, refused before tokenizing (8,192 tokens are ~35,000)
    "MEDEIR_BATCH_SIZE": 0,  # encoding batch size; 0: 256 on a GPU, 32 on a CPU
}
MAX_RESULTS = 100
SOURCE_CHOICES = ("All", "ICD-10-CM", "HPO")
PRECISIONS = ("float32", "int8", "binary")  # what search compares: float, int8 or sign-bit embeddings
# A search on the compact index keeps the HAMMING_K nearest by bits, reranks them against the float query, and
# embeds the best RESCORE_FACTOR x top_k exactly (recall@10 against float search: see `python -m space.index`).
HAMMING_K = 400
RESCORE_FACTOR = 3


class InputError(ValueError):
    """Something wrong with what the visitor typed; the message is shown in the page as is."""


class ModelUnavailable(RuntimeError):
    """The model could not be loaded; the message says which model and what to do instead."""


def read_limits(environ=os.environ) -> dict[str, int]:
    """The demo's limits from the environment; a bad value stops the demo at start-up with the variable named."""
    limits = {}
    for name, default in LIMITS.items():
        raw = (environ.get(name) or "").strip()
        try:
            value = int(raw.replace("_", "")) if raw else default
        except ValueError:
            value = -1
        if value < (0 if name == "MEDEIR_BATCH_SIZE" else 1):
            raise ValueError(f"{name}={raw!r} is not a positive integer (default {default:,}); fix the setting.")
        limits[name] = value
    return limits


def has_visible_text(text: str) -> bool:
    """True if `text` has a letter, digit, punctuation mark or symbol (the handler's rule, hub/handler.py): NUL,
    control and zero-width characters and lone combining marks are dropped by the tokenizer's normaliser."""
    return any(unicodedata.category(char)[0] in "LNPS" for char in text)


def pick_device() -> str:
    """`cuda` on a ZeroGPU Space (the GPU is attached per call) or when CUDA is visible, `cpu` otherwise."""
    import torch

    if os.environ.get("MEDEIR_DEVICE"):
        return os.environ["MEDEIR_DEVICE"]
    if os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true"):
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _is_local(name: str) -> bool:
    """Treat `name` as a folder (not a Hub repository id) if it exists or is written like a path."""
    path = Path(name).expanduser()
    return (
        path.exists()
        or name.startswith((".", "/", "~"))
        or name == DEFAULT_MODEL
        or name.count("/") > 1
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    )


def load_model(name: str, device: str):
    """Load a sentence-transformers MedEIR model from a folder or a Hub repository id, or raise ModelUnavailable."""
    from sentence_transformers import SentenceTransformer

    how = "Choose a model with --model PATH_OR_HUB_ID or the MEDEIR_MODEL environment variable."
    if _is_local(name) and not Path(name).expanduser().is_dir():
        reason = (
            " That is where the trained MedEIR-small model goes, and it has not been built yet."
            if name == DEFAULT_MODEL
            else ""
        )
        raise ModelUnavailable(f"No MedEIR model folder at {name}.{reason} {how}")
    try:
        model = SentenceTransformer(name, trust_remote_code=True, device=device)
        config = getattr(getattr(model[0], "auto_model", None), "config", None)
        if hasattr(config, "check_tokenizer"):  # the tokenizer object the demo uses must be the model's own
            config.check_tokenizer(model.tokenizer, f"the tokenizer of {name}")
        return model
    except Exception as err:  # any loader error becomes one readable line
        offline = " (HF_HUB_OFFLINE=1 is set: only models already in the local cache load)" if is_offline_mode() else ""
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelUnavailable(
            f"Could not load {name!r}{offline}: {type(err).__name__}: {first_line[:300]} {how}"
        ) from err


def load_tokenizer(path: Path | str | None):
    """A tokenizer from a local folder (the bert-base-uncased files), or None when there is none."""
    if path is None or not Path(path).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def top_k(
    query: np.ndarray, embeddings: np.ndarray, k: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` rows of `embeddings` with the highest dot product with `query`, and their scores, best first
    (sentence-transformers' `semantic_search`); `rows` maps positions back to index rows when `embeddings` is a subset.
    """
    import torch
    from sentence_transformers.util import dot_score, semantic_search

    hits = semantic_search(torch.from_numpy(query), torch.from_numpy(embeddings), top_k=k, score_function=dot_score)
    found = np.array([hit["corpus_id"] for hit in hits[0]], dtype=np.int64)
    scores = np.array([hit["score"] for hit in hits[0]], dtype=np.float32)
    return (found if rows is None else rows[found]), scores


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    code: str
    source: str
    text: str


class Engine:
    """A loaded model, the index and its cached embeddings, and the input checks every tab shares."""

    def __init__(
        self,
        model,
        model_name: str,
        device: str,
        index: pa.Table,
        cache: EmbeddingCache,
        reference_tokenizer=None,
        reference_name: str = "bert-base-uncased",
        batch_size: int | None = None,
        compact_folder: Path | None = None,
    ):
        self.model = model
        self.model_name = model_name
        self.device = device
        self.codes = index.column("code").to_pylist()
        self.sources = np.asarray(index.column("source").to_pylist())
        self.texts = index.column("text").to_pylist()
        self.index_key = index_fingerprint(index)
        self.model_key = model_fingerprint(model)
        self.cache = cache
        self.reference_tokenizer = reference_tokenizer
        self.reference_name = reference_name
        limits = read_limits()
        self.max_chars = limits["MEDEIR_MAX_CHARS"]
        self.batch_size = batch_size or limits["MEDEIR_BATCH_SIZE"] or (256 if device.startswith("cuda") else 32)
        # Replaced by the app with the same function behind @spaces.GPU: the only code that needs the GPU.
        self.encoder: Callable[[list[str]], np.ndarray] = self.encode_local
        self._index_embeddings: np.ndarray | None = None
        self._int8_index: tuple[int, np.ndarray, np.ndarray] | None = None  # (dims, dequantized index, ranges)
        # Precomputed bits made for exactly this model and index (`python -m space.index --precompute`), else None
        self.compact = CompactIndex.find(compact_folder, self.model_key, self.index_key) if compact_folder else None

    # -- inputs -----------------------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        config = getattr(self.model[0], "auto_model", None)
        limit = getattr(getattr(config, "config", None), "max_position_embeddings", None)
        return min(self.model.max_seq_length, limit) if limit else self.model.max_seq_length

    def count_tokens(self, text: str) -> int:
        """Tokens the model reads for `text`, [CLS] and [SEP] included, without truncation."""
        return len(self.model.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])

    def check_chars(self, text: object, what: str = "The text") -> None:
        """The checks that need no tokenizer: type, size, valid Unicode, something visible."""
        if not isinstance(text, str):
            raise InputError(f"{what} must be text, not {type(text).__name__}.")
        if not text.strip():
            raise InputError(f"{what} is empty: type something first.")
        if len(text) > self.max_chars:
            raise InputError(
                f"{what} is {len(text):,} characters long; the limit is {self.max_chars:,} characters "
                f"(and {self.max_tokens:,} tokens)."
            )
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InputError(
                    f"{what} has an invalid character (a lone surrogate) at position {err.start}."
                ) from None
        if not has_visible_text(text):
            raise InputError(f"{what} is empty: it has no letters, digits or symbols, only invisible characters.")

    def check_text(self, text: object, what: str = "The text") -> int:
        """Return the token count of a valid input, or raise InputError saying what is wrong with it."""
        self.check_chars(text, what)
        tokens = self.count_tokens(text)
        if tokens > self.max_tokens:
            raise InputError(
                f"{what} is {tokens:,} tokens long; MedEIR reads at most {self.max_tokens:,} tokens. "
                f"Shorten it by {tokens - self.max_tokens:,} tokens."
            )
        return tokens

    # -- embeddings -------------------------------------------------------------------------------------------
    def encode_local(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings on this process's device (the GPU function in the app wraps this)."""
        return self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )

    def index_embeddings(self, progress: Progress | None = None) -> np.ndarray:
        """The index embeddings: from memory, from the disk cache, or computed once with progress reports."""
        if self._index_embeddings is None:
            self._index_embeddings = self.cache.get_or_compute(
                self.model_key, self.index_key, self.texts, self.encoder, progress
            )
        return self._index_embeddings

    @property
    def index_cached(self) -> bool:
        """True when a search needs no embedding of the index: in memory, in the disk cache, or precomputed."""
        return self.compact is not None or self._has_float_index()

    def without_float_index(self) -> "Engine":
        """This engine as a fresh start would see it with only the compact index (for measuring it)."""
        import copy

        clone = copy.copy(self)
        clone._index_embeddings, clone._int8_index = None, None
        clone.cache = EmbeddingCache(self.cache.folder / "none")  # a folder with no cached embeddings
        return clone

    def _has_float_index(self) -> bool:
        return self._index_embeddings is not None or self.cache.path(self.model_key, self.index_key).is_file()

    # -- ranking ----------------------------------------------------------------------------------------------
    @staticmethod
    def _truncated(vectors: np.ndarray, dims: int | None) -> np.ndarray:
        if dims is None or dims == vectors.shape[-1]:
            return vectors
        cut = vectors[..., :dims]
        norms = np.linalg.norm(cut, axis=-1, keepdims=True)
        return cut / np.where(norms > 0, norms, 1)

    def _int8(self, dims: int | None, progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
        """The index as int8 (calibrated on the index itself), dequantized for scoring; and the ranges."""
        from sentence_transformers.util.quantization import quantize_embeddings

        dims = dims or self.dimension
        if self._int8_index is None or self._int8_index[0] != dims:
            floats = self._truncated(self.index_embeddings(progress), dims)
            ranges = np.stack([floats.min(axis=0), floats.max(axis=0)]).astype(np.float32)
            self._int8_index = (
                dims,
                self._dequantize(quantize_embeddings(floats, "int8", ranges=ranges), ranges),
                ranges,
            )
        return self._int8_index[1], self._int8_index[2]

    @staticmethod
    def _dequantize(ints: np.ndarray, ranges: np.ndarray) -> np.ndarray:
        steps = (ranges[1] - ranges[0]) / 255
        return ranges[0] + (ints.astype(np.float32) + 128.5) * np.where(steps == 0, 1, steps)

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    def rank(
        self,
        query: np.ndarray,
        k: int,
        keep: np.ndarray | None = None,
        precision: str = "float32",
        dims: int | None = None,
        progress: Progress | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the `k` index entries closest to a query embedding, best first.

        float32: exact cosine over the float index, or, while only the compact index exists, bits + exact rescoring
        of the best candidates. int8: cosine of int8 embeddings (dequantized). binary: 1 - 2 * Hamming / dims, the
        agreement of sign bits.
        """
        query = self._truncated(np.asarray(query, dtype=np.float32), dims)
        if precision == "binary":
            # The k nearest by Hamming distance (CompactIndex), in order of sign agreement; a stable sort, so equal
            # agreements keep the float rerank's order (semantic_search would break those ties arbitrarily).
            bits = self.compact or CompactIndex.from_embeddings(self.index_embeddings(progress), "", "")
            rows = bits.candidates(query, keep, hamming_k=k, rescore_k=k, dims=dims)
            agreement = bits.signs(rows, dims) @ np.where(query > 0, 1.0, -1.0).astype(np.float32) / query.shape[0]
            order = np.argsort(-agreement, kind="stable")
            return rows[order], agreement[order]
        if precision == "float32" and self.compact is not None and not self._has_float_index():
            rows = self.compact.candidates(query, keep, HAMMING_K, max(RESCORE_FACTOR * k, k), dims)
            exact = self._truncated(np.asarray(self.encoder([self.texts[i] for i in rows]), dtype=np.float32), dims)
            return top_k(query, exact, k, rows)
        if precision == "int8":
            index, ranges = self._int8(dims, progress)
            from sentence_transformers.util.quantization import quantize_embeddings

            query = self._dequantize(quantize_embeddings(query[None], "int8", ranges=ranges), ranges)[0]
        else:
            index = self._truncated(self.index_embeddings(progress), dims)
        rows = None if keep is None else np.flatnonzero(keep)
        return top_k(query, index if rows is None else index[rows], k, rows)

    # -- the three jobs ---------------------------------------------------------------------------------------
    def search(
        self,
        query: object,
        top_k: object = 10,
        source: str = "All",
        progress: Progress | None = None,
        precision: str = "float32",
        truncate_dim: object = None,
    ) -> tuple[list[Hit], int]:
        """The `top_k` index entries closest to `query` (cosine), optionally from one source; and the query's tokens.

        `precision` (float32, int8, binary) and `truncate_dim` (the first N dimensions, renormalised) show what
        smaller embeddings cost in ranking.
        """
        tokens = self.check_text(query, "The query")
        top_k = self.check_count(top_k, "The number of results", MAX_RESULTS)
        if source not in SOURCE_CHOICES:
            raise InputError(f"Source must be one of {', '.join(SOURCE_CHOICES)}, not {source!r}.")
        if precision not in PRECISIONS:
            raise InputError(f"Precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
        dims = None if truncate_dim is None else self.check_count(truncate_dim, "The dimension", self.dimension)
        keep = None if source == "All" else self.sources == source
        query_embedding = np.asarray(self.encoder([query]), dtype=np.float32)[0]
        rows, scores = self.rank(query_embedding, top_k, keep, precision, dims, progress)
        hits = [
            Hit(rank, float(score), self.codes[i], str(self.sources[i]), self.texts[i])
            for rank, (i, score) in enumerate(zip(rows, scores, strict=True), start=1)
        ]
        return hits, tokens

    @staticmethod
    def check_count(value: object, what: str, high: int) -> int:
        """A whole number in [1, high], given as an int or an integral float (sliders send 10.0)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"{what} must be a whole number, not {type(value).__name__}.")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise InputError(f"{what} must be a whole number between 1 and {high}, not {value!r}.")
        if not 1 <= value <= high:
            raise InputError(f"{what} must be between 1 and {high}, not {value!r}.")
        return int(value)

    def similarity(self, first: object, second: object) -> tuple[float, int, int]:
        """Cosine similarity of two texts, and their token counts."""
        tokens_first = self.check_text(first, "The first text")
        tokens_second = self.check_text(second, "The second text")
        a, b = np.asarray(self.encoder([first, second]), dtype=np.float32)
        return float(a @ b), tokens_first, tokens_second

    def embed_document(self, text: object) -> tuple[np.ndarray, int, float]:
        """Embed one (possibly long) text: the embedding, its tokens and the seconds it took."""
        tokens = self.check_text(text, "The document")
        start = time.perf_counter()
        embedding = np.asarray(self.encoder([text]), dtype=np.float32)[0]
        return embedding, tokens, time.perf_counter() - start

    def nearest(self, embedding: np.ndarray, top_k: int = 5, progress: Progress | None = None) -> list[Hit]:
        """Index entries closest to an embedding already computed (the long-document tab)."""
        rows, scores = self.rank(embedding, top_k, progress=progress)
        return [
            Hit(r, float(score), self.codes[i], str(self.sources[i]), self.texts[i])
            for r, (i, score) in enumerate(zip(rows, scores, strict=True), 1)
        ]

    def tokenize(self, text: object, limit: int = 512) -> dict:
        """How the MedEIR tokenizer and the reference (bert-base-uncased) cut `text`: pieces and counts."""
        self.check_chars(text, "The text")
        result = {"words": len(text.split()), "limit": limit}
        for key, tokenizer in (("medeir", self.model.tokenizer), ("reference", self.reference_tokenizer)):
            if tokenizer is None:
                result[key] = None
                continue
            pieces = tokenizer.tokenize(text)
            result[key] = {"pieces": pieces[:limit], "count": len(pieces)}
        return result

    def describe(self) -> str:
        """One line saying which model runs where, on which index: shown at the top of the page."""
        device = self.device
        if device.startswith("cuda"):
            import torch

            try:
                device += f" ({torch.cuda.get_device_name()})"
            except Exception:  # ZeroGPU attaches the GPU only inside a GPU call: outside one it has no name
                device += " (ZeroGPU)"
        config = getattr(getattr(self.model[0], "auto_model", None), "config", None)
        shape = (
            f"{config.num_hidden_layers} layers x {config.hidden_size}, "
            if hasattr(config, "num_hidden_layers")
            else ""
        )
        labels, counts = np.unique(self.sources, return_counts=True)
        sources = ", ".join(
            f"{n:,} {label}" for label, n in sorted(zip(labels, counts, strict=True), key=lambda x: -x[1])
        )
        return (
            f"Model **{self.model_name}** ({shape}up to {self.max_tokens:,} tokens) on **{device}**; "
            f"index: {len(self.texts):,} entries ({sources})."
        )
