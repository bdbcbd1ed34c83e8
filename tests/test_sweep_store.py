"""helpers.sweep_store: the paper-profile Iris sweeps kept in the repository, chunk by chunk.

Two things are checked: the store itself (write, read back, resume, refuse a chunk of another config) on a tiny
config, and that a committed chunk is what its code computes — one committed member is recomputed from its seed
and compared with the stored numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers import provenance, sweep_store
from helpers.experiments import nonconvex

TINY = nonconvex.IrisSweepConfig(depths=(1,), widths=(8,), depth_regimes=("l2", "l2_swa"), width_regimes=("bnn",),
                              last_layer_regimes=("l2",), reps=2, epochs=30, retrain_epochs=5, n_candidates=4,
                              dtype="float64")


def test_store_round_trip_and_resume(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep_store, "BLOCK", 1)
    tasks = TINY.chunks(1)
    first = tasks[0]
    result = nonconvex.run_iris_chunk(TINY, **first, cache=False)
    folder = sweep_store.write_chunk(first, result, TINY, wall_s=1.5, store=tmp_path, command="test")
    assert folder.name == "depth-plain-d1-r00-01" and sweep_store.is_stored(first, TINY, tmp_path)
    assert not sweep_store.is_stored(tasks[1], TINY, tmp_path)
    prov = json.loads((folder / "provenance.json").read_text())
    assert {"git_sha", "date", "machine", "wall_s", "command", "config", "task"} <= set(prov)
    # another config (e.g. other lengths) never reuses the stored chunk
    assert not sweep_store.is_stored(first, nonconvex.IrisSweepConfig(**{**TINY.__dict__, "epochs": 31}), tmp_path)
    back, table = sweep_store.load_stored(tmp_path, TINY)
    assert list(table["chunk"]) == ["depth-plain-d1-r00-01"] and table["wall_s"].tolist() == [1.5]
    # full precision survives the CSV round trip
    pd.testing.assert_frame_equal(back.runs, result.runs.reset_index(drop=True), check_dtype=False, rtol=0,
                                  atol=0)
    # a resumed run skips what is stored and adds the rest
    sweep_store.run(1, False, config=TINY, store=tmp_path, scheduler=None)
    assert all(sweep_store.is_stored(t, TINY, tmp_path) for t in tasks)
    assert len(sweep_store.load_stored(tmp_path, TINY)[1]) == len(tasks)


def test_a_committed_chunk_is_recomputed_from_its_seeds() -> None:
    """The cheapest committed chunk of the paper profile (the deterministic family at its smallest stored
    setting) that was computed on a machine rounding as this one does (:func:`helpers.provenance.
    numerics_fingerprint`), recomputed by the current code from its seeds, equals the committed numbers: every
    repetition of it, training state, truths and correlations."""
    config = sweep_store.paper_config()
    stored = [t for t in config.chunks(sweep_store.BLOCK) if sweep_store.is_stored(t, config)]
    assert stored, ("no chunk of the paper profile is committed under book/data/iris_paper: run "
                    "`python -m helpers.sweep_store run --commit`")
    here = [t for t in stored if not provenance.mismatch_note(sweep_store.stored_machine(t))]
    cheapest = min(here or stored, key=lambda t: (t["family"] == "bnn", t["sweep"] == "depth", t["values"]))
    note = provenance.mismatch_note(sweep_store.stored_machine(cheapest))
    again = sweep_store.recompute(cheapest, config)
    folder = sweep_store.STORE / sweep_store.chunk_name(cheapest)
    keys = ["sweep", "regime", "value", "rep"]
    for table, columns in (("models", ["floor_epoch", "test_loss", "train_loss", "grad_norm"]),
                           ("runs", ["spearman", "pearson", "delta_mean", "drift"])):
        saved = pd.read_csv(folder / f"{table}.csv.gz")
        new = getattr(again, table)
        extra = ["protocol", "estimator"] if table == "runs" else []
        merged = saved.merge(new, on=keys + extra, suffixes=("_saved", "_new"))
        assert len(merged) == len(new) == len(saved) > 0, f"the recomputed {table} rows differ from the stored ones"
        for c in columns:
            np.testing.assert_allclose(merged[f"{c}_new"], merged[f"{c}_saved"], rtol=1e-6, atol=1e-9,
                                       err_msg=f"{table}.{c} of the committed chunk {folder.name}. {note}"
                                       + ("Commit a chunk computed on this kind of machine (`python -m "
                                          "helpers.sweep_store run --commit`)." if note else ""))


def test_borrow_takes_the_same_members_and_refuses_another_protocol(tmp_path, monkeypatch) -> None:
    """A profile that cannot afford a regime reads the stored runs of its own settings, never another protocol's."""
    monkeypatch.setattr(sweep_store, "BLOCK", 1)
    monkeypatch.setattr(sweep_store, "paper_config", lambda: TINY)
    for task in TINY.chunks(1):
        r = nonconvex.run_iris_chunk(TINY, **task, cache=False)
        sweep_store.write_chunk(task, r, TINY, wall_s=0.0, store=tmp_path)
    small = nonconvex.IrisSweepConfig(**{**TINY.__dict__, "reps": 1, "depth_regimes": ("l2",)})
    got = sweep_store.borrow(small, ["bnn"], store=tmp_path)
    assert set(got.models["regime"]) == {"bnn"} and set(got.models["rep"]) == {0} and len(got.models) == 1
    assert set(got.runs["sweep"]) == {"width"} and len(got.history) > 0
    with pytest.raises(ValueError, match="differs in \\['epochs'\\]"):
        sweep_store.borrow(nonconvex.IrisSweepConfig(**{**TINY.__dict__, "epochs": 31}), ["bnn"], store=tmp_path)


def test_first_runs_the_settings_a_profile_borrows_longest_first() -> None:
    config = sweep_store.paper_config()
    order = sweep_store.first_of(sweep_store.parse_settings(["depth=1,2,4,8", "width=8,20,50"]), 5, ["bnn"])
    tasks = sorted(config.chunks(sweep_store.BLOCK), key=order)
    names = [sweep_store.chunk_name(t) for t in tasks[:8]]
    assert names[:7] == ["depth-bnn-d8-r00-05", "depth-bnn-d4-r00-05", "depth-bnn-d2-r00-05", "depth-bnn-d1-r00-05",
                         "width-bnn-w50-r00-05", "width-bnn-w20-r00-05", "width-bnn-w8-r00-05"]
    # then the usual order: the first block of every setting, cheap (plain, width) before expensive
    assert names[7] == "width-plain-w8-r00-05" and len(tasks) == len(config.chunks(sweep_store.BLOCK))
    with pytest.raises(ValueError, match="sweep=values"):
        sweep_store.parse_settings(["layers=1,2"])
