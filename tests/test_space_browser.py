"""The demo in a real browser: the app serves on localhost (tiny model, all-MiniLM-L6-v2 and a tiny late-interaction
model, a few hundred real ICD-10-CM and HPO rows), Debian's headless Chromium driven by Playwright searches, reads both
ranked tables, checks that the first results do not depend on the result count, runs two visitors' searches at once,
reranks by cosine + token match and shows the token matches, clicks an example, runs similarity, and photographs every
tab.

Screenshots go to build/test-artifacts/ (or $MEDEIR_ARTIFACTS). The ones committed in tests/artifacts/ come from the
shipped model on the full index:
    MEDEIR_BROWSER_MODEL=models/medeir-small MEDEIR_ARTIFACTS=tests/artifacts .venv/bin/python -m pytest \
        tests/test_space_browser.py
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from space.index import build_index, read_index, write_index

from .conftest import REPO
from .test_space import write_data_dir
from .test_space_late_interaction import save_tiny_colbert

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# Closed network: no background, component or sync traffic (each would be refused), no sandbox as root.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(os.environ.get("MEDEIR_ARTIFACTS", REPO / "build" / "test-artifacts"))
# Another model folder (with its index from the data build, data/ or build/space-data) instead of the tiny model
REAL_MODEL = os.environ.get("MEDEIR_BROWSER_MODEL")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_medeir_init, tmp_path_factory):
    """`python -m space.app` in a subprocess on a free port; yields (url, index table, cache folder)."""
    root = tmp_path_factory.mktemp("space-browser")
    if REAL_MODEL:  # with the repository's late-interaction model, if built
        from space.engine import default_index

        index_path = default_index(root / "cache")
        model, colbert = REAL_MODEL, []
    else:
        index_path = write_index(build_index(write_data_dir(root / "data", icd=200, hpo=100)), root / "index.parquet")
        model, colbert = str(tiny_model_dir), ["--colbert", str(save_tiny_colbert(tiny_medeir_init, root / "colbert"))]
    index = read_index(index_path)
    port = free_port()
    command = [sys.executable, "-m", "space.app", "--model", model, *colbert, "--index", str(index_path),
               "--cache", str(root / "cache"), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "MEDEIR_MODEL": ""}
    env.pop("MEDEIR_BASELINE", None)  # the default comparison model: all-MiniLM-L6-v2 from its package
    log = (root / "app.log").open("w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited ({process.returncode}):\n{(root / 'app.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the app did not answer on {url}:\n{(root / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, index, root / "cache"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(server[0], wait_until="networkidle")
        ready = re.compile(r"^(?!.*embedding the index).*all-MiniLM-L6-v2: index embeddings", re.S)
        playwright.expect(page.locator("#index-status")).to_have_text(ready, timeout=240_000)
        yield page
        browser.close()


def table_rows(page, selector: str) -> list[list[str]]:
    """Cell texts of a Gradio Dataframe's body rows (ARIA grid rows; the header row is a <tr>)."""
    rows = page.locator(f"{selector} div[role=row]")
    return [[c.strip() for c in rows.nth(i).locator("[role=gridcell]").all_inner_texts()] for i in range(rows.count())]


def settled(page, selector: str) -> None:
    """Wait until Gradio hides the component's progress overlay (a screenshot would catch it greyed out)."""
    tracker = page.locator(f"{selector} [data-testid=status-tracker]").first
    playwright.expect(tracker).to_have_class(re.compile(r"\bhide\b"))


def search_for(page, text: str, count: int | None = None) -> None:
    page.locator("#search-query textarea, #search-query input").first.fill(text)
    if count is not None:
        page.locator("#search-top-k input[type=number]").fill(str(count))
        page.locator("#search-top-k input[type=number]").press("Enter")
    page.click("#search-button")


