"""Chapter 2's paper-profile Iris sweeps, run once and kept in the repository, chunk by chunk.

The paper profile of the Iris sweeps (50 repetitions, every regime, the paper's 60,000 / 7,500 epochs) takes
hours. It is run in the background on a Dask ``LocalCluster`` (or any cluster) and every finished chunk — one
setting (depth or width) × one regime family × one block of repetitions, see
:meth:`helpers.experiments.nonconvex.IrisSweepConfig.chunks` — is
written under ``book/data/iris_paper/<chunk>/`` as small CSVs with its provenance (command, git SHA, date,
machine, wall time) and, with ``--commit``, committed at once. A fresh clone therefore resumes where the last
run stopped: chunks already stored are skipped.

    python -m helpers.sweep_store run --workers 2 --commit     # start or resume (hours; in the background)
    python -m helpers.sweep_store status                       # which chunks are stored

Chapter 2 reads the stored chunks with :func:`load_stored` and shows them beside the default run and the paper's
bars; ``tests/test_sweep_store.py`` recomputes a committed chunk from its seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from helpers import provenance
from helpers.cache import REPO_ROOT
from helpers.experiments.nonconvex import IrisSweepConfig, IrisSweepResult, run_iris_chunk, run_iris_sweeps

STORE = REPO_ROOT / "book" / "data" / "iris_paper"
BLOCK = 5  # repetitions per chunk: ~minutes each, so an interruption loses little
TABLES = ("runs", "models", "points", "history", "lanczos")


def paper_config() -> IrisSweepConfig:
    """The paper's Iris protocol at its full scale (STUDY.md §3): the defaults of :class:`IrisSweepConfig`, with
    the last-layer protocol for both deterministic plain regimes."""
    return IrisSweepConfig(last_layer_regimes=("nol2", "l2"))


def chunk_name(task: dict[str, Any]) -> str:
    """Folder name of a chunk, e.g. ``depth-plain-d8-r00-05`` (depth 8) or ``width-bnn-w20-r05-10``."""
    value = "-".join(f"{task['sweep'][0]}{v}" for v in task["values"])
    return f"{task['sweep']}-{task['family']}-{value}-r{task['rep_start']:02d}-{task['rep_stop']:02d}"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def is_stored(task: dict[str, Any], config: IrisSweepConfig, store: Path = STORE) -> bool:
    """True when the chunk's folder holds every table and a provenance written for this same config."""
    folder = store / chunk_name(task)
    prov = folder / "provenance.json"
    if not prov.exists() or not all((folder / f"{t}.csv.gz").exists() for t in TABLES):
        return False
    return json.loads(prov.read_text())["config"] == _as_json(dataclasses.asdict(config))


def stored_machine(task: dict[str, Any], store: Path = STORE) -> dict[str, Any]:
    """The machine a stored chunk was computed on, as its provenance recorded it (:func:`helpers.provenance.machine`;
    chunks stored before the numerics fingerprint was recorded lack that field)."""
    return json.loads((store / chunk_name(task) / "provenance.json").read_text())["machine"]


def _as_json(value: Any) -> Any:
    """The value as a JSON round trip gives it back (tuples become lists), for comparisons with stored JSON."""
    return json.loads(json.dumps(value))


def code_version() -> dict[str, Any]:
    """The commit the code was loaded from and whether ``helpers/`` differed from it (read once, at start)."""
    return {"git_sha": _git("rev-parse", "HEAD"), "helpers_modified": bool(_git("status", "--porcelain", "helpers"))}


def write_chunk(task: dict[str, Any], result: IrisSweepResult, config: IrisSweepConfig, *, wall_s: float,
                store: Path = STORE, command: str = "", code: dict[str, Any] | None = None) -> Path:
    """Write one chunk's tables (gzip CSV, full float precision) and its provenance; returns the folder."""
    folder = store / chunk_name(task)
    folder.mkdir(parents=True, exist_ok=True)
    for t in TABLES:
        # written to a temporary name first so that a killed run never leaves a half-written table
        tmp = folder / f".{t}.csv.gz.tmp"
        getattr(result, t).to_csv(tmp, index=False, float_format="%.17g", compression={"method": "gzip", "mtime": 0})
        os.replace(tmp, folder / f"{t}.csv.gz")
    prov = {"task": task, "config": dataclasses.asdict(config), "command": command or " ".join(sys.argv),
            **(code or code_version()), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": provenance.machine(),
            "wall_s": round(wall_s, 1)}
    (folder / "provenance.json").write_text(json.dumps(prov, indent=1, default=list) + "\n")
    return folder


