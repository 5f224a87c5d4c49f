"""Train MedEIR's lower-cased WordPiece tokenizer from the corpus: `python -m tokenizer.train [--recipe NAME]`.

Exactly 52,543 entries, BERT's normaliser and pre-tokeniser, and BERT's special-token ids ([PAD]=0, [UNK]=100,
[CLS]=101, [SEP]=102, [MASK]=103) so a bert-base-uncased-family checkpoint (all-MiniLM-L6-v2) keeps its special
embedding rows at the same index when converted; ids 1-99 hold ordinary learned tokens, not BERT's [unused] slots.
The recipe (corpus weighting, minimum frequency, and optionally `"extends": "bert-base-uncased"`: keep all 30,522
BERT entries at their ids and add the most frequent learned tokens BERT lacks) lives in tokenizer/recipes.json. `--sweep` trains every recipe
and records its fragmentation figures in results/tokenizer/sweep.json.
"""

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from corpus.dataset import DEFAULT_ROOT, DataBuild
from corpus.reference import minilm_path

HERE = Path(__file__).resolve().parent
SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def load_recipe(name: str | None = None) -> tuple[str, dict]:
    """The named recipe (default: the file's default) merged over the common settings."""
    spec = json.loads((HERE / "recipes.json").read_text())
    name = name or spec["default"]
    return name, {**spec["common"], **spec["recipes"][name]}


def load_corpus(data: DataBuild) -> list[dict]:
    """Rows of the build's training corpus: text, source, domain (held-out text never reaches this file)."""
    return data.corpus("train", columns=["text", "source", "domain"]).to_pylist()


def weighted_texts(rows: list[dict], weights: dict[str, int]) -> Iterator[str]:
    """Each text repeated by the weight of its domain or source (the largest applicable; 1 by default)."""
    for row in rows:
        repeat = max(weights.get(row["domain"], 1), weights.get(row["source"], 1))
        for _ in range(repeat):
            yield row["text"]


def bert_normalizer() -> normalizers.Normalizer:
    """bert-base-uncased's normaliser (lower-case, strip accents): the one BertTokenizer applies at run time."""
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)


def alphabet(rows: list[dict], extra: str) -> list[str]:
    """Every character of the normalised corpus plus the recipe's extra characters, sorted.

    The whole alphabet is kept (no frequency cut-off), so no tie decides which characters survive.
    """
    norm = bert_normalizer()
    chars = set(norm.normalize_str(extra))
    for row in rows:
        chars.update(norm.normalize_str(row["text"]))
    return sorted(c for c in chars if not c.isspace())


def train_vocab(rows: list[dict], recipe: dict) -> list[str]:
    """Train WordPiece and return its vocabulary in trained id order (special tokens first).

    The tokenizers trainer numbers word-initial and `##` characters in hash-map order, and merges of equal count are
    ordered by those numbers, so two runs can differ. Passing the sorted alphabet (bare and `##`) as leading
    "special tokens" fixes every base id up front; merge order, and so the vocabulary, is then reproducible.
    These entries are only id seeds: the saved tokenizer is rebuilt from the vocabulary as a plain BertTokenizer.
    """
    chars = alphabet(rows, recipe.get("extra_alphabet", ""))
    seeds = list(SPECIAL_IDS) + chars + [f"##{c}" for c in chars]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = bert_normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=recipe["vocab_size"],
        min_frequency=recipe["min_frequency"],
        limit_alphabet=len(chars),  # keep every character: the seeds already hold them all
        special_tokens=seeds,
        continuing_subword_prefix="##",
        show_progress=sys.stderr.isatty(),
    )
    length = sum(max(recipe["weights"].get(r["domain"], 1), recipe["weights"].get(r["source"], 1)) for r in rows)
    tok.train_from_iterator(weighted_texts(rows, recipe["weights"]), trainer=trainer, length=length)
    vocab = tok.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


def bert_layout(tokens: list[str], size: int) -> list[str]:
    """Put the special tokens at BERT's ids and fill the gaps with learned tokens, keeping exactly `size` entries."""
    learned = [t for t in tokens if t not in SPECIAL_IDS]
    if len(learned) + len(SPECIAL_IDS) < size:
        raise ValueError(f"trainer produced {len(learned) + len(SPECIAL_IDS)} tokens, fewer than {size}")
    out: list[str] = []
    it = iter(learned)
    by_id = {i: t for t, i in SPECIAL_IDS.items()}
    for i in range(size):
        out.append(by_id[i] if i in by_id else next(it))
    return out


