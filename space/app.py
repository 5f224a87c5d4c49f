"""MedEIR demo: semantic search over ICD-10-CM codes and HPO terms beside all-MiniLM-L6-v2, similarity of two texts,
the MedEIR tokenizer next to bert-base-uncased, and long inputs up to 8,192 tokens.

    python -m space.app [--model PATH_OR_HUB_ID] [--index FILE] [--port 7860]   # in the repository
    python app.py                                                              # in the published Space

Model: --model, else $MEDEIR_MODEL, else models/medeir-small in the repository, else the `models:` entry of the
Space's README front matter (the published Space). Device: on a ZeroGPU Space only `encode_on_device` holds the GPU
(@spaces.GPU); with plain CUDA everything runs on the GPU; otherwise on the CPU. The models load at start-up, outside
any GPU function, as ZeroGPU requires; index embeddings that were not precomputed are embedded in the background.
"""

try:  # present on Spaces (imported first: ZeroGPU must patch CUDA before anything touches it); a no-op elsewhere
    import spaces
except ImportError:
    spaces = None

import argparse
import functools
import html
import logging
import os
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

# The published Space keeps this layout: app.py at its root next to the space/ package (engine.py, index.py).
from space.engine import (
    BASELINE_NAME,
    REPO,
    SOURCE_CHOICES,
    Engine,
    Hit,
    InputError,
    ModelUnavailable,
    create_engine,
    read_examples,
)
from space.index import PRECISIONS, SCORE_SCALES

logger = logging.getLogger("medeir.space")

GPU_SECONDS = 60  # ZeroGPU budget per call: one index chunk or one request
CONCURRENCY = 4  # searches served at once: ranking runs in parallel, encoding is serialised per model
REFERENCE_TOKENIZER = "bert-base-uncased"
RESULT_COLUMNS = ["Rank", "Score", "Code", "Source", "Text"]
COLUMN_WIDTHS = ["9%", "12%", "16%", "17%", "46%"]
PRECISION_LABELS = {"float32": "float32: exact cosine", "int8": "int8", "binary": "binary (1 bit a dimension)"}

ENGINE: Engine | None = None  # set once at start-up (main); the GPU function reaches it without arguments


def gpu(duration: int):
    """`spaces.GPU(duration=...)` when the `spaces` package is installed, otherwise a decorator that does nothing."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


@gpu(duration=GPU_SECONDS)
def encode_on_device(texts: list[str], model: int = 0) -> np.ndarray:
    """The one function that needs the GPU: ZeroGPU attaches a GPU for the length of each call."""
    return ENGINE.models[model].encode_local(texts)


def use_engine(engine: Engine) -> Engine:
    """Make `engine` the page's, every model encoding through the GPU function."""
    global ENGINE
    for number, indexed in enumerate(engine.models):
        indexed.encoder = functools.partial(encode_on_device, model=number)
    ENGINE = engine
    return engine


# -- event handlers: every one turns a bad input into a message in the page, never a stack trace ---------------
def warning_markdown(message: str) -> str:
    return f"<div class='medeir-error'>⚠️ {html.escape(message)}</div>"


