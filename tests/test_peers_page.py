"""The appendix page on the peers shows exactly the committed benchmark results (issue 7).

``make bench`` writes ``book/data/peers.csv`` and renders ``book/data/peers_table.md`` from it; the page
``book/peers.md`` includes the table. The book never runs the peers, so this test only checks that the committed
copies agree and that the page includes them — it fails if someone edits one without re-running the benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.peers.report import ACCURACY, ratios, render  # noqa: E402

CSV = REPO / "book" / "data" / "peers.csv"
TABLE = REPO / "book" / "data" / "peers_table.md"
PAGE = REPO / "book" / "peers.md"


def test_committed_table_is_the_rendering_of_the_committed_csv() -> None:
    if not CSV.exists():
        pytest.fail(f"{CSV.relative_to(REPO)} is missing: run `make bench` and commit book/data/peers*.")
    df = pd.read_csv(CSV)
    assert TABLE.read_text() == render(df), "book/data/peers_table.md is stale: re-run `make bench`"
    assert df["date"].nunique() == 1, "one benchmark run per CSV (the ratio is measured within one run)"
    assert {"P1", "P2"} <= set(df["problem"]) and "helpers" in set(df["library"])
    ok = df[df["status"] == "ok"]
    # every accurate method's conversion to the book's convention is checked by its fitted scale factor
    accurate = ok[ok["rel_error"] <= ACCURACY]
    assert not accurate.empty and (accurate["scale"] - 1).abs().max() < 1e-5
    assert set(ratios(df)) == {"P1", "P2"}


def test_page_includes_the_table_and_is_in_the_toc() -> None:
    text = PAGE.read_text()
    assert "data/peers_table.md" in text
    toc = (REPO / "_toc.yml").read_text()
    assert "book/peers" in toc and toc.index("book/peers") < toc.index("book/api")
