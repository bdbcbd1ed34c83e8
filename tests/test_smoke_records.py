"""Every number the smoke book records is pinned: a refactor that changes one fails here, naming it.

``tests/data/smoke_records.json`` holds the records of a smoke build (its provenance inside). A deliberate change
of a number is made by rewriting that file in the same commit, with the reason in the commit message.
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

from compare_records import differences, machine_note, value_differences  # noqa: E402

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
    pins name that machine (helpers.provenance.numerics_fingerprint), so a failure can say which it is."""
    assert len(json.loads(PINNED.read_text())["_provenance"]["machine"]["numerics"]) == 12


def test_the_pinned_default_records_are_well_formed() -> None:
    pinned = json.loads((REPO / "tests" / "data" / "default_records.json").read_text())
    smoke = json.loads(PINNED.read_text())
    assert pinned["_provenance"]["changes_from_baseline"] and set(pinned) - {"_provenance"} == set(smoke) - {
        "_provenance"}
    assert all(len(v) > 10 for k, v in pinned.items() if not k.startswith("_"))


@pytest.mark.slow
def test_smoke_records_equal_the_pinned_ones(smoke_book: Path) -> None:
    pinned = json.loads(PINNED.read_text())
    problems = differences(pinned, smoke_book / "records")
    assert not problems, (f"{len(problems)} smoke records differ from {PINNED.name}. {machine_note(pinned)}If "
                          "intended, re-pin (python tools/compare_records.py --pin ... --why ...) and say why in the "
                          "commit:\n" + "\n".join(problems[:60]))
    # the command the README names for the default book, run here on the smoke book
    run = subprocess.run([sys.executable, str(REPO / "tools" / "compare_records.py"), str(PINNED),
                          str(smoke_book / "records")], capture_output=True, text=True)
    assert run.returncode == 0 and "pinned records equal" in run.stdout, run.stdout + run.stderr