def load_stored(store: Path = STORE, config: IrisSweepConfig | None = None
                ) -> tuple[IrisSweepResult, pd.DataFrame]:
    """Every stored chunk of ``config`` (default: :func:`paper_config`) as one result, and a provenance table
    (one row per chunk: name, repetitions, date, git SHA, wall time). Chunks not yet stored are simply absent;
    an empty store gives empty tables."""
    config = config or paper_config()
    parts, prov = [], []
    for task in config.chunks(BLOCK):
        if not is_stored(task, config, store):
            continue
        folder = store / chunk_name(task)
        parts.append(IrisSweepResult(*(_read(folder / f"{t}.csv.gz") for t in TABLES)))
        p = json.loads((folder / "provenance.json").read_text())
        prov.append({"chunk": chunk_name(task), **task, "date": p["date"], "git_sha": p["git_sha"][:10],
                     "wall_s": p["wall_s"], "machine": p["machine"]["node"], "cpus": p["machine"]["cpus"]})
    if not parts:
        return IrisSweepResult(*(pd.DataFrame() for _ in TABLES)), pd.DataFrame(prov)
    return IrisSweepResult.concat(parts), pd.DataFrame(prov)


def _read(path: Path) -> pd.DataFrame:
    """A stored table; an empty one (e.g. no Lanczos check in a Bayesian chunk) has no columns at all."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


# the fields that define what is done to each member; a profile may differ from the paper's only in the others
PROTOCOL_FIELDS = ("epochs", "retrain_epochs", "n_candidates", "test_index", "swa_start", "loo", "dtype", "seed", "lr",
                   "patience", "bnn_damping", "depth_width", "stop_at_floor")


def borrow(config: IrisSweepConfig, regimes: Sequence[str], store: Path = STORE) -> IrisSweepResult:
    """The stored paper-profile runs of ``regimes`` restricted to ``config``'s settings — its depths and widths,
    repetitions ``0 .. reps - 1`` — for a profile that cannot afford to compute them (e.g. the Bayesian network,
    which never reaches its learning-rate floor). Same seeds, same protocol, same code as the stored chunk's
    provenance: the runs ``config`` would have computed. Raises when ``config``'s protocol differs from the paper
    profile's; returns empty tables when nothing is stored yet."""
    paper = paper_config()
    differs = [f for f in PROTOCOL_FIELDS if getattr(config, f) != getattr(paper, f)]
    if differs:
        raise ValueError(f"the stored runs follow the paper profile's protocol; this config differs in {differs}")
    stored, _ = load_stored(store)
    if not len(stored.runs):
        return stored
    values = {"depth": set(config.depths), "width": set(config.widths)}

    def keep(frame: pd.DataFrame) -> pd.DataFrame:
        if not len(frame):
            return frame
        ok = frame["regime"].isin(list(regimes)) & frame.apply(lambda r: r["value"] in values[r["sweep"]], axis=1)
        if "rep" in frame.columns:
            ok &= frame["rep"] < config.reps
        return frame[ok].reset_index(drop=True)

    return IrisSweepResult(*(keep(getattr(stored, t)) for t in TABLES))


