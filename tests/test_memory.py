"""helpers.memory: the budget, the chunk arithmetic, the measured activation bytes against closed forms, and a
measured peak: a dense Hessian assembled under a small budget stays within it, the same assembly in one vmap does
not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import memory

REPO = Path(__file__).resolve().parent.parent
DT = torch.float64


def test_budget_reads_book_memory_gb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(memory.ENV, raising=False)
    assert memory.budget() == int(memory.DEFAULT_FRACTION * memory.physical_memory())
    assert 0 < memory.physical_memory() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setenv(memory.ENV, "1.5")
    assert memory.budget() == int(1.5 * 2**30)
    for bad in ("zero", "-1", "0", "inf", "nan"):
        monkeypatch.setenv(memory.ENV, bad)
        with pytest.raises(ValueError, match="BOOK_MEMORY_GB=.* is not a positive number of gigabytes"):
            memory.budget()


def test_chunk_is_the_number_of_items_that_fit() -> None:
    assert memory.chunk(100, 10.0, budget_bytes=95) == 9
    assert memory.chunk(100, 10.0, budget_bytes=95, reserve=50) == 4
    assert memory.chunk(5, 10.0, budget_bytes=1e9) == 5  # never more than there are
    assert memory.chunk(100, 1e12, budget_bytes=10) == 1  # never less than one
    assert memory.chunk(7, 0.0, budget_bytes=10) == 7  # unknown size: all at once
    assert memory.gb(1.5 * 2**30) == "1.5 GB"


def test_saved_and_row_bytes_match_the_closed_form() -> None:
    """(x W)² summed: autograd saves the rows of x (for W's gradient) and x W (for the square); W needs no saving."""
    torch.manual_seed(0)
    w = torch.randn(7, 3, dtype=DT, requires_grad=True)
    x, y = torch.randn(20, 7, dtype=DT), torch.zeros(20)

    def f(xr, yr):
        return (xr @ w).pow(2).sum()

    assert memory.saved_bytes(lambda: f(x[:5], y[:5])) == 5 * 7 * 8 + 5 * 3 * 8 + 8  # + the scalar output
    assert memory.row_bytes(f, x, y) == (7 + 3) * 8
    # a model's per-sample losses: one linear layer and the cross-entropy over 3 classes
    model = torch.nn.Linear(7, 3).to(DT)
    rb = memory.model_row_bytes(model, dict(model.named_parameters()), x, torch.randint(3, (20,)))
    assert (7 + 3) * 8 <= rb <= (7 + 4 * 3) * 8  # the input row, the logits and a few softmax-sized tensors


_PEAK = r"""
import json, re, sys, torch, warnings
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
from helpers import models, memory
from helpers.curvature import hessian_operator
from helpers.objective import model_params, param_names

def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

def rss():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

torch.manual_seed(0)
model = models.small_cnn(1, 10, width=4, input_size=8, activation="tanh").double()
x, y = torch.randn(300, 64, dtype=torch.float64), torch.randint(10, (300,))
P = model_params(model, param_names(model))
op = hessian_operator(model, P, x, y, l2=0.01, linearize=False)
op2 = hessian_operator(model, P, x[:4], y[:4], l2=0.01, linearize=False)
op2.matmat(torch.eye(op.dim, dtype=torch.float64)[:, :2])  # warm-up: torch's one-off allocations
chunk = None if sys.argv[1] == "auto" else op.dim
base = rss()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
H = op.matmat(torch.eye(op.dim, dtype=torch.float64), chunk_size=chunk)
print(json.dumps({"peak": hwm() - base, "product_bytes": op.product_bytes, "column_chunk": op.column_chunk(op.dim),
                  "dim": op.dim, "budget": memory.budget()}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak reset needs Linux /proc")
def test_dense_assembly_stays_within_a_small_budget_that_one_vmap_would_exceed() -> None:
    """A small CNN's dense Hessian (358 columns over 300 rows) in a fresh process under BOOK_MEMORY_GB=0.25: assembled
    in the chunks the budget allows, its peak stays within the budget; assembled in one vmap over every column (what
    ran out of memory before), it exceeds the budget several times over — and the estimate per product that sets the
    chunks is an upper bound on what one product takes (measured / chunk)."""
    # glibc may keep freed blocks resident; returning them at once makes the peak the peak of live tensors
    env = dict(os.environ, BOOK_MEMORY_GB="0.25", MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=str(REPO))

    def run(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _PEAK, mode], env=env, capture_output=True, text=True,
                             cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    chunked, whole = run("auto"), run("whole")
    budget = chunked["budget"]
    assert budget == int(0.25 * 2**30) and 1 <= chunked["column_chunk"] < chunked["dim"]
    assert chunked["peak"] < budget, chunked
    assert whole["peak"] > 2 * budget, whole
    # the per-product estimate is conservative but not wildly so
    per_product = whole["peak"] / whole["dim"]
    assert per_product <= chunked["product_bytes"] <= 4 * per_product, (per_product, chunked["product_bytes"])
