"""Curvature products of an MLP: the layer-wise formulas of ``helpers.layered`` against traced autodiff.

    python benchmarks/bench_layered_products.py [--n 4000] [--width 64] [--columns 10] [--repeats 5] [--threads 1]

Benchmark P2's shape by default: a 784-64-10 tanh MLP on ``n`` rows of 784 features (random; a product's cost
does not depend on the values), its exact Hessian with λ = 1e-3. For float32 and float64 it builds both operators
(``hessian_operator(..., product="layers")`` and ``product="autodiff", linearize=True``), checks that they give the
same product, and prints each one's CPU time per ``--columns``-column product (best of ``--repeats``, process time,
so that other jobs on the machine disturb it little), the one-off cost of building each (the autodiff trace) and
the ratio — plus the per-sample directional derivatives of ``helpers.influence`` (layer-wise vs ``vmap`` of
``jvp``). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from helpers import models  # noqa: E402
from helpers.curvature import hessian_operator  # noqa: E402
from helpers.layered import layered_directional  # noqa: E402
from helpers.objective import model_params  # noqa: E402


def cpu_seconds(fn, repeats: int) -> float:
    """Best process time of ``repeats`` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's trace mentions torch.jit.script
    g = torch.Generator().manual_seed(0)
    print(f"784-{args.width}-10 tanh MLP, {args.n} rows, {args.columns} columns, {args.threads} thread(s); "
          "CPU seconds per product (best of repeats)")
    for dtype in (torch.float32, torch.float64):
        model = models.build("mlp", d_in=784, n_classes=10, depth=1, width=args.width, activation="tanh",
                             bias=True, dtype=dtype, seed=0)
        x = torch.randn(args.n, 784, generator=g).to(dtype)
        y = torch.randint(0, 10, (args.n,), generator=g)
        P = model_params(model)
        start = time.process_time()
        layers = hessian_operator(model, P, x, y, l2=1e-3, product="layers")
        built_layers = time.process_time() - start
        start = time.process_time()
        traced = hessian_operator(model, P, x, y, l2=1e-3, product="autodiff", linearize=True)
        built_traced = time.process_time() - start
        V = torch.randn(layers.dim, args.columns, generator=g).to(dtype)
        a, b = layers.matmat(V), traced.matmat(V)
        rel = float((a - b).norm() / b.norm())
        t_layers = cpu_seconds(lambda: layers.matmat(V), args.repeats)
        t_traced = cpu_seconds(lambda: traced.matmat(V), args.repeats)
        from helpers.influence import directional_derivatives as generic_dd

        t_dd_layers = cpu_seconds(lambda: layered_directional(model, P, x, y, V, "cross_entropy",
                                                                  max_bytes=2**31), args.repeats)
        t_dd_vmap = cpu_seconds(lambda: _vmap_directional(generic_dd, model, P, x, y, V), args.repeats)
        print(f"{str(dtype):14s} product: layer-wise {t_layers:.3f} s (built in {built_layers:.2f} s), traced autodiff "
              f"{t_traced:.3f} s (built and traced in {built_traced:.2f} s): ratio {t_traced / t_layers:.2f}; "
              f"relative difference {rel:.1e}")
        print(f"{'':14s} directional derivatives: layer-wise {t_dd_layers:.3f} s, vmap of jvp {t_dd_vmap:.3f} s: "
              f"ratio {t_dd_vmap / t_dd_layers:.2f}")


def _vmap_directional(generic_dd, model, P, x, y, V):
    """helpers.influence.directional_derivatives with its layer-wise path switched off (the vmap-of-jvp baseline)."""
    import helpers.influence as influence

    saved = influence.layered_directional
    influence.layered_directional = lambda *args, **kwargs: None
    try:
        return generic_dd(model, P, x, y, V)
    finally:
        influence.layered_directional = saved


if __name__ == "__main__":
    main()
