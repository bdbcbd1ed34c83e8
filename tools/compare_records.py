"""Compare a build's records with pinned ones: ``python tools/compare_records.py PINNED.json RECORDS_DIR``.

Re-pin after a deliberate change: ``python tools/compare_records.py --pin PINNED.json RECORDS_DIR --why "..."``
rewrites the pins of this machine's arithmetic from the build's records, appends the reason to their
``_provenance.changes`` and records the commit, date and machine (with :func:`helpers.provenance.
numerics_fingerprint`).

``PINNED.json`` maps chapter → {record: value} (``tests/data/smoke_records.json`` for the smoke book,
``tests/data/default_records.json`` for the default one); ``RECORDS_DIR`` is a build's ``records/`` folder
(``_build/records`` after ``make book``). Prints every difference — a record that is new, gone, or differs beyond
six significant digits — and exits 1 if there is any. Wall times (``seconds*``) and the counts of the
paper-profile store (``stored_*``) are left out: they change without any code change.

One set of pins per kind of arithmetic. Numbers that pass through long training runs hold bit for bit only where
the kernels round alike, so ``PINNED.json`` may have siblings ``PINNED.<fingerprint>.json``, each made on a machine
of that fingerprint; both commands take the one of this machine (:func:`pins_for_this_machine`; a re-pin on a new
kind of machine starts its sibling). A deliberate change re-pinned on one kind cannot be re-pinned on the others
from there: the chapters it moved are marked stale in the other kinds' pins (``_provenance.stale``), which are
then not compared on those machines — saying so — until someone re-pins there.
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
    the ``<chapter>.json`` files of ``records_dir``; chapters marked stale (:func:`stale_note`) are not compared."""
    problems = []
    stale = pinned.get("_provenance", {}).get("stale", {})
    for chapter, numbers in pinned.items():
        if chapter.startswith("_") or chapter in stale:
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


def _fingerprint(pins: dict[str, Any]) -> str | None:
    machine = pins.get("_provenance", {}).get("machine")
    return machine.get("numerics") if isinstance(machine, dict) else None


def pin_family(base: Path) -> list[Path]:
    """``base`` and its siblings ``<stem>.<fingerprint>.json``: the pins of every kind of arithmetic."""
    base = Path(base)
    return [base] * base.exists() + sorted(base.parent.glob(f"{base.stem}.*{base.suffix}"))


def pins_for_this_machine(base: Path, fingerprint: str | None = None) -> Path:
    """The member of ``base``'s family made on a machine that rounds as this one does, or ``base`` itself when
    none is (a comparison then fails saying the machines differ; a re-pin starts this machine's sibling,
    :func:`sibling_for`)."""
    here = fingerprint or _this_fingerprint()
    for path in pin_family(base):
        if _fingerprint(json.loads(path.read_text())) == here:
            return path
    return Path(base)


def sibling_for(base: Path, fingerprint: str) -> Path:
    """Where a new kind of machine keeps its pins: ``<stem>.<fingerprint>.json`` beside ``base``; ``base`` itself
    while it does not exist or records no machine."""
    base = Path(base)
    if not base.exists() or _fingerprint(json.loads(base.read_text())) in (None, fingerprint):
        return base
    return base.with_name(f"{base.stem}.{fingerprint}{base.suffix}")


def _this_fingerprint() -> str:
    sys.path.insert(0, str(REPO))
    from helpers import provenance  # torch is imported only when the machine matters

    return provenance.numerics_fingerprint()


def pin(pinned_path: Path, records_dir: Path, why: str) -> tuple[Path, dict[str, Any]]:
    """Rewrite the pins of this machine's arithmetic in ``pinned_path``'s family (:func:`pins_for_this_machine`;
    for a new kind of machine, a new sibling) from the records of the chapters they pin (or, for a new file, of
    every chapter in ``records_dir``); the old provenance is kept, with ``why`` appended to its changes. The
    chapters whose records this moved are marked stale in the other kinds' pins (:func:`mark_stale`). Returns the
    file written and its contents."""
    sys.path.insert(0, str(REPO))
    from helpers import provenance  # torch is imported only for a re-pin

    machine = provenance.machine()
    target = pins_for_this_machine(pinned_path, machine["numerics"])
    if not target.exists() or _fingerprint(json.loads(target.read_text())) != machine["numerics"]:
        target = sibling_for(pinned_path, machine["numerics"])
    old = json.loads(target.read_text()) if target.exists() else {}
    chapters = ([k for k in old if not k.startswith("_")]
                or sorted(p.stem for p in Path(records_dir).glob("*.json")))
    prov = {k: v for k, v in old.get("_provenance", {}).items() if k != "stale"}  # re-pinned here: none is stale
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    prov.update({"git_sha": sha or "unknown", "date": time.strftime("%Y-%m-%d"), "machine": machine})
    prov["changes"] = [*prov.get("changes", []), why]
    new = {"_provenance": prov, **_records(records_dir, chapters)}
    # chapters that moved here, except those catching up with a change already pinned on another kind
    caught_up = old.get("_provenance", {}).get("stale", {})
    moved = [ch for ch in chapters if ch in old and ch not in caught_up and value_differences(
        {k: v for k, v in old[ch].items() if not k.startswith(VOLATILE_PREFIXES)}, new[ch], ch)]
    target.write_text(json.dumps(new, indent=1, ensure_ascii=False) + "\n")
    for other in pin_family(pinned_path):
        if other != target and moved:
            mark_stale(other, moved, why=why, sha=sha or "unknown", fingerprint=machine["numerics"])
    return target, new


def mark_stale(path: Path, chapters: list[str], *, why: str, sha: str, fingerprint: str) -> None:
    """Record in the pins at ``path`` (made on another kind of machine) that ``chapters`` were re-pinned elsewhere
    for ``why``: their numbers here are out of date, and comparisons skip them until a re-pin on that kind."""
    pins = json.loads(Path(path).read_text())
    stale = pins.setdefault("_provenance", {}).setdefault("stale", {})
    for chapter in chapters:
        stale[chapter] = {"why": why, "git_sha": sha, "re_pinned_on": fingerprint}
    Path(path).write_text(json.dumps(pins, indent=1, ensure_ascii=False) + "\n")


def stale_note(pinned: dict[str, Any]) -> str:
    """A sentence naming the chapters these pins leave uncompared (re-pinned on another kind of machine), or ''."""
    stale = pinned.get("_provenance", {}).get("stale", {})
    if not stale:
        return ""
    what = "; ".join(f"{ch} (re-pinned at {v['git_sha'][:7]} on numerics {v['re_pinned_on']}: {v['why'][:80]})"
                     for ch, v in sorted(stale.items()))
    return (f"Not compared, their pins for this kind of machine being out of date: {what}. Re-pin on this kind of "
            "machine to compare them. ")


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
        target, new = pin(args.pinned, args.records_dir, args.why)
        print(f"pinned {sum(len(v) for k, v in new.items() if not k.startswith('_'))} records in {target}")
        return 0
    path = pins_for_this_machine(args.pinned)
    pinned = json.loads(path.read_text())
    problems = differences(pinned, args.records_dir)
    stale = pinned.get("_provenance", {}).get("stale", {})
    n = sum(len(v) for k, v in pinned.items() if not k.startswith("_") and k not in stale)
    print(f"comparing with {path}")
    print("\n".join(problems + [machine_note(pinned)]) if problems
          else f"all {n} pinned records equal those in {args.records_dir}")
    if stale:
        print(stale_note(pinned))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
