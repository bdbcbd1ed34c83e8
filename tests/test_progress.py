"""helpers.progress: one rule for the engine's bars — on in a terminal or notebook, off in the rendered book."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_notebook
from helpers import build
from helpers.progress import DELAY, ENV, enabled, progress_bar


def test_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert enabled() and not enabled(False)
    bar = progress_bar(10, "x")
    assert not bar.disable and bar.delay == DELAY and not bar.leave  # a quick loop never draws
    bar.close()
    for off in ("off", "0", "false", "NO"):
        monkeypatch.setenv(ENV, off)
        assert not enabled() and progress_bar(10, "x").disable
    monkeypatch.setenv(ENV, "on")
    assert enabled() and not enabled(False)


@pytest.mark.slow
def test_chapter_kernels_run_with_bars_off(mini_book: Path, tmp_path: Path) -> None:
    write_notebook(mini_book / "book" / "good.ipynb", [
        ("code", "scale = 1", ["parameters"]),
        ("code", "import os\nfrom helpers import book\nfrom helpers.progress import enabled\n"
                 "book.record('bars', enabled())\nbook.record('env', os.environ.get('BOOK_PROGRESS'))"),
    ])
    out = tmp_path / "_build"
    build.execute_chapter(build.find_chapter("good", mini_book), "default", build_dir=out, root=mini_book, quiet=True)
    record = json.loads((out / "records" / "good.json").read_text())
    assert record["bars"] is False and record["env"] == "off"
