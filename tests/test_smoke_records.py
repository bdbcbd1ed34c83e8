"""Every number the smoke book records is pinned: a refactor that changes one fails here, naming it.

``tests/data/smoke_records.json`` holds the records of a smoke build (its provenance inside). A deliberate change
of a number is made by rewriting that file in the same commit, with the reason in the commit message.

Left out, because they change without any code change: wall times (``seconds*``) and what describes the
paper-profile store while its background run commits chunks (``stored_*``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

PINNED = Path(__file__).resolve().parent / "data" / "smoke_records.json"
VOLATILE_PREFIXES = ("stored_", "seconds")
# Six significant digits: equal on this machine bit for bit (two smoke builds agree exactly), with room for
# another CPU's rounding of the same arithmetic; any change of method moves a number by far more.
REL_TOL = 1e-6


def _differences(pinned, got, where: str) -> list[str]:
    if isinstance(pinned, float) or isinstance(got, float):
        ok = (isinstance(got, (int, float)) and isinstance(pinned, (int, float))
              and math.isclose(pinned, got, rel_tol=REL_TOL, abs_tol=1e-12))
        return [] if ok else [f"{where}: pinned {pinned!r}, got {got!r}"]
    if isinstance(pinned, list) and isinstance(got, list) and len(pinned) == len(got):
        return [d for i, (a, b) in enumerate(zip(pinned, got)) for d in _differences(a, b, f"{where}[{i}]")]
    if isinstance(pinned, dict) and isinstance(got, dict) and pinned.keys() == got.keys():
        return [d for k in pinned for d in _differences(pinned[k], got[k], f"{where}.{k}")]
    return [] if pinned == got else [f"{where}: pinned {str(pinned)[:120]!r}, got {str(got)[:120]!r}"]


def test_the_comparison_sees_a_change() -> None:
    assert _differences({"a": [1.0, "x"]}, {"a": [1.0 + 1e-9, "x"]}, "r") == []
    assert _differences({"a": [1.0, "x"]}, {"a": [1.001, "x"]}, "r") == ["r.a[0]: pinned 1.0, got 1.001"]
    assert _differences({"n": 3}, {"n": 4}, "r") and _differences("text", "other text", "r")


@pytest.mark.slow
def test_smoke_records_equal_the_pinned_ones(smoke_book: Path) -> None:
    pinned = json.loads(PINNED.read_text())
    problems = []
    for chapter, numbers in pinned.items():
        if chapter.startswith("_"):
            continue
        got = json.loads((smoke_book / "records" / f"{chapter}.json").read_text())
        got = {k: v for k, v in got.items() if k != "_meta" and not k.startswith(VOLATILE_PREFIXES)}
        problems += [f"{chapter}: new record {k!r}" for k in sorted(got.keys() - numbers.keys())]
        problems += [f"{chapter}: record {k!r} is gone" for k in sorted(numbers.keys() - got.keys())]
        problems += [d for k in sorted(numbers.keys() & got.keys()) for d in _differences(numbers[k], got[k],
                                                                                          f"{chapter}.{k}")]
    assert not problems, (f"{len(problems)} smoke records differ from {PINNED.name} (if intended, rewrite it and "
                          "say why in the commit):\n" + "\n".join(problems[:60]))
