"""What a chapter notebook calls to hand numbers and figure data to the build.

* :func:`record` — a number quoted in the prose: glued for ``{glue:text}`` in the page *and* written to
  ``records/<chapter>.json``, which the chapter's smoke test asserts.
* :func:`figure_data` — the data behind a figure, written as CSV to ``data/<chapter>/<name>.csv``.

Both write into ``$BOOK_OUTPUT_DIR`` (a private folder :mod:`helpers.build` gives each chapter run and moves
into ``_build/`` only when the chapter succeeded). Run interactively, without the runner, they write to
``<checkout>/_build/interactive/<chapter>`` (an installed package: the per-user cache folder's ``interactive/``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .cache import checkout_root, user_cache_root


def chapter_name() -> str:
    return os.environ.get("BOOK_CHAPTER", "interactive")


def output_dir() -> Path:
    """The folder this chapter run writes to (see module docstring)."""
    folder = os.environ.get("BOOK_OUTPUT_DIR")
    root = checkout_root()
    base = root / "_build" if root is not None else user_cache_root()
    path = Path(folder) if folder else base / "interactive" / chapter_name()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def record(name: str, value: Any, *, fmt: str | None = None, display: bool = False) -> Any:
    """Record a number (or a small list/dict of numbers) under ``name`` and glue it for the prose.

    ``fmt`` (e.g. ``"{:.3f}"``) formats the glued text; the JSON keeps full precision. A non-finite number
    raises: a NaN must never reach the page unannounced. Returns ``value`` unchanged.
    """
    plain = _plain(value)
    for v in np.ravel(np.asarray(plain if not isinstance(plain, dict) else list(plain.values()), dtype=object)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"record({name!r}) got a non-finite value {v}: fix the computation before quoting it")
    path = output_dir() / "records.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = plain
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    text = fmt.format(value) if fmt else (f"{plain:.3g}" if isinstance(plain, float) else str(plain))
    try:
        from myst_nb import glue

        glue(name, text, display=display)
    except ImportError:  # outside a notebook build the record file is enough
        pass
    return value


def record_ci(name: str, triple: Any, *, fmt: str | None = "{:.2f}") -> tuple[float, float, float]:
    """Record a value with its confidence interval as ``name``, ``name_low``, ``name_high`` (each glued with
    ``fmt``). ``triple``: ``(value, low, high)``. Returns the three floats."""
    value, low, high = (float(v) for v in triple)
    for suffix, v in (("", value), ("_low", low), ("_high", high)):
        record(name + suffix, v, fmt=fmt)
    return value, low, high


def say(name: str, text: str) -> str:
    """Glue a computed sentence for the prose (``{glue:text}`name```); not a number, so not a record."""
    if not isinstance(text, str):
        raise TypeError(f"say({name!r}) takes a sentence (str), got {type(text).__name__}: use record() for numbers")
    try:
        from myst_nb import glue

        glue(name, text, display=False)
    except ImportError:  # outside a notebook build there is no page to glue to
        pass
    return text


def ci_column(frame: pd.DataFrame, column: str, fmt: str = "{:.4f}", *, low: str | None = None,
              high: str | None = None) -> list[str]:
    """``"value [low, high]"`` strings for a table column; the bounds are the columns ``low`` / ``high`` (default
    ``column + "_low"`` / ``column + "_high"``)."""
    lo_col, hi_col = low or column + "_low", high or column + "_high"
    return [f"{fmt.format(e)} [{fmt.format(lo)}, {fmt.format(hi)}]"
            for e, lo, hi in zip(frame[column], frame[lo_col], frame[hi_col])]


NOT_RUN = "not run in this profile"


def record_median(name: str, values: Any, *, fmt: str | None = None) -> Any:
    """Record the median of the finite ``values``, or — when there are none (e.g. a regime this profile does not
    run) — the text :data:`NOT_RUN`, so the prose says so instead of quoting a NaN. Returns what was recorded."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    return record(name, float(np.median(v)), fmt=fmt) if v.size else record(name, NOT_RUN)


def figure_data(name: str, frame: pd.DataFrame | dict[str, Any]) -> pd.DataFrame:
    """Write the data behind figure ``name`` to ``data/<chapter>/<name>.csv`` and return it as a DataFrame.

    Refuses NaN/inf in numeric columns unless they are declared by a column named ``note`` explaining them.
    """
    df = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
    numeric = df.select_dtypes(include="number")
    if not np.isfinite(numeric.to_numpy(dtype=float)).all() and "note" not in df.columns:
        bad = numeric.columns[~np.isfinite(numeric.to_numpy(dtype=float)).all(axis=0)].tolist()
        raise ValueError(f"figure {name!r} has non-finite values in {bad}: drop or explain them (a 'note' column)")
    folder = output_dir() / "data"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.csv.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, folder / f"{name}.csv")
    return df