def test_search_beside_minilm_then_similarity_in_a_real_browser(server, page):
    _, index, _ = server
    code, title = index.column("code")[3].as_py(), index.column("text")[3].as_py()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    header = page.locator("#header").inner_text()
    assert "not a clinical tool" in header and "on cpu" in header and f"index: {index.num_rows:,} entries" in header

    # An empty query: a message in the page and a warning toast, no results, no stack trace.
    page.click("#search-button")
    playwright.expect(page.locator("#search-status")).to_contain_text("The query is empty")
    playwright.expect(page.locator("[data-testid=toast-text]")).to_contain_text("The query is empty")
    assert "Traceback" not in page.content()
    page.click("[data-testid=toast-close]")

    # A query: MedEIR's ranked results with scores and codes, and MiniLM's beside them.
    search_for(page, title)
    playwright.expect(page.locator("#search-status")).to_contain_text("10 results for a")
    playwright.expect(page.locator("#search-status")).to_contain_text("Scores: cosine similarity.")
    playwright.expect(page.locator("#search-results div[role=row]")).to_have_count(10)
    playwright.expect(page.locator("#baseline-results div[role=row]")).to_have_count(10)
    playwright.expect(page.locator("#search-results [data-testid=cell-0-2]")).to_have_text(code)
    rows = table_rows(page, "#search-results")
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(re.fullmatch(r"-?\d\.\d{3}", r[1]) for r in rows)
    assert rows[0][1:] == ["1.000", code, "ICD-10-CM", title]
    codes = set(index.column("code").to_pylist())
    assert all(r[2] in codes and r[3] in ("ICD-10-CM", "HPO", "Disease") for r in rows)
    assert table_rows(page, "#baseline-results")[0][1:3] == ["1.000", code]  # MiniLM finds an exact title too
    playwright.expect(page.locator("#score-guide")).to_contain_text("How to read the scores")
    settled(page, "#search-results")
    page.screenshot(path=str(ARTIFACTS / "space-search.png"), full_page=True)

    # Similarity of two texts.
    page.get_by_role("tab", name="Similarity").click()
    page.locator("#sim-a textarea").fill(title)
    page.locator("#sim-b textarea").fill(index.column("text")[250].as_py())
    page.click("#sim-button")
    result = page.locator("#sim-result")
    playwright.expect(result).to_contain_text("Cosine similarity:")
    score = float(re.search(r"Cosine similarity: (-?\d\.\d{3})", result.inner_text()).group(1))
    assert -1.0 <= score < 1.0
    page.locator("#sim-b textarea").fill(title)
    page.click("#sim-button")
    playwright.expect(result).to_contain_text("Cosine similarity: 1.000")
    settled(page, "#sim-result")
    page.screenshot(path=str(ARTIFACTS / "space-similarity.png"), full_page=True)


def wait_for_token_mean(page, score: float, timeout: float = 60) -> None:
    """Wait until the token list's last line, the mean of the best matches listed (the token match), is `score` (as
    the table rounds it), under the line with MaxSim."""
    deadline = time.time() + timeout
    pattern = (
        r"\nMaxSim \(.*\): -?\d+\.\d{3}\nMean over the \d+ (?:query|result) tokens \(token match\): (-?\d+\.\d{3})$"
    )
    while True:
        found = re.search(pattern, page.locator("#token-list textarea").input_value())
        if found and abs(float(found.group(1)) - score) <= 2e-3:
            return
        assert time.time() < deadline, f"the token list's mean was never {score}: {found and found.group(0)}"
        time.sleep(0.2)


def test_a_rerank_by_cosine_plus_token_match_and_the_token_matches_of_a_result(server, page):
    """Ticked, a search also shows MedEIR's results reordered by cosine + the late-interaction model's token match
    (the score, both parts, and the dense rank each came from) and the token matches of the top one; picking another
    result shows its matches."""
    if page.locator("#search-rerank").count() == 0:
        pytest.skip("this demo has no late-interaction model")
    page.locator("#search-rerank input[type=checkbox]").check()
    search_for(page, server[1].column("text")[7].as_py())
    playwright.expect(page.locator("#rerank-status")).to_contain_text(
        "results reordered by cosine + MedEIR-ColBERT token match"
    )
    playwright.expect(page.locator("#rerank-results div[role=row]")).to_have_count(10)
    rows = table_rows(page, "#rerank-results")
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    scores, cosines, means = ([float(r[i]) for r in rows] for i in (1, 2, 3))
    assert scores == sorted(scores, reverse=True)
    assert all(abs(s - c - m) <= 1.5e-3 for s, c, m in zip(scores, cosines, means, strict=True)), rows
    assert all(re.fullmatch(r"\d+ \((=|↑\d+|↓\d+)\)", r[4]) for r in rows), [r[4] for r in rows]
    wait_for_token_mean(page, means[0])
    playwright.expect(page.locator("#token-heatmap table")).to_be_visible()
    # another result: its own matches
    page.locator("#token-choice input").click()
    page.get_by_role("option").nth(1).click()
    wait_for_token_mean(page, means[1])
    settled(page, "#token-heatmap")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "space-rerank.png"), full_page=True)


