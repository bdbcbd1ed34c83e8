"""``make bench`` cannot rot: every method of the peers harness runs on tiny P1 and P2 inside ``make test`` (issue 15).

``make bench`` (benchmarks/peers) takes an hour and needs the peers installed, so nothing used to run it between
benchmark runs — and a renamed ``helpers`` function (``helpers.convex.test_losses``, since renamed) broke it unnoticed. This
test builds the tiny versions of both problems (:data:`benchmarks.peers.problems.TINY_SPECS`: 200 ``digits``
images, 640 and 610 parameters) with the same code as the full ones, then runs every job of
:func:`benchmarks.peers.run.jobs` — every helpers method, and every peer method in float64 and float32 whose
library is importable here (captum and dattri come with the ``bench`` extra, pyDVL lives in ``.venv-pydvl``: the
others are skipped, and the skip says so) — through :func:`benchmarks.peers.run.run_job`, i.e. the ladder
search and the worker code of ``make bench`` (:mod:`benchmarks.peers.worker`, in this process: a fresh process
costs ~5 s of imports on a busy 2-core machine; one job also runs in a real worker process), and renders the
table with :func:`benchmarks.peers.report.render`.

What it asserts is each conversion to the book's Δ_pred: the exact methods agree with the float64 reference to
1e-10, every CG, LiSSA and Arnoldi method (its settings converge on the tiny problems) to 1e-6, and the fitted
scale factor — the number that names a wrong sign, a forgotten 1/n or a sum/mean mix-up — is 1 to 1e-6
(float32 runs: 1e-3). Arnoldi is compared with its own limit, the rank-5 truncation of the inverse
(:func:`benchmarks.peers.problems.truncated_reference`), since a rank-5 method cannot approach the full inverse.

Cost on the busy 2-core machine: ~25 s without the peers, ~45 s with captum and dattri installed (measured
with both on ``PYTHONPATH``: every one of their methods passes in both dtypes).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.peers import problems, report, run  # noqa: E402

PEER_MODULES = {"captum": "captum", "dattri": "dattri", "pydvl": "pydvl", "kronfluence": "kronfluence"}
KRONECKER = ("kfac", "ekfac")  # approximate families: checked against helpers.kronecker's answer, not the exact one
MC_ERROR = 0.5  # kronfluence's Monte-Carlo Fisher (one sampled label per point) against the type-2 EK-FAC
EXACT_ERROR = 1e-10  # exact methods against the float64 reference
CONVERGED_ERROR = 1e-6  # CG, LiSSA and Arnoldi on the tiny problems (their settings converge there)
SCALE_TOLERANCE = {"float64": 1e-6, "float32": 1e-3}
FLOAT32_ERROR = 1e-2  # captum's float32 Hessian inverse reaches ~1e-3 on tiny P2


def _importable(library: str) -> bool:
    if library == "helpers":
        return True
    module = PEER_MODULES.get(library)
    return module is not None and importlib.util.find_spec(module) is not None


def _quiet(message: str) -> None:
    """The harness's log (progress lines of ``make bench``): kept out of the test output."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny P1 and P2 built, every runnable job of the harness run on them; the rows, the references, the jobs."""
    where = tmp_path_factory.mktemp("bench_check")
    paths = problems.build(("P1", "P2"), size="tiny", directory=where / "problems", log=_quiet)
    rows: list[dict[str, Any]] = []
    references: dict[tuple[str, str], np.ndarray] = {}
    all_jobs: list[run.Job] = []
    for name, path in paths.items():
        with np.load(path) as f:
            reference = f["reference"]
            meta = json.loads(str(f["meta"]))
        assert problems.size_of(meta["spec"]) == "tiny"
        cfg = run.settings(name, "tiny")
        references[(name, "reference")] = reference
        references[(name, "arnoldi")] = problems.truncated_reference(path, cfg.rank)
        references[(name, "floor")] = _gradient_similarity(path)
        for kind in KRONECKER:
            for fisher in ("type-2", "empirical"):
                references[(name, kind, fisher)] = problems.kronecker_reference(path, kind, fisher)
        for job in run.jobs(name, meta, path):
            all_jobs.append(job)
            if not _importable(job.library):
                continue
            ref = references[_reference_key(job)]
            rows += run.run_job(job, ref, 0, 30.0, 120.0, False, _quiet, rows=where / "rows",
                                launch=run.launch_in_process)
    return {"rows": rows, "references": references, "jobs": all_jobs, "paths": paths, "where": where}


