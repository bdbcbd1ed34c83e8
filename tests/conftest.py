"""Shared fixtures: tiny throw-away books for the runner's tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
from filelock import FileLock
import pytest

from helpers import build

REPO = Path(__file__).resolve().parent.parent


def write_notebook(path: Path, cells: list[tuple[str, str] | tuple[str, str, list[str]]]) -> Path:
    """Write a notebook from ``(kind, source[, tags])`` triples; kind is ``"code"`` or ``"md"``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for cell in cells:
        kind, source, *rest = cell
        new = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
        c = new(source)
        if rest:
            c.metadata["tags"] = list(rest[0])
        nb.cells.append(c)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def mini_book(tmp_path: Path) -> Path:
    """A two-chapter book (``good`` records a number and writes figure data, ``boom`` raises in cell 2)."""
    root = tmp_path / "book_root"
    (root / "book" / "profiles").mkdir(parents=True)
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    (root / "book" / "references.bib").write_text((REPO / "book" / "references.bib").read_text())
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/index\nchapters:\n  - file: book/good\n  - file: book/boom\n")
    (root / "book" / "index.md").write_text("# Mini\n\nA test book.\n")
    write_notebook(root / "book" / "good.ipynb", [
        ("md", "# Good"),
        ("code", "scale = 2\nlabel = 'x'", ["parameters"]),
        ("code", "from helpers import book\nbook.record('answer', 21 * scale)\n"
                 "book.figure_data('line', {'x': [0, 1], 'y': [0, scale]})"),
        ("md", "The answer is {glue:text}`answer`."),
    ])
    write_notebook(root / "book" / "boom.ipynb", [
        ("md", "# Boom"),
        ("code", "fail = True", ["parameters"]),
        ("code", "x = 1"),
        ("code", "if fail:\n    raise ValueError('deliberate failure')"),
    ])
    for profile, body in {"default": "good: {}\n", "smoke": "good:\n  scale: 3\n"}.items():
        (root / "book" / "profiles" / f"{profile}.yml").write_text(body)
    return root


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny problems gain nothing from intra-op threads, and on a shared 2-core machine they lose a lot.

    Chapters run in their own kernels (separate processes) and keep torch's default.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole book built once per test session in the smoke profile, into a fresh folder and cache.

    Under ``make test`` two pytest-xdist workers share it: the first to ask builds it under a file lock in their
    common temporary folder, the other waits and reuses it (one build, not two).
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' basetemps are siblings
    out, done = shared / "smoke_build", shared / "smoke_build.complete"
    with FileLock(str(shared / "smoke_build.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a build that died half-way
            out.mkdir()
            mp = pytest.MonkeyPatch()
            mp.delenv("BOOK_CACHE_DIR", raising=False)
            mp.delenv("BOOK_CACHE", raising=False)
            try:
                build.build_book("smoke", build_dir=out, quiet=True)
            finally:
                mp.undo()
            done.touch()
    return out
