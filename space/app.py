"""MedEIR demo: semantic search over ICD-10-CM codes, HPO terms and diseases beside all-MiniLM-L6-v2 (optionally
reranked by a late-interaction MedEIR-ColBERT model, with its token-by-token matches), similarity of two texts, the
MedEIR tokenizer next to bert-base-uncased, and long inputs up to 8,192 tokens.

    python -m space.app [--model PATH_OR_HUB_ID] [--colbert PATH_OR_HUB_ID] [--index FILE] [--port 7860]  # repository
    python app.py                                                                                    # the Space

Model: --model, else $MEDEIR_MODEL, else models/medeir-small in the repository, else the first `models:` entry of
the Space's README front matter (the published Space). Late-interaction model: --colbert, else $MEDEIR_COLBERT_MODEL
("none": off), else models/medeir-small-colbert in the repository when it exists, else the second `models:` entry of
the Space's front matter when there is one (the published Space), else none (no rerank). Device: on a ZeroGPU Space
only `encode_on_device` holds the GPU (@spaces.GPU); with plain CUDA everything runs on the GPU; otherwise on the
CPU. The models load at start-up, outside any GPU function, as ZeroGPU requires; index embeddings that were not
precomputed are embedded in the background.
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
    COLBERT_NAME,
    REPO,
    RERANK_CANDIDATES,
    SOURCE_CHOICES,
    Engine,
    Hit,
    InputError,
    ModelUnavailable,
    TokenMatches,
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
RERANK_COLUMNS = ["Rank", "Score", "Cosine", "Token match", "Dense rank", "Code", "Source", "Text"]
RERANK_WIDTHS = ["6%", "8%", "8%", "9%", "10%", "12%", "11%", "36%"]
TOKEN_VIEW_COLUMNS = 256  # document tokens drawn in the heatmap; the list under it covers every one
RERANK_LABEL = f"Rerank with {COLBERT_NAME} (cosine + token match)"
RERANK_HINT = (
    f'Tick "{RERANK_LABEL}" and search: MedEIR\'s top {RERANK_CANDIDATES} results are then reordered by their cosine '
    f"plus {COLBERT_NAME}'s token match, and the token matches of each reordered result are shown."
)
RERANK_STATUS = (
    "MedEIR's top {candidates} results reordered by cosine + {colbert} token match. Score = Cosine (MedEIR's exact "
    "float32 cosine, all dimensions, whatever the search precision) + Token match (each token's best cosine with a "
    "token of the other text, averaged over the query's tokens, or over the result's when the query has more than "
    "twice its tokens)."
)
SIDE_NAMES = {"query": "query", "document": "result"}
PRECISION_LABELS = {"float32": "float32: exact cosine", "int8": "int8", "binary": "binary (1 bit a dimension)"}


def gpu(duration: int):
    """`spaces.GPU(duration=...)` when the `spaces` package is installed, otherwise a decorator that does nothing."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def use_gpu(engine: Engine) -> Engine:
    """Route every model of `engine` through one GPU function, so that on ZeroGPU a GPU is attached for each call.

    Decorated here, at start-up and before the page launches, as ZeroGPU requires. The function closes over `engine`:
    ZeroGPU runs it in a worker forked from this process, which inherits the loaded models, so only the texts and the
    model's number cross to the worker (pickled).
    """

    @gpu(duration=GPU_SECONDS)
    def encode_on_device(texts: list[str], model: int = 0, side: str | None = None):
        """The one function that needs the GPU: ZeroGPU attaches a GPU for the length of each call. `model` picks a
        dense model (embeddings); `side` ("query" or "document") asks the late-interaction model for token vectors
        instead."""
        if side is not None:
            return engine.colbert.encode_local(texts, side)
        return engine.models[model].encode_local(texts)

    for number, indexed in enumerate(engine.models):
        indexed.encoder = functools.partial(encode_on_device, model=number)
    if engine.colbert is not None:
        engine.colbert.encoder = encode_on_device
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


def moved(hit: Hit) -> str:
    """The dense rank a reranked result came from, and how far the rerank moved it."""
    shift = hit.dense_rank - hit.rank
    return f"{hit.dense_rank} ({'↑' if shift > 0 else '↓'}{abs(shift)})" if shift else f"{hit.dense_rank} (=)"


