"""``make bench``: helpers against captum, dattri and pyDVL on the same two problems, in one run (issue 7).

    .venv/bin/python -m benchmarks.peers.run [--problems P1 P2] [--only LIBRARY ...] [--resume] [--repeats 3]

Every method runs in a fresh worker process (:mod:`benchmarks.peers.worker`; pyDVL's in ``.venv-pydvl``), one
after the other, never two at a time, each with ONE thread (``torch.set_num_threads(1)`` and
``OMP_NUM_THREADS=MKL_NUM_THREADS=OPENBLAS_NUM_THREADS=1``) — the same for every library, so that the other jobs
of a shared machine disturb every method alike. Each worker loads the frozen problem
(:mod:`benchmarks.peers.problems`), times one warm-up call and ``--repeats`` timed calls (median reported; a
method whose warm-up took longer than ``--slow`` seconds is not called again: its one call is the time, marked in
the table) and writes the scores converted to the book's convention. This script then compares them with the
reference:

* ``rel_error`` = ‖Δ − Δ_ref‖_F / ‖Δ_ref‖_F over the whole ``[10, 4000]`` matrix;
* ``pearson``, ``spearman`` over its 40,000 entries (scipy);
* ``scale`` = ⟨Δ, Δ_ref⟩ / ⟨Δ, Δ⟩, the least-squares factor s in Δ_ref ≈ s·Δ: the check of each library's
  conversion (sign, 1/n, orientation, sum- or mean-loss Hessian, damping) — ≈ 1 for every accurate method.

Iterative solvers with an accuracy knob (CG in every library: a tolerance, or dattri's fixed iteration count) get
a *ladder* of settings, cheapest first, searched by bisection with single calls (accuracy grows along the
ladder); the cheapest setting that reaches ``rel_error ≤ 1e-6`` is then timed in full — or, when none does, the
most accurate one. LiSSA and Arnoldi run with the same settings in every library (same depth and scale; same
rank and Krylov dimension), so their answers agree and only the time differs.

"At equal accuracy" below means: the fastest fully timed method of each side with ``rel_error ≤ 1e-6``; the two
are then re-timed head to head, alternating, ``--rounds`` processes each. If no peer reaches 1e-6, the peers'
side is the fastest of their most accurate results (see :func:`benchmarks.peers.report.ratios`).

Outputs: ``_build/bench/peers.csv`` (one row per timed run), ``_build/bench/peers.md`` (the table),
``_build/bench/build_times.md`` (the book's own build times against their targets, read from
``_build/timings/``), and — so that the book never needs the peers — copies in ``book/data/peers.csv`` and
``book/data/peers_table.md`` (the appendix page ``book/peers.md`` includes the latter). Prints the table, the
ratios fastest peer / helpers for P1 and P2, the LiSSA and Arnoldi comparisons and the build times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import build_times, problems  # noqa: E402
from benchmarks.peers.report import ACCURACY, CAP_SECONDS, SLOW_SECONDS, render  # noqa: E402

OUT = ROOT / "_build" / "bench"
ROWS = OUT / "rows"
BOOK_CSV = ROOT / "book" / "data" / "peers.csv"
BOOK_TABLE = ROOT / "book" / "data" / "peers_table.md"
MAIN_PY = ROOT / ".venv" / "bin" / "python"
PYDVL_PY = ROOT / ".venv-pydvl" / "bin" / "python"
WORKER = ROOT / "benchmarks" / "peers" / "worker.py"
VERSIONS = {"helpers": "(this checkout)", "captum": "0.9.0", "dattri": "0.3.0", "pydvl": "0.10.0",
            "torch-influence": "–"}
THREADS = 1  # per method, every library
THREAD_ENV = {k: str(THREADS) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}

# the same LiSSA (depth, scale) and Arnoldi (rank, Krylov dimension) for every library: equal work, equal answers
LISSA = {"P1": {"depth": 100}, "P2": {"depth": 50}}  # scale: 1.1·λ_max(H + δI), stored with the problem
ARNOLDI = {"P1": {"rank": 50, "arnoldi_dim": 100}, "P2": {"rank": 50, "arnoldi_dim": 100}}
MEMORY_CAP = [16 * 2**30]  # resident-set cap of a worker (bytes; --memory-cap-gib); 0 = none
POLL_SECONDS = 0.25

# Accuracy ladders, cheapest first, cut to four rungs around what a trial run of the whole benchmark found (the
# same procedure for every library, so that the hour-long run is not spent searching): each starts below the
# cheapest setting the trial found accurate (helpers' at residual 1e-6, the target itself, accurate on P1). helpers stops on the relative residual;
# pyDVL's block CG stops at ‖r‖ ≤ rtol²·‖b‖ (its rtol acts squared); dattri's CG runs a fixed number of
# iterations. Trial (2026-11-29, 1 thread): helpers' residual 1e-6 gave 5.9e-7 on P1, 1.0e-6 (just above) on P2;
# pyDVL rtol 4.5e-4 gave 1.2e-6 and 3.2e-4 8.3e-7 on P1, 1.7e-4 1.2e-6 and 1e-4 4.1e-7 on P2; dattri 65 iterations
# gave 1.6e-6 and 70 4.2e-7 on P1, 30 gave 1.7e-5 and 40 1.4e-7 on P2.
HELPERS_RESIDUALS = (1e-6, 5e-7, 2e-7, 1e-7)
PYDVL_RTOLS = {"P1": (4.5e-4, 3.2e-4, 2.2e-4, 1e-4), "P2": (1.7e-4, 1.3e-4, 1e-4, 7e-5)}
DATTRI_CG_ITERS = {"P1": (65, 70, 80, 100), "P2": (30, 35, 40, 50)}


@dataclass
class Job:
    """One method, or a ladder of its settings (cheapest first) to be searched for ``ACCURACY``."""

    problem: str
    library: str
    method: str
    ladder: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    family: str = "exact"  # exact | cg | lissa | arnoldi (for the table and the per-family comparison)
    skip: str | None = None  # why it cannot run (recorded as a row, not run)
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.method


def jobs(problem: str, meta: dict[str, Any]) -> list[Job]:
    """Every method of issue 7 for one problem, helpers' first."""
    n_params = meta["n_params"]
    dense_gib = n_params**2 * 8 / 2**30
    big = dense_gib > 4  # a dense float64 Hessian beyond 4 GiB (P2: 19.3 GiB) does not fit next to its solver
    no_dense = f"dense {n_params}×{n_params} float64 Hessian = {dense_gib:.1f} GiB (machine: 23 GiB RAM)"
    lissa = dict(LISSA[problem], scale=meta["info"]["lissa_scale"])
    arn = ARNOLDI[problem]
    rtols = [{"rtol": r} for r in HELPERS_RESIDUALS]
    f32 = {"block": True, "low_precision": "float32"}
    # P1 is a linear model: helpers' closed-form operator (helpers.convex) is what a user calls; the autodiff
    # path is timed too, for comparison with the peers' (all autodiff) products
    entry = "convex" if problem == "P1" else "generic"
    what = "closed form" if problem == "P1" else "autodiff HVP"
    out = [
        Job(problem, "helpers", f"{entry}:cg", [dict(r, **f32) for r in rtols], "cg",
            label=f"{what}, block CG, float32 refinement"),
        Job(problem, "helpers", f"{entry}:cg", [dict(r, block=True) for r in rtols], "cg",
            label=f"{what}, block CG"),
    ]
    if problem == "P1":
        out += [
            Job(problem, "helpers", "convex:exact", [{}], "exact", label="closed form, Cholesky"),
            Job(problem, "helpers", "generic:cg", [dict(r, **f32) for r in rtols], "cg",
                label="autodiff HVP, block CG, float32 refinement"),
        ]
    else:
        out.append(Job(problem, "helpers", "generic:exact", skip=no_dense, family="exact", label="Cholesky"))
    out += [
        Job(problem, "helpers", f"{entry}:lissa", [{"depth": lissa["depth"], "scale": lissa["scale"]}], "lissa",
            label=f"{what}, LiSSA"),
        Job(problem, "helpers", f"{entry}:arnoldi", [{"rank": arn["rank"], "krylov_dim": arn["arnoldi_dim"]}],
            "arnoldi", label=f"{what}, Arnoldi (Lanczos)"),
        Job(problem, "captum", "NaiveInfluenceFunction", [{"projection_dim": None}], "exact",
            skip=no_dense if big else None),
        Job(problem, "captum", "ArnoldiInfluenceFunction",
            [{"projection_dim": arn["rank"], "arnoldi_dim": arn["arnoldi_dim"]}], "arnoldi"),
        Job(problem, "dattri", "IFAttributorExplicit", [{}], "exact", skip=no_dense if big else None),
        Job(problem, "dattri", "IFAttributorCG", [{"max_iter": m} for m in DATTRI_CG_ITERS[problem]], "cg"),
        Job(problem, "dattri", "IFAttributorLiSSA", [dict(lissa)], "lissa"),
        Job(problem, "dattri", "IFAttributorArnoldi", [{"rank": arn["rank"], "arnoldi_dim": arn["arnoldi_dim"]}],
            "arnoldi"),
        Job(problem, "pydvl", "DirectInfluence", [{}], "exact", skip=no_dense if big else None),
        Job(problem, "pydvl", "CgInfluence", [{"rtol": r, "block": True} for r in PYDVL_RTOLS[problem]], "cg"),
        Job(problem, "pydvl", "LissaInfluence", [dict(lissa)], "lissa"),
        Job(problem, "pydvl", "ArnoldiInfluence", [{"rank": arn["rank"], "arnoldi_dim": arn["arnoldi_dim"]}],
            "arnoldi"),
        Job(problem, "torch-influence", "(all)", skip="not on PyPI (github.com/alstonlo/torch-influence); not installed",
            family="-"),
    ]
    return out


