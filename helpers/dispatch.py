"""One function to run many independent runs (settings × repetitions): serial, local processes, or a cluster.

    results = run_many(train_one_setting, [{"depth": d, "seed": s} for d in depths for s in seeds])

* default: serial, in this process (joblib with ``n_jobs=1``) — what the book's default profile uses;
* ``n_jobs=k``: k local worker processes (joblib's loky backend);
* a Dask scheduler address, given as ``scheduler="tcp://host:8786"`` or in ``$BOOK_DASK_SCHEDULER``: the same
  runs go to a ``dask.distributed`` cluster (``pip install -e '.[cluster]'``).

Every backend returns the results in the order of ``tasks``, and a run computes the same numbers wherever
it runs (each task carries its own seed; nothing depends on which worker picks it up).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence, TypeVar

from joblib import Parallel, delayed
from helpers.progress import progress_bar

R = TypeVar("R")

SCHEDULER_ENV = "BOOK_DASK_SCHEDULER"


def scheduler_address(scheduler: str | None = None) -> str | None:
    """The Dask scheduler to use: the argument, else ``$BOOK_DASK_SCHEDULER``, else None (run locally)."""
    return scheduler or os.environ.get(SCHEDULER_ENV) or None


def run_many(fn: Callable[..., R], tasks: Sequence[dict[str, Any]], *, scheduler: str | None = None,
             n_jobs: int = 1, progress: bool = True, desc: str = "runs",
             on_result: Callable[[int, R], None] | None = None) -> list[R]:
    """``[fn(**task) for task in tasks]``, dispatched to the chosen backend; results in task order.

    Args:
        fn: a module-level function (it is pickled to reach other processes); keyword arguments only.
        tasks: one dict of keyword arguments per run.
        scheduler: Dask scheduler address (``"tcp://..."``), or None to use ``$BOOK_DASK_SCHEDULER`` if set.
        n_jobs: local worker processes when no scheduler is given (1 = serial in this process).
        progress: a tqdm bar over completed runs (every backend).
        on_result: ``on_result(i, result)`` is called in this process as soon as task i has finished (in
            completion order), e.g. to store each result of a long run so that an interruption loses only the
            runs in flight.

    Raises:
        ImportError: a scheduler was given but ``dask.distributed`` is not installed (names the install).
        The first exception a run raised, re-raised here (no silently missing results).
    """
    tasks = list(tasks)
    if not all(isinstance(t, dict) for t in tasks):
        raise TypeError("run_many takes one dict of keyword arguments per run, e.g. [{'seed': 0}, {'seed': 1}]")
    done = on_result if on_result is not None else (lambda i, r: None)
    address = scheduler_address(scheduler)
    if address is not None:
        return _run_dask(fn, tasks, address, progress, desc, done)
    bar = progress_bar(len(tasks), desc, progress and len(tasks) > 1, leave=True, delay=0)
    out: list[Any] = [None] * len(tasks)
    if n_jobs == 1:
        for i, task in enumerate(tasks):
            out[i] = fn(**task)
            done(i, out[i])
            bar.update(1)
    else:
        # loky processes; results arrive as they finish, tagged with their task index
        runs = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
            delayed(_indexed)(fn, i, task) for i, task in enumerate(tasks))
        for i, result in runs:
            out[i] = result
            done(i, result)
            bar.update(1)
    bar.close()
    return out


def _indexed(fn: Callable[..., R], i: int, task: dict[str, Any]) -> tuple[int, R]:
    return i, fn(**task)


def _run_dask(fn: Callable[..., R], tasks: list[dict[str, Any]], address: str, progress: bool,
              desc: str, done: Callable[[int, R], None]) -> list[R]:
    try:
        from dask.distributed import Client, as_completed
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"a Dask scheduler was given ({address}) but dask.distributed is not installed: "
            "run `.venv/bin/pip install -e '.[cluster]'` or unset " + SCHEDULER_ENV
        ) from err

    def call(task: dict[str, Any]) -> R:
        return fn(**task)

    with Client(address) as client:
        futures = client.map(call, tasks, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        bar = progress_bar(len(futures), desc, progress, leave=True, delay=0)
        out: list[Any] = [None] * len(tasks)
        for future in as_completed(futures):
            i = index[future.key]
            out[i] = future.result()  # re-raises the run's exception here
            done(i, out[i])
            bar.update(1)
        bar.close()
        return out