def reranked_frame(hits: list[Hit] | None) -> pd.DataFrame:
    """Reranked results: the score they are ordered by, its two parts, and the dense rank each came from."""
    rows = [
        [h.rank, f"{h.score:.3f}", f"{h.cosine:.3f}", f"{h.token_match:.3f}", moved(h), h.code, h.source, h.text]
        for h in hits or []
    ]
    return pd.DataFrame(rows, columns=RERANK_COLUMNS)


EMPTY_RERANK = pd.DataFrame([], columns=RERANK_COLUMNS)


def _colour(fraction: float) -> str:
    """White (0) to dark blue (1)."""
    low, high = np.array([255, 255, 255]), np.array([30, 64, 175])
    r, g, b = (low + (high - low) * min(max(fraction, 0.0), 1.0)).round().astype(int)
    return f"rgb({r},{g},{b})"


TOKEN_TABLE_STYLE = """<style>
.medeir-tokens { overflow-x: auto; }
.medeir-tokens table { border-collapse: collapse; font-size: 12px; }
.medeir-tokens caption { caption-side: bottom; text-align: left; padding-top: 6px; }
.medeir-tokens th { font-weight: normal; padding: 2px 4px; }
.medeir-tokens thead th { writing-mode: vertical-rl; transform: rotate(180deg); }
.medeir-tokens tbody th { text-align: right; }
.medeir-tokens td { min-width: 18px; height: 18px; text-align: center; font-size: 10px; }
.medeir-tokens td.dark { color: white; }
.medeir-tokens td.best { outline: 2px solid #dc2626; outline-offset: -2px; }
.medeir-tokens td.adds { font-size: 12px; padding-left: 6px; }
.medeir-tokens .added { color: #6b7280; font-style: italic; }
</style>"""


def outlined(matches: TokenMatches) -> set[tuple[int, int]]:
    """The cells the rerank reads: each token of the side it reads with its best match on the other side."""
    if matches.side == "query":
        return {(i, int(j)) for i, j in enumerate(matches.side_best)}
    return {(int(i), j) for j, i in enumerate(matches.side_best)}