def recompute(task: dict[str, Any], config: IrisSweepConfig | None = None) -> IrisSweepResult:
    """Recompute one stored chunk from its seeds, uncached (the same members in the same ensemble: exact), on one
    thread as :func:`run` computes every chunk (its workers have one thread each): with two, some reductions
    round differently (seen: Pearson correlations moving by 4e-6)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_iris_chunk(config or paper_config(), **task, cache=False)
    finally:
        torch.set_num_threads(threads)


def by_block(task: dict[str, Any]) -> tuple:
    """Run order: the first block of repetitions of every setting before the second of any, so that an
    interrupted run leaves every setting with some repetitions; within a block the cheaper chunks first (width
    before depth, smaller before larger, the deterministic family before the Bayesian one, which never reaches its
    learning-rate floor and runs all 60,000 epochs)."""
    return (task["rep_start"], task["family"] == "bnn", task["sweep"] == "depth", task["values"])


def first_of(settings: dict[str, Sequence[int]], reps: int, families: Sequence[str] = ("plain", "bnn")):
    """A run order that takes the chunks inside ``settings`` (e.g. chapter 2's default: ``{"depth": [1, 2, 4, 8],
    "width": [8, 20, 50]}``), repetitions below ``reps``, of ``families`` first, each group in :func:`by_block`
    order — so that a profile borrowing stored runs (:func:`borrow`) gets them before the rest of the sweep.
    Inside, the most expensive chunks come first (deepest, then widest): with several workers, starting the
    longest tasks first gives the shortest wall time."""
    def order(task: dict[str, Any]) -> tuple:
        inside = (task["family"] in families and task["rep_stop"] <= reps
                  and set(task["values"]) <= set(settings.get(task["sweep"], ())))
        if inside:
            return (0, task["sweep"] != "depth", -max(task["values"]), task["family"] == "plain", task["rep_start"])
        return (1,) + by_block(task)

    return order


def parse_settings(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["depth=1,2,4,8", "width=8,20,50"]`` → ``{"depth": [1, 2, 4, 8], "width": [8, 20, 50]}``."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        sweep, _, values = spec.partition("=")
        if sweep not in ("depth", "width") or not values:
            raise ValueError(f"--first takes sweep=values such as depth=1,2,4,8 or width=8,20,50, got {spec!r}")
        out[sweep] = [int(v) for v in values.split(",")]
    return out


def run(workers: int, commit: bool, scheduler: str | None = None, config: IrisSweepConfig | None = None,
        store: Path = STORE, order=by_block, command: str | None = None) -> None:
    """Run every chunk not yet stored on a Dask cluster (a ``LocalCluster`` of ``workers`` one-thread processes
    unless ``scheduler`` names one), writing — and with ``commit`` committing — each as it finishes, in
    ``order`` (a sort key of the tasks: :func:`by_block` or :func:`first_of`)."""
    config = config or paper_config()
    command = command or " ".join(["python -m helpers.sweep_store run", f"--workers {workers}"]
                                  + (["--commit"] if commit else []))
    started = {"t": time.perf_counter()}
    code = code_version()  # the code this process runs, whatever is committed while it runs

    def done(task: dict[str, Any], result: IrisSweepResult) -> None:
        now = time.perf_counter()
        folder = write_chunk(task, result, config, wall_s=now - started["t"], store=store, command=command,
                             code=code)
        started["t"] = now
        print(f"stored {folder}", flush=True)
        if commit:
            rel = str(folder.resolve().relative_to(REPO_ROOT))
            for attempt in range(5):  # another git command may hold the index lock for a moment
                _git("add", rel)
                _git("commit", "-m", f"Paper-profile Iris sweeps: chunk {chunk_name(task)} "
                     "(python -m helpers.sweep_store run)", "--", rel)
                if not _git("status", "--porcelain", rel):
                    break
                time.sleep(2 + 3 * attempt)

    cluster = None
    if scheduler is None:
        from dask.distributed import LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        scheduler = cluster.scheduler_address
    try:
        # wall time per chunk is measured between completions: with w workers it is w chunks' worth of one core
        run_iris_sweeps(config, block=BLOCK, scheduler=scheduler, progress=True, cache=False, on_result=done,
                        skip=lambda t: is_stored(t, config, store), order=order)
    finally:
        if cluster is not None:
            cluster.close()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.sweep_store", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the paper-profile Iris sweeps, chunk by chunk")
    r.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (one thread each)")
    r.add_argument("--scheduler", default=None, help="an existing Dask scheduler address instead of a LocalCluster")
    r.add_argument("--commit", action="store_true", help="git-commit each chunk as soon as it is stored")
    r.add_argument("--first", nargs="*", default=[], metavar="SWEEP=VALUES",
                   help="run these settings first, e.g. --first depth=1,2,4,8 width=8,20,50 (chapter 2's default)")
    r.add_argument("--first-reps", type=int, default=BLOCK, help="repetitions of the --first settings (default %(default)s)")
    r.add_argument("--first-family", nargs="*", default=["plain", "bnn"], choices=["plain", "bnn"],
                   help="families of the --first settings (default: both)")
    sub.add_parser("status", help="list the stored and the missing chunks")
    args = parser.parse_args(argv)
    config = paper_config()
    if args.cmd == "status":
        tasks = config.chunks(BLOCK)
        have = [t for t in tasks if is_stored(t, config)]
        print(f"{len(have)} of {len(tasks)} chunks stored in {STORE.relative_to(REPO_ROOT)}")
        for t in tasks:
            print(("  stored   " if t in have else "  missing  ") + chunk_name(t))
        return 0
    import torch

    torch.set_num_threads(1)
    order = by_block
    if args.first:
        order = first_of(parse_settings(args.first), args.first_reps, args.first_family)
    run(args.workers, args.commit, args.scheduler, config, order=order,
        command=" ".join(["python -m helpers.sweep_store"] + list(argv if argv is not None else sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