def test_the_first_results_are_the_same_for_10_and_50(server, page):
    query = server[1].column("text")[120].as_py()
    search_for(page, query, 10)
    playwright.expect(page.locator("#search-results div[role=row]")).to_have_count(10)
    ten = table_rows(page, "#search-results")
    search_for(page, query, 50)
    playwright.expect(page.locator("#search-status")).to_contain_text("50 results for a")
    settled(page, "#search-results")
    fifty = table_rows(page, "#search-results")  # the table renders the rows in view: the first 10 at least
    assert len(fifty) >= 10 and fifty[:10] == ten


def test_a_float_search_answers_while_an_int8_search_runs(server):
    """Two visitors at once: one searching with int8 embeddings, the other with float32; both answer, the float32
    one within seconds (the seconds go to build/test-artifacts/concurrent-search.json)."""
    url, index, _ = server
    seconds = {}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pages = [browser.new_page(viewport={"width": 1280, "height": 1000}) for _ in range(2)]
        for page in pages:
            page.set_default_timeout(60_000)
            page.goto(url, wait_until="networkidle")
        int8_page, float_page = pages
        int8_page.click("#search-advanced")
        int8_page.get_by_label("int8", exact=True).check()
        search_for(int8_page, index.column("text")[5].as_py(), 50)
        start = time.perf_counter()
        search_for(float_page, index.column("text")[6].as_py())
        playwright.expect(float_page.locator("#search-results div[role=row]")).to_have_count(10)
        seconds["float32 while int8 runs"] = time.perf_counter() - start
        playwright.expect(int8_page.locator("#search-status")).to_contain_text("cosine of the int8-quantised")
        seconds["int8"] = time.perf_counter() - start
        browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "concurrent-search.json").write_text(json.dumps(seconds, indent=1))
    assert seconds["float32 while int8 runs"] < 5, seconds


def test_clicking_an_example_runs_it(page):
    examples = json.loads((REPO / "space" / "examples.json").read_text())["search"]
    page.locator("#search-examples").get_by_text(examples[0]["query"], exact=False).first.click()
    playwright.expect(page.locator("#search-results div[role=row]")).to_have_count(10)
    playwright.expect(page.locator("#search-query textarea, #search-query input").first).to_have_value(
        examples[0]["query"]
    )
    weak = next(e for e in examples if e["kind"] == "weak")
    playwright.expect(page.locator("#search-examples")).to_contain_text(f"{weak['query']} (a miss")
    settled(page, "#search-results")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "space-example.png"), full_page=True)


def test_long_input_shows_its_token_count_and_the_limit(page):
    page.get_by_role("tab", name="Long document").click()
    page.locator("#long-text textarea").fill("word " * 9000)
    playwright.expect(page.locator("#long-count")).to_contain_text("9,002 / 8,192 tokens - over the limit")
    page.click("#long-button")
    playwright.expect(page.locator("#long-status")).to_contain_text(
        "The document is 9,002 tokens long; MedEIR reads at most 8,192 tokens"
    )
    page.click("[data-testid=toast-close]")
    page.click("#long-example")
    playwright.expect(page.locator("#long-count")).to_have_text(re.compile(r"^\s*3,\d{3} / 8,192 tokens\s*$"))
    page.click("#long-button")
    playwright.expect(page.locator("#long-status")).to_contain_text("Embedded **3,".replace("**", ""))
    settled(page, "#long-status")
    page.screenshot(path=str(ARTIFACTS / "space-long-document.png"), full_page=True)


def test_tokenizer_tab(page):
    page.get_by_role("tab", name="Tokenizer").click()
    page.click("#tok-button")
    playwright.expect(page.locator("#tok-summary")).to_contain_text("bert-base-uncased:")
    settled(page, "#tok-summary")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "space-tokenizer.png"), full_page=True)
