"""What the Space does, without the page: load a MedEIR model, check what a visitor typed, search the index, compare
two texts, show how the tokenizers cut a text. Free of Gradio, so tests and the publish check drive it directly.
"""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from space.index import EmbeddingCache, Progress, index_fingerprint, model_fingerprint

DEFAULT_MODEL = "models/medeir-small"
MAX_CHARS = 200_000  # refused before tokenizing: far beyond 8,192 tokens of any real text
SOURCE_CHOICES = ("All", "ICD-10-CM", "HPO")


class InputError(ValueError):
    """Something wrong with what the visitor typed; the message is shown in the page as is."""


class ModelUnavailable(RuntimeError):
    """The model could not be loaded; the message says which model and what to do instead."""


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
        return SentenceTransformer(name, trust_remote_code=True, device=device)
    except Exception as err:  # any loader error becomes one readable line
        offline = " (HF_HUB_OFFLINE=1 is set: only models already in the local cache load)" if _offline() else ""
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelUnavailable(
            f"Could not load {name!r}{offline}: {type(err).__name__}: {first_line[:300]} {how}"
        ) from err


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def load_tokenizer(path: Path | str | None):
    """A tokenizer from a local folder (the bert-base-uncased files), or None when there is none."""
    if path is None or not Path(path).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


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
        self.batch_size = batch_size or (256 if device.startswith("cuda") else 32)
        # Replaced by the app with the same function behind @spaces.GPU: the only code that needs the GPU.
        self.encoder: Callable[[list[str]], np.ndarray] = self.encode_local
        self._index_embeddings: np.ndarray | None = None

    # -- inputs -----------------------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        config = getattr(self.model[0], "auto_model", None)
        limit = getattr(getattr(config, "config", None), "max_position_embeddings", None)
        return min(self.model.max_seq_length, limit) if limit else self.model.max_seq_length

    def count_tokens(self, text: str) -> int:
        """Tokens the model reads for `text`, [CLS] and [SEP] included, without truncation."""
        return len(self.model.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])

    def check_text(self, text: object, what: str = "The text") -> int:
        """Return the token count of a valid input, or raise InputError saying what is wrong with it."""
        if not isinstance(text, str):
            raise InputError(f"{what} must be text, not {type(text).__name__}.")
        if not text.strip():
            raise InputError(f"{what} is empty: type something first.")
        if len(text) > MAX_CHARS:
            raise InputError(
                f"{what} is {len(text):,} characters long; the limit is {MAX_CHARS:,} characters "
                f"(and {self.max_tokens:,} tokens)."
            )
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
        return self._index_embeddings is not None or self.cache.path(self.model_key, self.index_key).is_file()

    # -- the three jobs ---------------------------------------------------------------------------------------
    def search(
        self, query: object, top_k: int = 10, source: str = "All", progress: Progress | None = None
    ) -> tuple[list[Hit], int]:
        """The `top_k` index entries closest to `query` (cosine), optionally from one source; and the query's tokens."""
        tokens = self.check_text(query, "The query")
        if not isinstance(top_k, int | float) or not 1 <= int(top_k) <= 100:
            raise InputError(f"The number of results must be between 1 and 100, not {top_k!r}.")
        if source not in SOURCE_CHOICES:
            raise InputError(f"Source must be one of {', '.join(SOURCE_CHOICES)}, not {source!r}.")
        embeddings = self.index_embeddings(progress)
        query_embedding = np.asarray(self.encoder([query]), dtype=np.float32)[0]
        scores = embeddings @ query_embedding
        if source != "All":
            scores = np.where(self.sources == source, scores, -np.inf)
        k = min(int(top_k), int(np.isfinite(scores).sum()))
        top = np.argpartition(-scores, k - 1)[:k] if k else np.array([], dtype=int)
        top = top[np.argsort(-scores[top], kind="stable")]
        hits = [
            Hit(rank, float(scores[i]), self.codes[i], str(self.sources[i]), self.texts[i])
            for rank, i in enumerate(top, start=1)
        ]
        return hits, tokens

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
        scores = self.index_embeddings(progress) @ embedding
        top = np.argsort(-scores, kind="stable")[:top_k]
        return [
            Hit(r, float(scores[i]), self.codes[i], str(self.sources[i]), self.texts[i]) for r, i in enumerate(top, 1)
        ]

    def tokenize(self, text: object, limit: int = 512) -> dict:
        """How the MedEIR tokenizer and the reference (bert-base-uncased) cut `text`: pieces and counts."""
        if not isinstance(text, str):
            raise InputError(f"The text must be text, not {type(text).__name__}.")
        if not text.strip():
            raise InputError("The text is empty: type something first.")
        if len(text) > MAX_CHARS:
            raise InputError(f"The text is {len(text):,} characters long; the limit is {MAX_CHARS:,} characters.")
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
