"""Every number the smoke book records is pinned: a refactor that changes one fails here, naming it.

``tests/data/smoke_records.json`` holds the records of a smoke build (its provenance inside), and a sibling
``smoke_records.<fingerprint>.json`` those of each other kind of machine arithmetic it was pinned on (the test
takes this machine's: ``compare_records.pins_for_this_machine``). A deliberate change of a number is made by
re-pinning in the same commit, with the reason in the commit message.
``tests/data/default_records.json`` pins the default book the same way; it is checked by hand after a default
build (``python tools/compare_records.py tests/data/default_records.json _build/records``), since that build takes
half an hour.

Left out, because they change without any code change: wall times (``seconds*``) and what describes the
paper-profile store while its background run commits chunks (``stored_*``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from compare_records import (differences, machine_note, mark_stale, pin_family,  # noqa: E402
                             pins_for_this_machine, stale_note, value_differences)

PINNED = REPO / "tests" / "data" / "smoke_records.json"


def test_the_comparison_sees_a_change(tmp_path: Path) -> None:
    assert value_differences({"a": [1.0, "x"]}, {"a": [1.0 + 1e-9, "x"]}, "r") == []
    assert value_differences({"a": [1.0, "x"]}, {"a": [1.001, "x"]}, "r") == ["r.a[0]: pinned 1.0, got 1.001"]
    assert value_differences({"n": 3}, {"n": 4}, "r") and value_differences("text", "other text", "r")
    (tmp_path / "ch.json").write_text(json.dumps({"x": 1.0, "new": 2, "seconds_total": 9.0, "_meta": {}}))
    assert differences({"_provenance": {}, "ch": {"x": 1.0, "gone": 3}}, tmp_path) == [
        "ch: new record 'new'", "ch: record 'gone' is gone"]


def test_a_re_pin_records_the_machine_and_the_reason(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    (records / "ch.json").write_text(json.dumps({"x": 1.5, "seconds_total": 9.0, "_meta": {"a": 1}}))
    pinned = tmp_path / "pins.json"
    pinned.write_text(json.dumps({"_provenance": {"changes": ["before"]}, "ch": {"x": 1.0}}))
    run = subprocess.run([sys.executable, str(REPO / "tools" / "compare_records.py"), str(pinned), str(records)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "ch.x: pinned 1.0, got 1.5" in run.stdout
    assert "recorded no numerics fingerprint" in run.stdout  # the old pins say nothing of their machine
    run = subprocess.run([sys.executable, str(REPO / "tools" / "compare_records.py"), "--pin", str(pinned),
                          str(records)], capture_output=True, text=True)
    assert run.returncode == 2 and "--pin needs --why" in run.stderr
    run = subprocess.run([sys.executable, str(REPO / "tools" / "compare_records.py"), "--pin", str(pinned),
                          str(records), "--why", "x moved"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    new = json.loads(pinned.read_text())
    assert new["ch"] == {"x": 1.5} and new["_provenance"]["changes"] == ["before", "x moved"]
    assert machine_note(new) == "" and len(new["_provenance"]["machine"]["numerics"]) == 12
    assert differences(new, records) == []


def test_the_smoke_pins_say_where_they_were_made() -> None:
    """Records that pass through long training runs are reproducible only where the kernels round alike; the
    pins name that machine (helpers.provenance.numerics_fingerprint), so a failure can say which it is, and each
    kind of machine has its own file."""
    prints = [json.loads(p.read_text())["_provenance"]["machine"]["numerics"] for p in pin_family(PINNED)]
    assert all(len(f) == 12 for f in prints) and len(set(prints)) == len(prints)
    assert all(p == PINNED or p.name == f"smoke_records.{f}.json" for p, f in zip(pin_family(PINNED), prints))


def test_the_pinned_default_records_are_well_formed() -> None:
    smoke = json.loads(PINNED.read_text())
    for path in pin_family(REPO / "tests" / "data" / "default_records.json"):
        pinned = json.loads(path.read_text())
        assert set(pinned) - {"_provenance"} == set(smoke) - {"_provenance"}, path
        assert all(len(v) > 10 for k, v in pinned.items() if not k.startswith("_")), path
        assert len(pinned["_provenance"]["machine"]["numerics"]) == 12, path


def test_a_re_pin_on_another_machine_keeps_both_and_marks_what_moved_stale(tmp_path: Path, monkeypatch) -> None:
    """Pins per kind of arithmetic: a re-pin on a new kind starts its own file and leaves the other's alone; a
    deliberate change re-pinned on one kind marks the chapters it moved stale in the others', which their
    comparisons then skip and name, until a re-pin there clears the mark."""
    import compare_records

    from helpers import provenance

    def build(x: float, y: float) -> Path:
        folder = tmp_path / f"records-{x}-{y}"
        folder.mkdir(exist_ok=True)
        (folder / "a.json").write_text(json.dumps({"x": x, "_meta": {}}))
        (folder / "b.json").write_text(json.dumps({"y": y, "_meta": {}}))
        return folder

    base = tmp_path / "pins.json"
    machine = dict(provenance.machine())
    monkeypatch.setattr(provenance, "machine", lambda: machine)
    monkeypatch.setattr(compare_records, "_this_fingerprint", lambda: machine["numerics"])
    machine["numerics"] = "aaaaaaaaaaaa"
    assert compare_records.pin(base, build(1.0, 2.0), "first")[0] == base
    machine["numerics"] = "bbbbbbbbbbbb"  # another CPU: its arithmetic moves y a little
    other, _ = compare_records.pin(base, build(1.0, 2.5), "new machine")
    assert other == tmp_path / "pins.bbbbbbbbbbbb.json" and pin_family(base) == [base, other]
    assert pins_for_this_machine(base) == other and not differences(json.loads(other.read_text()), build(1.0, 2.5))
    assert "stale" not in json.loads(base.read_text())["_provenance"]  # a new machine is no change of method
    compare_records.pin(base, build(3.0, 2.5), "x changed on purpose")  # re-pinned on the second machine only
    first = json.loads(base.read_text())
    assert set(first["_provenance"]["stale"]) == {"a"} and "x changed on purpose" in stale_note(first)
    machine["numerics"] = "aaaaaaaaaaaa"
    assert pins_for_this_machine(base) == base
    assert differences(first, build(3.0, 2.0)) == []  # a: stale, not compared; b still is
    assert differences(first, build(3.0, 2.1)) == ["b.y: pinned 2.0, got 2.1"]
    compare_records.pin(base, build(3.0, 2.0), "re-pinned here")
    assert "stale" not in json.loads(base.read_text())["_provenance"] and stale_note(json.loads(base.read_text())) == ""
    assert "stale" not in json.loads(other.read_text())["_provenance"]  # catching up marks nothing elsewhere
    mark_stale(base, ["b"], why="w", sha="0" * 40, fingerprint="bbbbbbbbbbbb")
    assert "b (re-pinned at 0000000" in stale_note(json.loads(base.read_text()))


@pytest.mark.slow
def test_smoke_records_equal_the_pinned_ones(smoke_book: Path) -> None:
    path = pins_for_this_machine(PINNED)
    pinned = json.loads(path.read_text())
    print(stale_note(pinned))
    problems = differences(pinned, smoke_book / "records")
    assert not problems, (f"{len(problems)} smoke records differ from {path.name}. {machine_note(pinned)}If "
                          "intended, re-pin (python tools/compare_records.py --pin ... --why ...) and say why in the "
                          "commit:\n" + "\n".join(problems[:60]))
    # the command the README names for the default book, run here on the smoke book
    run = subprocess.run([sys.executable, str(REPO / "tools" / "compare_records.py"), str(PINNED),
                          str(smoke_book / "records")], capture_output=True, text=True)
    assert run.returncode == 0 and "pinned records equal" in run.stdout, run.stdout + run.stderr