def _key(problem: str, library: str, method: str, options: dict[str, Any]) -> str:
    text = json.dumps([problem, library, method, options], sort_keys=True)
    return "".join(c if c.isalnum() else "_" for c in text)[:180]


def _resident_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _watch(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str, str | None]:
    """Run a worker, stopping it past ``timeout`` seconds or past the resident-memory cap (polled: a worker
    that would take the shared machine's memory is stopped before the kernel's OOM killer picks a victim —
    an address-space limit would refuse the large virtual reservations torch makes without touching them).
    Returns (exit code or None, stderr, why it was stopped)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=ROOT, env=env)
        start, why = time.perf_counter(), None
        while proc.poll() is None:
            if time.perf_counter() - start > timeout:
                why = f"stopped at the {timeout:.0f}-s cap per process (still running)"
            elif MEMORY_CAP[0] and _resident_bytes(proc.pid) > MEMORY_CAP[0]:
                why = f"stopped: its resident memory passed the {MEMORY_CAP[0] / 2**30:g}-GiB cap per process"
            if why:
                proc.kill()
                proc.wait()
                break
            time.sleep(POLL_SECONDS)
        err.seek(0)
        return proc.returncode, err.read(), why


def run_worker(job: Job, options: dict[str, Any], repeats: int, slow: float, timeout: float, resume: bool,
               log) -> tuple[dict[str, Any] | None, np.ndarray | None, str | None]:
    """One worker process; returns (timing json, values, error message)."""
    ROWS.mkdir(parents=True, exist_ok=True)
    stem = ROWS / f"{_key(job.problem, job.library, job.method, options)}__r{repeats}"
    if resume and stem.with_suffix(".json").exists():
        return json.loads(stem.with_suffix(".json").read_text()), np.load(stem.with_suffix(".npy")), None
    python = PYDVL_PY if job.library == "pydvl" else MAIN_PY
    if not python.exists():
        return None, None, f"{python.relative_to(ROOT)} missing: run `make bench` (it builds it)"
    cmd = [str(python), str(WORKER), "--problem", str(problems.problem_path(job.problem)), "--library", job.library,
           "--method", job.method, "--options", json.dumps(options), "--repeats", str(repeats), "--slow", str(slow),
           "--threads", str(THREADS), "--out", str(stem)]
    t0 = time.perf_counter()
    code, stderr, why = _watch(cmd, dict(os.environ, **THREAD_ENV), timeout)
    if why:
        return None, None, why
    if code != 0:
        tail = [ln.strip() for ln in stderr.splitlines() if ln.strip(" ^~\t")][-2:]  # no traceback markers
        return None, None, f"failed (exit {code}): {' | '.join(tail)}"[:300]
    log(f"    {time.perf_counter() - t0:6.1f} s wall (worker process)")
    return json.loads(stem.with_suffix(".json").read_text()), np.load(stem.with_suffix(".npy")), None


def metrics(values: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    v, r = values.reshape(-1), ref.reshape(-1)
    vv = float(v @ v)
    return {
        "rel_error": float(np.linalg.norm(v - r) / np.linalg.norm(r)),
        "pearson": float(scipy.stats.pearsonr(v, r)[0]) if np.ptp(v) > 0 else float("nan"),
        "spearman": float(scipy.stats.spearmanr(v, r)[0]) if np.ptp(v) > 0 else float("nan"),
        "scale": float(v @ r / vv) if vv > 0 else float("nan"),
    }


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def search(job: Job, ref: np.ndarray, slow: float, timeout: float, resume: bool, log
           ) -> tuple[dict[str, Any] | None, list[str], str | None]:
    """Find the job's cheapest rung with rel_error ≤ ACCURACY, one single call per probe: the cheapest rung
    first (often enough), then bisection of the rest.

    Returns (the rung to time — the cheapest accurate one, else the most accurate probed —, what was probed as
    "setting → error" texts, an error message)."""
    lo, hi = 0, len(job.ladder) - 1
    errors: dict[int, float] = {}
    while lo <= hi:
        mid = lo if not errors else (lo + hi) // 2
        log(f"    search {json.dumps(job.ladder[mid])}")
        res, values, err = run_worker(job, job.ladder[mid], 0, slow, timeout, resume, log)
        if err:
            return None, [], err
        errors[mid] = metrics(values, ref)["rel_error"]
        log(f"      rel. error {errors[mid]:.1e}")
        if errors[mid] <= ACCURACY:
            hi = mid - 1
        else:
            lo = mid + 1
    accurate = [i for i, e in errors.items() if e <= ACCURACY]
    pick = min(accurate) if accurate else min(errors, key=errors.get)
    varying = [k for k in job.ladder[0] if len({json.dumps(rung.get(k)) for rung in job.ladder}) > 1]
    probed = [f"{_options_text({k: job.ladder[i][k] for k in varying})} → {errors[i]:.1e}" for i in sorted(errors)]
    return job.ladder[pick], probed, None


def run_job(job: Job, ref: np.ndarray, repeats: int, slow: float, timeout: float, resume: bool,
            log) -> list[dict[str, Any]]:
    base = {"problem": job.problem, "library": job.library, "version": VERSIONS[job.library],
            "method": job.name, "family": job.family}
    if job.skip:
        log(f"  {job.library:8s} {job.name}: skipped ({job.skip})")
        return [dict(base, options="", status=f"skipped: {job.skip}")]
    log(f"  {job.library:8s} {job.name}")
    searched: list[str] = []
    options = job.ladder[0]
    if len(job.ladder) > 1:
        options, searched, err = search(job, ref, slow, timeout, resume, log)
        if err:
            log(f"    {err}")
            return [dict(base, options=json.dumps(job.ladder[0]), status=err)]
    log(f"    timed {json.dumps(options)}")
    res, values, err = run_worker(job, options, repeats, slow, timeout, resume, log)
    if err:
        log(f"    {err}")
        return [dict(base, options=json.dumps(options), status=err)]
    m = metrics(values, ref)
    row = dict(base, options=json.dumps(options), status="ok", seconds=res["seconds"],
               warmup_seconds=res["warmup_seconds"], repeats=len(res["times"]), peak_mib=res["peak_mib"],
               threads=res["threads"], load_1min=res["loadavg_end"][0], searched="; ".join(searched), **m,
               **{f"info_{k}": v for k, v in res["info"].items()})
    log(f"    {row['seconds']:8.2f} s (median of {row['repeats']}; warm-up {row['warmup_seconds']:.2f} s)  "
        f"rel.err {m['rel_error']:.1e}  pearson {m['pearson']:.6f}  scale {m['scale']:.6f}")
    return [row]


def head_to_head(problem: str, rows: list[dict[str, Any]], job_of: dict[tuple[str, str], Job], ref: np.ndarray,
                 rounds: int, slow: float, timeout: float, log) -> list[dict[str, Any]]:
    """Re-time the fastest accurate helpers run and the fastest accurate peer run alternately, ``rounds`` times
    each (fresh processes, one warm-up and one timed call each): the ratio of their medians is robust to the load
    of a shared machine drifting during the hour the whole table takes."""
    ok = [r for r in rows if r["problem"] == problem and r.get("status") == "ok" and r["rel_error"] <= ACCURACY
          and r["family"] != "head-to-head"]
    mine = [r for r in ok if r["library"] == "helpers"]
    peers = [r for r in ok if r["library"] != "helpers"]
    if not mine or not peers:
        return []
    best = [min(mine, key=lambda r: r["seconds"]), min(peers, key=lambda r: r["seconds"])]
    times: dict[int, list[float]] = {0: [], 1: []}
    last: dict[int, tuple[dict, np.ndarray]] = {}
    log(f"  head-to-head on {problem}: helpers {best[0]['method']} vs {best[1]['library']} {best[1]['method']}, "
        f"{rounds} rounds")
    for _ in range(rounds):
        for side, r in enumerate(best):
            job = job_of[(r["library"], r["method"])]
            res, values, err = run_worker(job, json.loads(r["options"]), 1, slow, timeout, False, log)
            if err:
                log(f"    {err}")
                return []
            times[side].append(res["seconds"])
            last[side] = (res, values)
    out = []
    for side, r in enumerate(best):
        res, values = last[side]
        out.append(dict(r, family="head-to-head", seconds=float(np.median(times[side])),
                        warmup_seconds=res["warmup_seconds"], repeats=rounds, peak_mib=res["peak_mib"],
                        load_1min=res["loadavg_end"][0], searched="", **metrics(values, ref)))
    log(f"    helpers {out[0]['seconds']:.2f} s, peer {out[1]['seconds']:.2f} s: ratio "
        f"{out[1]['seconds'] / out[0]['seconds']:.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["P1", "P2"], choices=["P1", "P2"])
    parser.add_argument("--only", nargs="+", default=None, help="libraries to run (default: all)")
    parser.add_argument("--match", default=None, help="run only methods whose name contains this text")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow", type=float, default=SLOW_SECONDS,
                        help="a method whose warm-up call takes longer than this is not called again: that one "
                             "call is its time")
    parser.add_argument("--timeout", type=float, default=CAP_SECONDS,
                        help="cap per worker process, seconds: a method still running is stopped (its row says so)")
    parser.add_argument("--resume", action="store_true", help="reuse rows of an earlier (interrupted) run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="head-to-head rounds of the two fastest accurate runs per problem (0: none)")
    parser.add_argument("--no-publish", action="store_true", help="do not copy the results into book/data")
    parser.add_argument("--memory-cap-gib", type=float, default=16.0,
                        help="resident-memory cap per worker: a method needing more is stopped (0: no cap)")
    args = parser.parse_args()
    MEMORY_CAP[0] = int(args.memory_cap_gib * 2**30)

    def log(msg: str) -> None:
        print(msg, flush=True)

    started = dt.datetime.now().astimezone()
    t_start = time.perf_counter()
    if not PYDVL_PY.exists():
        log("note: .venv-pydvl missing — pyDVL rows will say so (make bench builds it)")
    paths = problems.build(tuple(args.problems), log=log)
    all_rows = []
    for problem in args.problems:
        with np.load(paths[problem]) as f:
            ref = f["reference"]
            meta = json.loads(str(f["meta"]))
        log(f"{problem}: {meta['spec']['model']}, {meta['n_params']} parameters, reference: {meta['spec']['reference']}")
        job_of = {}
        for job in jobs(problem, meta):
            if (args.only and job.library not in args.only) or (args.match and args.match not in job.name):
                continue
            job_of[(job.library, job.name)] = job
            all_rows += run_job(job, ref, args.repeats, args.slow, args.timeout, args.resume, log)
        if args.rounds > 0:
            all_rows += head_to_head(problem, all_rows, job_of, ref, args.rounds, args.slow, args.timeout, log)
    df = pd.DataFrame(all_rows)
    OUT.mkdir(parents=True, exist_ok=True)
    df.insert(0, "date", started.isoformat(timespec="seconds"))
    df.insert(1, "machine", f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    df.insert(2, "wall_minutes", round((time.perf_counter() - t_start) / 60, 1))
    df.to_csv(OUT / "peers.csv", index=False)
    text = render(pd.read_csv(OUT / "peers.csv"))  # from the file, exactly as the book's test re-renders it
    (OUT / "peers.md").write_text(text)
    times = build_times.report()
    (OUT / "build_times.md").write_text(times)
    print()
    print(text)
    print(times)
    if not args.no_publish and not args.only and not args.match and set(args.problems) == {"P1", "P2"}:
        BOOK_CSV.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(OUT / "peers.csv", BOOK_CSV)
        BOOK_TABLE.write_text(text)
        log(f"published: {BOOK_CSV.relative_to(ROOT)}, {BOOK_TABLE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
