"""Progress bars for the engine's long loops, under one rule.

A bar shows in a terminal and in a notebook (``tqdm.auto``: a widget where ipywidgets is installed, text
otherwise) once its loop has run for :data:`DELAY` seconds — a quick loop never draws one — and stays quiet in
the rendered book: the build runner (:mod:`helpers.build`) sets ``BOOK_PROGRESS=off`` for every chapter kernel,
so no bar reaches a page. ``BOOK_PROGRESS=off`` silences them anywhere; a function's ``progress=False`` silences
its own.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

ENV = "BOOK_PROGRESS"
#: seconds a loop runs before its bar appears
DELAY = 2.0


def enabled(progress: bool = True) -> bool:
    """Whether a loop asked to show progress (``progress``) may draw a bar here (see the module docstring)."""
    return bool(progress) and os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def progress_bar(total: int | None, desc: str, progress: bool = True, **options: Any):
    """A ``tqdm.auto`` bar over ``total`` steps (None: unknown), disabled by :func:`enabled`; ``leave=False``."""
    with warnings.catch_warnings():
        # In a kernel without ipywidgets tqdm.auto warns that it falls back to text bars; that fallback is fine.
        warnings.filterwarnings("ignore", message=".*IProgress not found.*")
        from tqdm.auto import tqdm

    settings = {"leave": False, "mininterval": 1.0, "delay": DELAY} | options
    return tqdm(total=total, desc=desc, disable=not enabled(progress), **settings)