def guarded(*empty):
    """Wrap a handler: InputError -> its message (and a toast); any other error -> a short note, logged in full."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except InputError as err:
                gr.Warning(str(err))
                message = str(err)
            except Exception as err:
                logger.exception("handler %s failed", fn.__name__)
                message = f"Something went wrong ({type(err).__name__}: {str(err)[:200]}). The details are in the log."
            out = (*empty, warning_markdown(message))
            return out[0] if len(out) == 1 else out  # Gradio takes a single output's value bare

        return wrapper

    return decorate


def hits_frame(hits: list[Hit] | None) -> pd.DataFrame:
    rows = [[h.rank, f"{h.score:.3f}", h.code, h.source, h.text] for h in hits or []]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


EMPTY_HITS = pd.DataFrame([], columns=RESULT_COLUMNS)


@guarded(EMPTY_HITS, EMPTY_HITS)
def search(
    query: str,
    top_k: float = 10,
    source: str = "All",
    precision: str = "float32",
    dimensions: object = None,
    compare: bool = True,
):
    """MedEIR's ranked results, all-MiniLM-L6-v2's for the same query (float32, full width), and a status line."""
    dims = None if dimensions in (None, "", ENGINE.dimension) else dimensions
    hits, baseline, tokens = ENGINE.search(query, top_k, source, precision, dims, baseline=compare)
    where = "" if source == "All" else f" from {source}"
    scale = SCORE_SCALES[precision] + ("" if dims is None else f", first {int(dims)} dimensions")
    status = f"{len(hits)} results{where} for a {tokens:,}-token query. Scores: {scale}."
    if compare and baseline is None and ENGINE.baseline is not None:
        status += f" ({BASELINE_NAME}'s index is not ready yet: {ENGINE.status()}.)"
    return hits_frame(hits), hits_frame(baseline), status


def run_example(query: str):
    """A search example: the default settings. Raised errors are shown and never cached as the example's output."""
    try:
        return search.__wrapped__(query)
    except InputError as err:
        raise gr.Error(str(err)) from None


@guarded()
def similarity(first: str, second: str):
    score, tokens_first, tokens_second = ENGINE.similarity(first, second)
    return f"Cosine similarity: **{score:.3f}** (texts of {tokens_first:,} and {tokens_second:,} tokens)"


def _highlighted(pieces: list[str]) -> list[tuple[str, str | None]]:
    """Alternate two colours so every token is visible; spaces between tokens carry no label."""
    out: list[tuple[str, str | None]] = []
    for i, piece in enumerate(pieces):
        if i:
            out.append((" ", None))
        out.append((piece, "odd" if i % 2 else "even"))
    return out


@guarded([], [])
def tokenize(text: str):
    result = ENGINE.tokenize(text)
    medeir, reference = result["medeir"], result["reference"]
    lines = [f"{result['words']:,} words -> **MedEIR: {medeir['count']:,} tokens**"]
    if reference is None:
        lines.append(f"({REFERENCE_TOKENIZER} tokenizer not available here)")
    else:
        ratio = reference["count"] / max(medeir["count"], 1)
        lines.append(f"**{REFERENCE_TOKENIZER}: {reference['count']:,} tokens** ({ratio:.2f}x MedEIR's count)")
    if max(medeir["count"], (reference or {"count": 0})["count"]) > result["limit"]:
        lines.append(f"(showing the first {result['limit']:,} tokens)")
    return _highlighted(medeir["pieces"]), _highlighted(reference["pieces"] if reference else []), " · ".join(lines)


def count_tokens(text: str) -> str:
    """Live counter under the long-document box (cheap: tokenizing only)."""
    if not isinstance(text, str) or not text.strip():
        return f"0 / {ENGINE.max_tokens:,} tokens"
    if len(text) > ENGINE.max_chars:
        return warning_markdown(f"{len(text):,} characters: far over the {ENGINE.max_tokens:,}-token limit")
    tokens = ENGINE.count_tokens(text)
    over = tokens > ENGINE.max_tokens
    text_out = f"{tokens:,} / {ENGINE.max_tokens:,} tokens" + (" - over the limit" if over else "")
    return warning_markdown(text_out) if over else text_out


@guarded(EMPTY_HITS)
def embed_document(text: str):
    embedding, tokens, seconds = ENGINE.embed_document(text)
    hits = ENGINE.nearest(embedding, 5)
    return hits_frame(hits), (
        f"Embedded **{tokens:,} tokens** (limit {ENGINE.max_tokens:,}) in {seconds:.2f} s on {ENGINE.device}; "
        f"{embedding.shape[0]}-dimensional embedding. Closest index entries:"
    )


