"""Where a number was computed: the machine, and how its floating-point kernels round.

Pinned numbers (``tests/data/smoke_records.json``, the committed sweep chunks of ``book/data/iris_paper``) are
reproduced bit for bit only where the arithmetic rounds the same way. It does not on every x86 CPU: PyTorch
dispatches its elementwise and reduction kernels on the CPU's vector width (AVX2 or AVX-512), and MKL picks its
matrix-product kernels and blockings by processor, so the same code and seeds give results that differ in the last
bits — and a long training run with a stopping rule turns those into another stopping epoch. Such differences are
not a change of method, but a pin cannot tell them from one. So each pin records :func:`numerics_fingerprint`,
a hash of the exact bits of a fixed set of the computations the book runs on, and a test comparing pins first says
whether this machine rounds as the pinning one did.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from typing import Any

import numpy as np
import torch


def _probe() -> list[torch.Tensor]:
    """The kernels behind the book's training and influence, in float32 and float64, on fixed inputs (matrix
    products, elementwise maps, reductions, a convolution; LAPACK's factorisations run on the same MKL, whose
    choice of kernels the matrix products already show).

    Inputs come from NumPy's generator (plain C, the same bits on every CPU) rather than ``torch.randn``, whose
    vectorised sampler is itself one of the kernels that differ."""
    rng = np.random.default_rng(20230611)
    out = []
    for dtype in (torch.float32, torch.float64):
        a = torch.as_tensor(rng.standard_normal((67, 131)), dtype=dtype)
        b = torch.as_tensor(rng.standard_normal((131, 45)), dtype=dtype)
        big = torch.as_tensor(rng.standard_normal((257, 300)), dtype=dtype)
        x = a @ b                                          # GEMM of awkward sizes (MKL)
        out += [x, big @ big.T, big.T @ big[:, :7],        # a blocked GEMM and a tall-skinny one
                torch.tanh(x), torch.exp(x / 10), torch.log_softmax(x, dim=1),   # vectorised elementwise
                x.sum(dim=0), big.sum(), (big * big).mean(dim=1)]                # reductions
    img = torch.as_tensor(rng.standard_normal((4, 1, 28, 28)), dtype=torch.float32)
    kernel = torch.as_tensor(rng.standard_normal((6, 1, 5, 5)), dtype=torch.float32)
    out.append(torch.nn.functional.conv2d(img, kernel, padding=2))                   # oneDNN / native conv
    return out


@functools.cache
def numerics_fingerprint() -> str:
    """Twelve hex digits naming how this machine rounds the book's kernels (see the module's docstring): equal on
    two machines when every probe gives the same bits; the torch version is part of it. The probe runs on one
    thread, so that the name depends on the CPU and the libraries, not on how a process set its thread count.
    Computed once per process (a few milliseconds)."""
    digest = hashlib.sha256(torch.__version__.encode())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in _probe():
            digest.update(t.detach().contiguous().numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    return digest.hexdigest()[:12]


def machine() -> dict[str, Any]:
    """The machine, as provenance: host, system, CPU model and core count, Python and torch versions, the vector
    width torch dispatches on, the threads it uses, and :func:`numerics_fingerprint`."""
    return {"node": platform.node(), "system": platform.platform(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "numerics": numerics_fingerprint()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mismatch_note(pinned: dict[str, Any] | None) -> str:
    """An empty string when ``pinned`` (a stored ``machine()`` dict) rounds as this machine does; otherwise a
    sentence saying the pins came from other arithmetic, for a failing comparison's message."""
    here = machine()
    if pinned and pinned.get("numerics") == here["numerics"]:
        return ""
    there = (f"{pinned.get('cpu', '?')}, {pinned.get('cpu_capability', '?')}, numerics {pinned['numerics']}"
             if pinned and pinned.get("numerics") else "a machine that recorded no numerics fingerprint")
    return (f"The pins were made on {there}; this machine ({here['cpu']}, {here['cpu_capability']}) has numerics "
            f"{here['numerics']}: its kernels round differently, so numbers that pass through long training runs "
            "differ without any change of code. ")
