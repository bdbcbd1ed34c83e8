"""Compare a build's records with pinned ones: ``python tools/compare_records.py PINNED.json RECORDS_DIR``.

``PINNED.json`` maps chapter → {record: value} (``tests/data/smoke_records.json`` for the smoke book,
``tests/data/default_records.json`` for the default one); ``RECORDS_DIR`` is a build's ``records/`` folder
(``_build/records`` after ``make book``). Prints every difference — a record that is new, gone, or differs beyond
six significant digits — and exits 1 if there is any. Wall times (``seconds*``) and the counts of the
paper-profile store (``stored_*``) are left out: they change without any code change.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

VOLATILE_PREFIXES = ("stored_", "seconds")
# Six significant digits: equal on this machine bit for bit (two builds agree exactly), with room for another
# CPU's rounding of the same arithmetic; any change of method moves a number by far more.
REL_TOL = 1e-6


def value_differences(pinned: Any, got: Any, where: str) -> list[str]:
    """Where ``got`` differs from ``pinned`` (floats to :data:`REL_TOL`, recursively through lists and dicts)."""
    if isinstance(pinned, float) or isinstance(got, float):
        ok = (isinstance(got, (int, float)) and isinstance(pinned, (int, float))
              and math.isclose(pinned, got, rel_tol=REL_TOL, abs_tol=1e-12))
        return [] if ok else [f"{where}: pinned {pinned!r}, got {got!r}"]
    if isinstance(pinned, list) and isinstance(got, list) and len(pinned) == len(got):
        return [d for i, (a, b) in enumerate(zip(pinned, got)) for d in value_differences(a, b, f"{where}[{i}]")]
    if isinstance(pinned, dict) and isinstance(got, dict) and pinned.keys() == got.keys():
        return [d for k in pinned for d in value_differences(pinned[k], got[k], f"{where}.{k}")]
    return [] if pinned == got else [f"{where}: pinned {str(pinned)[:120]!r}, got {str(got)[:120]!r}"]


def differences(pinned: dict[str, Any], records_dir: Path) -> list[str]:
    """Every difference between the pinned records (chapter → records; keys starting with ``_`` are metadata) and
    the ``<chapter>.json`` files of ``records_dir``."""
    problems = []
    for chapter, numbers in pinned.items():
        if chapter.startswith("_"):
            continue
        path = Path(records_dir) / f"{chapter}.json"
        if not path.exists():
            problems.append(f"{chapter}: no records at {path} (was the chapter built?)")
            continue
        got = json.loads(path.read_text())
        got = {k: v for k, v in got.items() if k != "_meta" and not k.startswith(VOLATILE_PREFIXES)}
        numbers = {k: v for k, v in numbers.items() if not k.startswith(VOLATILE_PREFIXES)}
        problems += [f"{chapter}: new record {k!r}" for k in sorted(got.keys() - numbers.keys())]
        problems += [f"{chapter}: record {k!r} is gone" for k in sorted(numbers.keys() - got.keys())]
        problems += [d for k in sorted(numbers.keys() & got.keys())
                     for d in value_differences(numbers[k], got[k], f"{chapter}.{k}")]
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    pinned = json.loads(Path(argv[0]).read_text())
    problems = differences(pinned, Path(argv[1]))
    n = sum(len(v) for k, v in pinned.items() if not k.startswith("_"))
    print("\n".join(problems) if problems else f"all {n} pinned records equal those in {argv[1]}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
