"""The demo in a real browser: the app serves on localhost (tiny model, a few hundred real ICD-10-CM and HPO rows),
Debian's headless Chromium driven by Playwright types a query, searches, reads the ranked table, runs similarity.
Screenshots go to tests/artifacts/ (or $MEDEIR_ARTIFACTS)."""

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

from space.index import build_index, write_index

from .conftest import REPO
from .test_space import write_data_dir

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
ARTIFACTS = Path(os.environ.get("MEDEIR_ARTIFACTS", REPO / "tests" / "artifacts"))

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """`python -m space.app` in a subprocess on a free port; yields (url, index table, cache folder)."""
    root = tmp_path_factory.mktemp("space-browser")
    index = build_index(write_data_dir(root / "data", icd=200, hpo=100))
    index_path = write_index(index, root / "index.parquet")
    port = free_port()
    command = [sys.executable, "-m", "space.app", "--model", str(tiny_model_dir), "--index", str(index_path),
               "--cache", str(root / "cache"), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "MEDEIR_MODEL": ""}
    log = (root / "app.log").open("w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
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


def test_search_then_similarity_in_a_real_browser(server, page):
    _, index, cache = server
    code, title = index.column("code")[3].as_py(), index.column("text")[3].as_py()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # An empty query: a message in the page and a warning toast, no results, no stack trace.
    page.click("#search-button")
    playwright.expect(page.locator("#search-status")).to_contain_text("The query is empty")
    playwright.expect(page.locator("[data-testid=toast-text]")).to_contain_text("The query is empty")
    assert "Traceback" not in page.content()
    page.click("[data-testid=toast-close]")

    # A query: ranked results with scores and codes; the index embeddings are computed once and cached on disk.
    page.locator("#search-query textarea, #search-query input").first.fill(title)
    page.click("#search-button")
    playwright.expect(page.locator("#search-status")).to_contain_text("10 results for a")
    playwright.expect(page.locator("#search-results div[role=row]")).to_have_count(10)
    playwright.expect(page.locator("#search-results [data-testid=cell-0-2]")).to_have_text(code)
    rows = table_rows(page, "#search-results")
    assert len(rows) == 10, rows
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(re.fullmatch(r"-?\d\.\d{3}", r[1]) for r in rows)
    assert rows[0][1:] == ["1.000", code, "ICD-10-CM", title]
    codes = set(index.column("code").to_pylist())
    assert all(r[2] in codes and r[3] in ("ICD-10-CM", "HPO") for r in rows)
    assert list(cache.glob("embeddings-*.npy")), "the index embeddings were not cached on disk"
    settled(page, "#search-results")
    page.screenshot(path=str(ARTIFACTS / "space.png"), full_page=True)

    # Similarity of two texts.
    page.get_by_role("tab", name="Similarity").click()
    page.locator("#sim-a textarea").fill("heart attack")
    page.locator("#sim-b textarea").fill("Acute myocardial infarction")
    page.click("#sim-button")
    result = page.locator("#sim-result")
    playwright.expect(result).to_contain_text("Cosine similarity:")
    score = float(re.search(r"Cosine similarity: (-?\d\.\d{3})", result.inner_text()).group(1))
    assert -1.0 <= score < 1.0
    page.locator("#sim-b textarea").fill("heart attack")
    page.click("#sim-button")
    playwright.expect(result).to_contain_text("Cosine similarity: 1.000")
    settled(page, "#sim-result")
    page.screenshot(path=str(ARTIFACTS / "space-similarity.png"), full_page=True)


def test_long_input_shows_its_token_count_and_the_limit(page):
    page.get_by_role("tab", name="Long document").click()
    page.locator("#long-text textarea").fill("word " * 9000)
    playwright.expect(page.locator("#long-count")).to_contain_text("9,002 / 8,192 tokens - over the limit")
    page.click("#long-button")
    playwright.expect(page.locator("#long-status")).to_contain_text(
        "The document is 9,002 tokens long; MedEIR reads at most 8,192 tokens"
    )
    page.click("#long-example")
    playwright.expect(page.locator("#long-count")).to_have_text(re.compile(r"^\s*3,\d{3} / 8,192 tokens\s*$"))
