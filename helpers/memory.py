"""The memory budget of the engine's batched computations (``BOOK_MEMORY_GB``).

Batched autodiff holds the activations of everything it batches at once: ``vmap`` over the d columns of a dense
Hessian keeps d copies of a forward-over-reverse pass over the whole training set, ``vmap`` over k ensemble
members k forward/backward passes. This module says how much memory such a call may take and how many items (columns,
rows, members) fit in it; :mod:`helpers.curvature`, :mod:`helpers.influence`, :mod:`helpers.solvers` and
:mod:`helpers.train` cut their batches into chunks of that size.

* :func:`budget`: ``BOOK_MEMORY_GB`` (gigabytes of 2³⁰ bytes) if set, else :data:`DEFAULT_FRACTION` of the machine's
  physical memory (or of the container's limit, where one is set and lower).
* :func:`row_bytes`: the activation bytes one data row costs in a forward pass with autograd, *measured* (the
  tensors autograd saves for the backward pass, on two small batches, so that the weights' share cancels out).
* :func:`chunk`: how many items of a given size fit in the budget (at least one: a single item over budget is run
  anyway, and callers that can split further — rows of a Hessian-vector product — do so).

The multipliers (:data:`GRAD_FACTOR`, :data:`HVP_FACTOR`, :data:`JVP_FACTOR`) turn saved activations into the peak
of each kind of pass. They were measured (peak resident memory of the pass, one to sixteen columns or a chunk of
rows, divided by the saved bytes) on an MLP (64-64-64-10, tanh) and a small CNN (two 3×3 convolutions on 8×8 images)
over 2,000 rows: a Hessian-vector product 4.2–7.9, a forward-mode directional derivative 1.9–3.3, a per-sample
gradient up to 3.2; the constants sit in those ranges, on the safe side for wide batches, where the chunks matter.
``tests/test_memory.py`` checks that a dense Hessian assembled under a small budget stays within it, and that the
per-product estimate lies between 1 and 4 times what one product measurably takes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

ENV = "BOOK_MEMORY_GB"
#: share of physical memory the engine's batches may take when ``BOOK_MEMORY_GB`` is unset
DEFAULT_FRACTION = 0.25
#: peak memory of a reverse-mode gradient (forward saved + backward), per byte of saved activations
GRAD_FACTOR = 3.0
#: peak memory of one forward-over-reverse product (jvp of grad: primal and tangent, forward and backward)
HVP_FACTOR = 6.0
#: peak memory of one forward-mode directional derivative (primal and tangent, nothing saved for a backward pass)
JVP_FACTOR = 3.0

_GB = 2**30


def physical_memory() -> int:
    """Bytes of memory this process can use: physical RAM, or a lower cgroup (container) limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return int(total)


def budget() -> int:
    """Bytes one batched computation may take: ``BOOK_MEMORY_GB`` × 2³⁰, else a quarter of :func:`physical_memory`.

    Raises:
        ValueError: ``BOOK_MEMORY_GB`` is set but not a positive number.
    """
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return int(DEFAULT_FRACTION * physical_memory())
    try:
        gb = float(raw)
    except ValueError:
        gb = float("nan")
    if not (gb > 0 and math.isfinite(gb)):
        raise ValueError(f"{ENV}={raw!r} is not a positive number of gigabytes: set e.g. {ENV}=4, or unset it "
                         f"(default: {DEFAULT_FRACTION:.0%} of the machine's memory)")
    return int(gb * _GB)


def gb(n_bytes: float) -> str:
    """``"1.5 GB"``: bytes in gigabytes (2³⁰ bytes), two significant digits."""
    return f"{n_bytes / _GB:.2g} GB"


def chunk(n_items: int, item_bytes: float, *, budget_bytes: float | None = None, reserve: float = 0.0) -> int:
    """How many of ``n_items`` items of ``item_bytes`` each fit in the budget (less ``reserve`` bytes): in [1, n].

    Example: the columns of a dense Hessian at ``HVP_FACTOR · n · row_bytes`` each. One item is always allowed —
    a caller that can split an item further (rows of a product) checks ``item_bytes`` against the budget itself.
    """
    n_items = int(n_items)
    if n_items < 1:
        return 1
    room = (budget() if budget_bytes is None else float(budget_bytes)) - float(reserve)
    if not item_bytes > 0:
        return n_items
    return int(min(n_items, max(1, room // float(item_bytes))))


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass while ``fn()`` runs (its output included).

    ``fn`` must build a graph (its inputs require grad). Each saved tensor counts its own elements (a slice of a larger
    tensor counts the slice, not the whole storage); the same view saved twice counts once.
    """
    sizes: dict[tuple, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            key: tuple = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrapped subclasses)
            key = (id(t),)
        sizes[key] = t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return int(sum(sizes.values()) + out.numel() * out.element_size())


def row_bytes(loss_of_rows: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
              rows: tuple[int, int] = (2, 10)) -> float:
    """Activation bytes per data row of ``loss_of_rows(x_rows, y_rows)`` (a scalar of leaves that require grad).

    Measured with :func:`saved_bytes` on the first ``rows[0]`` and ``rows[1]`` rows of ``x``; the difference divided
    by the difference in rows, so that what does not grow with the batch (the weights autograd saves) cancels. Never
    less than the bytes of one input row. Cost: two forward passes on a few rows.
    """
    a, b = (min(int(r), x.shape[0]) for r in rows)
    if b <= a:
        per = saved_bytes(lambda: loss_of_rows(x[:b], y[:b])) / max(b, 1)
    else:
        sa = saved_bytes(lambda: loss_of_rows(x[:a], y[:a]))
        sb = saved_bytes(lambda: loss_of_rows(x[:b], y[:b]))
        per = (sb - sa) / (b - a)
    one_row = x[:1].numel() * x.element_size()
    return float(max(per, one_row))


def model_row_bytes(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, loss: str = "cross_entropy"
                    ) -> float:
    """:func:`row_bytes` of the per-sample losses of ``model`` at ``params`` (differentiated in ``params``)."""
    from helpers.objective import per_sample_losses

    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}

    def f(xr: Tensor, yr: Tensor) -> Tensor:
        return per_sample_losses(model, leaves, xr, yr, loss).sum()

    return row_bytes(f, x, y)
