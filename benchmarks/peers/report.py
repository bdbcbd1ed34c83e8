"""The peers table and the speed ratios, rendered from ``peers.csv`` (pandas only: the book's test reuses it).

:func:`render` turns the CSV of :mod:`benchmarks.peers.run` into the markdown that ``make bench`` prints and that
the appendix page ``book/peers.md`` includes from ``book/data/peers_table.md``; ``tests/test_peers_page.py``
checks that the committed table is exactly ``render(book/data/peers.csv)``.

Tables from before issue 15 have no ``dtype`` column (everything ran in float64): they render exactly as they
did then. With the column, the table shows each run's dtype, and where no float32 peer run reaches 1e-6 the
ratios are followed by the comparison at 1e-5 (:func:`loose_ratios`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

ACCURACY = 1e-6  # "full accuracy": the relative error both sides must reach for the speed ratio
LOOSE_ACCURACY = 1e-5  # the second comparison, where no float32 peer reaches ACCURACY (issue 15)
TARGET_RATIOS = {"P1": 2.0, "P2": 3.0}  # fastest peer / helpers at ACCURACY (issue 7: 2 on both; issue 15: 3 on P2)
SLOW_SECONDS = 30.0  # a method whose warm-up call takes longer is not called again: that call is its time
CAP_SECONDS = 240.0  # a worker process still running after this is stopped (the whole run must fit in an hour)
FAMILIES = {"lissa": "LiSSA", "arnoldi": "Arnoldi"}  # same settings in every library: compared one to one


def _setting(options: Any) -> str:
    if not isinstance(options, str) or not options:
        return ""
    return ", ".join(f"{k}={v}" for k, v in json.loads(options).items())


def _note(r: pd.Series) -> str:
    reps = int(r["repeats"])
    if r["family"] == "head-to-head":
        return f"head to head: median of {reps} processes, alternating with the other side"
    note = ("median of 3" if reps >= 3 else f"median of {reps}" if reps > 1 else
            "1 timed call" if reps == 1 else f"1 call (over {SLOW_SECONDS:.0f} s: not repeated)")
    searched = r.get("searched")
    if isinstance(searched, str) and searched:
        note += f"; ladder searched: {searched}"
    return note


def _power(x: float) -> str:
    """``1e-05`` → ``1e-5``, as the text writes accuracies."""
    return f"{x:.0e}".replace("e-0", "e-")


def _has_dtype(df: pd.DataFrame) -> bool:
    """Whether the table records each run's dtype (tables from before issue 15 do not: all float64)."""
    return "dtype" in df.columns


def _dtype(r: pd.Series) -> str:
    value = r.get("dtype")
    return value if isinstance(value, str) and value else "float64"


def table(df: pd.DataFrame) -> str:
    """One markdown line per run: (dtype,) time, peak memory, accuracy against the reference, the fitted scale."""
    with_dtype = _has_dtype(df)
    dtype_head, dtype_rule = ("dtype | ", "---|") if with_dtype else ("", "")
    lines = [f"| problem | library | method | {dtype_head}setting | time [s] | peak [MiB] | rel. error | Pearson "
             "| Spearman | scale | note |", f"|---|---|---|{dtype_rule}---|---:|---:|---:|---:|---:|---:|---|"]
    for _, r in df.iterrows():
        dtype = f"{_dtype(r)} | " if with_dtype else ""
        head = f"| {r['problem']} | {r['library']} {r['version']} | {r['method']} | {dtype}{_setting(r['options'])} "
        if r["status"] != "ok":
            lines.append(head + f"| – | – | – | – | – | – | {r['status']} |")
            continue
        acc = " ✓" if r["rel_error"] <= ACCURACY else ""
        peak = "–" if pd.isna(r["peak_mib"]) else f"{r['peak_mib']:.0f}"
        lines.append(head + f"| {r['seconds']:.2f} | {peak} | {r['rel_error']:.1e}{acc} | {r['pearson']:.6f} | "
                     f"{r['spearman']:.6f} | {r['scale']:.6f} | {_note(r)} |")
    return "\n".join(lines)


def _label(r: pd.Series) -> str:
    """``library method (setting, dtype)``; no dtype for tables from before issue 15."""
    parts = [p for p in (_setting(r["options"]), _dtype(r) if "dtype" in r.index else "") if p]
    return f"{r['library']} {r['method']}" + (f" ({', '.join(parts)})" if parts else "")