def _gradient_similarity(path: Path) -> np.ndarray:
    """g_testᵀ g_i / n from one dense per-sample Jacobian each (what the floor job returns besides its time)."""
    import torch

    from helpers.objective import model_params, per_sample_losses

    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    model = problems._trained_model(arrays, json.loads(str(arrays["meta"]))["spec"])
    params = model_params(model)

    def jacobian(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        losses = lambda p: per_sample_losses(model, p, torch.from_numpy(x), torch.from_numpy(y))  # noqa: E731
        jac = torch.func.jacrev(losses)(params)
        return torch.cat([jac[k].reshape(len(x), -1) for k in params], dim=1)

    return (jacobian(arrays["x_test"], arrays["y_test"]) @ jacobian(arrays["x_train"], arrays["y_train"]).T
            / len(arrays["x_train"])).numpy()


def _reference_key(job: run.Job) -> tuple[str, ...]:
    """Which answer a job converges to: the exact one, the rank-5 truncation (Arnoldi), helpers.kronecker's K-FAC /
    EK-FAC with the job's Fisher (type-2 for helpers and kronfluence's Monte-Carlo one, whose limit it is), or
    gradient similarity (the floor's by-product)."""
    if job.family == "arnoldi":
        return (job.problem, "arnoldi")
    if job.family in KRONECKER:
        fisher = "empirical" if job.ladder[0].get("fisher") == "empirical" else "type-2"
        return (job.problem, job.family, fisher)
    if job.family == "floor":
        return (job.problem, "floor")
    return (job.problem, "reference")


def _monte_carlo(r: dict[str, Any]) -> bool:
    return '"mc"' in str(r["options"])


def _describe(r: dict[str, Any]) -> str:
    status = r["status"] if r["status"] == "ok" else r["status"][-600:]
    numbers = (f"rel. error {r['rel_error']:.2e}, scale {r['scale']:.9f}" if r["status"] == "ok" else "")
    return f"{r['problem']} {r['library']} {r['method']} [{r['dtype']}] {r['options']}: {status} {numbers}"


def test_every_runnable_job_of_the_harness_runs(tiny: dict[str, Any]) -> None:
    rows = tiny["rows"]
    failed = [_describe(r) for r in rows if r["status"] != "ok" and not r["status"].startswith("skipped")]
    assert not failed, "the harness no longer runs these (a changed helpers API or peer?):\n" + "\n".join(failed)
    helpers_jobs = [j for j in tiny["jobs"] if j.library == "helpers"]
    helpers_rows = [r for r in rows if r["library"] == "helpers" and r["status"] == "ok"]
    assert len(helpers_jobs) >= 11 and {r["method"] for r in helpers_rows} == {j.name for j in helpers_jobs}, \
        "every helpers method of the harness must run on the tiny problems (none may be skipped there)"


def test_exact_methods_match_the_float64_reference(tiny: dict[str, Any]) -> None:
    exact = [r for r in tiny["rows"] if r["status"] == "ok" and r["family"] == "exact" and r["dtype"] == "float64"]
    assert {r["problem"] for r in exact if r["library"] == "helpers"} == {"P1", "P2"}
    bad = [_describe(r) for r in exact if not r["rel_error"] <= EXACT_ERROR]
    assert not bad, f"exact methods off the float64 reference by more than {EXACT_ERROR:g}:\n" + "\n".join(bad)


def test_every_conversion_gives_scale_one(tiny: dict[str, Any]) -> None:
    """Every run, every family: the answer is Δ_pred (scale 1, small error), so each library's sign, 1/n,
    orientation, sum/mean Hessian, damping and LiSSA scaling are mapped right."""
    bad = []
    for r in tiny["rows"]:
        if r["status"] != "ok":
            continue
        if _monte_carlo(r):  # a sampled Fisher converges to the type-2 one only in expectation
            if not r["rel_error"] <= MC_ERROR:
                bad.append(_describe(r))
            continue
        limit = CONVERGED_ERROR if r["dtype"] == "float64" else FLOAT32_ERROR
        if not (abs(r["scale"] - 1) <= SCALE_TOLERANCE[r["dtype"]] and r["rel_error"] <= limit):
            bad.append(_describe(r))
    assert not bad, ("conversions off (scale -1: sign; 1/200 or 200: the 1/n or a sum/mean Hessian; else damping "
                     "or LiSSA scaling):\n" + "\n".join(bad))


def test_the_report_renders_the_tiny_run(tiny: dict[str, Any], tmp_path: Path) -> None:
    df = run.frame(tiny["rows"], dt.datetime.now().astimezone(), 1.0)
    df.to_csv(tmp_path / "peers.csv", index=False)
    back = pd.read_csv(tmp_path / "peers.csv")  # as make bench and the book's test read it
    text = report.render(back)
    assert text.count("\n| P") == len(back), "one table line per run"
    ratios = report.ratios(back)
    assert set(ratios) == {"P1", "P2"}
    peers_ran = bool(((back["library"] != "helpers") & (back["status"] == "ok")).any())
    for v in ratios.values():  # without peers only helpers' side exists, and the line says so
        assert math.isfinite(v["ratio"]) if peers_ran else "the peers' side" in v["note"], v
    assert "| dtype |" in text and "float64 throughout" not in text
    floors = report.floors(back)  # issue 15: the floor ratio of both problems, printed and on the appendix page
    assert set(floors) == {"P1", "P2"} and all(v["ratio"] > 0 for v in floors.values()), floors
    assert "**The floor**" in text and "**K-FAC and EK-FAC influence**" in text
    assert "**EK-FAC as a preconditioner of CG**" in text and "- P2: block CG" in text


def test_one_job_through_a_real_worker_process(tiny: dict[str, Any]) -> None:
    """The process boundary of make bench: worker.py as a script, arguments on its command line, helpers found
    from a fresh interpreter (``.venv/bin/python``)."""
    if not run.MAIN_PY.exists():
        pytest.skip(f"{run.MAIN_PY} missing (make test creates it)")
    job = next(j for j in tiny["jobs"] if j.problem == "P1" and j.method == "convex:exact")
    rows = run.run_job(job, tiny["references"][("P1", "reference")], 1, 30.0, 300.0, False, _quiet,
                       rows=tiny["where"] / "process_rows", launch=run.launch_process)
    assert len(rows) == 1 and rows[0]["status"] == "ok", _describe(rows[0])
    assert rows[0]["rel_error"] <= EXACT_ERROR and rows[0]["repeats"] == 1, _describe(rows[0])


def test_peers_not_installed_here_are_named(tiny: dict[str, Any]) -> None:
    missing = sorted({j.library for j in tiny["jobs"] if not _importable(j.library) and not j.skip})
    if missing:
        pytest.skip(f"peers not importable here, not checked: {', '.join(missing)} (captum, dattri: "
                    "pip install -e '.[bench]'; pyDVL runs only in .venv-pydvl)")


# ------------------------------------------------------------------------------------------------ no computing


def _fake_launch(errors: list[float]):
    """A launcher that writes, for ladder rung i (found by its options), reference × (1 + errors[i])."""

    def launch(job: run.Job, argv: list[str], timeout: float) -> tuple[int | None, str, str | None]:
        options = json.loads(argv[argv.index("--options") + 1])
        out = Path(argv[argv.index("--out") + 1])
        rung = job.ladder.index(options)
        np.save(out.with_suffix(".npy"), np.full((2, 3), 1.0 + errors[rung]))
        out.with_suffix(".json").write_text(json.dumps({
            "seconds": 1.0 + rung, "warmup_seconds": 1.0, "times": [1.0], "peak_mib": 1.0, "threads": 1,
            "info": {}, "loadavg_end": [0.0, 0.0, 0.0]}))
        return 0, "", None

    return launch


@pytest.mark.parametrize("errors, picked", [
    ([1e-3, 3e-6, 5e-7, 1e-8], [2, 1]),  # cheapest at 1e-6 and, cheaper, at 1e-5: both timed
    ([5e-7, 1e-7, 1e-8, 1e-9], [0]),  # the cheapest rung reaches both
    ([1e-3, 1e-4, 5e-5, 2e-5], [3]),  # neither: the most accurate, once
    ([1e-3, 8e-6, float("nan"), 1e-7], [3, 1]),  # a non-finite answer counts as the least accurate
])
def test_search_times_the_cheapest_rung_for_each_accuracy(tmp_path: Path, errors: list[float],
                                                          picked: list[int]) -> None:
    job = run.Job("P1", "pydvl", "CgInfluence", [{"rtol": float(i)} for i in range(4)], "cg", path=tmp_path / "P1.npz")
    rows = run.run_job(job, np.ones((2, 3)), 1, 30.0, 10.0, False, _quiet, rows=tmp_path, launch=_fake_launch(errors))
    assert [json.loads(r["options"])["rtol"] for r in rows] == [float(i) for i in picked]
    assert all(r["status"] == "ok" and r["dtype"] == "float64" for r in rows)


def _row(problem: str, library: str, method: str, dtype: str, seconds: float, error: float) -> dict[str, Any]:
    return {"date": "2026-12-01T00:00:00+00:00", "machine": "test", "wall_minutes": 1.0, "problem": problem,
            "library": library, "version": "v", "method": method, "family": "cg", "dtype": dtype, "options": "{}",
            "status": "ok", "seconds": seconds, "warmup_seconds": seconds, "repeats": 3, "peak_mib": 1.0,
            "rel_error": error, "pearson": 1.0, "spearman": 1.0, "scale": 1.0}


def test_report_compares_at_1e5_where_no_float32_peer_reaches_1e6() -> None:
    rows = [_row("P1", "helpers", "cg", "float64", 1.0, 5e-7), _row("P1", "helpers", "cg", "float64", 0.5, 6e-6),
            _row("P1", "pydvl", "CgInfluence", "float64", 8.0, 8e-7),
            _row("P1", "pydvl", "CgInfluence", "float32", 2.0, 4e-6),
            _row("P2", "helpers", "cg", "float64", 1.0, 5e-7), _row("P2", "pydvl", "CgInfluence", "float64", 9.0, 8e-7),
            _row("P2", "pydvl", "CgInfluence", "float32", 3.0, 9e-7)]
    df = pd.DataFrame(rows)
    loose = report.loose_ratios(df)
    assert set(loose) == {"P1"}  # on P2 a float32 peer run reached 1e-6: the 1e-6 ratio already counts it
    assert loose["P1"]["peer_seconds"] == 2.0 and loose["P1"]["helpers_seconds"] == 0.5
    assert loose["P1"]["ratio"] == pytest.approx(4.0)
    assert report.ratios(df)["P2"]["peer_seconds"] == 3.0  # both dtypes count at 1e-6
    text = report.render(df)
    assert "**P1 at rel. error ≤ 1e-5**" in text and "float32" in text
    # tables from before issue 15 (no dtype column) render without dtypes or the 1e-5 line
    old = report.render(df[df["dtype"] == "float64"].drop(columns="dtype"))
    assert "dtype" not in old and "1e-5" not in old and "float64 throughout" in old
