"""helpers.dispatch: serial, local processes and a 2-worker Dask LocalCluster give identical results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import dispatch


def small_fit(seed: int, width: int) -> np.ndarray:
    """A tiny seeded training run (module level, so it pickles to other processes)."""
    from helpers import data, models, train

    split = data.load("iris", seed=0, n_train=60, n_test=10)
    model = models.build("mlp", d_in=4, n_classes=3, depth=1, width=width, seed=seed, dtype=torch.float64)
    fitted = train.fit(train.Recipe(optimizer="adam", lr=1e-2, epochs=30, seed=seed), model, *split.train,
                       progress=False)
    return torch.cat([v.reshape(-1) for v in fitted.params.values()]).numpy()


TASKS = [{"seed": s, "width": w} for s in (0, 1) for w in (3, 5)]


def test_serial_and_dask_local_cluster_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    distributed = pytest.importorskip("dask.distributed", reason="install the dev extra (dask[distributed])")
    monkeypatch.delenv(dispatch.SCHEDULER_ENV, raising=False)
    serial = dispatch.run_many(small_fit, TASKS, progress=False)
    assert [r.shape for r in serial] == [(27,), (43,), (27,), (43,)]
    assert not np.array_equal(serial[0], serial[2])  # the seed matters
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        monkeypatch.setenv(dispatch.SCHEDULER_ENV, c.scheduler_address)
        on_cluster = dispatch.run_many(small_fit, TASKS, progress=False)
    for a, b in zip(serial, on_cluster):
        np.testing.assert_array_equal(a, b)


def test_local_processes_agree_and_errors_surface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.SCHEDULER_ENV, raising=False)
    serial = dispatch.run_many(small_fit, TASKS[:2], progress=False)
    parallel = dispatch.run_many(small_fit, TASKS[:2], n_jobs=2)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        dispatch.run_many(small_fit, [{"seed": 0, "width": 0}], progress=False)
    with pytest.raises(TypeError, match="one dict of keyword arguments per run"):
        dispatch.run_many(small_fit, [(0, 3)])