def ratios(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per problem: fastest peer / fastest helpers at equal accuracy.

    helpers' side: its fastest run with rel_error ≤ ACCURACY. The peers' side: their fastest run with
    rel_error ≤ ACCURACY — or, if no peer run reaches it, the fastest of the peers' most accurate results (the
    run(s) with the smallest error any peer reached), so that helpers is then both more accurate and faster.
    Times come from the head-to-head rows (the two re-timed alternately) when the run has them."""
    out: dict[str, dict[str, Any]] = {}
    ok = df[(df["status"] == "ok")]
    for problem in sorted(df["problem"].unique()):
        g = ok[ok["problem"] == problem]
        h2h = g[g["family"] == "head-to-head"]
        g = h2h if len(h2h) == 2 else g[g["family"] != "head-to-head"]
        h = g[(g["library"] == "helpers") & (g["rel_error"] <= ACCURACY)]
        peers = g[g["library"] != "helpers"]
        p = peers[peers["rel_error"] <= ACCURACY]
        equal = not p.empty
        if not equal and not peers.empty:
            p = peers[peers["rel_error"] <= 1.5 * peers["rel_error"].min()]  # the most accurate peer result(s)
        if h.empty or p.empty:
            side = "either side" if h.empty and p.empty else ("helpers' side" if h.empty else "the peers' side")
            out[problem] = {"ratio": math.nan, "note": f"no fully timed run at rel. error ≤ 1e-6 on {side}"}
            continue
        hb, pb = h.loc[h["seconds"].idxmin()], p.loc[p["seconds"].idxmin()]
        out[problem] = {"ratio": float(pb["seconds"] / hb["seconds"]), "equal_accuracy": equal,
                        "helpers": _label(hb), "helpers_seconds": float(hb["seconds"]),
                        "helpers_error": float(hb["rel_error"]), "peer": _label(pb),
                        "peer_seconds": float(pb["seconds"]), "peer_error": float(pb["rel_error"]),
                        "head_to_head": len(h2h) == 2}
        if str(hb["method"]).startswith("layer-wise"):
            # the same comparison with helpers' generic (autodiff) products only, from the ladder rows: what a
            # model the layer-wise backend does not cover would get
            rows = ok[(ok["problem"] == problem) & (ok["family"] != "head-to-head")]
            a = rows[(rows["library"] == "helpers") & rows["method"].str.startswith("autodiff")
                     & (rows["rel_error"] <= ACCURACY)]
            same = rows[(rows["library"] == pb["library"]) & (rows["method"] == pb["method"])
                        & (rows["rel_error"] <= ACCURACY)]
            if not a.empty and not same.empty:
                ab, sb = a.loc[a["seconds"].idxmin()], same.loc[same["seconds"].idxmin()]
                out[problem].update(autodiff=_label(ab), autodiff_seconds=float(ab["seconds"]),
                                    autodiff_error=float(ab["rel_error"]),
                                    autodiff_ratio=float(sb["seconds"] / ab["seconds"]))
    return out


def loose_ratios(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per problem where float32 peer runs exist and none reaches ACCURACY: the fastest peer run (either dtype) with
    rel_error ≤ LOOSE_ACCURACY against helpers' fastest run at that same accuracy (issue 15: a float32 peer is
    not left out of the comparison only because float32 cannot reach 1e-6). Empty for tables without dtypes.
    Head-to-head rows are left out: they re-time the 1e-6 pair only."""
    out: dict[str, dict[str, Any]] = {}
    if not _has_dtype(df):
        return out
    ok = df[(df["status"] == "ok") & (df["family"] != "head-to-head")]
    for problem in sorted(df["problem"].unique()):
        g = ok[ok["problem"] == problem]
        peers = g[g["library"] != "helpers"]
        f32 = peers[peers["dtype"] == "float32"]
        if f32.empty or (f32["rel_error"] <= ACCURACY).any():
            continue
        h = g[(g["library"] == "helpers") & (g["rel_error"] <= LOOSE_ACCURACY)]
        p = peers[peers["rel_error"] <= LOOSE_ACCURACY]
        if h.empty or p.empty:
            side = "either side" if h.empty and p.empty else ("helpers' side" if h.empty else "the peers' side")
            out[problem] = {"ratio": math.nan, "note": f"no run at rel. error ≤ {_power(LOOSE_ACCURACY)} on {side}",
                            "best_float32_error": float(f32["rel_error"].min())}
            continue
        hb, pb = h.loc[h["seconds"].idxmin()], p.loc[p["seconds"].idxmin()]
        out[problem] = {"ratio": float(pb["seconds"] / hb["seconds"]), "helpers": _label(hb),
                        "helpers_seconds": float(hb["seconds"]), "helpers_error": float(hb["rel_error"]),
                        "peer": _label(pb), "peer_seconds": float(pb["seconds"]), "peer_error": float(pb["rel_error"]),
                        "best_float32_error": float(f32["rel_error"].min())}
    return out


