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

Every peer method runs in float64 and in float32 (``--dtypes``; the ``dtype`` column), both compared with the
float64 reference; helpers runs in float64 (its "float32 refinement" computes the products in float32 and
refines in float64). A ladder search also picks the cheapest rung with ``rel_error ≤ 1e-5``
(:data:`benchmarks.peers.report.LOOSE_ACCURACY`) and times it too when it is cheaper than the 1e-6 one: where no
float32 peer reaches 1e-6, the report compares the fastest peer at 1e-5 with helpers' time at 1e-5.

:func:`jobs` reads the problem's size from its spec: the ``"tiny"`` problems of
:data:`benchmarks.peers.problems.TINY_SPECS` get settings under which every CG and LiSSA method converges to
1e-8 or better and every Arnoldi method to its rank-5 limit (``tests/test_bench_check.py`` runs them all inside
``make test``, through :func:`run_job` and :func:`launch_in_process`, to check the harness against the current
``helpers`` API and every library's conversion).

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
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import scipy.stats

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import build_times, problems  # noqa: E402
from benchmarks.peers.report import ACCURACY, CAP_SECONDS, LOOSE_ACCURACY, SLOW_SECONDS, render  # noqa: E402

OUT = ROOT / "_build" / "bench"
ROWS = OUT / "rows"
BOOK_CSV = ROOT / "book" / "data" / "peers.csv"
BOOK_TABLE = ROOT / "book" / "data" / "peers_table.md"
MAIN_PY = ROOT / ".venv" / "bin" / "python"
PYDVL_PY = ROOT / ".venv-pydvl" / "bin" / "python"
WORKER = ROOT / "benchmarks" / "peers" / "worker.py"
VERSIONS = {"helpers": "(this checkout)", "captum": "0.9.0", "dattri": "0.3.0", "pydvl": "0.10.0",
            "kronfluence": "1.0.1", "torch-influence": "–"}
THREADS = 1  # per method, every library
THREAD_ENV = {k: str(THREADS) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
DTYPES = ("float64", "float32")  # the dtypes every peer method runs in (helpers: float64)
DTYPE_BYTES = {"float64": 8, "float32": 4}

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
# Issue 15 puts looser rungs in front of each ladder (LOOSE_RUNGS), for the comparison at rel. error ≤ 1e-5; they
# are extrapolated from the trial above, not measured yet. A float32 peer uses its library's ladder unchanged.
HELPERS_RESIDUALS = (1e-6, 5e-7, 2e-7, 1e-7)
PYDVL_RTOLS = {"P1": (4.5e-4, 3.2e-4, 2.2e-4, 1e-4), "P2": (1.7e-4, 1.3e-4, 1e-4, 7e-5)}
DATTRI_CG_ITERS = {"P1": (65, 70, 80, 100), "P2": (30, 35, 40, 50)}
LOOSE_RUNGS = {"helpers": {"P1": (1e-5, 5e-6), "P2": (1e-5, 5e-6)},
               "pydvl": {"P1": (2e-3, 1e-3), "P2": (1e-3, 5e-4)},
               "dattri": {"P1": (55, 60), "P2": (25,)}}


@dataclass(frozen=True)
class Settings:
    """The per-problem knobs of :func:`jobs`: LiSSA depth, Arnoldi (rank, Krylov dimension), and the CG ladders
    (cheapest first) of helpers (relative residual), pyDVL (its ``rtol``) and dattri (iterations)."""

    lissa_depth: int
    rank: int
    arnoldi_dim: int
    helpers_residuals: tuple[float, ...]
    pydvl_rtols: tuple[float, ...]
    dattri_cg_iters: tuple[int, ...]


def settings(problem: str, size: str = "full") -> Settings:
    """The knobs for ``problem`` at ``size``: the constants above for ``"full"``; for ``"tiny"`` (the check in
    ``make test``) a two-rung ladder per CG method — a loose rung that misses 1e-6 (so the search is exercised)
    and one near round-off —, a LiSSA depth that converges to ~1e-10, and Arnoldi at rank 5 with a Krylov space
    of 100, where the top five Ritz pairs have converged in every library (so all of them return the rank-5
    truncation of :func:`benchmarks.peers.problems.truncated_reference`)."""
    if size == "tiny":
        depth = {"P1": 220, "P2": 180}[problem]
        # dattri's CG has no stopping test: run far past convergence it divides 0 by 0 (NaN at 400 iterations)
        return Settings(depth, 5, 100, (1e-3, 1e-12), (3e-2, 1e-7), (3, 35))
    if size != "full":
        raise ValueError(f"unknown problem size {size!r}: use 'full' or 'tiny'")
    loose = {lib: rungs[problem] for lib, rungs in LOOSE_RUNGS.items()}
    return Settings(LISSA[problem]["depth"], ARNOLDI[problem]["rank"], ARNOLDI[problem]["arnoldi_dim"],
                    loose["helpers"] + HELPERS_RESIDUALS, loose["pydvl"] + PYDVL_RTOLS[problem],
                    loose["dattri"] + DATTRI_CG_ITERS[problem])


@dataclass
class Job:
    """One method in one dtype, or a ladder of its settings (cheapest first) to be searched for ``ACCURACY``
    (and ``LOOSE_ACCURACY``); ``path`` is the problem file (default: the full problem's)."""

    problem: str
    library: str
    method: str
    ladder: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    family: str = "exact"  # exact | cg | lissa | arnoldi (for the table and the per-family comparison)
    skip: str | None = None  # why it cannot run (recorded as a row, not run)
    label: str | None = None
    dtype: str = "float64"
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.label or self.method

    @property
    def problem_file(self) -> Path:
        return self.path if self.path is not None else problems.problem_path(self.problem)


def _dense_skip(n_params: int, dtype: str) -> str | None:
    """Why a method that forms the dense Hessian cannot run (None if it can): beyond 4 GiB (P2 in float64:
    19.3 GiB) it does not fit next to its solver on the 23-GiB benchmark machine."""
    gib = n_params**2 * DTYPE_BYTES[dtype] / 2**30
    return f"dense {n_params}×{n_params} {dtype} Hessian = {gib:.1f} GiB (machine: 23 GiB RAM)" if gib > 4 else None


def jobs(problem: str, meta: dict[str, Any], path: Path | None = None,
         dtypes: tuple[str, ...] = DTYPES) -> list[Job]:
    """Every method of issues 7 and 15 for one problem (``meta``: its stored metadata; ``path``: its file),
    helpers' first (float64), then each peer method in each of ``dtypes``."""
    bad = [d for d in dtypes if d not in DTYPE_BYTES]
    if bad:
        raise ValueError(f"unknown dtypes {bad}: use some of {list(DTYPE_BYTES)}")
    n_params = meta["n_params"]
    no_dense = _dense_skip(n_params, "float64")
    cfg = settings(problem, problems.size_of(meta["spec"]))
    lissa = {"depth": cfg.lissa_depth, "scale": meta["info"]["lissa_scale"]}
    arn = {"rank": cfg.rank, "arnoldi_dim": cfg.arnoldi_dim}
    rtols = [{"rtol": r} for r in cfg.helpers_residuals]
    f32 = {"block": True, "low_precision": "float32"}
    # P1 is a linear model: helpers' closed-form operator (helpers.closed_form) is what a user calls; the autodiff
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
        out += [
            # the layer-wise products of helpers.layered (P2's network is an MLP): the same matrix as autodiff's
            Job(problem, "helpers", "generic:cg", [dict(r, backend="layers", **f32) for r in rtols], "cg",
                label="layer-wise HVP, block CG, float32 refinement"),
            Job(problem, "helpers", "generic:exact", skip=no_dense, family="exact", label="Cholesky"),
            # issue 15: CG preconditioned by helpers' own EK-FAC of the same network (helpers.kronecker)
            Job(problem, "helpers", "generic:cg", [dict(r, preconditioner="ekfac", **f32) for r in rtols], "cg",
                label=f"{what}, EK-FAC-preconditioned block CG, float32 refinement"),
        ]
    out += [
        Job(problem, "helpers", "generic:floor", [{}], "floor",
            label="floor: one pass of per-sample training gradients"),
        Job(problem, "helpers", "generic:exact", [{"hessian": "kfac"}], "kfac", label="K-FAC influence (type-2)"),
        Job(problem, "helpers", "generic:exact", [{"hessian": "ekfac"}], "ekfac", label="EK-FAC influence (type-2)"),
    ]
    out += [
        Job(problem, "helpers", f"{entry}:lissa", [{"depth": lissa["depth"], "scale": lissa["scale"]}], "lissa",
            label=f"{what}, LiSSA"),
        Job(problem, "helpers", f"{entry}:arnoldi", [{"rank": arn["rank"], "krylov_dim": arn["arnoldi_dim"]}],
            "arnoldi", label=f"{what}, Arnoldi (Lanczos)"),
    ]
    for dtype in dtypes:
        dense = _dense_skip(n_params, dtype)
        out += [
            Job(problem, "captum", "NaiveInfluenceFunction", [{"projection_dim": None}], "exact", skip=dense,
                dtype=dtype),
            Job(problem, "captum", "ArnoldiInfluenceFunction",
                [{"projection_dim": arn["rank"], "arnoldi_dim": arn["arnoldi_dim"]}], "arnoldi", dtype=dtype),
            Job(problem, "dattri", "IFAttributorExplicit", [{}], "exact", skip=dense, dtype=dtype),
            Job(problem, "dattri", "IFAttributorCG", [{"max_iter": m} for m in cfg.dattri_cg_iters], "cg",
                dtype=dtype),
            Job(problem, "dattri", "IFAttributorLiSSA", [dict(lissa)], "lissa", dtype=dtype),
            Job(problem, "dattri", "IFAttributorArnoldi", [{"rank": arn["rank"], "arnoldi_dim": arn["arnoldi_dim"]}],
                "arnoldi", dtype=dtype),
            Job(problem, "pydvl", "DirectInfluence", [{}], "exact", skip=dense, dtype=dtype),
            Job(problem, "pydvl", "CgInfluence", [{"rtol": r, "block": True} for r in cfg.pydvl_rtols], "cg",
                dtype=dtype),
            Job(problem, "pydvl", "LissaInfluence", [dict(lissa)], "lissa", dtype=dtype),
            Job(problem, "pydvl", "ArnoldiInfluence", [{"rank": arn["rank"], "arnoldi_dim": arn["arnoldi_dim"]}],
                "arnoldi", dtype=dtype),
            Job(problem, "kronfluence", "ekfac", [{"fisher": "mc"}], "ekfac", dtype=dtype,
                label="EK-FAC (MC Fisher, its default)"),
            Job(problem, "kronfluence", "ekfac", [{"fisher": "empirical"}], "ekfac", dtype=dtype,
                label="EK-FAC (empirical Fisher)"),
        ]
    out.append(Job(problem, "torch-influence", "(all)",
                   skip="not on PyPI (github.com/alstonlo/torch-influence); not installed", family="-"))
    for job in out:
        job.path = path
    return out


def _key(problem: str, library: str, method: str, options: dict[str, Any], dtype: str = "float64") -> str:
    """The file stem of one run's rows; float64 runs keep the stems of the runs before dtypes existed."""
    head = problem if dtype == "float64" else f"{problem}:{dtype}"  # in front: the stem is cut at 180 characters
    text = json.dumps([head, library, method, options], sort_keys=True)
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


#: How a worker is started: ``launch(job, argv, timeout)`` runs ``worker.py argv`` for ``job`` and returns (exit
#: code or None, its stderr, why it was stopped or could not start — None if it ran).
Launch = Callable[["Job", list[str], float], tuple[int | None, str, str | None]]


def launch_process(job: Job, argv: list[str], timeout: float) -> tuple[int | None, str, str | None]:
    """The benchmark's way: a fresh process of ``.venv`` (pyDVL: ``.venv-pydvl``) with one thread, watched for
    ``timeout`` seconds and the memory cap (:func:`_watch`)."""
    python = PYDVL_PY if job.library == "pydvl" else MAIN_PY
    if not python.exists():
        return None, "", f"{python.relative_to(ROOT)} missing: run `make bench` (it builds it)"
    return _watch([str(python), str(WORKER), *argv], dict(os.environ, **THREAD_ENV), timeout)


def launch_in_process(job: Job, argv: list[str], timeout: float) -> tuple[int | None, str, str | None]:
    """The same worker code (:func:`benchmarks.peers.worker.main`) in this process, for the tiny check of
    ``make test``, where a process start (~5 s of imports on a busy 2-core machine) would cost more than the
    method. No timeout or memory cap; torch's thread count, default dtype and RNG state are restored afterwards
    (the worker sets them). A worker that raises gives exit code 1 and the traceback as its stderr."""
    import torch

    from benchmarks.peers import worker

    threads, default, rng = torch.get_num_threads(), torch.get_default_dtype(), torch.get_rng_state()
    try:
        worker.main(argv)
        return 0, "", None
    except SystemExit as e:  # argparse's refusal of the arguments
        return (e.code if isinstance(e.code, int) else 2), f"worker.main({argv}) exited: {e}", None
    except Exception:
        return 1, traceback.format_exc(), None
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(default)
        torch.set_rng_state(rng)


def run_worker(job: Job, options: dict[str, Any], repeats: int, slow: float, timeout: float, resume: bool,
               log, *, rows: Path = ROWS, launch: Launch = launch_process
               ) -> tuple[dict[str, Any] | None, np.ndarray | None, str | None]:
    """One worker (by ``launch``, writing under ``rows``); returns (timing json, values, error message)."""
    rows.mkdir(parents=True, exist_ok=True)
    stem = rows / f"{_key(job.problem_file.stem, job.library, job.method, options, job.dtype)}__r{repeats}"
    if resume and stem.with_suffix(".json").exists():
        return json.loads(stem.with_suffix(".json").read_text()), np.load(stem.with_suffix(".npy")), None
    argv = ["--problem", str(job.problem_file), "--library", job.library, "--method", job.method,
            "--options", json.dumps(options), "--dtype", job.dtype, "--repeats", str(repeats), "--slow", str(slow),
            "--threads", str(THREADS), "--out", str(stem)]
    t0 = time.perf_counter()
    code, stderr, why = launch(job, argv, timeout)
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


def search(job: Job, ref: np.ndarray, slow: float, timeout: float, resume: bool, log, *, rows: Path = ROWS,
           launch: Launch = launch_process, targets: tuple[float, ...] = (ACCURACY, LOOSE_ACCURACY)
           ) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """Find the job's cheapest rung with rel_error ≤ each of ``targets``, one single call per probe: for the
    first target the cheapest rung first (often enough), then bisection of the rest; each further target bisects
    the rungs below the previous pick (the error falls along the ladder), reusing every probe.

    Returns (the rungs to time, one per target without repeats, in ``targets`` order — the cheapest accurate
    one, else the most accurate probed —, what was probed as "setting → error" texts, an error message)."""
    errors: dict[int, float] = {}

    def probe(i: int) -> str | None:
        if i in errors:
            return None
        log(f"    search {json.dumps(job.ladder[i])}")
        res, values, err = run_worker(job, job.ladder[i], 0, slow, timeout, resume, log, rows=rows, launch=launch)
        if err:
            return err
        error = metrics(values, ref)["rel_error"]
        errors[i] = error if math.isfinite(error) else math.inf  # a non-finite answer is the least accurate
        log(f"      rel. error {errors[i]:.1e}")
        return None

    picks: list[int] = []
    top = len(job.ladder) - 1
    for target in targets:
        lo, hi, first = 0, top, not errors
        while lo <= hi:
            mid = lo if first else (lo + hi) // 2
            first = False
            err = probe(mid)
            if err:
                return [], [], err
            if errors[mid] <= target:
                hi = mid - 1
            else:
                lo = mid + 1
        accurate = [i for i, e in errors.items() if e <= target]
        pick = min(accurate) if accurate else min(errors, key=errors.get)
        if pick not in picks:
            picks.append(pick)
        top = pick
    varying = [k for k in job.ladder[0] if len({json.dumps(rung.get(k)) for rung in job.ladder}) > 1]
    probed = [f"{_options_text({k: job.ladder[i][k] for k in varying})} → "
              + (f"{errors[i]:.1e}" if math.isfinite(errors[i]) else "non-finite") for i in sorted(errors)]
    return [job.ladder[i] for i in picks], probed, None


def run_job(job: Job, ref: np.ndarray, repeats: int, slow: float, timeout: float, resume: bool,
            log, *, rows: Path = ROWS, launch: Launch = launch_process) -> list[dict[str, Any]]:
    """The table rows of one job: skipped, failed, or timed — at the rungs :func:`search` picked for 1e-6 and
    1e-5 (one row each, one if they coincide) when the job has a ladder."""
    base = {"problem": job.problem, "library": job.library, "version": VERSIONS[job.library],
            "method": job.name, "family": job.family, "dtype": job.dtype}
    if job.skip:
        log(f"  {job.library:8s} {job.name} [{job.dtype}]: skipped ({job.skip})")
        return [dict(base, options="", status=f"skipped: {job.skip}")]
    log(f"  {job.library:8s} {job.name} [{job.dtype}]")
    searched: list[str] = []
    picks = [job.ladder[0]]
    if len(job.ladder) > 1:
        picks, searched, err = search(job, ref, slow, timeout, resume, log, rows=rows, launch=launch)
        if err:
            log(f"    {err}")
            return [dict(base, options=json.dumps(job.ladder[0]), status=err)]
    out = []
    for options in picks:
        log(f"    timed {json.dumps(options)}")
        res, values, err = run_worker(job, options, repeats, slow, timeout, resume, log, rows=rows, launch=launch)
        if err:
            log(f"    {err}")
            out.append(dict(base, options=json.dumps(options), status=err))
            continue
        bad = int((~np.isfinite(values)).sum())
        if bad:
            err = f"failed: {bad} of its {values.size} values are not finite"
            log(f"    {err}")
            out.append(dict(base, options=json.dumps(options), status=err))
            continue
        m = metrics(values, ref)
        row = dict(base, options=json.dumps(options), status="ok", seconds=res["seconds"],
                   warmup_seconds=res["warmup_seconds"], repeats=len(res["times"]), peak_mib=res["peak_mib"],
                   threads=res["threads"], load_1min=res["loadavg_end"][0], searched="; ".join(searched), **m,
                   **{f"info_{k}": v for k, v in res["info"].items()})
        log(f"    {row['seconds']:8.2f} s (median of {row['repeats']}; warm-up {row['warmup_seconds']:.2f} s)  "
            f"rel.err {m['rel_error']:.1e}  pearson {m['pearson']:.6f}  scale {m['scale']:.6f}")
        out.append(row)
    return out


def head_to_head(problem: str, rows: list[dict[str, Any]], job_of: dict[tuple[str, str, str], Job], ref: np.ndarray,
                 rounds: int, slow: float, timeout: float, log, *, out_rows: Path = ROWS,
                 launch: Launch = launch_process) -> list[dict[str, Any]]:
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
    log(f"  head-to-head on {problem}: helpers {best[0]['method']} vs {best[1]['library']} {best[1]['method']} "
        f"[{best[1]['dtype']}], {rounds} rounds")
    for _ in range(rounds):
        for side, r in enumerate(best):
            job = job_of[(r["library"], r["method"], r["dtype"])]
            res, values, err = run_worker(job, json.loads(r["options"]), 1, slow, timeout, False, log,
                                          rows=out_rows, launch=launch)
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


def frame(rows: list[dict[str, Any]], started: dt.datetime, wall_minutes: float) -> pd.DataFrame:
    """The rows as the table's data frame: date, machine and the run's wall time in front (the CSV's layout)."""
    df = pd.DataFrame(rows)
    df.insert(0, "date", started.isoformat(timespec="seconds"))
    df.insert(1, "machine", f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    df.insert(2, "wall_minutes", round(wall_minutes, 1))
    return df


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["P1", "P2"], choices=["P1", "P2"])
    parser.add_argument("--only", nargs="+", default=None, help="libraries to run (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="dtypes of the peers' runs (helpers: float64); default both")
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
        for job in jobs(problem, meta, paths[problem], tuple(args.dtypes)):
            if (args.only and job.library not in args.only) or (args.match and args.match not in job.name):
                continue
            job_of[(job.library, job.name, job.dtype)] = job
            all_rows += run_job(job, ref, args.repeats, args.slow, args.timeout, args.resume, log)
        if args.rounds > 0:
            all_rows += head_to_head(problem, all_rows, job_of, ref, args.rounds, args.slow, args.timeout, log)
    df = frame(all_rows, started, (time.perf_counter() - t_start) / 60)
    OUT.mkdir(parents=True, exist_ok=True)
    df.to_csv(OUT / "peers.csv", index=False)
    text = render(pd.read_csv(OUT / "peers.csv"))  # from the file, exactly as the book's test re-renders it
    (OUT / "peers.md").write_text(text)
    times = build_times.report()
    (OUT / "build_times.md").write_text(times)
    print()
    print(text)
    print(times)
    if (not args.no_publish and not args.only and not args.match and set(args.problems) == {"P1", "P2"}
            and set(args.dtypes) == set(DTYPES)):
        BOOK_CSV.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(OUT / "peers.csv", BOOK_CSV)
        BOOK_TABLE.write_text(text)
        log(f"published: {BOOK_CSV.relative_to(ROOT)}, {BOOK_TABLE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
