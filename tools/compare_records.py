"""Compare a build's records with pinned ones: ``python tools/compare_records.py PINNED.json RECORDS_DIR``.

Re-pin after a deliberate change: ``python tools/compare_records.py --pin PINNED.json RECORDS_DIR --why "..."``
rewrites ``PINNED.json`` from the build's records, appends the reason to its ``_provenance.changes`` and records
the commit, date and machine (with :func:`helpers.provenance.numerics_fingerprint`).

``PINNED.json`` maps chapter → {record: value} (``tests/data/smoke_records.json`` for the smoke book,
``tests/data/default_records.json`` for the default one); ``RECORDS_DIR`` is a build's ``records/`` folder
(``_build/records`` after ``make book``). Prints every difference — a record that is new, gone, or differs beyond
six significant digits — and exits 1 if there is any. Wall times (``seconds*``) and the counts of the
paper-profile store (``stored_*``) are left out: they change without any code change.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

VOLATILE_PREFIXES = ("stored_", "seconds")
# Six significant digits: two builds on one machine agree bit for bit, and any change of method moves a number by
# far more. Another kind of CPU rounds differently, which long training runs amplify beyond any such tolerance:
# pins name the machine they hold on (helpers.provenance), and a comparison says when it is not this one.
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


def _stable(records: dict[str, Any]) -> dict[str, Any]:
    """A chapter's records without its metadata and the volatile ones."""
    return {k: v for k, v in records.items() if k != "_meta" and not k.startswith(VOLATILE_PREFIXES)}


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
        got = _stable(json.loads(path.read_text()))
        numbers = {k: v for k, v in numbers.items() if not k.startswith(VOLATILE_PREFIXES)}
        problems += [f"{chapter}: new record {k!r}" for k in sorted(got.keys() - numbers.keys())]
        problems += [f"{chapter}: record {k!r} is gone" for k in sorted(numbers.keys() - got.keys())]
        problems += [d for k in sorted(numbers.keys() & got.keys())
                     for d in value_differences(numbers[k], got[k], f"{chapter}.{k}")]
    return problems


def _records(records_dir: Path, chapters: list[str]) -> dict[str, dict[str, Any]]:
    return {ch: _stable(json.loads((Path(records_dir) / f"{ch}.json").read_text())) for ch in chapters}


def pin(pinned_path: Path, records_dir: Path, why: str) -> dict[str, Any]:
    """Rewrite ``pinned_path`` from the records of the chapters it pins (or, for a new file, of every chapter in
    ``records_dir``); the old provenance is kept, with ``why`` appended to its changes."""
    sys.path.insert(0, str(REPO))
    from helpers import provenance  # torch is imported only for a re-pin

    old = json.loads(pinned_path.read_text()) if pinned_path.exists() else {}
    chapters = [k for k in old if not k.startswith("_")] or sorted(p.stem for p in Path(records_dir).glob("*.json"))
    prov = dict(old.get("_provenance", {}))
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    prov.update({"git_sha": sha or "unknown", "date": time.strftime("%Y-%m-%d"), "machine": provenance.machine()})
    prov["changes"] = [*prov.get("changes", []), why]
    new = {"_provenance": prov, **_records(records_dir, chapters)}
    pinned_path.write_text(json.dumps(new, indent=1, ensure_ascii=False) + "\n")
    return new


def machine_note(pinned: dict[str, Any]) -> str:
    """Whether the pins were made on a machine that rounds as this one does (empty when it does or when helpers
    cannot be imported)."""
    try:
        sys.path.insert(0, str(REPO))
        from helpers import provenance
    except ImportError:
        return ""
    machine = pinned.get("_provenance", {}).get("machine")
    return provenance.mismatch_note(machine if isinstance(machine, dict) else None)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pinned", type=Path)
    parser.add_argument("records_dir", type=Path)
    parser.add_argument("--pin", action="store_true", help="rewrite PINNED from RECORDS_DIR instead of comparing")
    parser.add_argument("--why", default="", help="with --pin: the reason, kept in the file's provenance")
    args = parser.parse_args(argv)
    if args.pin:
        if not args.why:
            parser.error("--pin needs --why: say what changed the numbers and why (it is kept in the file)")
        new = pin(args.pinned, args.records_dir, args.why)
        print(f"pinned {sum(len(v) for k, v in new.items() if not k.startswith('_'))} records in {args.pinned}")
        return 0
    pinned = json.loads(args.pinned.read_text())
    problems = differences(pinned, args.records_dir)
    n = sum(len(v) for k, v in pinned.items() if not k.startswith("_"))
    print("\n".join(problems + [machine_note(pinned)]) if problems
          else f"all {n} pinned records equal those in {args.records_dir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
