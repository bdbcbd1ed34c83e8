"""The book's own cost, for ``make bench``: the latest build times against their targets (issue 7).

Reads the timing records the builds leave behind — nothing is re-run here:

* ``_build/timings/<profile>.json``, written by :mod:`helpers.build`: every executed chapter's latest seconds
  with its cache hits and misses, and the latest whole-book build of each kind — ``cold`` (every cache lookup a
  miss), ``rebuild`` (every lookup a hit: nothing changed) and ``partial`` (some of each);
* ``_build/timings/make-test.json``, written by ``tools/timed.py`` around the tests of ``make test``.

A number that no record holds is reported as "not measured yet", never estimated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = ROOT / "_build" / "timings"

#: minutes, default profile (issue 7)
BOOK_COLD_MIN = 45.0
REBUILD_MIN = 3.0
MAKE_TEST_MIN = 15.0
CHAPTER_MIN = {"convex": 5.0, "nonconvex": 20.0, "validation": 15.0}
OTHER_CHAPTER_MIN = 5.0


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _verdict(seconds: float, target_min: float) -> str:
    return f"target ≤ {target_min:g} min: {'met' if seconds <= 60 * target_min else 'NOT met'}"


def _line(what: str, record: dict[str, Any] | None, target_min: float) -> str:
    if not record:
        return f"- {what}: not measured yet (target ≤ {target_min:g} min)"
    extra = f", exit code {record['exit_code']}: the tests failed" if record.get("exit_code") not in (None, 0) else ""
    return (f"- {what}: {record['seconds'] / 60:.1f} min (finished {record['finished']}{extra}) — "
            f"{_verdict(record['seconds'], target_min)}")


def report(profile: str = "default", timings: Path = TIMINGS) -> str:
    """Markdown lines: whole book cold and rebuilt, ``make test``, and each chapter with its share and budget."""
    book = _read(timings / f"{profile}.json") or {}
    builds = book.get("builds", {})
    where = timings.relative_to(ROOT) if timings.is_relative_to(ROOT) else timings
    lines = [f"**Book build times** ({profile} profile; read from {where}/, not re-run):", ""]
    lines.append(_line("whole book, cold (every cache lookup a miss)", builds.get("cold"), BOOK_COLD_MIN))
    lines.append(_line("rebuild with nothing changed (every lookup a hit)", builds.get("rebuild"), REBUILD_MIN))
    if builds.get("partial"):
        p = builds["partial"]
        lines.append(f"- latest partly cached build (neither cold nor a pure rebuild): {p['seconds'] / 60:.1f} min "
                     f"(finished {p['finished']})")
    lines.append(_line("`make test`", _read(timings / "make-test.json"), MAKE_TEST_MIN))
    source, chapters = "the latest cold build", (builds.get("cold") or {}).get("chapters")
    if not chapters:
        source, chapters = "each chapter's latest execution (not one build)", book.get("chapters")
    if not chapters:
        lines.append("- chapters: not measured yet (no timing record: run `make book`)")
        return "\n".join(lines) + "\n"
    total = sum(c["seconds"] for c in chapters.values())
    lines += ["", f"Chapters ({source}; share of {total / 60:.1f} min of chapter execution):", "",
              "| chapter | minutes | share | budget | cache hits / misses | within budget |",
              "|---|---:|---:|---:|---:|---|"]
    for name, c in chapters.items():
        budget = CHAPTER_MIN.get(name, OTHER_CHAPTER_MIN)
        ok = "yes" if c["seconds"] <= 60 * budget else "NO"
        lines.append(f"| {name} | {c['seconds'] / 60:.1f} | {c['seconds'] / total:.0%} | ≤ {budget:g} | "
                     f"{c.get('cache_hits', 0)} / {c.get('cache_misses', 0)} | {ok} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(report())