def families(df: pd.DataFrame) -> list[str]:
    """LiSSA and Arnoldi, one line each per problem: helpers' time and error against the fastest peer's with the
    same settings (target: helpers no slower at equal residual)."""
    out = []
    ok = df[(df["status"] == "ok")]
    for problem in sorted(df["problem"].unique()):
        for fam, name in FAMILIES.items():
            g = ok[(ok["problem"] == problem) & (ok["family"] == fam)]
            h, p = g[g["library"] == "helpers"], g[g["library"] != "helpers"]
            if h.empty or p.empty:
                out.append(f"- {problem} {name}: not measured on {'helpers' if h.empty else 'the peers'}' side.")
                continue
            hb, pb = h.loc[h["seconds"].idxmin()], p.loc[p["seconds"].idxmin()]
            verdict = "met" if hb["seconds"] <= pb["seconds"] else "not met"
            peer = pb["library"] + (f" ({_dtype(pb)})" if "dtype" in pb.index else "")
            out.append(f"- {problem} {name} (same settings everywhere): helpers {hb['seconds']:.2f} s at rel. error "
                       f"{hb['rel_error']:.2e}; fastest peer {peer} {pb['seconds']:.2f} s at "
                       f"{pb['rel_error']:.2e} (peers' errors {p['rel_error'].min():.2e}–{p['rel_error'].max():.2e}). "
                       f"helpers no slower: {verdict} (ratio {pb['seconds'] / hb['seconds']:.2f}).")
    return out


def floors(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per problem with a floor row (issue 15): helpers' fastest run at rel. error ≤ 1e-6 (head-to-head time when
    there is one) divided by the time of one pass of per-sample training gradients — the work no exact method
    avoids, so the ratio says how much of helpers' time is spent beyond it."""
    out: dict[str, dict[str, float]] = {}
    ok = df[df["status"] == "ok"]
    for problem in sorted(df["problem"].unique()):
        g = ok[(ok["problem"] == problem) & (ok["library"] == "helpers")]
        floor = g[g["family"] == "floor"]
        h2h = g[g["family"] == "head-to-head"]
        best = h2h if len(h2h) else g[(g["rel_error"] <= ACCURACY) & (g["family"] != "floor")]
        if floor.empty or best.empty:
            continue
        hb = best.loc[best["seconds"].idxmin()]
        out[problem] = {"floor_seconds": float(floor["seconds"].min()), "helpers_seconds": float(hb["seconds"]),
                        "ratio": float(hb["seconds"] / floor["seconds"].min()), "helpers": _label(hb)}
    return out


def preconditioning(df: pd.DataFrame) -> list[str]:
    """The EK-FAC-preconditioned CG against the same CG without it (issue 15): iterations and time at the rung
    each side timed for 1e-6."""
    out = []
    ok = df[(df["status"] == "ok") & (df["library"] == "helpers") & (df["family"] == "cg")]
    for problem in sorted(df["problem"].unique()):
        g = ok[ok["problem"] == problem]
        pre = g[g["method"].str.contains("preconditioned")]
        plain = g[g["method"].str.contains("float32 refinement") & ~g["method"].str.contains("preconditioned")
                  & g["method"].str.contains("autodiff")]
        if pre.empty or plain.empty:
            continue

        def best(rows: pd.DataFrame) -> pd.Series:
            accurate = rows[rows["rel_error"] <= ACCURACY]
            rows = accurate if len(accurate) else rows
            return rows.loc[rows["seconds"].idxmin()]

        a, b = best(plain), best(pre)
        its = "info_iterations" in df.columns
        count = (lambda r: f", {int(r['info_iterations'])} iterations") if its else (lambda r: "")
        out.append(f"- {problem}: block CG with float32 refinement {a['seconds']:.2f} s at {a['rel_error']:.1e}"
                   f"{count(a)}; preconditioned by EK-FAC {b['seconds']:.2f} s at {b['rel_error']:.1e}{count(b)} "
                   f"(time ratio {b['seconds'] / a['seconds']:.2f}).")
    return out


def kronecker_lines(df: pd.DataFrame) -> list[str]:
    """K-FAC / EK-FAC rows: time and error against the exact reference, helpers beside kronfluence."""
    out = []
    ok = df[(df["status"] == "ok") & df["family"].isin(["kfac", "ekfac"])]
    for problem in sorted(ok["problem"].unique()):
        parts = [f"{r['library']} {r['method']} [{_dtype(r)}] {r['seconds']:.2f} s, rel. error {r['rel_error']:.2f}, "
                 f"Pearson {r['pearson']:.3f}" for _, r in ok[ok["problem"] == problem].iterrows()]
        out.append(f"- {problem}: " + "; ".join(parts) + ".")
    return out


