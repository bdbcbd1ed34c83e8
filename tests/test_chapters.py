"""Every chapter in the smoke profile, through the same runner `make book` uses, and a smoke build of the book.

Each chapter records the numbers its prose quotes (helpers.book.record); the checks below assert them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import build, cache

CHAPTERS = [c.name for c in build.notebook_chapters()]


def check_intro(r: dict[str, Any]) -> None:
    # Convex, exact Hessian, trained and retrained to 1e-12: the estimate must match retraining closely.
    assert r["grad_norm"] < 1e-10 and r["retrain_grad_norm"] < 1e-10
    assert r["pearson"] >= 0.99 and r["spearman"] >= 0.99, r
    assert r["pearson_low"] <= r["pearson"] <= r["pearson_high"]
    assert r["relative_error"] < 0.25
    assert r["solver_residual"] < 1e-10
    assert r["drift"] <= 1e-3 * r["median_abs_delta"]  # nothing removed: nothing moves
    assert r["_meta"]["profile"] == "smoke"


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {"intro": check_intro}


def test_every_chapter_has_a_check() -> None:
    assert set(CHECKS) == set(CHAPTERS), "add a records check for every chapter in _toc.yml"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_records(smoke_book: Path, chapter: str) -> None:
    records = json.loads((smoke_book / "records" / f"{chapter}.json").read_text())
    CHECKS[chapter](records)


def test_smoke_book_renders_intro_with_figure_and_numbers(smoke_book: Path) -> None:
    index = (smoke_book / "html" / "index.html").read_text()
    records = json.loads((smoke_book / "records" / "intro.json").read_text())
    assert re.search(r'<img [^>]*src="_images/[0-9a-f]+\.png"', index), "the intro figure is missing"
    assert (smoke_book / "data" / "intro" / "intro_scatter.csv").exists()
    text = re.sub(r"<[^>]+>", "", index)
    assert f"Over all {records['n_train']} training points" in text
    assert f"{records['pearson']:.4f}" in text and f"{records['spearman']:.4f}" in text
    assert "Traceback" not in index and "{glue" not in index
    # Math renders offline: MathJax comes from the book itself, not a CDN.
    assert "_static/../mathjax/tex-mml-chtml.js" in index and "cdn.jsdelivr" not in index
    assert (smoke_book / "html" / "mathjax" / "tex-mml-chtml.js").exists()


def test_smoke_book_has_api_reference_and_bibliography(smoke_book: Path) -> None:
    api = (smoke_book / "html" / "book" / "api.html").read_text()
    for name in ("predict_removal", "warm_start", "hessian_operator", "memoize", "Recipe"):
        assert f'id="helpers.' in api and name in api, f"API page lacks {name}"
    bib = (smoke_book / "html" / "book" / "references.html").read_text()
    assert "Understanding Black-box Predictions via Influence Functions" in bib


def test_rebuild_reuses_every_cached_result(smoke_book: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run with nothing changed only hits; a changed parameter misses."""
    monkeypatch.delenv("BOOK_CACHE_DIR", raising=False)
    log_dir = smoke_book / "cache"
    first_events = cache.read_log(log_dir)
    assert any(e["event"] == "miss" for e in first_events), "the smoke book cached nothing"
    for chapter in build.notebook_chapters():
        build.execute_chapter(chapter, "smoke", build_dir=smoke_book, quiet=True)
    second = cache.read_log(log_dir)[len(first_events):]
    assert second and all(e["event"] == "hit" for e in second), [e for e in second if e["event"] != "hit"]
    assert len(second) == len(first_events)

    build.execute_chapter(build.find_chapter("intro"), "smoke", overrides={"seed": 1}, build_dir=smoke_book,
                          quiet=True)
    third = cache.read_log(log_dir)[len(first_events) + len(second):]
    assert any(e["event"] == "miss" for e in third)
