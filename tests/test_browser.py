"""The smoke book in a real browser: every page loads its figures and math, with no console error.

Headless Chromium (Debian's `chromium`, which `make test` installs when it can) driven by Playwright with the
system browser (Playwright's own browser download is never used). One screenshot per page is saved under
`_build/screenshots/` for a human to look at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import build
from conftest import REPO

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no Chromium found: install it with `sudo apt-get install -y chromium` (Debian; "
                "`make test` does this itself when run as root), then re-run make test")


def pages(html: Path) -> list[Path]:
    """index.html plus one page per _toc.yml entry after the root."""
    found = [html / "index.html"]
    for chapter in build.read_toc()[1:]:
        found.append(html / chapter.path.with_suffix(".html"))
    return found


#: pixels; a taller page gets a screenshot of its first screen only
SCREENSHOT_MAX_HEIGHT = 30_000


def test_every_page_renders_figures_and_math_without_console_errors(smoke_book: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="install the dev extra (playwright)")
    shots = REPO / "_build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            for page_path in pages(smoke_book / "html"):
                assert page_path.exists(), f"{page_path} was not built"
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                problems: list[str] = []
                page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                        if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
                page.goto(page_path.as_uri())
                page.wait_for_load_state("load")
                n_math = page.locator(".math").count()
                if n_math:
                    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                                           timeout=30_000)
                    page.evaluate("() => MathJax.startup.promise")
                    rendered = page.locator("mjx-container").count()
                    assert rendered >= n_math, f"{page_path.name}: {rendered} of {n_math} formulas rendered"
                images = page.evaluate(
                    "() => Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
                broken = [src for src, ok in images if not ok]
                assert not broken, f"{page_path.name}: images that did not load: {broken}"
                assert not problems, f"{page_path.name}: {problems}"
                name = "index" if page_path.name == "index.html" else page_path.stem
                # a screenshot is for a human to look at, not part of the check: the whole page where it is of
                # reading length, the first screens of a reference page as long as the API (a full-page capture
                # of that takes minutes on a loaded machine)
                tall = page.evaluate("() => document.documentElement.scrollHeight") > SCREENSHOT_MAX_HEIGHT
                page.screenshot(path=str(shots / f"{name}.png"), full_page=not tall, timeout=120_000)
                page.close()
        finally:
            browser.close()
    intro_images = (smoke_book / "html" / "index.html").read_text().count("<img ")
    assert intro_images >= 1, "the intro's figure is missing from the page"