def long_example(target_tokens: int = 3000) -> str:
    """A long real text: consecutive index entries (from the heart-failure codes when present) up to ~target tokens."""
    start = next((i for i, code in enumerate(ENGINE.codes) if code.startswith("I50")), 0)
    parts, tokens = [], 2  # [CLS] and [SEP]
    for text in ENGINE.texts[start:] + ENGINE.texts[:start]:
        parts.append(text.rstrip(".") + ".")
        tokens += ENGINE.count_tokens(parts[-1]) - 2  # word pieces never cross the spaces that join the parts
        if tokens >= target_tokens:
            break
    return " ".join(parts)


def index_status() -> str:
    return ENGINE.status() + "."


# -- the page ---------------------------------------------------------------------------------------------------
CSS = """
.medeir-error { color: #b91c1c; font-weight: 600; }
.medeir-note { font-size: 0.9em; opacity: 0.85; }
"""
NOT_CLINICAL = (
    "A research demo of text embeddings, **not a clinical tool**: do not use it to diagnose, code or treat anyone."
)


def model_card_link(name: str) -> str:
    """A link to the model card: the Hub page of a Hub model; for a local folder, its README or the repository's card."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if (folder / "README.md").is_file():
            return f"model card: `{folder / 'README.md'}`"
        return "model card: `model_card.md` in the repository" if REPO is not None else f"model folder: `{name}`"
    return f"[model card](https://huggingface.co/{name})"


def score_guide(pairs: dict[str, list[str]] | None = None) -> str:
    """How to read a score: the models' own cosines for a known synonym and for an unrelated pair (real benchmark
    texts, from examples.json), measured on the running models at each page load."""
    if not pairs:
        return "Scores are cosine similarities: higher is closer. Compare them with each other, not with 1."
    measured = ENGINE.pair_scores(pairs)
    synonym, unrelated = pairs["synonym"], pairs["unrelated"]
    lines = [
        "**How to read the scores.** Each model has its own scale, so compare scores within a column, not with 1 "
        f'and not across models. A known synonym pair, "{synonym[0]}" / "{synonym[1]}", scores '
        + ", ".join(f"**{s['synonym']:.2f}** ({name})" for name, s in measured.items())
        + f'; an unrelated pair, "{unrelated[0]}" / "{unrelated[1]}", scores '
        + ", ".join(f"**{s['unrelated']:.2f}** ({name})" for name, s in measured.items())
        + "."
    ]
    return "\n".join(lines)


def example_labels(examples: list[dict]) -> list[str]:
    names = {"good": "", "weak": " (a miss: MedEIR's top 10 lacks the answer)"}
    return [f"{e['query']}{names.get(e.get('kind'), '')}" for e in examples]


def build_demo(engine: Engine, examples: dict | None = None) -> gr.Blocks:
    """The four tabs. Handlers use the module's ENGINE (the GPU function must reach it without arguments)."""
    examples = read_examples() if examples is None else examples
    reference_vocab = len(engine.reference_tokenizer) if engine.reference_tokenizer is not None else None
    baseline = engine.baseline is not None
    with gr.Blocks(title="MedEIR: medical text embeddings", analytics_enabled=False) as demo:
        gr.Markdown(
            "# MedEIR: medical text embeddings\n"
            "Describe a condition in your own words and find the ICD-10-CM codes and HPO terms that match, ranked by "
            f"MedEIR{' and, beside it, by ' + BASELINE_NAME if baseline else ''}. MedEIR is an ALiBi encoder that "
            "reads up to 8,192 tokens, with a tokenizer built for medical text.\n\n"
            f"{engine.describe()} ({model_card_link(engine.model_name)})\n\n{NOT_CLINICAL}",
            elem_id="header",
        )
        status = gr.Markdown(index_status(), elem_id="index-status", elem_classes="medeir-note")
        if not engine.wait_ready(timeout=0):  # refresh the line every 2 s until every index is ready
            timer = gr.Timer(2)
            timer.tick(
                lambda: (index_status(), gr.Timer(active=not ENGINE.wait_ready(timeout=0))),
                None,
                [status, timer],
                show_progress="hidden",
            )
        with gr.Tab("Search", id="search"):
            with gr.Row():
                query = gr.Textbox(
                    label="Query",
                    placeholder="Describe a condition in your own words",
                    elem_id="search-query",
                    scale=4,
                )
                search_button = gr.Button("Search", variant="primary", elem_id="search-button", scale=1)
            top_k = gr.Slider(1, 50, value=10, step=1, label="Results", elem_id="search-top-k")
            with gr.Accordion("Advanced settings", open=False, elem_id="search-advanced"):
                source = gr.Radio(list(SOURCE_CHOICES), value="All", label="Source", elem_id="search-source")
                precision = gr.Radio(
                    [(PRECISION_LABELS[p], p) for p in PRECISIONS],
                    value="float32",
                    label="Embedding precision (int8 and binary are made from the same embeddings; their scores are "
                    "on their own scale)",
                    elem_id="search-precision",
                )
                full = engine.dimension
                dimensions = gr.Dropdown(
                    [full, *(d for d in (full // 2, full // 4, full // 8) if d >= 8)],
                    value=full,
                    label="Dimensions (Matryoshka truncation: the first N, renormalised)",
                    elem_id="search-dimensions",
                )
                compare = gr.Checkbox(
                    value=baseline,
                    interactive=baseline,
                    label=f"Show {BASELINE_NAME}'s results beside MedEIR's (float32, all dimensions)",
                    elem_id="search-compare",
                )
            search_status = gr.Markdown(elem_id="search-status")
            with gr.Row(equal_height=False):
                results = gr.Dataframe(
                    EMPTY_HITS,
                    label="MedEIR",
                    interactive=False,
                    wrap=True,
                    max_height=1000,
                    column_widths=COLUMN_WIDTHS,
                    elem_id="search-results",
                )
                baseline_results = gr.Dataframe(
                    EMPTY_HITS,
                    label=f"{BASELINE_NAME} (baseline)",
                    interactive=False,
                    wrap=True,
                    max_height=1000,
                    column_widths=COLUMN_WIDTHS,
                    visible=baseline,
                    elem_id="baseline-results",
                )
            search_examples = examples.get("search") or []
            if search_examples:
                gr.Examples(
                    [[e["query"]] for e in search_examples],
                    inputs=[query],
                    outputs=[results, baseline_results, search_status],
                    fn=run_example,
                    cache_examples=True,
                    cache_mode="lazy",
                    example_labels=example_labels(search_examples),
                    label="Real benchmark queries (click to run)",
                    elem_id="search-examples",
                )
            guide = gr.Markdown(elem_id="score-guide")
            # measured on the first page load, inside a request (a ZeroGPU function cannot run at start-up)
            demo.load(functools.partial(score_guide, pairs=examples.get("pairs") or {}), None, guide)
            inputs = [query, top_k, source, precision, dimensions, compare]
            for trigger in (search_button.click, query.submit):
                trigger(search, inputs, [results, baseline_results, search_status], concurrency_limit=CONCURRENCY)

        with gr.Tab("Similarity", id="similarity"):
            with gr.Row():
                first = gr.Textbox(label="First text", lines=3, elem_id="sim-a")
                second = gr.Textbox(label="Second text", lines=3, elem_id="sim-b")
            sim_button = gr.Button("Compare", variant="primary", elem_id="sim-button")
            sim_result = gr.Markdown(elem_id="sim-result")
            if examples.get("similarity"):
                gr.Examples(
                    examples["similarity"],
                    inputs=[first, second],
                    outputs=[sim_result],
                    fn=similarity,
                    run_on_click=True,
                    label="Real benchmark pairs (click to run)",
                )
            sim_button.click(similarity, [first, second], [sim_result], concurrency_limit=CONCURRENCY)

        with gr.Tab("Tokenizer", id="tokenizer"):
            tok_text = gr.Textbox(
                label="Text", lines=3, value="Pheochromocytoma with paroxysmal hypertension", elem_id="tok-text"
            )
            tok_button = gr.Button("Tokenize", variant="primary", elem_id="tok-button")
            tok_summary = gr.Markdown(elem_id="tok-summary")
            colours = {"even": "#bfdbfe", "odd": "#fde68a"}
            with gr.Row():
                medeir_tokens = gr.HighlightedText(
                    label=f"MedEIR tokenizer ({len(engine.model.tokenizer):,}-token vocabulary)",
                    color_map=colours,
                    show_inline_category=False,
                    elem_id="tok-medeir",
                )
                reference_tokens = gr.HighlightedText(
                    label=f"{REFERENCE_TOKENIZER} ({reference_vocab:,}-token vocabulary)"
                    if reference_vocab
                    else f"{REFERENCE_TOKENIZER} (not available)",
                    color_map=colours,
                    show_inline_category=False,
                    elem_id="tok-reference",
                )
            tok_button.click(tokenize, [tok_text], [medeir_tokens, reference_tokens, tok_summary])

        with gr.Tab("Long document", id="long"):
            doc = gr.Textbox(
                label=f"Document (up to {engine.max_tokens:,} tokens)", lines=10, max_lines=20, elem_id="long-text"
            )
            counter = gr.Markdown(f"0 / {engine.max_tokens:,} tokens", elem_id="long-count")
            with gr.Row():
                example_button = gr.Button("Fill with a ~3,000-token example", elem_id="long-example")
                doc_button = gr.Button("Embed", variant="primary", elem_id="long-button")
            doc_status = gr.Markdown(elem_id="long-status")
            doc_results = gr.Dataframe(
                EMPTY_HITS, label="Closest index entries", interactive=False, wrap=True, column_widths=COLUMN_WIDTHS
            )
            doc.change(count_tokens, [doc], [counter], show_progress="hidden", trigger_mode="always_last")
            example_button.click(long_example, None, [doc])
            doc_button.click(embed_document, [doc], [doc_results, doc_status])
    return demo


def self_check(engine: Engine) -> str:
    """What `--check` runs: every job once on a few index entries, and the page built (nothing launched)."""
    texts = engine.texts[:8]
    for indexed in engine.models:
        vectors = indexed.encode(texts)
        assert vectors.shape[0] == len(texts) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    score, _, _ = engine.similarity(texts[0], texts[0])
    assert abs(score - 1) < 1e-3, score
    hits, _, _ = engine.search(texts[0], 3, baseline=True)
    assert len(hits) == 3, hits
    assert engine.tokenize(texts[0])["medeir"]["count"] > 0
    try:
        engine.check_text("   ")
    except InputError:
        pass
    else:
        raise AssertionError("an empty input was accepted")
    build_demo(engine)
    return f"CHECK OK: {engine.describe()} {engine.status()}"


def examples_cache(engine: Engine) -> Path:
    """Where Gradio keeps the cached example outputs: per model weights, under the demo's cache folder."""
    return engine.cache.folder / "examples" / engine.main.key[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub repository id (default: see above)")
    parser.add_argument("--index", type=Path, default=None, help="index parquet (code, source, text)")
    parser.add_argument("--cache", type=Path, default=None, help="where index embeddings are cached")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU when present)")
    parser.add_argument("--host", default=None, help="server address (default: Gradio's, 127.0.0.1 locally)")
    parser.add_argument("--port", type=int, default=None, help="server port (default: Gradio's, 7860)")
    parser.add_argument("--check", action="store_true", help="load everything, run each job once, do not serve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = use_engine(create_engine(args.model, args.index, args.cache, args.device))
    except (ModelUnavailable, FileNotFoundError, ValueError) as err:
        print(f"MedEIR demo cannot start: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(engine.describe().replace("**", ""), file=sys.stderr, flush=True)

    def progress(fraction: float, desc: str) -> None:
        logger.info("%s", desc)

    os.environ.setdefault("GRADIO_EXAMPLES_CACHE", str(examples_cache(engine)))
    if args.check:
        engine.load_indexes(progress)
        print(self_check(engine).replace("**", ""))
        return
    engine.load_indexes_in_background(progress)
    demo = build_demo(engine).queue(default_concurrency_limit=CONCURRENCY, max_size=64)
    demo.launch(server_name=args.host, server_port=args.port, css=CSS, show_error=False)


if __name__ == "__main__":
    main()