def token_table_html(matches: TokenMatches, max_columns: int = TOKEN_VIEW_COLUMNS) -> str:
    """The similarity of every query token (rows) with every document token (columns) as coloured cells, the best
    matches the rerank reads outlined with their values (each row's when it reads the query's side, each column's
    when it reads the result's), and what each query token adds to MaxSim at the row's end. Tokens the model adds
    ([CLS], [SEP], prompt, query expansion) are grey and italic: they count too."""
    sims = matches.similarities
    low, high = float(sims.min()), float(sims.max())
    span = high - low if high > low else 1.0
    shown = min(sims.shape[1], max_columns)

    def label(token: str, is_text: bool) -> str:
        return html.escape(token) if is_text else f"<span class='added'>{html.escape(token)}</span>"

    head = "".join(
        f"<th scope='col'>{label(token, bool(is_text))}</th>"
        for token, is_text in zip(matches.document_tokens[:shown], matches.document_is_text[:shown], strict=True)
    )
    best = outlined(matches)
    rows = []
    for i, (token, is_text) in enumerate(zip(matches.query_tokens, matches.query_is_text, strict=True)):
        cells = []
        for j in range(shown):
            value = float(sims[i, j])
            fraction = (value - low) / span
            tip = html.escape(f"{token} / {matches.document_tokens[j]}: {value:.3f}", quote=True)
            classes = " ".join(c for c, on in (("dark", fraction > 0.6), ("best", (i, j) in best)) if on)
            shown_value = f"{value:.2f}" if (i, j) in best else ""
            cells.append(
                f"<td class='{classes}' title='{tip}' style='background:{_colour(fraction)}'>{shown_value}</td>"
            )
        rows.append(
            f"<tr><th scope='row'>{label(token, bool(is_text))}</th>{''.join(cells)}"
            f"<td class='adds'>{matches.contributions[i]:.3f}</td></tr>"
        )
    cut = (
        f" The map shows the first {shown:,} of the document's {sims.shape[1]:,} token vectors; the list below covers "
        "all of them."
        if shown < sims.shape[1]
        else ""
    )
    side = SIDE_NAMES[matches.side]
    why = "at most twice the result's tokens" if matches.side == "query" else "under half the query's tokens"
    caption = (
        f"Token vector similarity (cosine), from {low:.2f} (white) to {high:.2f} (dark blue). Outlined: each {side} "
        f"token's best match (the {side} has {why}); their mean over the {len(matches.side_best)} {side} "
        f"tokens, {matches.mean:.3f}, is the token match the rerank adds to the cosine. The last column is what each "
        f"query token's best match adds to MaxSim, whose sum is {matches.score:.3f}. Grey italic: tokens the model "
        f"adds.{cut}"
    )
    return (
        f"{TOKEN_TABLE_STYLE}<div class='medeir-tokens'><table><caption>{html.escape(caption, quote=False)}</caption>"
        f"<thead><tr><th></th>{head}<th scope='col'>adds</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def token_list_text(matches: TokenMatches) -> str:
    """One line per token of the side the rerank reads (shorter_side): its best token on the other side and their
    similarity; then MaxSim (each query token's best match, summed: the model's own score) and last the mean of the
    best matches listed, the token match of the rerank."""
    if matches.side == "query":
        tokens, is_text, other = matches.query_tokens, matches.query_is_text, matches.document_tokens
        values = matches.similarities[np.arange(len(matches.side_best)), matches.side_best]
    else:
        tokens, is_text, other = matches.document_tokens, matches.document_is_text, matches.query_tokens
        values = matches.similarities[matches.side_best, np.arange(len(matches.side_best))]
    lines = [
        f"{token}{'' if text else ' (added by the model)'} -> {other[j]} ({value:.3f})"
        for token, text, j, value in zip(tokens, is_text, matches.side_best, values, strict=True)
    ]
    side, other_side = SIDE_NAMES[matches.side], SIDE_NAMES["document" if matches.side == "query" else "query"]
    return "\n".join(
        [
            f"Each {side} token's best match in the {other_side}:",
            *lines,
            f"MaxSim (each query token's best match, summed; the model's own score): {matches.score:.3f}",
            f"Mean over the {len(lines)} {side} tokens (token match): {matches.mean:.3f}",
        ]
    )


def _highlighted(pieces: list[str]) -> list[tuple[str, str | None]]:
    """Alternate two colours so every token is visible; spaces between tokens carry no label."""
    out: list[tuple[str, str | None]] = []
    for i, piece in enumerate(pieces):
        if i:
            out.append((" ", None))
        out.append((piece, "odd" if i % 2 else "even"))
    return out


class Page:
    """The page's event handlers over one engine (no module state: the page is built from the engine it serves)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @guarded(EMPTY_HITS, EMPTY_HITS)
    def search(
        self,
        query: str,
        top_k: int | float = 10,  # a slider sends a float
        source: str = "All",
        precision: str = "float32",
        dimensions: int | str | None = None,  # the dropdown's width; None or "" (or the full width): all of them
        compare: bool = True,
    ):
        """MedEIR's ranked results, all-MiniLM-L6-v2's for the same query (float32, full width), and a status line."""
        engine = self.engine
        dims = None if dimensions in (None, "", engine.dimension) else dimensions
        hits, baseline, tokens = engine.search(
            query, top_k, source=source, precision=precision, truncate_dim=dims, baseline=compare
        )
        where = "" if source == "All" else f" from {source}"
        scale = SCORE_SCALES[precision] + ("" if dims is None else f", first {int(dims)} dimensions")
        status = f"{len(hits)} results{where} for a {tokens:,}-token query. Scores: {scale}."
        if compare and baseline is None and engine.baseline is not None:
            status += f" ({BASELINE_NAME}'s index is not ready yet: {engine.status()}.)"
        return hits_frame(hits), hits_frame(baseline), status

    @guarded(EMPTY_RERANK, gr.update(choices=[], value=None), None)
    def rerank(
        self,
        query: str,
        top_k: int | float = 10,
        source: str = "All",
        precision: str = "float32",
        dimensions: int | str | None = None,
        rerank: bool = False,
    ):
        """MedEIR's results reordered by cosine + the late-interaction model's token match (empty when not asked for),
        the results to pick for the token view (the top one picked), the query they answer (kept for the token view),
        and a status line."""
        if not rerank:
            return EMPTY_RERANK, gr.update(choices=[], value=None), None, RERANK_HINT
        engine = self.engine
        dims = None if dimensions in (None, "", engine.dimension) else dimensions
        hits, candidates = engine.rerank(query, top_k, source=source, precision=precision, truncate_dim=dims)
        colbert = engine.colbert
        status = RERANK_STATUS.format(candidates=candidates, colbert=COLBERT_NAME)
        tokens = colbert.count_tokens(query, "query")
        if tokens > colbert.query_tokens:
            status += f" {COLBERT_NAME} reads the first {colbert.query_tokens} of the query's {tokens:,} tokens."
        choices = [(f"{h.rank}. {h.code}: {h.text[:80]}", h.row) for h in hits]
        return reranked_frame(hits), gr.update(choices=choices, value=hits[0].row if hits else None), query, status

    @guarded("", "")
    def token_view(self, query: str | None, row: int | None):
        """The token-by-token matches of the reranked query with the picked result: a heatmap and the same as text."""
        if not query or row is None:  # nothing reranked yet
            return "", "", ""
        matches = self.engine.token_matches(query, self.engine.entry_text(row))
        return token_table_html(matches), token_list_text(matches), ""

    def run_example(self, query: str, source: str = "All"):
        """A search example: the default settings within its source. Raised errors are shown and never cached as the
        example's output."""
        try:
            return Page.search.__wrapped__(self, query, source=source)
        except InputError as err:
            raise gr.Error(str(err)) from None

    @guarded()
    def similarity(self, first: str, second: str):
        score, tokens_first, tokens_second = self.engine.similarity(first, second)
        return f"Cosine similarity: **{score:.3f}** (texts of {tokens_first:,} and {tokens_second:,} tokens)"

    @guarded([], [])
    def tokenize(self, text: str):
        result = self.engine.tokenize(text)
        medeir, reference = result["medeir"], result["reference"]
        lines = [f"{result['words']:,} words -> **MedEIR: {medeir['count']:,} tokens**"]
        if reference is None:
            lines.append(f"({REFERENCE_TOKENIZER} tokenizer not available here)")
        else:
            ratio = reference["count"] / max(medeir["count"], 1)
            lines.append(f"**{REFERENCE_TOKENIZER}: {reference['count']:,} tokens** ({ratio:.2f}x MedEIR's count)")
        if max(medeir["count"], (reference or {"count": 0})["count"]) > result["limit"]:
            lines.append(f"(showing the first {result['limit']:,} tokens)")
        shown = _highlighted(reference["pieces"] if reference else [])
        return _highlighted(medeir["pieces"]), shown, " · ".join(lines)

    def count_tokens(self, text: str) -> str:
        """Live counter under the long-document box (cheap: tokenizing only)."""
        limit = self.engine.max_tokens
        if not isinstance(text, str) or not text.strip():
            return f"0 / {limit:,} tokens"
        if len(text) > self.engine.max_chars:
            return warning_markdown(f"{len(text):,} characters: far over the {limit:,}-token limit")
        tokens = self.engine.count_tokens(text)
        over = tokens > limit
        text_out = f"{tokens:,} / {limit:,} tokens" + (" - over the limit" if over else "")
        return warning_markdown(text_out) if over else text_out

    @guarded(EMPTY_HITS)
    def embed_document(self, text: str):
        engine = self.engine
        embedding, tokens, seconds = engine.embed_document(text)
        hits = engine.nearest(embedding, 5)
        return hits_frame(hits), (
            f"Embedded **{tokens:,} tokens** (limit {engine.max_tokens:,}) in {seconds:.2f} s on {engine.device}; "
            f"{embedding.shape[0]}-dimensional embedding. Closest index entries:"
        )

    def long_example(self, target_tokens: int = 3000) -> str:
        """A long real text: consecutive index entries (from the heart-failure codes when present) up to ~target
        tokens."""
        codes, texts = self.engine.codes, self.engine.texts
        start = next((i for i, code in enumerate(codes) if code.startswith("I50")), 0)
        parts, tokens = [], 2  # [CLS] and [SEP]
        for text in texts[start:] + texts[:start]:
            parts.append(text.rstrip(".") + ".")
            tokens += self.engine.count_tokens(parts[-1]) - 2  # word pieces never cross the spaces that join the parts
            if tokens >= target_tokens:
                break
        return " ".join(parts)

    def index_status(self) -> str:
        return self.engine.status() + "."

    def refresh_status(self):
        """The status line, and the timer that asks again until every index is ready."""
        return self.index_status(), gr.Timer(active=not self.engine.wait_ready(timeout=0))

    def score_guide(self, pairs: dict[str, list[str]] | None = None) -> str:
        """How to read a score: the models' own cosines for a known synonym and for an unrelated pair (real
        benchmark texts, from examples.json), measured on the running models at each page load."""
        if not pairs:
            return "Scores are cosine similarities: higher is closer. Compare them with each other, not with 1."
        measured = self.engine.pair_scores(pairs)
        synonym, unrelated = pairs["synonym"], pairs["unrelated"]
        return (
            "**How to read the scores.** Each model has its own scale, so compare scores within a column, not with 1 "
            f'and not across models. A known synonym pair, "{synonym[0]}" / "{synonym[1]}", scores '
            + ", ".join(f"**{s['synonym']:.2f}** ({name})" for name, s in measured.items())
            + f'; an unrelated pair, "{unrelated[0]}" / "{unrelated[1]}", scores '
            + ", ".join(f"**{s['unrelated']:.2f}** ({name})" for name, s in measured.items())
            + "."
        )


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


def example_labels(examples: list[dict]) -> list[str]:
    names = {"good": "", "weak": " (a miss: MedEIR's top 10 lacks the answer)"}
    within = {"All": ""} | {label: f"{label}: " for label in SOURCE_CHOICES[1:]}  # first: long labels are cut
    return [f"{within[e.get('source', 'All')]}{e['query']}{names.get(e.get('kind'), '')}" for e in examples]


def build_demo(engine: Engine, examples: dict | None = None) -> gr.Blocks:
    """The page for `engine`: a header, the index status, and four tabs whose handlers are bound to the engine."""
    examples = read_examples() if examples is None else examples
    page = Page(engine)
    with gr.Blocks(title="MedEIR: medical text embeddings", analytics_enabled=False) as demo:
        header(engine)
        status = gr.Markdown(page.index_status(), elem_id="index-status", elem_classes="medeir-note")
        if not engine.wait_ready(timeout=0):  # refresh the line every 2 s until every index is ready
            timer = gr.Timer(2)
            timer.tick(page.refresh_status, None, [status, timer], show_progress="hidden")
        with gr.Tab("Search", id="search"):
            search_tab(page, demo, examples)
        with gr.Tab("Similarity", id="similarity"):
            similarity_tab(page, examples)
        with gr.Tab("Tokenizer", id="tokenizer"):
            tokenizer_tab(page)
        with gr.Tab("Long document", id="long"):
            long_document_tab(page)
    return demo


def header(engine: Engine) -> None:
    baseline = f" and, beside it, by {BASELINE_NAME}" if engine.baseline is not None else ""
    gr.Markdown(
        "# MedEIR: medical text embeddings\n"
        "Describe a condition in your own words and find the ICD-10-CM codes and HPO terms that match, or list "
        "symptoms and search the diseases (Source: Disease, under Advanced settings), ranked by "
        f"MedEIR{baseline}. MedEIR is an ALiBi encoder that "
        "reads up to 8,192 tokens, with a tokenizer built for medical text.\n\n"
        f"{engine.describe()} ({model_card_link(engine.model_name)})\n\n{NOT_CLINICAL}",
        elem_id="header",
    )


def search_tab(page: Page, demo: gr.Blocks, examples: dict) -> None:
    """Query, result count, the rerank choice and advanced settings; MedEIR's results beside the baseline's; the
    reranked results and their token matches (with a late-interaction model); the examples; the guide."""
    with gr.Row():
        query = gr.Textbox(
            label="Query", placeholder="Describe a condition in your own words", elem_id="search-query", scale=4
        )
        search_button = gr.Button("Search", variant="primary", elem_id="search-button", scale=1)
    top_k = gr.Slider(1, 50, value=10, step=1, label="Results", elem_id="search-top-k")
    rerank = rerank_setting(page.engine)
    with gr.Accordion("Advanced settings", open=False, elem_id="search-advanced"):
        settings = search_settings(page.engine)
    search_status = gr.Markdown(elem_id="search-status")
    with gr.Row(equal_height=False):
        outputs = [*result_tables(page.engine.baseline is not None), search_status]
    reranked = rerank_section() if rerank is not None else None
    search_examples = examples.get("search") or []
    if search_examples:
        gr.Examples(
            [[e["query"], e.get("source", "All")] for e in search_examples],
            inputs=[query, settings[0]],  # the query and the source filter
            outputs=outputs,
            fn=page.run_example,
            cache_examples=True,
            cache_mode="lazy",
            example_labels=example_labels(search_examples),
            label="Real benchmark queries (click to run)",
            elem_id="search-examples",
        )
    guide = gr.Markdown(elem_id="score-guide")
    # measured on the first page load, inside a request (a ZeroGPU function cannot run at start-up)
    demo.load(functools.partial(page.score_guide, pairs=examples.get("pairs") or {}), None, guide)
    for trigger in (search_button.click, query.submit):
        event = trigger(page.search, [query, top_k, *settings], outputs, concurrency_limit=CONCURRENCY)
        if reranked is not None:  # then the rerank (when ticked), then the token matches of its top result
            table, choice, reranked_query, rerank_status, token_outputs = reranked
            rerank_inputs = [query, top_k, *settings[:3], rerank]  # the query, count, source, precision, dimensions
            event.then(
                page.rerank,
                rerank_inputs,
                [table, choice, reranked_query, rerank_status],
                concurrency_limit=CONCURRENCY,
            ).then(page.token_view, [reranked_query, choice], token_outputs, concurrency_limit=CONCURRENCY)
            choice.input(page.token_view, [reranked_query, choice], token_outputs, concurrency_limit=CONCURRENCY)


def search_settings(engine: Engine) -> list[gr.components.Component]:
    """Source, precision, Matryoshka dimensions and the baseline column: the search's advanced settings."""
    full, baseline = engine.dimension, engine.baseline is not None
    source = gr.Radio(list(SOURCE_CHOICES), value="All", label="Source", elem_id="search-source")
    precision = gr.Radio(
        [(PRECISION_LABELS[p], p) for p in PRECISIONS],
        value="float32",
        label="Embedding precision (int8 and binary are made from the same embeddings; their scores are "
        "on their own scale)",
        elem_id="search-precision",
    )
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
    return [source, precision, dimensions, compare]


def rerank_setting(engine: Engine) -> gr.Checkbox | None:
    """The rerank checkbox when a late-interaction model is loaded; otherwise one line saying that none is."""
    if engine.colbert is None:
        gr.Markdown(engine.colbert_status(), elem_id="rerank-absent", elem_classes="medeir-note")
        return None
    return gr.Checkbox(
        value=False,
        label=RERANK_LABEL,
        info=engine.colbert_status().replace("**", ""),
        elem_id="search-rerank",
    )


def rerank_section() -> tuple:
    """The reranked results, and the token view: a result to pick, its heatmap and the same matches as text."""
    rerank_status = gr.Markdown(RERANK_HINT, elem_id="rerank-status")
    table = gr.Dataframe(
        EMPTY_RERANK,
        label=f"MedEIR's results reranked by cosine + {COLBERT_NAME} token match",
        interactive=False,
        wrap=True,
        max_height=1000,
        column_widths=RERANK_WIDTHS,
        elem_id="rerank-results",
    )
    # the query the reranked results answer, for the token view (a hidden box: a gr.State would hold a heartbeat
    # connection open for every visitor)
    reranked_query = gr.Textbox(visible=False, elem_id="reranked-query")
    with gr.Accordion("Token matches: each token's best match between the query and a result", elem_id="token-view"):
        choice = gr.Dropdown([], value=None, label="Reranked result", elem_id="token-choice")
        token_status = gr.Markdown(elem_id="token-status")
        heatmap = gr.HTML(elem_id="token-heatmap")
        listing = gr.Textbox(
            label="Each token of the side the rerank reads: its best match (score); their mean is the token match",
            lines=8,
            max_lines=40,
            interactive=False,
            elem_id="token-list",
        )
    return table, choice, reranked_query, rerank_status, [heatmap, listing, token_status]


def result_tables(baseline: bool) -> list[gr.Dataframe]:
    """MedEIR's results, and the baseline's beside them (hidden without a baseline model)."""
    shared = dict(interactive=False, wrap=True, max_height=1000, column_widths=COLUMN_WIDTHS)
    return [
        gr.Dataframe(EMPTY_HITS, label="MedEIR", elem_id="search-results", **shared),
        gr.Dataframe(
            EMPTY_HITS, label=f"{BASELINE_NAME} (baseline)", visible=baseline, elem_id="baseline-results", **shared
        ),
    ]


def similarity_tab(page: Page, examples: dict) -> None:
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
            fn=page.similarity,
            run_on_click=True,
            label="Real benchmark pairs (click to run)",
        )
    sim_button.click(page.similarity, [first, second], [sim_result], concurrency_limit=CONCURRENCY)


