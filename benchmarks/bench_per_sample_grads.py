"""Per-sample gradients: ``helpers.influence.per_sample_grads`` (vmap over grad) vs a Python loop of autograd.grad.

    python benchmarks/bench_per_sample_grads.py [--n 4000] [--dtype float32] [--device cpu] [--repeats 3]

A 784-64-10 ReLU MLP on ``n`` MNIST images from ``helpers.data.load("mnist5k")`` (random 784-dim data when that
loader is unavailable — the script says which). Prints both wall times (best of ``--repeats``), the speed-up and
whether it meets the 5× target, after checking that both give the same [n, d] matrix. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from helpers.influence import per_sample_grads  # noqa: E402
from helpers.objective import model_params  # noqa: E402

TARGET = 5.0


def load_inputs(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` rows of 784 features and labels in 0..9, and a word on where they came from."""
    try:
        from helpers.data import load

        split = load("mnist5k", seed=seed, n_train=n, dtype=dtype)
        x, y = split.x_train.reshape(split.n_train, -1), split.y_train
        if x.shape != (n, 784):
            raise ValueError(f"unexpected mnist5k shape {tuple(x.shape)}")
        return x, y, f"mnist5k via helpers.data.load ({n} training images)"
    except Exception as err:  # the benchmark measures autodiff, not data: any 784-dim input will do
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 784, generator=g, dtype=dtype)
        y = torch.randint(10, (n,), generator=g)
        return x, y, f"random N(0, 1) data ({type(err).__name__}: {err})"


def loop_grads(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The baseline: one forward and one autograd.grad per sample."""
    named = dict(model.named_parameters())
    params = [named[k] for k in names]
    rows = []
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def best_time(fn, repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    out, best = None, float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="number of samples")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--loop-repeats", type=int, default=2, help="runs of the (slow) loop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)

    x, y, source = load_inputs(args.n, dtype, args.seed)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).to(device=device, dtype=dtype)
    P = model_params(model)
    names = list(P)
    d = sum(p.numel() for p in P.values())

    per_sample_grads(model, P, x[:8], y[:8])  # warm-up: first-call overheads of torch.func
    loop_grads(model, names, x[:8], y[:8])
    t_vmap, G_vmap = best_time(lambda: per_sample_grads(model, P, x, y), args.repeats, device)
    t_loop, G_loop = best_time(lambda: loop_grads(model, names, x, y), args.loop_repeats, device)
    scale = float(G_loop.abs().max())
    err = float((G_vmap - G_loop).abs().max()) / scale

    ratio = t_loop / t_vmap
    print(f"data:   {source}")
    threads = torch.get_num_threads()
    print(f"model:  784-64-10 ReLU MLP, d = {d} parameters, {args.dtype} on {device}, {threads} threads")
    print(f"vmap:   {t_vmap:8.3f} s  (helpers.influence.per_sample_grads, best of {args.repeats})")
    print(f"loop:   {t_loop:8.3f} s  ({args.n} × torch.autograd.grad, best of {args.loop_repeats})")
    print(f"ratio:  {ratio:8.1f} ×  (target ≥ {TARGET:.0f}×: {'met' if ratio >= TARGET else 'NOT met'})")
    print(f"agreement: max |Δ| / max |g| = {err:.1e}")


if __name__ == "__main__":
    main()
