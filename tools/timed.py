"""Run a command and record its wall time: ``python tools/timed.py NAME -- COMMAND ...``.

Writes ``_build/timings/NAME.json`` (start, end, seconds, exit code) and exits with the command's exit code.
``make test`` runs its tests through it (NAME ``make-test``), and ``make bench`` reports that time against its
target (benchmarks/peers/build_times.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python tools/timed.py NAME -- COMMAND [ARGS ...]", file=sys.stderr)
        return 2
    name, command = argv[0], argv[2:]
    start, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    code = subprocess.call(command)
    record = {"command": " ".join(command), "started": start, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": round(time.perf_counter() - t0, 2), "exit_code": code}
    path = ROOT / "_build" / "timings" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