def render(df: pd.DataFrame) -> str:
    """The whole markdown block: date and machine line, table, ratio lines, LiSSA and Arnoldi lines."""
    first = df.iloc[0]
    loads = df["load_1min"].dropna() if "load_1min" in df else pd.Series(dtype=float)
    load = f"{loads.min():.1f}–{loads.max():.1f}" if len(loads) else "n/a"
    wall = f"; the whole run took {first['wall_minutes']:.0f} min" if "wall_minutes" in df else ""
    dtypes = ("helpers in float64 (its float32 refinement: products in float32, residuals and answer in float64), "
              "each peer method in the dtype of its row, every error against the float64 reference;"
              if _has_dtype(df) else "float64 throughout;")
    md = [f"Measured {first['date']} on {first['machine']}, **1 thread per method** in every library (1-minute "
          f"load average at the end of each run: {load}: other jobs shared the machine{wall}). {dtypes} "
          "time = median of 3 calls after a warm-up unless noted; ✓ = relative error ≤ 1e-6.", "", table(df), "",
          "**Speed at equal accuracy** (target: fastest peer / helpers ≥ "
          + ", ".join(f"{r:g} on {p}" for p, r in TARGET_RATIOS.items()) + "):", ""]
    loose = loose_ratios(df)
    for problem, v in ratios(df).items():
        if not math.isfinite(v["ratio"]):
            md.append(f"- **{problem}**: {v['note']}.")
            continue
        target = TARGET_RATIOS.get(problem, max(TARGET_RATIOS.values()))
        verdict = "met" if v["ratio"] >= target else "not met"
        how = ("re-timed head to head, alternating, median of 3 processes each" if v["head_to_head"]
               else "from the table")
        peer = (f"fastest peer at rel. error ≤ 1e-6: {v['peer']}, {v['peer_seconds']:.2f} s"
                if v["equal_accuracy"] else
                f"no peer reached 1e-6; fastest peer at the best accuracy the peers reached: {v['peer']}, "
                f"{v['peer_seconds']:.2f} s at rel. error {v['peer_error']:.1e} (the ratio compares that time with "
                "helpers' time at ≤ 1e-6: helpers is then both more accurate and faster)")
        md.append(f"- **{problem}**: {peer}; fastest {v['helpers']}, {v['helpers_seconds']:.2f} s at "
                  f"{v['helpers_error']:.1e} ({how}). Ratio fastest peer / helpers = **{v['ratio']:.2f}** "
                  f"(target ≥ {target:g}: {verdict}).")
        if "autodiff_ratio" in v:
            md.append(f"  With autodiff products only (no layer-wise MLP backend), helpers' fastest run in the table is "
                      f"{v['autodiff']}, {v['autodiff_seconds']:.2f} s at {v['autodiff_error']:.1e}; the same peer's "
                      f"table time over it: **{v['autodiff_ratio']:.2f}** (both from the ladder runs above, not "
                      "re-timed head to head).")
    for problem, v in loose.items():
        head = (f"- **{problem} at rel. error ≤ {_power(LOOSE_ACCURACY)}** (no float32 peer run reached 1e-6; the "
                f"best reached {v['best_float32_error']:.1e})")
        if not math.isfinite(v["ratio"]):
            md.append(f"{head}: {v['note']}.")
            continue
        md.append(f"{head}: fastest peer {v['peer']}, {v['peer_seconds']:.2f} s at {v['peer_error']:.1e}; fastest "
                  f"{v['helpers']}, {v['helpers_seconds']:.2f} s at {v['helpers_error']:.1e} (from the table). "
                  f"Ratio fastest peer / helpers = **{v['ratio']:.2f}**.")
    md += ["", "**LiSSA and Arnoldi** (target: helpers no slower than the fastest peer at equal residual):", ""]
    md += families(df)
    floor = floors(df)
    if floor:
        md += ["", "**The floor** (helpers' fastest time at rel. error ≤ 1e-6 / the time of one pass of per-sample "
               "training gradients, the work no exact method avoids):", ""]
        md += [f"- {problem}: {v['helpers_seconds']:.2f} s / {v['floor_seconds']:.2f} s = **{v['ratio']:.2f}** "
               f"({v['helpers']})." for problem, v in floor.items()]
    pre = preconditioning(df)
    if pre:
        md += ["", "**EK-FAC as a preconditioner of CG** (helpers' own factors of the same network):", ""] + pre
    kron = kronecker_lines(df)
    if kron:
        md += ["", "**K-FAC and EK-FAC influence** (approximations: their error against the exact answer):", ""]
        md += kron
    return "\n".join(md) + "\n"