def tokenizer_tab(page: Page) -> None:
    """The MedEIR tokenizer's pieces beside bert-base-uncased's."""
    engine = page.engine
    reference_vocab = len(engine.reference_tokenizer) if engine.reference_tokenizer is not None else None
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
    tok_button.click(page.tokenize, [tok_text], [medeir_tokens, reference_tokens, tok_summary])


def long_document_tab(page: Page) -> None:
    """A document up to the model's limit, its live token count, and the index entries closest to it."""
    limit = page.engine.max_tokens
    doc = gr.Textbox(label=f"Document (up to {limit:,} tokens)", lines=10, max_lines=20, elem_id="long-text")
    counter = gr.Markdown(f"0 / {limit:,} tokens", elem_id="long-count")
    with gr.Row():
        example_button = gr.Button("Fill with a ~3,000-token example", elem_id="long-example")
        doc_button = gr.Button("Embed", variant="primary", elem_id="long-button")
    doc_status = gr.Markdown(elem_id="long-status")
    doc_results = gr.Dataframe(
        EMPTY_HITS, label="Closest index entries", interactive=False, wrap=True, column_widths=COLUMN_WIDTHS
    )
    doc.change(page.count_tokens, [doc], [counter], show_progress="hidden", trigger_mode="always_last")
    example_button.click(page.long_example, None, [doc])
    doc_button.click(page.embed_document, [doc], [doc_results, doc_status])


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
    if engine.colbert is not None:
        reranked, _ = engine.rerank(texts[0], 3)
        assert len(reranked) == 3, reranked
        top = reranked[0]
        matches = engine.token_matches(texts[0], top.text)
        assert abs(matches.mean - top.token_match) <= 1e-3, (matches.mean, top.token_match)
        assert abs(top.cosine + top.token_match - top.score) <= 1e-5, top
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
    parser.add_argument(
        "--colbert", default=None, help="late-interaction model folder or Hub repository id, or none (default: above)"
    )
    parser.add_argument("--index", type=Path, default=None, help="index parquet (code, source, text)")
    parser.add_argument("--cache", type=Path, default=None, help="where index embeddings are cached")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU when present)")
    parser.add_argument("--host", default=None, help="server address (default: Gradio's, 127.0.0.1 locally)")
    parser.add_argument("--port", type=int, default=None, help="server port (default: Gradio's, 7860)")
    parser.add_argument("--check", action="store_true", help="load everything, run each job once, do not serve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        colbert = "default" if args.colbert is None else args.colbert
        colbert = None if colbert.strip().lower() in ("", "none") else colbert
        engine = use_gpu(create_engine(args.model, args.index, args.cache, args.device, colbert=colbert))
    except (ModelUnavailable, FileNotFoundError, ValueError) as err:
        print(f"MedEIR demo cannot start: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(engine.describe().replace("**", ""), file=sys.stderr, flush=True)
    print(engine.colbert_status().replace("**", ""), file=sys.stderr, flush=True)

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