def bert_vocab() -> list[str]:
    """bert-base-uncased's 30,522 entries in id order (the vocab.txt shipped with all-MiniLM-L6-v2's package)."""
    return (minilm_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()


def superset_layout(base: list[str], tokens: list[str], size: int) -> list[str]:
    """`base` unchanged at its own ids, then the learned tokens it lacks, in trained order, up to `size` entries.

    With bert-base-uncased as `base`, every token of a BERT-family checkpoint keeps its id, so a converted
    all-MiniLM-L6-v2 keeps all of its embeddings and only the added medical tokens start from their pieces.
    """
    known = set(base)
    added = [t for t in tokens if t not in known and t not in SPECIAL_IDS]
    if len(base) + len(added) < size:
        raise ValueError(f"only {len(added)} learned tokens are new to the base vocabulary; {size - len(base)} needed")
    missing = {t: i for t, i in SPECIAL_IDS.items() if base[i] != t}
    if missing:
        raise ValueError(f"base vocabulary lacks BERT's special tokens at their ids: {missing}")
    return base + added[: size - len(base)]


def save(tokens: list[str], out: Path, model_max_length: int) -> None:
    """Save as a transformers BertTokenizer (tokenizer.json + tokenizer_config.json) plus vocab.txt."""
    from transformers import BertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True, model_max_length=model_max_length
    )
    tokenizer.save_pretrained(str(out))
    (out / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")


def vocab_sha256(tokens: list[str]) -> str:
    return hashlib.sha256("".join(f"{t}\n" for t in tokens).encode("utf-8")).hexdigest()


def build(data: DataBuild, out: Path, recipe_name: str | None = None) -> dict:
    """Train, lay out, save, and record what was built from what (tokenizer/build.json)."""
    name, recipe = load_recipe(recipe_name)
    t0 = time.time()
    rows = load_corpus(data)
    learned = train_vocab(rows, recipe)
    if recipe.get("extends") == "bert-base-uncased":
        tokens = superset_layout(bert_vocab(), learned, recipe["vocab_size"])
    elif recipe.get("extends"):
        raise ValueError(f"unknown base vocabulary {recipe['extends']!r}: only 'bert-base-uncased'")
    else:
        tokens = bert_layout(learned, recipe["vocab_size"])
    save(tokens, out, recipe["model_max_length"])
    record = {
        "recipe": name,
        "settings": recipe,
        "corpus": {
            "rows": len(rows),
            "sha256": hashlib.sha256(data.corpus_path().read_bytes()).hexdigest(),
            "dataset_version": data.version(),
        },
        "vocab_size": len(tokens),
        "vocab_sha256": vocab_sha256(tokens),
        "special_token_ids": SPECIAL_IDS,
    }
    (out / "build.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(
        f"[tokenizer] {name}: {len(tokens):,} tokens from {len(rows):,} texts in {time.time() - t0:.0f}s -> {out}",
        flush=True,
    )
    return record


def sweep(data: DataBuild, names: list[str] | None = None) -> list[dict]:
    """Train recipes from recipes.json (all, or `names`) and record their headline fragmentation figures in
    results/tokenizer/sweep.json (results of recipes not re-run are kept)."""
    from tokenizer import fragmentation

    spec = json.loads((HERE / "recipes.json").read_text())
    path = fragmentation.REPORTS / "sweep.json"
    done = {r["recipe"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    sets = fragmentation.held_out_sets(data)
    bert = fragmentation.load_bert()
    for name in names or list(spec["recipes"]):
        with tempfile.TemporaryDirectory() as tmp:
            build(data, Path(tmp), name)
            figures = fragmentation.headline(fragmentation.load_medeir(Path(tmp)), bert, sets)
        done[name] = {"recipe": name, "weights": spec["recipes"][name]["weights"], **figures}
        print(f"[sweep] {name}: {figures}", flush=True)
    results = [done[n] for n in spec["recipes"] if n in done]
    path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=DataBuild, default=DataBuild(DEFAULT_ROOT), help="output folder of corpus.build")
    parser.add_argument("--out", type=Path, default=HERE, help="where to save the tokenizer (default: tokenizer/)")
    parser.add_argument("--recipe", default=None, help="recipe name in tokenizer/recipes.json")
    parser.add_argument(
        "--sweep", action="store_true", help="train recipes and record them in results/tokenizer/sweep.json"
    )
    parser.add_argument("--recipes", default=None, help="with --sweep: comma-separated recipes (default: all)")
    args = parser.parse_args(argv)
    if not args.data.corpus_path().exists():
        parser.error(f"{args.data.corpus_path()} not found: run `python -m corpus.build` first")
    if args.sweep:
        sweep(args.data, args.recipes.split(",") if args.recipes else None)
    else:
        build(args.data, args.out, args.recipe)


if __name__ == "__main__":
    main()
